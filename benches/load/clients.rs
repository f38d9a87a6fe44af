//! Clients and payloads: client set-up, and the large files that cost one
//! 1 MiB buffer whatever their size.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use backupd::client::{Client, ClientOptions};
use backupd::crypto::{self, Cksum, StreamDecryptor, AES_KEY_LEN};
use backupd::protocol::{
    ClientId, Code, NameField, PacketHeader, RequestHeader, Response, PACKET_HEADER_LEN, REQUEST_HEADER_LEN,
    VERSION,
};
use rsa::RsaPrivateKey;

use crate::common::pseudo_random;
use crate::{Res, MIB, PACKET_NUMBER_AT, PERIOD};

pub(crate) fn client_options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    }
}

/// Connect, register `name`, exchange keys.
pub(crate) fn new_client(addr: SocketAddr, name: &str, key: &RsaPrivateKey) -> Res<Client> {
    let mut c = Client::connect(addr, &client_options()).map_err(|e| format!("connect: {e}"))?;
    c.register(name).map_err(|e| format!("register {name}: {e}"))?;
    c.send_public_key(name, key).map_err(|e| format!("key exchange {name}: {e}"))?;
    Ok(c)
}

/// Set up one client per name on `threads` threads. Returns the clients that
/// made it, in order, and the errors of the others.
pub(crate) fn new_clients(
    addr: SocketAddr,
    names: &[String],
    key: &RsaPrivateKey,
    threads: usize,
) -> (Vec<Client>, Vec<String>) {
    let next = AtomicUsize::new(0);
    let mut results: Vec<(usize, Res<Client>)> = thread::scope(|s| {
        let hs: Vec<_> = (0..threads.clamp(1, names.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= names.len() {
                            return out;
                        }
                        out.push((i, new_client(addr, &names[i], key)));
                    }
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    results.sort_by_key(|r| r.0);
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for (_, r) in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => errs.push(e),
        }
    }
    (ok, errs)
}

/// A whole-file ciphertext of `mib` MiB that costs one 1 MiB buffer: the
/// ciphertext is one random period `R` repeated `mib` times, then a final
/// block `F = E(pad ^ r_last)` that decrypts to a full PKCS#7 padding block.
/// CBC makes the plaintext periodic too (block k of a period decrypts to
/// `D(r_k) ^ r_{k-1}`), except the first block of the file, which is chained
/// to the zero IV instead of `r_last`. Only its checksum is needed.
pub(crate) struct BigFile {
    /// Request header + packet header + `R`: every packet but the last.
    pub(crate) frame: Vec<u8>,
    /// Request header + packet header + `F`: the last packet.
    pub(crate) last: Vec<u8>,
    mib: u64,
    pub(crate) cksum: u32,
}

impl BigFile {
    pub(crate) fn new(key: &[u8; AES_KEY_LEN], mib: u64, seed: u64) -> BigFile {
        let r = pseudo_random(PERIOD, seed);
        let mut r_last = [0u8; 16];
        r_last.copy_from_slice(&r[PERIOD - 16..]);
        // Decrypt r_last ++ R ++ (one more block, held back by the decryptor):
        // after the first block, the output is the plaintext of a period that
        // follows another period.
        let mut stream = Vec::with_capacity(PERIOD + 32);
        stream.extend_from_slice(&r_last);
        stream.extend_from_slice(&r);
        stream.extend_from_slice(&[0u8; 16]);
        let mut plain = Vec::with_capacity(PERIOD + 16);
        StreamDecryptor::new(key).update(&mut stream, |p| plain.extend_from_slice(p));
        let generic = &plain[16..16 + PERIOD];
        let mut first = generic.to_vec();
        for (b, x) in first.iter_mut().zip(r_last) {
            *b ^= x;
        }
        let mut ck = Cksum::new();
        ck.update(&first);
        for _ in 1..mib {
            ck.update(generic);
        }
        let mut x = [16u8; 16];
        for (b, l) in x.iter_mut().zip(r_last) {
            *b ^= l;
        }
        let f = crypto::encrypt_all(key, &x);
        let mut frame = vec![0u8; REQUEST_HEADER_LEN + PACKET_HEADER_LEN];
        frame.extend_from_slice(&r);
        let mut last = vec![0u8; REQUEST_HEADER_LEN + PACKET_HEADER_LEN];
        last.extend_from_slice(&f[..16]);
        BigFile { frame, last, mib, cksum: ck.finalize() }
    }

    pub(crate) fn orig(&self) -> u64 {
        self.mib * MIB
    }

    pub(crate) fn ciphertext_len(&self) -> u64 {
        self.orig() + 16
    }

    pub(crate) fn packets(&self) -> u16 {
        (self.mib + 1) as u16
    }

    /// Write the headers for `id`'s upload of `name`.
    pub(crate) fn address(&mut self, id: &ClientId, name: &str) -> Res<()> {
        let field = NameField::from_name(name.as_bytes()).ok_or(format!("bad file name {name:?}"))?;
        let (orig, total) = (self.orig() as u32, self.packets());
        write_packet_headers(&mut self.frame, id, &field, PERIOD, orig, 1, total);
        write_packet_headers(&mut self.last, id, &field, 16, orig, total, total);
        Ok(())
    }

    /// Upload as `name`, check the 1603, confirm with 1029. Returns the time
    /// to the 1603 and the time of the 1029 round trip.
    pub(crate) fn upload(&mut self, c: &mut Client, name: &str) -> Res<(Duration, Duration)> {
        self.address(&c.id(), name)?;
        let t0 = Instant::now();
        for n in 1..self.packets() {
            self.frame[PACKET_NUMBER_AT..PACKET_NUMBER_AT + 2].copy_from_slice(&n.to_le_bytes());
            c.send_raw(&self.frame).map_err(|e| format!("{name}: packet {n}: {e}"))?;
        }
        c.send_raw(&self.last).map_err(|e| format!("{name}: last packet: {e}"))?;
        match c.read_response() {
            Ok(Response::FileReceived { cksum, content_size, .. }) => {
                if cksum != self.cksum || u64::from(content_size) != self.ciphertext_len() {
                    let _ = c.crc_abort(name);
                    return Err(format!(
                        "{name}: 1603 says {content_size} bytes, cksum {cksum}; expected {} bytes, cksum {}",
                        self.ciphertext_len(),
                        self.cksum
                    ));
                }
            }
            Ok(other) => return Err(format!("{name}: expected 1603, got {}", other.code() as u16)),
            Err(e) => return Err(format!("{name}: waiting for 1603: {e}")),
        }
        let t1 = Instant::now();
        c.crc_ok(name).map_err(|e| format!("{name}: 1029: {e}"))?;
        Ok((t1 - t0, t1.elapsed()))
    }
}

pub(crate) fn write_packet_headers(
    buf: &mut [u8],
    id: &ClientId,
    field: &NameField,
    content: usize,
    orig: u32,
    number: u16,
    total: u16,
) {
    let h = RequestHeader {
        client_id: *id,
        version: VERSION,
        code: Code::FilePacket.as_u16(),
        payload_size: (PACKET_HEADER_LEN + content) as u32,
    };
    buf[..REQUEST_HEADER_LEN].copy_from_slice(&h.encode());
    let mut ph = Vec::with_capacity(PACKET_HEADER_LEN);
    PacketHeader {
        content_size: content as u32,
        orig_file_size: orig,
        packet_number: number,
        total_packets: total,
        file_name: field.clone(),
    }
    .encode(&mut ph);
    buf[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + PACKET_HEADER_LEN].copy_from_slice(&ph);
}
