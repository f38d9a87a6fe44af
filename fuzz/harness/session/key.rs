//! The client key of the `session` target.

use std::sync::OnceLock;

use rsa::RsaPrivateKey;

/// The client key of the `session` target: generated once per process from a
/// fixed seed (so runs are reproducible), 1024 bits like the field's clients.
pub struct ClientKey {
    pub private: RsaPrivateKey,
    /// Its SubjectPublicKeyInfo DER, as a 1026 carries it.
    pub der: Vec<u8>,
}

/// A deterministic generator for the one key generation (xorshift; key
/// quality is irrelevant here).
struct SeededRng(u64);

impl rsa::rand_core::RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for SeededRng {}

pub fn client_key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs8::EncodePublicKey;
        let private =
            RsaPrivateKey::new(&mut SeededRng(0x0DDB_A11C_0FFE_E5ED), 1024).expect("key generation");
        let der = private.to_public_key().to_public_key_der().expect("DER").into_vec();
        ClientKey { private, der }
    })
}
