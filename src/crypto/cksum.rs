//! The POSIX `cksum` CRC, streaming.
//!
//! Two engines compute its CRC-32/CKSUM, one chosen at build time:
//!
//! * `crc`'s `Table<16>` (slicing-by-16), the default: about 3.4-3.8 GB/s
//!   here, small;
//! * `crc-fast` with `--features simd-crc`: carry-less multiplication
//!   (PCLMULQDQ / VPCLMULQDQ on x86_64, PMULL on the ARM boxes we target),
//!   chosen at run time, 10x and more faster (docs/PERFORMANCE.md, "cksum"),
//!   but +731 KB on the stripped binary, over its 2 MiB budget; opt-in.
//!
//! The tests hold both equal to the reference (`crc`'s bytewise table) on
//! random lengths, alignments and splits, whichever is built.

use std::fmt;

#[cfg(any(not(feature = "simd-crc"), test))]
use crc::{Crc, Table, CRC_32_CKSUM};

/// A streaming CRC-32/CKSUM over the data bytes (with the final inversion).
trait Engine: Clone {
    fn start() -> Self;
    fn update(&mut self, data: &[u8]);
    fn finish(self) -> u32;
}

#[cfg(any(not(feature = "simd-crc"), test))]
static TABLE16: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_CKSUM);

/// `crc`'s slicing-by-16 table.
#[cfg(any(not(feature = "simd-crc"), test))]
#[derive(Clone)]
struct Table16(crc::Digest<'static, u32, Table<16>>);

#[cfg(any(not(feature = "simd-crc"), test))]
impl Engine for Table16 {
    #[inline]
    fn start() -> Self {
        Table16(TABLE16.digest())
    }
    #[inline]
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    #[inline]
    fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// `crc-fast`'s SIMD CRC.
#[cfg(any(feature = "simd-crc", test))]
#[derive(Clone)]
struct Simd(crc_fast::Digest);

#[cfg(any(feature = "simd-crc", test))]
impl Engine for Simd {
    fn start() -> Self {
        Simd(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Cksum))
    }
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    fn finish(self) -> u32 {
        // A 32-bit CRC: the upper half of crc-fast's u64 is zero.
        self.0.finalize() as u32
    }
}

#[cfg(feature = "simd-crc")]
type Built = Simd;
#[cfg(not(feature = "simd-crc"))]
type Built = Table16;

/// The cksum of a stream on engine `E`: the CRC of the data, then of the
/// length bytes (least significant first, while the remaining length is
/// non-zero).
#[derive(Clone)]
struct Stream<E> {
    engine: E,
    len: u64,
}

impl<E: Engine> Stream<E> {
    #[inline]
    fn new() -> Self {
        Stream { engine: E::start(), len: 0 }
    }

    #[inline]
    fn update(&mut self, data: &[u8]) {
        self.engine.update(data);
        self.len += data.len() as u64;
    }

    #[inline]
    fn finalize(mut self) -> u32 {
        let bytes = self.len.to_le_bytes();
        let n = (u64::BITS - self.len.leading_zeros()).div_ceil(8) as usize;
        self.engine.update(&bytes[..n]);
        self.engine.finish()
    }
}

/// Streaming POSIX `cksum` CRC (the first number `cksum FILE` prints).
#[derive(Clone)]
pub struct Cksum(Stream<Built>);

impl fmt::Debug for Cksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cksum").field("len", &self.0.len).finish_non_exhaustive()
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
        Cksum(Stream::new())
    }

    /// Feed the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.0.len
    }

    /// Whether no bytes have been fed yet.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The POSIX `cksum` value of all bytes fed.
    pub fn finalize(self) -> u32 {
        self.0.finalize()
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

    fn one_shot<E: Engine>(data: &[u8]) -> u32 {
        let mut s = Stream::<E>::new();
        s.update(data);
        s.finalize()
    }

    /// `data` fed in the pieces that `cuts` (sorted positions) make.
    fn in_pieces<E: Engine>(data: &[u8], cuts: &[usize]) -> (u64, u32) {
        let mut s = Stream::<E>::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&data.len()]) {
            s.update(&data[from..to]);
            from = to;
        }
        (s.len, s.finalize())
    }

    #[test]
    fn known_values() {
        // `printf '' | cksum`, `printf 'a' | cksum`, `printf '123456789' | cksum`.
        for (d, want) in [(&b""[..], 4294967295), (b"a", 1220704766), (b"123456789", 930766865)] {
            assert_eq!(cksum(d), want);
            assert_eq!(reference(d), want);
            assert_eq!(one_shot::<Table16>(d), want);
            assert_eq!(one_shot::<Simd>(d), want);
        }
    }

    /// Lengths around the SIMD paths' block sizes and the 2^8, 2^16 length
    /// byte boundaries, at every alignment of the first 64 bytes.
    #[test]
    fn both_engines_equal_the_reference_at_the_edges() {
        let buf: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let lens = [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 1023];
        for len in lens.into_iter().chain([1024, 4096, 65_535, 65_536, 65_537]) {
            for off in 0..64 {
                let d = &buf[off..off + len];
                let want = reference(d);
                assert_eq!(one_shot::<Simd>(d), want, "crc-fast, len {len} offset {off}");
                assert_eq!(one_shot::<Table16>(d), want, "Table<16>, len {len} offset {off}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random data, length and alignment, fed whole or in random pieces:
        /// both engines give the reference's value.
        #[test]
        fn both_engines_equal_the_reference(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            off in 0usize..64,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let d = &data[off.min(data.len())..];
            let want = reference(d);
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(d.len() + 1)).collect();
            at.sort_unstable();
            prop_assert_eq!(cksum(d), want);
            prop_assert_eq!(in_pieces::<Simd>(d, &at), (d.len() as u64, want));
            prop_assert_eq!(in_pieces::<Table16>(d, &at), (d.len() as u64, want));
        }
    }
}
