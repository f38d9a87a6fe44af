//! Cryptographic primitives of protocol v3 (see `PROTOCOL.md`).
//!
//! Everything here is a pure function or state machine over byte slices; no I/O
//! happens in this module.
//!
//! * **Public keys**: clients send a DER X.509 `SubjectPublicKeyInfo` RSA key,
//!   sometimes followed by zero padding ([`parse_public_key`]).
//! * **Session keys**: a fresh 32-byte AES key ([`random_aes_key`]) is sent to the
//!   client encrypted with RSA-OAEP, SHA-1 or SHA-256 ([`encrypt_session_key`]).
//! * **File contents**: AES-256-CBC with an all-zero IV and PKCS#7 padding over the
//!   whole file. [`StreamDecryptor`] decrypts such a stream in O(1) memory, however
//!   the ciphertext is cut into pieces; [`StreamEncryptor`] is the client-side
//!   counterpart.
//! * **Checksum**: the POSIX `cksum` CRC of the plaintext ([`Cksum`], [`cksum`]).

use std::fmt;
use std::str::FromStr;

use aes::cipher::consts::U16;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use crc::{Crc, Digest, Table, CRC_32_CKSUM};
use rand::rngs::OsRng;
use rand::RngCore;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};

/// Length in bytes of the AES-256 session key.
pub const AES_KEY_LEN: usize = 32;
/// AES block size in bytes.
pub const BLOCK: usize = 16;

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

/// Smallest accepted RSA modulus, in bits.
const MIN_KEY_BITS: usize = 1024;
/// Largest accepted RSA modulus, in bits.
const MAX_KEY_BITS: usize = 4096;

// ---------------------------------------------------------------------------
// RSA
// ---------------------------------------------------------------------------

/// Hash function used by RSA-OAEP, both as the OAEP digest and for MGF1.
///
/// Parses from `"sha1"` / `"sha256"` (case-insensitive; `"sha-1"` and `"sha-256"`
/// are accepted too) and displays as `"sha1"` / `"sha256"`. The default is SHA-1,
/// which is what clients in the field use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OaepHash {
    /// SHA-1 (Crypto++ `RSAES_OAEP_SHA`, PyCryptodome's default).
    #[default]
    Sha1,
    /// SHA-256.
    Sha256,
}

impl OaepHash {
    fn padding(self) -> Oaep {
        match self {
            OaepHash::Sha1 => Oaep::new::<sha1::Sha1>(),
            OaepHash::Sha256 => Oaep::new::<sha2::Sha256>(),
        }
    }
}

impl FromStr for OaepHash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("sha1") || s.eq_ignore_ascii_case("sha-1") {
            Ok(OaepHash::Sha1)
        } else if s.eq_ignore_ascii_case("sha256") || s.eq_ignore_ascii_case("sha-256") {
            Ok(OaepHash::Sha256)
        } else {
            Err(format!("unknown OAEP hash {s:?} (expected \"sha1\" or \"sha256\")"))
        }
    }
}

impl fmt::Display for OaepHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OaepHash::Sha1 => "sha1",
            OaepHash::Sha256 => "sha256",
        })
    }
}

/// Why a client's public key field was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// Not a well-formed DER `SubjectPublicKeyInfo` RSA key (optionally followed
    /// by zero bytes only).
    Malformed,
    /// A well-formed RSA key whose modulus size (in bits) is outside 1024..=4096.
    BadSize(usize),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Malformed => f.write_str("malformed RSA public key"),
            KeyError::BadSize(bits) => {
                write!(f, "RSA key of {bits} bits (accepted: {MIN_KEY_BITS} to {MAX_KEY_BITS} bits)")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// Total length (header + contents) of the DER element starting at `field[0]`,
/// which must be a SEQUENCE. Short and long (up to 4 length bytes) forms.
fn der_sequence_len(field: &[u8]) -> Option<usize> {
    let (&tag, rest) = field.split_first()?;
    if tag != 0x30 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return 2usize.checked_add(usize::from(first));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 || rest.len() < n {
        // 0x80 is the (BER-only) indefinite form; more than 4 length bytes
        // cannot describe anything that fits in a packet.
        return None;
    }
    let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    len.checked_add(2 + n)
}

/// Bit length of a big-endian unsigned integer.
fn bit_len(be: &[u8]) -> usize {
    let be = match be.iter().position(|&b| b != 0) {
        Some(i) => &be[i..],
        None => return 0,
    };
    be.len() * 8 - be[0].leading_zeros() as usize
}

/// Modulus size in bits of a DER `SubjectPublicKeyInfo` holding an RSA key,
/// without the size limits `rsa` applies on decoding.
fn spki_modulus_bits(der: &[u8]) -> Option<usize> {
    let spki = rsa::pkcs8::SubjectPublicKeyInfoRef::try_from(der).ok()?;
    let key = rsa::pkcs1::RsaPublicKey::try_from(spki.subject_public_key.as_bytes()?).ok()?;
    Some(bit_len(key.modulus.as_bytes()))
}

/// Parse a client's public key field.
///
/// The field holds a DER X.509 `SubjectPublicKeyInfo` RSA key, possibly followed by
/// zero padding (some clients pad the field). The DER length is taken from the outer
/// SEQUENCE header (short or long form); every byte after it must be zero. Moduli
/// of 1024 to 4096 bits are accepted, others give [`KeyError::BadSize`].
///
/// Returns the key and its exact DER encoding (without the padding), for storage.
pub fn parse_public_key(field: &[u8]) -> Result<(RsaPublicKey, Vec<u8>), KeyError> {
    let len = der_sequence_len(field).ok_or(KeyError::Malformed)?;
    if len > field.len() {
        return Err(KeyError::Malformed);
    }
    let (der, padding) = field.split_at(len);
    if padding.iter().any(|&b| b != 0) {
        return Err(KeyError::Malformed);
    }
    // Size check first: `rsa` refuses moduli over 4096 bits with an error that
    // does not say so.
    let bits = spki_modulus_bits(der).ok_or(KeyError::Malformed)?;
    if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
        return Err(KeyError::BadSize(bits));
    }
    let key = RsaPublicKey::from_public_key_der(der).map_err(|_| KeyError::Malformed)?;
    let bits = key.n().bits();
    if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
        return Err(KeyError::BadSize(bits));
    }
    Ok((key, der.to_vec()))
}

/// Encrypt a session key to `key` with RSA-OAEP (`hash` for both the OAEP digest
/// and MGF1, empty label), using the OS random number generator.
pub fn encrypt_session_key(
    key: &RsaPublicKey,
    aes_key: &[u8; AES_KEY_LEN],
    hash: OaepHash,
) -> Result<Vec<u8>, rsa::Error> {
    key.encrypt(&mut OsRng, hash.padding(), aes_key)
}

/// Client-side inverse of [`encrypt_session_key`] (blinded RSA decryption).
///
/// Fails if the ciphertext does not decrypt or the plaintext is not 32 bytes.
pub fn decrypt_session_key(
    key: &RsaPrivateKey,
    ct: &[u8],
    hash: OaepHash,
) -> Result<[u8; AES_KEY_LEN], rsa::Error> {
    let plain = key.decrypt_blinded(&mut OsRng, hash.padding(), ct)?;
    <[u8; AES_KEY_LEN]>::try_from(plain.as_slice()).map_err(|_| rsa::Error::Decryption)
}

/// A fresh random AES-256 key from the OS random number generator.
pub fn random_aes_key() -> [u8; AES_KEY_LEN] {
    let mut key = [0u8; AES_KEY_LEN];
    OsRng.fill_bytes(&mut key);
    key
}

// ---------------------------------------------------------------------------
// AES-256-CBC, zero IV, PKCS#7
// ---------------------------------------------------------------------------

/// Ciphertext length of a plaintext of `plain_len` bytes under PKCS#7 padding:
/// `(plain_len / 16 + 1) * 16` (saturating at `u64::MAX`, far beyond any file).
pub fn ciphertext_len(plain_len: u64) -> u64 {
    (plain_len / BLOCK as u64 + 1).saturating_mul(BLOCK as u64)
}

/// Decryption failed: the ciphertext was empty, not a whole number of blocks, or
/// its padding was invalid. Deliberately carries no detail, so that the server
/// cannot serve as a padding oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaddingError;

impl fmt::Display for PaddingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("decryption failed")
    }
}

impl std::error::Error for PaddingError {}

/// Streaming AES-256-CBC decryptor (zero IV, PKCS#7 padding) for a ciphertext
/// that arrives in arbitrary pieces; piece boundaries need not fall on blocks.
///
/// Memory use is constant: at most 15 carried ciphertext bytes and one
/// held-back plaintext block (the last block seen so far, which may be the one
/// holding the padding). No call allocates.
///
/// Usage:
///
/// ```text
/// let mut dec = StreamDecryptor::new(&key);
/// for piece in pieces {                    // piece: &mut [u8], any length
///     dec.update(piece, |plain| sink(plain));
/// }
/// dec.finish(|plain| sink(plain))?;        // Err(PaddingError) on bad input
/// ```
///
/// The plaintext handed to the callbacks, concatenated in call order, is the
/// plaintext of the stream; it is only complete, and only trustworthy as a
/// whole, once `finish` has returned `Ok`.
pub struct StreamDecryptor {
    cipher: Aes256CbcDec,
    /// Ciphertext bytes of an incomplete block, `carry[..carry_len]`.
    carry: [u8; BLOCK],
    carry_len: usize,
    /// The last decrypted block, not yet emitted (valid if `has_held`).
    held: [u8; BLOCK],
    has_held: bool,
    seen: u64,
}

impl fmt::Debug for StreamDecryptor {
    // Deliberately shows no key or data material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamDecryptor")
            .field("ciphertext_seen", &self.seen)
            .field("carried", &self.carry_len)
            .field("held_block", &self.has_held)
            .finish_non_exhaustive()
    }
}

impl StreamDecryptor {
    /// A decryptor for AES-256-CBC with `key` and an all-zero IV.
    pub fn new(key: &[u8; AES_KEY_LEN]) -> Self {
        StreamDecryptor {
            cipher: Aes256CbcDec::new(key.into(), &[0u8; BLOCK].into()),
            carry: [0; BLOCK],
            carry_len: 0,
            held: [0; BLOCK],
            has_held: false,
            seen: 0,
        }
    }

    /// Feed the next piece of ciphertext.
    ///
    /// `data` is decrypted **in place** (its contents are unspecified afterwards)
    /// and `emit` is called zero or more times with the plaintext that is now final,
    /// in stream order. The slices point into `data` or into the decryptor's
    /// internal storage. The last complete block seen is held back (it may be
    /// padding) and a trailing partial block is carried to the next call.
    ///
    /// Whole runs of blocks are decrypted with one call into the cipher, so the
    /// hardware AES pipeline is used; a call emits at most three slices.
    pub fn update(&mut self, data: &mut [u8], mut emit: impl FnMut(&[u8])) {
        self.seen += data.len() as u64;
        let mut rest = data;

        // Complete a carried partial block first.
        if self.carry_len > 0 {
            let take = (BLOCK - self.carry_len).min(rest.len());
            let (head, tail) = rest.split_at_mut(take);
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(head);
            self.carry_len += take;
            rest = tail;
            if self.carry_len < BLOCK {
                return;
            }
            self.cipher.decrypt_block_mut((&mut self.carry).into());
            self.carry_len = 0;
            if self.has_held {
                emit(&self.held);
            }
            self.held = self.carry;
            self.has_held = true;
        }

        // Decrypt all whole blocks of the piece in one batch.
        let whole = rest.len() - rest.len() % BLOCK;
        let (blocks, tail) = rest.split_at_mut(whole);
        if !blocks.is_empty() {
            let (chunks, _) = InOutBuf::from(&mut *blocks).into_chunks::<U16>();
            self.cipher.decrypt_blocks_inout_mut(chunks);
            if self.has_held {
                emit(&self.held);
            }
            let (ready, last) = blocks.split_at(whole - BLOCK);
            if !ready.is_empty() {
                emit(ready);
            }
            self.held.copy_from_slice(last);
            self.has_held = true;
        }

        // Carry the partial block.
        self.carry[..tail.len()].copy_from_slice(tail);
        self.carry_len = tail.len();
    }

    /// End of stream: check that no partial block is left over and that the
    /// held-back block ends in valid PKCS#7 padding (pad value 1..=16, all pad
    /// bytes equal), then emit its unpadded remainder (if not empty).
    ///
    /// An empty stream is an error. Errors carry no detail.
    pub fn finish(self, mut emit: impl FnMut(&[u8])) -> Result<(), PaddingError> {
        if self.carry_len != 0 || !self.has_held {
            return Err(PaddingError);
        }
        let pad = self.held[BLOCK - 1];
        // Check without data-dependent branches on the pad bytes.
        let mut bad = u8::from(pad == 0) | u8::from(usize::from(pad) > BLOCK);
        for (i, &b) in self.held.iter().enumerate() {
            let in_pad = u8::from(i >= BLOCK.saturating_sub(usize::from(pad)));
            bad |= in_pad & u8::from(b != pad);
        }
        if bad != 0 {
            return Err(PaddingError);
        }
        let keep = BLOCK - usize::from(pad);
        if keep > 0 {
            emit(&self.held[..keep]);
        }
        Ok(())
    }

    /// Total ciphertext bytes fed so far.
    pub fn ciphertext_seen(&self) -> u64 {
        self.seen
    }
}

/// Streaming AES-256-CBC encryptor (zero IV, PKCS#7 padding), the client-side
/// counterpart of [`StreamDecryptor`].
///
/// [`update`](Self::update) appends the ciphertext of all complete blocks to
/// `out` and carries a partial block; [`finish`](Self::finish) appends the final
/// padded block. No call allocates except by growing `out`.
pub struct StreamEncryptor {
    cipher: Aes256CbcEnc,
    /// Plaintext bytes of an incomplete block, `buf[..buf_len]`.
    buf: [u8; BLOCK],
    buf_len: usize,
    seen: u64,
}

impl fmt::Debug for StreamEncryptor {
    // Deliberately shows no key or data material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamEncryptor")
            .field("plaintext_seen", &self.seen)
            .field("carried", &self.buf_len)
            .finish_non_exhaustive()
    }
}

impl StreamEncryptor {
    /// An encryptor for AES-256-CBC with `key` and an all-zero IV.
    pub fn new(key: &[u8; AES_KEY_LEN]) -> Self {
        StreamEncryptor {
            cipher: Aes256CbcEnc::new(key.into(), &[0u8; BLOCK].into()),
            buf: [0; BLOCK],
            buf_len: 0,
            seen: 0,
        }
    }

    /// Encrypt the next piece of plaintext, appending the ciphertext of every
    /// block completed so far to `out`.
    pub fn update(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        self.seen += plain.len() as u64;
        let mut rest = plain;

        if self.buf_len > 0 {
            let take = (BLOCK - self.buf_len).min(rest.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&rest[..take]);
            self.buf_len += take;
            rest = &rest[take..];
            if self.buf_len < BLOCK {
                return;
            }
            self.cipher.encrypt_block_mut((&mut self.buf).into());
            out.extend_from_slice(&self.buf);
            self.buf_len = 0;
        }

        let whole = rest.len() - rest.len() % BLOCK;
        if whole > 0 {
            let start = out.len();
            out.extend_from_slice(&rest[..whole]);
            let (chunks, _) = InOutBuf::from(&mut out[start..]).into_chunks::<U16>();
            self.cipher.encrypt_blocks_inout_mut(chunks);
        }

        let tail = &rest[whole..];
        self.buf[..tail.len()].copy_from_slice(tail);
        self.buf_len = tail.len();
    }

    /// Pad (PKCS#7) and encrypt the final block, appending it to `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        let pad = BLOCK - self.buf_len; // 1..=16
        self.buf[self.buf_len..].fill(pad as u8);
        self.cipher.encrypt_block_mut((&mut self.buf).into());
        out.extend_from_slice(&self.buf);
    }

    /// Total plaintext bytes fed so far.
    pub fn plaintext_seen(&self) -> u64 {
        self.seen
    }
}

/// Encrypt a whole buffer with AES-256-CBC, zero IV, PKCS#7 padding.
pub fn encrypt_all(key: &[u8; AES_KEY_LEN], plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(plain.len() - plain.len() % BLOCK + BLOCK);
    let mut enc = StreamEncryptor::new(key);
    enc.update(plain, &mut out);
    enc.finish(&mut out);
    out
}

// ---------------------------------------------------------------------------
// POSIX cksum
// ---------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::RngCore;
    use rsa::pkcs8::EncodePublicKey;
    use std::io::Write;
    use std::process::Command;

    fn key_from(seed: u8) -> [u8; 32] {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
        k
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8).collect()
    }

    /// Decrypt `ct` fed in pieces of the given sizes (cycled); the rest in one go.
    fn decrypt_split(key: &[u8; 32], ct: &[u8], sizes: &[usize]) -> Result<Vec<u8>, PaddingError> {
        let mut buf = ct.to_vec();
        let mut dec = StreamDecryptor::new(key);
        let mut out = Vec::new();
        let mut rest = &mut buf[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = if sizes.is_empty() { rest.len() } else { sizes[i % sizes.len()].min(rest.len()) };
            i += 1;
            let (piece, tail) = rest.split_at_mut(n);
            dec.update(piece, |p| out.extend_from_slice(p));
            rest = tail;
        }
        assert_eq!(dec.ciphertext_seen(), ct.len() as u64);
        dec.finish(|p| out.extend_from_slice(p))?;
        Ok(out)
    }

    fn system_cksum(bytes: &[u8]) -> u32 {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        f.flush().expect("flush");
        let out = Command::new("cksum").arg(f.path()).output().expect("run cksum");
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).expect("utf8");
        text.split_whitespace().next().expect("cksum output").parse().expect("number")
    }

    #[test]
    fn cksum_known_values() {
        assert_eq!(cksum(b""), 4_294_967_295);
        assert_eq!(Cksum::new().finalize(), 4_294_967_295);
        // `printf '123456789' | cksum` on GNU coreutils.
        assert_eq!(cksum(b"123456789"), 930_766_865);
    }

    #[test]
    fn cksum_matches_system_binary() {
        let inputs: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"a".to_vec(),
            b"123456789\n".to_vec(),
            b"hello, world\n".to_vec(),
            data(255),
            data(256),
            data(65_536 + 3),
            vec![0u8; 70_000],
            data(1 << 20),
        ];
        for input in &inputs {
            assert_eq!(cksum(input), system_cksum(input), "length {}", input.len());
        }
    }

    #[test]
    fn cksum_streaming_and_len() {
        let d = data(5000);
        let mut c = Cksum::default();
        assert!(c.is_empty());
        for chunk in d.chunks(7) {
            c.update(chunk);
        }
        assert_eq!(c.len(), 5000);
        assert_eq!(c.finalize(), cksum(&d));
    }

    #[test]
    fn ciphertext_len_formula() {
        assert_eq!(ciphertext_len(0), 16);
        assert_eq!(ciphertext_len(15), 16);
        assert_eq!(ciphertext_len(16), 32);
        assert_eq!(ciphertext_len(17), 32);
        assert_eq!(ciphertext_len(u64::from(u32::MAX)), 4_294_967_296);
        assert_eq!(ciphertext_len(u64::from(u32::MAX) - 15), 4_294_967_296);
    }

    #[test]
    fn encrypt_matches_cbc_reference() {
        // Compare with the block-mode crate's own padded encryption.
        use aes::cipher::block_padding::Pkcs7;
        let key = key_from(9);
        for len in [0usize, 1, 15, 16, 17, 100] {
            let plain = data(len);
            let reference =
                Aes256CbcEnc::new((&key).into(), &[0u8; 16].into()).encrypt_padded_vec_mut::<Pkcs7>(&plain);
            assert_eq!(encrypt_all(&key, &plain), reference, "len {len}");
        }
    }

    #[test]
    fn round_trip_various_lengths_and_splits() {
        let key = key_from(1);
        let splits: [&[usize]; 8] = [&[], &[1], &[2], &[15], &[16], &[17], &[3, 29, 1, 64, 100], &[1024]];
        for len in [0usize, 1, 15, 16, 17, 1000, 65_536 + 3] {
            let plain = data(len);
            let ct = encrypt_all(&key, &plain);
            assert_eq!(ct.len() as u64, ciphertext_len(len as u64));
            for sizes in splits {
                assert_eq!(
                    decrypt_split(&key, &ct, sizes).as_deref(),
                    Ok(&plain[..]),
                    "len {len} sizes {sizes:?}"
                );
            }
        }
    }

    #[test]
    fn stream_encryptor_split_equals_whole() {
        let key = key_from(2);
        let plain = data(1000);
        let whole = encrypt_all(&key, &plain);
        for step in [1usize, 5, 16, 33] {
            let mut enc = StreamEncryptor::new(&key);
            let mut out = Vec::new();
            for chunk in plain.chunks(step) {
                enc.update(chunk, &mut out);
            }
            assert_eq!(enc.plaintext_seen(), 1000);
            enc.finish(&mut out);
            assert_eq!(out, whole, "step {step}");
        }
    }

    #[test]
    fn finish_rejects_bad_streams() {
        let key = key_from(3);
        // Empty stream.
        assert_eq!(decrypt_split(&key, &[], &[]), Err(PaddingError));
        let ct = encrypt_all(&key, &data(100));
        // Truncated: partial block, and one whole block short.
        assert_eq!(decrypt_split(&key, &ct[..ct.len() - 1], &[7]), Err(PaddingError));
        assert_eq!(decrypt_split(&key, &ct[..ct.len() - 16], &[]), Err(PaddingError));
        // Flipped final byte: bad padding (pad byte becomes garbage).
        let mut bad = ct.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert_eq!(decrypt_split(&key, &bad, &[]), Err(PaddingError));
        // Wrong key.
        assert_eq!(decrypt_split(&key_from(4), &ct, &[]), Err(PaddingError));
        assert_eq!(PaddingError.to_string(), "decryption failed");
    }

    #[test]
    fn finish_checks_every_pad_byte() {
        // Build final blocks with chosen plaintext and no padding of our own by
        // encrypting whole blocks then dropping the encryptor's padding block.
        let key = key_from(5);
        let raw = |block: [u8; 16]| {
            let mut enc = StreamEncryptor::new(&key);
            let mut out = Vec::new();
            enc.update(&block, &mut out);
            out
        };
        let mut good = [0xAAu8; 16];
        good[12..].fill(4);
        assert_eq!(decrypt_split(&key, &raw(good), &[]), Ok(vec![0xAA; 12]));
        assert_eq!(decrypt_split(&key, &raw([16; 16]), &[]), Ok(vec![]));
        let mut wrong = good;
        wrong[12] = 5;
        assert_eq!(decrypt_split(&key, &raw(wrong), &[]), Err(PaddingError));
        let mut zero = good;
        zero[15] = 0;
        assert_eq!(decrypt_split(&key, &raw(zero), &[]), Err(PaddingError));
        assert_eq!(decrypt_split(&key, &raw([17; 16]), &[]), Err(PaddingError));
    }

    fn rng() -> rand::rngs::OsRng {
        rand::rngs::OsRng
    }

    #[test]
    fn public_keys_and_oaep() {
        let priv65537 = RsaPrivateKey::new(&mut rng(), 1024).expect("keygen");
        let der = priv65537.to_public_key().to_public_key_der().expect("der").into_vec();
        assert_eq!(der.len(), 162);

        let (pk, stored) = parse_public_key(&der).expect("plain key");
        assert_eq!(stored, der);
        assert_eq!(pk, priv65537.to_public_key());

        let mut padded = der.clone();
        padded.extend_from_slice(&[0u8; 40]);
        let (pk2, stored2) = parse_public_key(&padded).expect("padded key");
        assert_eq!(stored2, der);
        assert_eq!(pk2, pk);

        let mut garbage = padded.clone();
        garbage[170] = 1;
        assert_eq!(parse_public_key(&garbage), Err(KeyError::Malformed));
        assert_eq!(parse_public_key(&der[..der.len() - 1]), Err(KeyError::Malformed));

        let priv17 =
            RsaPrivateKey::new_with_exp(&mut rng(), 1024, &rsa::BigUint::from(17u32)).expect("keygen e=17");
        let der17 = priv17.to_public_key().to_public_key_der().expect("der").into_vec();
        assert_eq!(der17.len(), 160);
        let (pk17, stored17) = parse_public_key(&der17).expect("e=17 key");
        assert_eq!(stored17, der17);
        assert_eq!(pk17.e(), &rsa::BigUint::from(17u32));

        // OAEP round trips with both hashes and both keys.
        for (private, public) in [(&priv65537, &pk), (&priv17, &pk17)] {
            for hash in [OaepHash::Sha1, OaepHash::Sha256] {
                let aes_key = random_aes_key();
                let ct = encrypt_session_key(public, &aes_key, hash).expect("encrypt");
                assert_eq!(ct.len(), 128);
                assert_eq!(decrypt_session_key(private, &ct, hash), Ok(aes_key));
                let other = match hash {
                    OaepHash::Sha1 => OaepHash::Sha256,
                    OaepHash::Sha256 => OaepHash::Sha1,
                };
                assert!(decrypt_session_key(private, &ct, other).is_err());
            }
        }
    }

    #[test]
    fn small_key_is_bad_size() {
        let small = RsaPrivateKey::new(&mut rng(), 512).expect("keygen 512");
        let der = small.to_public_key().to_public_key_der().expect("der");
        assert_eq!(parse_public_key(der.as_bytes()), Err(KeyError::BadSize(512)));
    }

    #[test]
    fn large_key_is_bad_size() {
        // rsa refuses to decode moduli over 4096 bits; build one by hand.
        let mut n = vec![0u8; 5000 / 8];
        OsRng.fill_bytes(&mut n);
        n[0] |= 0x80;
        let last = n.len() - 1;
        n[last] |= 1;
        let big = RsaPublicKey::new_with_max_size(
            rsa::BigUint::from_bytes_be(&n),
            rsa::BigUint::from(65_537u32),
            8192,
        )
        .expect("big key");
        let der = big.to_public_key_der().expect("der");
        assert_eq!(parse_public_key(der.as_bytes()), Err(KeyError::BadSize(5000)));
    }

    #[test]
    fn rejects_non_keys() {
        assert_eq!(parse_public_key(&[]), Err(KeyError::Malformed));
        assert_eq!(parse_public_key(&[0u8; 160]), Err(KeyError::Malformed));
        assert_eq!(parse_public_key(&[0x30, 0x80, 0, 0]), Err(KeyError::Malformed));
        assert_eq!(parse_public_key(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), Err(KeyError::Malformed));
        let mut random = [0u8; 162];
        for _ in 0..20 {
            OsRng.fill_bytes(&mut random);
            assert_eq!(parse_public_key(&random), Err(KeyError::Malformed));
            random[0] = 0x30;
            random[1] = 0x81;
            random[2] = 159;
            assert_eq!(parse_public_key(&random), Err(KeyError::Malformed));
        }
    }

    #[test]
    fn der_length_forms() {
        assert_eq!(der_sequence_len(&[0x30, 0x05]), Some(7));
        assert_eq!(der_sequence_len(&[0x30, 0x81, 0x9f]), Some(162));
        assert_eq!(der_sequence_len(&[0x30, 0x82, 0x01, 0x22]), Some(294));
        assert_eq!(der_sequence_len(&[0x30, 0x82, 0x01]), None);
        assert_eq!(der_sequence_len(&[0x31, 0x05]), None);
        assert_eq!(der_sequence_len(&[0x30]), None);
    }

    #[test]
    fn oaep_hash_parse_display() {
        assert_eq!("sha1".parse::<OaepHash>(), Ok(OaepHash::Sha1));
        assert_eq!("SHA256".parse::<OaepHash>(), Ok(OaepHash::Sha256));
        assert_eq!("Sha-256".parse::<OaepHash>(), Ok(OaepHash::Sha256));
        assert!("md5".parse::<OaepHash>().is_err());
        assert_eq!(OaepHash::Sha1.to_string(), "sha1");
        assert_eq!(OaepHash::Sha256.to_string(), "sha256");
        assert_eq!(OaepHash::default(), OaepHash::Sha1);
        for h in [OaepHash::Sha1, OaepHash::Sha256] {
            assert_eq!(h.to_string().parse::<OaepHash>(), Ok(h));
        }
        assert_eq!(KeyError::BadSize(512).to_string(), "RSA key of 512 bits (accepted: 1024 to 4096 bits)");
    }

    proptest! {
        #[test]
        fn prop_streaming_decrypt_equals_whole(
            plain in proptest::collection::vec(any::<u8>(), 0..2000),
            sizes in proptest::collection::vec(1usize..100, 0..20),
            seed in any::<u8>(),
        ) {
            let key = key_from(seed);
            let ct = encrypt_all(&key, &plain);
            let whole = decrypt_split(&key, &ct, &[]);
            prop_assert_eq!(whole.as_deref(), Ok(&plain[..]));
            prop_assert_eq!(decrypt_split(&key, &ct, &sizes), whole);
        }

        #[test]
        fn prop_cksum_split_equals_whole(
            d in proptest::collection::vec(any::<u8>(), 0..3000),
            cuts in proptest::collection::vec(any::<usize>(), 0..10),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (d.len() + 1)).collect();
            cuts.sort_unstable();
            let mut c = Cksum::new();
            let mut prev = 0;
            for cut in cuts.into_iter().chain(std::iter::once(d.len())) {
                c.update(&d[prev..cut]);
                prev = cut;
            }
            prop_assert_eq!(c.len(), d.len() as u64);
            prop_assert_eq!(c.finalize(), cksum(&d));
        }
    }
}
