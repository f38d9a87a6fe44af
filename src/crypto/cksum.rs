//! The POSIX `cksum` CRC, streaming.
//!
//! cksum's CRC-32/CKSUM is the most-significant-bit-first CRC of the
//! polynomial 0x04C11DB7 (register 0 at the start, inverted at the end),
//! over the data and then its length. The CRC-32 of zlib and Ethernet is the
//! least-significant-bit-first CRC of the same polynomial, and `crc32fast`
//! computes it with carry-less multiplication (PCLMULQDQ) on x86_64 or the
//! CRC32 instructions on ARMv8, chosen at run time (a slicing-by-16 table
//! elsewhere). Fed bytes whose bits are reversed, an LSB-first CRC runs the
//! MSB-first one with its register bit-reversed: so cksum here is
//! `crc32fast` over the bit-reversed bytes (reversed a few KiB at a time into
//! a buffer on the stack, in vector code: NEON's `rbit`, SSSE3's `pshufb`
//! when the CPU has it), with the register reversed back at the end.
//!
//! Why not a CRC crate with cksum built in: `crc`'s `Table<16>` runs at
//! 3.8-5.3 GB/s here, this at 11-19 GB/s (docs/PERFORMANCE.md, "8."); `crc-fast`,
//! the SIMD crate that knows CRC-32/CKSUM, adds 731 KB to the binary (its
//! tables for every CRC it knows are linked whatever one is used).
//!
//! The tests hold it equal to the reference (`crc`'s bytewise table) on
//! random lengths, alignments and splits.

use std::fmt;

/// Bytes bit-reversed at a time: a buffer on the stack that stays in L1.
const SCRATCH: usize = 4096;

/// Reverse the bits of every byte of `src` into `dst` (same length).
fn reverse_bits(src: &[u8], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU has SSSE3, checked just above.
        return unsafe { reverse_bits_ssse3(src, dst) };
    }
    reverse_bits_any(src, dst);
}

/// Vectorised by the compiler: SSE2 shifts and masks on x86_64 (11 GB/s
/// with the CRC here), one `rbit` per 16 bytes on ARMv8.
#[inline(always)]
fn reverse_bits_any(src: &[u8], dst: &mut [u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.reverse_bits();
    }
}

/// The same loop built for SSSE3: two `pshufb` table look-ups per 16 bytes
/// (18 GB/s with the CRC here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
unsafe fn reverse_bits_ssse3(src: &[u8], dst: &mut [u8]) {
    reverse_bits_any(src, dst);
}

/// Streaming POSIX `cksum` CRC (the first number `cksum FILE` prints).
#[derive(Clone)]
pub struct Cksum {
    /// `crc32fast`'s state over the bit-reversed bytes fed so far.
    crc: crc32fast::Hasher,
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
        // crc32fast resumes from a finished (inverted) CRC: !0 is a register
        // of 0, cksum's start.
        Cksum { crc: crc32fast::Hasher::new_with_initial(!0), len: 0 }
    }

    /// Feed the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.crc_update(data);
        self.len += data.len() as u64;
    }

    fn crc_update(&mut self, data: &[u8]) {
        let mut scratch = [0u8; SCRATCH];
        for piece in data.chunks(SCRATCH) {
            let reversed = &mut scratch[..piece.len()];
            reverse_bits(piece, reversed);
            self.crc.update(reversed);
        }
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no bytes have been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The POSIX `cksum` value of all bytes fed: the CRC goes on over the
    /// length bytes (least significant first, while the remaining length is
    /// non-zero), then its register, reversed back, is inverted.
    pub fn finalize(mut self) -> u32 {
        let bytes = self.len.to_le_bytes();
        let n = (u64::BITS - self.len.leading_zeros()).div_ceil(8) as usize;
        self.crc_update(&bytes[..n]);
        let register = !self.crc.finalize();
        !register.reverse_bits()
    }
}

/// The size and POSIX `cksum` of everything `src` yields, each piece also
/// written to `dst` (`io::sink()` to only read).
pub fn copy_with_cksum(
    src: &mut dyn std::io::Read,
    dst: &mut dyn std::io::Write,
) -> std::io::Result<(u64, u32)> {
    let mut sum = Cksum::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sum.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    Ok((sum.len(), sum.finalize()))
}

/// POSIX `cksum` CRC of `data`.
pub fn cksum(data: &[u8]) -> u32 {
    let mut c = Cksum::new();
    c.update(data);
    c.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crc::{Crc, Table, CRC_32_CKSUM};
    use proptest::prelude::*;

    /// The reference: the `crc` crate's bytewise CRC-32/CKSUM over the data
    /// and the length bytes, as `cksum` defines it.
    fn reference(data: &[u8]) -> u32 {
        let crc = Crc::<u32, Table<1>>::new(&CRC_32_CKSUM);
        let mut d = crc.digest();
        d.update(data);
        let mut len = data.len() as u64;
        while len != 0 {
            d.update(&[len as u8]);
            len >>= 8;
        }
        d.finalize()
    }

    /// `data` fed in the pieces that `cuts` (sorted positions) make.
    fn in_pieces(data: &[u8], cuts: &[usize]) -> (u64, u32) {
        let mut s = Cksum::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&data.len()]) {
            s.update(&data[from..to]);
            from = to;
        }
        (s.len(), s.finalize())
    }

    #[test]
    fn known_values() {
        // `printf '' | cksum`, `printf 'a' | cksum`, `printf '123456789' | cksum`.
        for (d, want) in [(&b""[..], 4294967295), (b"a", 1220704766), (b"123456789", 930766865)] {
            assert_eq!(cksum(d), want);
            assert_eq!(reference(d), want);
        }
    }

    /// Every byte's bits reversed, whichever loop the CPU gets, against a
    /// bit-by-bit reversal; at every length around the vector widths.
    #[test]
    fn bytes_are_bit_reversed() {
        let by_bits = |b: u8| (0..8).fold(0u8, |r, i| r | (((b >> i) & 1) << (7 - i)));
        let src: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        for len in 0..src.len() {
            let mut dst = vec![0u8; len];
            reverse_bits(&src[..len], &mut dst);
            let want: Vec<u8> = src[..len].iter().map(|&b| by_bits(b)).collect();
            assert_eq!(dst, want, "len {len}");
            reverse_bits_any(&src[..len], &mut dst);
            assert_eq!(dst, want, "len {len}, portable loop");
        }
    }

    /// Lengths around the SIMD paths' block sizes, the stack buffer's size
    /// and the 2^8, 2^16 length byte boundaries, at every alignment of the
    /// first 64 bytes.
    #[test]
    fn equal_to_the_reference_at_the_edges() {
        let buf: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let lens = [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 1023];
        let more = [1024, 4095, 4096, 4097, 8191, 8192, 8193, 65_535, 65_536, 65_537];
        for len in lens.into_iter().chain(more) {
            for off in 0..64 {
                let d = &buf[off..off + len];
                assert_eq!(cksum(d), reference(d), "len {len} offset {off}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random data, length and alignment, fed whole or in random pieces:
        /// the reference's value.
        #[test]
        fn equal_to_the_reference(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            off in 0usize..64,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let d = &data[off.min(data.len())..];
            let want = reference(d);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(d.len() + 1)).collect();
            at.sort_unstable();
            prop_assert_eq!(cksum(d), want);
            prop_assert_eq!(in_pieces(d, &at), (d.len() as u64, want));
        }
    }
}
