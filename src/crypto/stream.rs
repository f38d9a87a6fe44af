//! AES-256-CBC with a zero IV and PKCS#7 padding, as streams that take
//! their input in pieces of any length.

use std::fmt;

use aes::cipher::consts::U16;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};

use super::{AES_KEY_LEN, BLOCK};

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

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
