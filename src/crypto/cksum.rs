//! The POSIX `cksum` CRC, streaming.

use std::fmt;

use crc::{Crc, Digest, Table, CRC_32_CKSUM};

static CKSUM: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_CKSUM);

/// Streaming POSIX `cksum` CRC (the first number `cksum FILE` prints).
///
/// `crc::CRC_32_CKSUM` covers the data bytes and the final inversion;
/// [`finalize`](Self::finalize) feeds the length bytes (least significant first,
/// while the remaining length is non-zero) before finalizing.
#[derive(Clone)]
pub struct Cksum {
    digest: Digest<'static, u32, Table<16>>,
    len: u64,
}

impl fmt::Debug for Cksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cksum").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Default for Cksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Cksum {
    /// A checksum over no bytes yet.
    pub fn new() -> Self {
        Cksum { digest: CKSUM.digest(), len: 0 }
    }

    /// Feed the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.digest.update(data);
        self.len += data.len() as u64;
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no bytes have been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The POSIX `cksum` value of all bytes fed.
    pub fn finalize(mut self) -> u32 {
        let bytes = self.len.to_le_bytes();
        let n = (u64::BITS - self.len.leading_zeros()).div_ceil(8) as usize;
        self.digest.update(&bytes[..n]);
        self.digest.finalize()
    }
}

/// POSIX `cksum` CRC of `data`.
pub fn cksum(data: &[u8]) -> u32 {
    let mut c = Cksum::new();
    c.update(data);
    c.finalize()
}
