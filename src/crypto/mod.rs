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
//!
//! Modules: `keys` (RSA public keys and OAEP), `stream` (the AES-CBC streams),
//! `cksum` (the POSIX CRC); everything is re-exported here.

mod cksum;
mod keys;
mod stream;

pub use cksum::*;
pub use keys::*;
pub use stream::*;

/// Length in bytes of the AES-256 session key.
pub const AES_KEY_LEN: usize = 32;
/// AES block size in bytes.
pub const BLOCK: usize = 16;

#[cfg(test)]
mod tests {
    use super::keys::der_sequence_len;
    use super::*;
    use aes::cipher::{BlockEncryptMut, KeyIvInit};
    use rand::rngs::OsRng;
    use rsa::traits::PublicKeyParts;
    use rsa::{RsaPrivateKey, RsaPublicKey};

    type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
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
