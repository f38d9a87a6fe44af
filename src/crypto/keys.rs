//! RSA: the clients' public keys (DER SubjectPublicKeyInfo, zero padded in
//! the field) and the OAEP encryption of session keys to them.

use std::fmt;
use std::str::FromStr;

use rand::rngs::OsRng;
use rand::RngCore;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};

use super::AES_KEY_LEN;

/// Smallest accepted RSA modulus, in bits.
const MIN_KEY_BITS: usize = 1024;
/// Largest accepted RSA modulus, in bits.
const MAX_KEY_BITS: usize = 4096;

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
pub(super) fn der_sequence_len(field: &[u8]) -> Option<usize> {
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
