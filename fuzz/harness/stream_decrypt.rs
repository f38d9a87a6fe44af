//! Target 4: streaming decryption cut at arbitrary points.

use backupd::crypto::{ciphertext_len, encrypt_all, StreamDecryptor, AES_KEY_LEN};

use super::Input;

fn decrypt_pieces(
    key: &[u8; AES_KEY_LEN],
    ct: &[u8],
    cuts: &[usize],
) -> Result<Vec<u8>, backupd::crypto::PaddingError> {
    let mut buf = ct.to_vec();
    let mut dec = StreamDecryptor::new(key);
    let mut out = Vec::new();
    let mut prev = 0;
    for &cut in cuts.iter().chain(std::iter::once(&ct.len())) {
        let cut = cut.clamp(prev, ct.len());
        dec.update(&mut buf[prev..cut], |p| out.extend_from_slice(p));
        prev = cut;
    }
    assert_eq!(dec.ciphertext_seen(), ct.len() as u64);
    assert!(out.len() <= ct.len());
    dec.finish(|p| out.extend_from_slice(p))?;
    Ok(out)
}

/// Target 4: `StreamDecryptor` over arbitrary ciphertext (or the encryption of
/// arbitrary plaintext, possibly damaged) cut at arbitrary points never panics;
/// every split gives the same result as one piece; a success is the exact
/// inverse of `encrypt_all` and has a matching length.
pub fn stream_decrypt(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut key = [0u8; AES_KEY_LEN];
    key[0] = input.u8();
    key[31] = input.u8();
    let ncuts = usize::from(input.u8() % 9);
    let mut cuts: Vec<usize> = (0..ncuts).map(|_| usize::from(input.u16())).collect();
    let body = input.rest();

    let (ct, plain) = if mode & 1 == 0 {
        (body.to_vec(), None)
    } else {
        let mut ct = encrypt_all(&key, body);
        assert_eq!(ct.len() as u64, ciphertext_len(body.len() as u64));
        let damage = mode >> 1;
        match damage % 4 {
            0 => return check_decrypt(&key, &ct, &mut cuts, Some(body)),
            1 => {
                let at = usize::from(damage) * 7 % ct.len();
                ct[at] ^= 1 << (damage % 8);
            }
            2 => ct.truncate(ct.len() - 1 - usize::from(damage) % 16),
            _ => ct.extend_from_slice(&[damage; 16][..1 + usize::from(damage) % 16]),
        }
        (ct, None)
    };
    check_decrypt(&key, &ct, &mut cuts, plain);
}

fn check_decrypt(key: &[u8; AES_KEY_LEN], ct: &[u8], cuts: &mut [usize], plain: Option<&[u8]>) {
    if !ct.is_empty() {
        for c in cuts.iter_mut() {
            *c %= ct.len() + 1;
        }
    }
    cuts.sort_unstable();
    let whole = decrypt_pieces(key, ct, &[]);
    let split = decrypt_pieces(key, ct, cuts);
    assert_eq!(split, whole, "split at {cuts:?} differs from one piece");
    match whole {
        Ok(out) => {
            assert!(!ct.is_empty() && ct.len().is_multiple_of(16));
            assert!(out.len() < ct.len() && out.len() + 16 >= ct.len(), "{} from {}", out.len(), ct.len());
            assert_eq!(ciphertext_len(out.len() as u64), ct.len() as u64);
            assert_eq!(encrypt_all(key, &out), ct, "decryption is not the inverse of encryption");
            if let Some(p) = plain {
                assert_eq!(&out[..], p);
            }
        }
        Err(_) => assert!(plain.is_none(), "the encryption of {} bytes did not decrypt", ct.len()),
    }
}
