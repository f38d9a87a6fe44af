//! A 1 GiB file: received, published, then copied to the bucket as a
//! multipart upload streamed from disk, with the server's peak memory
//! (VmHWM) far below the file's size. The test's own memory is bounded
//! too: the file is generated as it is sent and hashed as it is read back.

use std::io::Read;
use std::time::Duration;

use backupd::client::{Client, UploadOptions};
use sha2::{Digest, Sha256};

use crate::common::{test_client_options, test_key};
use crate::garage::Garage;
use crate::support::{S3Conf, S3Server};

const GIB: u64 = 1 << 30;
/// The server's peak RSS must stay under this (a quarter of the file).
const PEAK_LIMIT_KIB: u64 = 256 * 1024;

/// `len` pseudo-random bytes (xorshift), generated on the fly and hashed.
struct Generated {
    left: u64,
    x: u64,
    hash: Sha256,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize / 8 * 8;
        let n = if n == 0 { (self.left as usize).min(buf.len()) } else { n };
        for chunk in buf[..n].chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            chunk.copy_from_slice(&self.x.to_le_bytes()[..chunk.len()]);
        }
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// VmHWM of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_1_gib_file_goes_up_as_multipart_in_bounded_memory() {
    let g = Garage::start();
    // Parts of 1 GiB on a loaded machine: give each request time.
    let mut conf = S3Conf::new(g.endpoint(), &g.bucket, "replica", "big");
    conf.timeout = "60s";
    let s = S3Server::start(conf, &[]);
    let opts =
        backupd::client::ClientOptions { read_timeout: Duration::from_secs(600), ..test_client_options() };
    let mut c = Client::connect(s.server.addr(), &opts).expect("connect");
    let id = c.register("big").expect("register");
    c.send_public_key("big", test_key()).expect("public key");

    let mut src = Generated { left: GIB, x: 0x9E37_79B9_7F4A_7C15, hash: Sha256::new() };
    let up = c.upload("huge.bin", &mut src, GIB, &UploadOptions::default()).expect("upload 1 GiB");
    assert!(up.cksum_matches());
    c.crc_ok("huge.bin").expect("1604");
    let want = src.hash.finalize();
    s.wait_drained(1.0);

    let peak = peak_rss_kib(s.server.pid());
    assert!(peak > 0, "no VmHWM for the server");
    assert!(
        peak < PEAK_LIMIT_KIB,
        "server peak RSS {peak} KiB for a 1 GiB file (limit {PEAK_LIMIT_KIB} KiB)"
    );

    // In the bucket: the same bytes, stored as a multipart upload (ETag "<md5>-<parts>").
    let key = s.conf.key(&id, "huge.bin");
    let mut h = Sha256::new();
    let len = g.bucket.get_to(&key, &mut |b| h.update(b)).expect("GET").expect("object present");
    assert_eq!(len, GIB);
    assert!(h.finalize() == want, "the object's bytes differ from the file's");
    let head = g
        .bucket
        .request(
            "HEAD",
            &format!("/{}/{}", g.bucket.bucket, crate::bucket::uri_encode(&key, false)),
            &[],
            &[],
        )
        .expect("HEAD");
    let etag = head.header("etag").unwrap_or("").trim_matches('"').to_string();
    let parts: u32 = etag.rsplit_once('-').and_then(|(_, n)| n.parse().ok()).unwrap_or(1);
    assert!(parts > 1, "not a multipart upload: ETag {etag:?}");
    eprintln!("1 GiB: server peak RSS {peak} KiB, object in {parts} parts");
}
