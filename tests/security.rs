//! Security hygiene (issue 4, docs/SECURITY.md): secrets never reach the log
//! or the disk, every decryption/padding/size failure looks the same on the
//! wire, and the data directory is private whatever the umask.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backupd::client::UploadOptions;
use backupd::crypto::encrypt_all;
use backupd::protocol::{id_hex, Response, ResponseCode};
use base64::Engine;
use common::*;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PrivateKeyParts;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every textual form in which a secret could leak into a log line: whole
/// (hex both cases, base64, lossy UTF-8, Debug) and any 8-byte window (hex
/// and Debug), so a truncated or partial print is caught too.
fn leak_forms(secret: &[u8]) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = vec![
        hex(secret),
        hex(secret).to_uppercase(),
        b64.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        String::from_utf8_lossy(secret).into_owned(),
        format!("{secret:?}"),
    ];
    for w in secret.windows(8) {
        forms.push(hex(w));
        forms.push(w.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "));
    }
    forms
}

fn assert_absent(haystack: &str, secret: &[u8], what: &str, source: &str) {
    for f in leak_forms(secret) {
        assert!(!haystack.contains(&f), "{what} appears in {source} as {f:?}");
    }
}

/// Every file below `dir` must not contain `secret` (raw bytes or hex).
fn assert_not_on_disk(dir: &Path, secret: &[u8], what: &str) {
    let files = walk_files(dir);
    assert!(!files.is_empty());
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret), "{what} stored raw in {}", f.display());
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&hex(secret)), "{what} stored as hex in {}", f.display());
    }
}

#[test]
fn no_session_key_or_private_key_in_the_trace_log_or_on_disk() {
    let launch = Launch { log_level: "trace", ..Launch::default() };
    let mut server = TestServer::start_with(&[], launch, |_| {});
    let mut keys: Vec<[u8; 32]> = Vec::new();
    let opts = UploadOptions { packet_size: 4096, ..Default::default() };

    // Register, key exchange, upload, retry, confirm, abort, a decryption failure.
    let (mut c, id) = server.registered_client("secretive");
    keys.push(*c.aes_key().unwrap());
    let data = pseudo_random(100_000, 1);
    assert!(c.upload_bytes("a", &data, &opts).unwrap().cksum_matches());
    c.crc_retry("a", false).unwrap();
    assert!(c.upload_bytes("a", &data, &opts).unwrap().cksum_matches());
    c.crc_ok("a").unwrap();
    assert!(c.upload_bytes("b", &data[..5000], &opts).unwrap().cksum_matches());
    c.crc_abort("b").unwrap();
    let mut bad = encrypt_all(&keys[0], &data[..100]);
    *bad.last_mut().unwrap() ^= 1;
    c.send_raw(&packet_frame(&id, 112, 100, 1, 1, &name_field_raw(b"bad"), &bad)).unwrap();
    assert_eq!(c.read_response().unwrap(), Response::GeneralError);
    // A second key on the same connection, then a reconnect on a new one.
    c.send_public_key("secretive", test_key()).unwrap();
    keys.push(*c.aes_key().unwrap());
    let mut c2 = server.connect();
    c2.reconnect(id, "secretive", test_key()).unwrap();
    keys.push(*c2.aes_key().unwrap());
    assert!(c2.upload_bytes("c", &data[..20_000], &opts).unwrap().cksum_matches());
    c2.crc_ok("c").unwrap();
    drop((c, c2));

    // While the server runs (WAL and shm present), then after a clean stop.
    for k in &keys {
        assert_not_on_disk(&server.data_dir(), k, "a session key");
    }
    assert!(server.stop().success());
    server.wait_for_log("shut down cleanly", Duration::from_secs(5));
    let log = server.log_text();
    assert!(log.contains("verified and stored") && log.contains("reconnected"), "log incomplete:\n{log}");
    assert!(log.contains("decryption failed"), "the decryption failure was not logged:\n{log}");
    for k in &keys {
        assert_absent(&log, k, "a session key", "the log");
        assert_not_on_disk(&server.data_dir(), k, "a session key");
    }
    let key = test_key();
    let der8 = key.to_pkcs8_der().unwrap();
    let der1 = key.to_pkcs1_der().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    for whole in [b64.encode(der8.as_bytes()), b64.encode(der1.as_bytes()), hex(der8.as_bytes())] {
        assert!(!log.contains(&whole), "the private key appears in the log");
    }
    let mut private_parts = vec![key.d().to_bytes_be()];
    private_parts.extend(key.primes().iter().map(|p| p.to_bytes_be()));
    for part in &private_parts {
        assert_absent(&log, part, "a private key component", "the log");
        assert_not_on_disk(&server.data_dir(), part, "a private key component");
    }
    let db = rusqlite::Connection::open(server.db_path()).unwrap();
    let stored: i64 =
        db.query_row("SELECT count(*) FROM clients WHERE AESKey IS NOT NULL", [], |r| r.get(0)).unwrap();
    assert_eq!(stored, 0, "a session key was written to the database");
}

/// The reply to every decryption, padding and size failure is the same 7
/// bytes (1607, empty payload), and the connection is left in the same
/// state: nothing tells one failure from another (no padding oracle).
#[test]
fn every_decrypt_padding_and_size_failure_looks_the_same() {
    let server = TestServer::start(&["--max-file-size", "1MiB"]);
    let (mut c, id) = server.registered_client("oracle");
    let key = *c.aes_key().unwrap();
    let nf = name_field_raw(b"x");
    let data = pseudo_random(100, 3);
    let ct = encrypt_all(&key, &data);
    let flipped = |i: usize| {
        let mut v = ct.clone();
        v[i] ^= 1;
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad padding", packet_frame(&id, 112, 100, 1, 1, &nf, &flipped(111))),
        ("bad padding, second-to-last block", packet_frame(&id, 112, 100, 1, 1, &nf, &flipped(96))),
        ("wrong key", packet_frame(&id, 112, 100, 1, 1, &nf, &encrypt_all(&[1; 32], &data))),
        ("plaintext shorter than declared", packet_frame(&id, 112, 105, 1, 1, &nf, &ct)),
        ("plaintext longer than declared", packet_frame(&id, 112, 96, 1, 1, &nf, &ct)),
        ("ciphertext over the declared size", packet_frame(&id, 112, 90, 1, 1, &nf, &ct)),
        ("ciphertext short of the declared size", packet_frame(&id, 112, 130, 1, 1, &nf, &ct)),
        ("partial block", packet_frame(&id, 100, 100, 1, 1, &nf, &ct[..100])),
        ("content_size mismatch", packet_frame(&id, 111, 100, 1, 1, &nf, &ct)),
        ("over --max-file-size", packet_frame(&id, 112, 2 << 20, 1, 1, &nf, &ct)),
    ];
    let probe = {
        let mut v = raw_header(&[0xEE; 16], 3, 1027, 255);
        v.extend_from_slice(&name_field_raw(b"probe"));
        v
    };
    for (what, frame) in cases {
        c.send_raw(&frame).unwrap();
        let mut reply = [0u8; 7];
        c.stream().read_exact(&mut reply).unwrap();
        assert_eq!(reply, [3, 0x47, 0x06, 0, 0, 0, 0], "{what}: reply bytes");
        c.send_raw(&probe).unwrap();
        assert_eq!(c.read_response().unwrap(), Response::ReconnectDenied { id: [0xEE; 16] }, "{what}: probe");
    }
    // The session survived all of them.
    assert!(c.upload_bytes("x", &data, &UploadOptions::default()).unwrap().cksum_matches());
    c.crc_ok("x").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "x")).unwrap(), data);
    assert_eq!(walk_files(&server.files_dir()).len(), 1);
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every directory under `dir` is 0700 and every file 0600.
fn assert_private(dir: &Path, tag: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            assert_eq!(mode(&p), 0o700, "{tag}: directory {}", p.display());
            n += assert_private(&p, tag);
        } else {
            assert_eq!(mode(&p), 0o600, "{tag}: file {}", p.display());
            n += 1;
        }
    }
    n
}

#[test]
fn data_directory_is_private_even_with_umask_0() {
    let umask0 = |cmd: &mut std::process::Command| {
        // SAFETY: umask is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
    };
    let launch = Launch { tweak: Some(Arc::new(umask0)), ..Launch::default() };
    // A data directory that already exists with loose permissions is tightened.
    let mut server = TestServer::start_with(&[], launch, |temp| {
        std::fs::create_dir(temp.join("data")).unwrap();
        std::fs::set_permissions(temp.join("data"), std::fs::Permissions::from_mode(0o755)).unwrap();
    });
    let (mut c, id) = server.registered_client("private");
    for v in 0..3 {
        let data = pseudo_random(10_000, v);
        assert!(c.upload_bytes("doc", &data, &UploadOptions::default()).unwrap().cksum_matches());
        c.crc_ok("doc").unwrap();
    }
    // One upload left staged in tmp/ (larger than a content piece: a
    // smaller one waits in a file without a name, which has no mode to see
    // until it is published, as "doc" was).
    assert!(c.upload_bytes("staged", &vec![7; 200_000], &UploadOptions::default()).unwrap().cksum_matches());
    let data = server.data_dir();
    assert_eq!(mode(&data), 0o700, "data dir");
    assert_eq!(walk_files(&data.join("tmp")).len(), 1);
    assert!(!walk_files(&data.join("versions")).is_empty());
    assert!(data.join("backupd.db-wal").exists());
    let n = assert_private(&data, "running");
    assert!(n >= 7, "only {n} files checked");
    drop(c);
    // A stray file under files/ is moved to orphans/ at the next start.
    assert!(server.stop().success());
    let stray = server.files_dir().join(id_hex(&id)).join("stray");
    std::fs::write(&stray, b"stray").unwrap();
    std::fs::set_permissions(&stray, std::fs::Permissions::from_mode(0o600)).unwrap();
    server.restart();
    assert!(!stray.exists());
    assert_eq!(mode(&data.join("orphans")), 0o700, "orphans dir");
    assert_eq!(mode(&data), 0o700);
    assert_private(&data, "after restart");
}

/// Ids and names travel in clear: a 1026 from anyone else must not replace a
/// key already on file (that would hand the client over to the sender).
#[test]
fn a_key_on_file_cannot_be_replaced_by_another_connection() {
    let server = TestServer::start(&[]);
    let (mut victim, id) = server.registered_client("victim");
    let data = pseudo_random(1000, 7);
    let up = victim.upload_bytes("a.bin", &data, &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches());
    victim.crc_ok("a.bin").unwrap();
    drop(victim);

    // The attacker knows id and name and sends its own key on a new connection.
    let attacker_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let mut attacker = server.connect();
    attacker.set_id(id);
    match attacker.send_public_key("victim", &attacker_key) {
        Err(backupd::client::ClientError::Refused(Response::GeneralError)) => {}
        other => panic!("a foreign 1026 must be refused with 1607, got {other:?}"),
    }
    // The attacker's connection has no session: its packets are refused too.
    assert!(attacker.upload_bytes("a.bin", b"evil", &UploadOptions::default()).is_err());
    assert_eq!(std::fs::read(server.stored_path(&id, "a.bin")).unwrap(), data);

    // The attack of issue 8: reconnect (1027) as the victim, which anyone can
    // ask for, then send a key on that connection. Refused: a 1605 proves nothing.
    let mut attacker = server.connect();
    let reconnect = frame(&id, backupd::protocol::Code::Reconnect, &[&name_field_raw(b"victim")]);
    attacker.send_raw(&reconnect).unwrap();
    assert_eq!(attacker.read_response().unwrap().code(), ResponseCode::ReconnectOk);
    attacker.set_id(id);
    match attacker.send_public_key("victim", &attacker_key) {
        Err(backupd::client::ClientError::Refused(Response::GeneralError)) => {}
        other => panic!("a 1026 after a 1027 must be refused with 1607, got {other:?}"),
    }

    // Not even the real client replaces its key after a reconnect: only its
    // registration connection sets it (an operator resets it otherwise).
    let mut victim = server.connect();
    victim.reconnect(id, "victim", test_key()).unwrap();
    let new_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    assert!(victim.send_public_key("victim", &new_key).is_err());
    drop(victim);
    let mut victim = server.connect();
    victim.reconnect(id, "victim", test_key()).unwrap();
    let up = victim.upload_bytes("b.bin", &data, &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches());
    victim.crc_ok("b.bin").unwrap();
    assert!(server.log_text().contains("only the connection that registered client"));
}
