//! End-to-end happy paths of issue 2 against the real `backupd` binary:
//! real sockets on 127.0.0.1, real files in temp directories, no mocks.
//! (Refusals live in `server_refusals.rs`.)

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backupd::client::{Client, ContentSizeField, PacketPlan, SendOutcome, UploadOptions};
use backupd::crypto::{self, OaepHash};
use backupd::protocol::{id_hex, ClientId, Code, Response, ResponseCode};
use common::*;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;

const MIB: usize = 1024 * 1024;

fn opts(packet_size: usize, content_size: ContentSizeField) -> UploadOptions {
    UploadOptions { packet_size, content_size, ..Default::default() }
}

/// Upload `data` as `name`, check the 1603 (size, echoed name, cksum), confirm
/// with 1029 and check the stored file and its database row.
fn upload_confirm_check(
    server: &TestServer,
    c: &mut Client,
    id: &ClientId,
    name: &str,
    data: &[u8],
    o: &UploadOptions,
) {
    let up = c.upload_bytes(name, data, o).unwrap();
    let expect_size = match o.content_size {
        ContentSizeField::PerPacketEncrypted => {
            PacketPlan::new(data.len() as u64, o.packet_size, o.content_size).unwrap().wire_bytes
        }
        _ => ((data.len() / 16 + 1) * 16) as u64,
    };
    assert_eq!(u64::from(up.content_size), expect_size, "{name}: 1603 content_size");
    assert_eq!(up.file_name_field, name_field_raw(name.as_bytes()), "{name}: 1603 name field");
    assert_eq!(up.server_cksum, crypto::cksum(data), "{name}: server cksum");
    assert!(up.cksum_matches());
    c.crc_ok(name).unwrap();
    let stored = std::fs::read(server.stored_path(id, name)).unwrap();
    assert!(
        stored == data,
        "{name}: stored file ({} bytes) differs from the {} sent",
        stored.len(),
        data.len()
    );
    assert_eq!(db_verified(&server.db_path(), id, name), Some(1), "{name}: files row");
}

fn tmp_is_empty(server: &TestServer) -> bool {
    walk_files(&server.data_dir().join("tmp")).is_empty()
}

#[test]
fn uploads_of_0_1_15_16_17_bytes_1mib_and_64mib_are_stored_byte_identical() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("sizes");
    let o = opts(MIB, ContentSizeField::ThisPacket);
    for (i, n) in [0, 1, 15, 16, 17, MIB, 64 * MIB].into_iter().enumerate() {
        let data = pseudo_random(n, 100 + i as u64);
        upload_confirm_check(&server, &mut c, &id, &format!("size-{n}.bin"), &data, &o);
    }
    assert!(wait_until(Duration::from_secs(5), || tmp_is_empty(&server)), "staging files left in tmp/");
    assert_eq!(walk_files(&server.files_dir()).len(), 7);
}

#[test]
fn every_packet_convention_and_single_packet_uploads() {
    use ContentSizeField::*;
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("conventions");
    // (plaintext size, packet size, convention)
    let cases = [
        (5000, 1000, ThisPacket),           // 6 packets, boundaries off the 16-byte blocks
        (300_000, 16 * MIB, ThisPacket),    // one packet holding the whole file
        (2032, 1024, WholeFile),            // ciphertext 2048 = 2 * 1024: empty last packet
        (5000, 1024, WholeFile),            // last packet partial
        (1000, 1024, WholeFile),            // one packet
        (0, 1024, WholeFile),               // empty file, one packet
        (10_000, 4000, PerPacketEncrypted), // 4000 + 4000 + 2000, each its own CBC stream
        (8000, 4000, PerPacketEncrypted),   // multiple of 4000: an extra packet of empty plaintext
        (3999, 4000, PerPacketEncrypted),   // one packet
        (0, 4000, PerPacketEncrypted),      // empty file
    ];
    let mut saw_empty_last = false;
    for (i, (n, p, conv)) in cases.into_iter().enumerate() {
        let plan = PacketPlan::new(n as u64, p, conv).unwrap();
        let last = plan.packet(plan.total_packets);
        saw_empty_last |= conv == WholeFile && last.content_len == 0 && plan.total_packets > 1;
        let data = pseudo_random(n, 7 + i as u64);
        let name = format!("conv-{i}-{n}.bin");
        upload_confirm_check(&server, &mut c, &id, &name, &data, &opts(p, conv));
    }
    assert!(saw_empty_last, "the empty-last-packet case was not exercised");
}

#[test]
fn public_key_variants_and_ascii_zero_register_id() {
    let server = TestServer::start(&[]);
    let key17 =
        RsaPrivateKey::new_with_exp(&mut rand::rngs::OsRng, 1024, &rsa::BigUint::from(17u32)).unwrap();
    let key2048 = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let der = |k: &RsaPrivateKey| k.to_public_key().to_public_key_der().unwrap().as_bytes().to_vec();
    assert_eq!(der(&key17).len(), 160, "Crypto++-style key: 1024 bits, e=17");
    assert_eq!(der(test_key()).len(), 162, "PyCryptodome-style key: 1024 bits, e=65537");
    let mut padded = der(test_key());
    padded.resize(padded.len() + 100, 0);
    let cases: [(&str, &RsaPrivateKey, Vec<u8>); 4] = [
        ("e17", &key17, der(&key17)),
        ("e65537", test_key(), der(test_key())),
        ("padded", test_key(), padded),
        ("k2048", &key2048, der(&key2048)),
    ];
    for (name, key, field) in cases {
        let mut c = server.connect();
        // 1025 with sixteen ASCII '0' in the header id (a client in the field does this).
        c.send_raw(&frame(&[b'0'; 16], Code::Register, &[&name_field_raw(name.as_bytes())])).unwrap();
        let Response::RegistrationOk { id } = expect_reply(&mut c, ResponseCode::RegistrationOk) else {
            unreachable!()
        };
        assert_ne!(id, [b'0'; 16]);
        c.send_raw(&frame(&id, Code::PublicKey, &[&name_field_raw(name.as_bytes()), &field])).unwrap();
        let Response::KeyAccepted { id: rid, encrypted_key } =
            expect_reply(&mut c, ResponseCode::KeyAccepted)
        else {
            unreachable!()
        };
        assert_eq!(rid, id);
        assert_eq!(encrypted_key.len(), key.to_public_key().size(), "{name}: RSA ciphertext size");
        let aes =
            crypto::decrypt_session_key(key, &encrypted_key, OaepHash::Sha1).expect("OAEP-SHA1 by default");
        c.set_id(id);
        c.set_aes_key(Some(aes));
        let data = pseudo_random(777, 3);
        upload_confirm_check(&server, &mut c, &id, "k.bin", &data, &UploadOptions::default());
        // The key on file is the exact DER (padding stripped): a reconnect encrypts to it.
        let mut c2 = server.connect();
        c2.reconnect(id, name, key).unwrap();
        upload_confirm_check(&server, &mut c2, &id, "k2.bin", &data, &UploadOptions::default());
    }
}

#[test]
fn oaep_sha256_setting() {
    let server = TestServer::start(&["--oaep-hash", "sha256"]);
    let mut c = server.connect();
    let id = c.register("sha256").unwrap();
    let spki = test_key().to_public_key().to_public_key_der().unwrap();
    c.send_frame(Code::PublicKey, &[&name_field_raw(b"sha256"), spki.as_bytes()]).unwrap();
    let Response::KeyAccepted { encrypted_key, .. } = expect_reply(&mut c, ResponseCode::KeyAccepted) else {
        unreachable!()
    };
    assert!(crypto::decrypt_session_key(test_key(), &encrypted_key, OaepHash::Sha1).is_err());
    let aes = crypto::decrypt_session_key(test_key(), &encrypted_key, OaepHash::Sha256).unwrap();
    c.set_aes_key(Some(aes));
    upload_confirm_check(&server, &mut c, &id, "s.bin", b"sha-256 session", &UploadOptions::default());
}

#[test]
fn every_key_exchange_and_reconnect_gives_a_new_key() {
    let server = TestServer::start(&[]);
    let (mut c1, id) = server.registered_client("rekey");
    let k1 = *c1.aes_key().unwrap();
    let data = pseudo_random(4096, 11);
    let o = opts(1000, ContentSizeField::ThisPacket);
    // A second 1026 on the same connection: a new key, and uploads use it.
    c1.send_public_key("rekey", test_key()).unwrap();
    let k1b = *c1.aes_key().unwrap();
    assert_ne!(k1, k1b);
    upload_confirm_check(&server, &mut c1, &id, "a.bin", &data, &o);

    // Reconnect on a new connection.
    let mut c2 = server.connect();
    c2.reconnect(id, "rekey", test_key()).unwrap();
    let k2 = *c2.aes_key().unwrap();
    assert!(k2 != k1 && k2 != k1b);
    upload_confirm_check(&server, &mut c2, &id, "b.bin", &data, &o);

    // Reconnect again on the same connection: another key; the previous one no longer decrypts.
    c2.reconnect(id, "rekey", test_key()).unwrap();
    let k3 = *c2.aes_key().unwrap();
    assert!(k3 != k2 && k3 != k1b);
    c2.set_aes_key(Some(k2));
    match c2.upload_bytes("c.bin", &data, &o) {
        Err(e) => assert_eq!(e.refusal_code(), Some(ResponseCode::GeneralError), "{e}"),
        Ok(up) => panic!("upload under a replaced key accepted: {up:?}"),
    }
    c2.set_aes_key(Some(k3));
    upload_confirm_check(&server, &mut c2, &id, "c.bin", &data, &o);
}

#[test]
fn retry_without_ack_retry_gets_no_reply_and_the_resend_is_stored() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("retry");
    let o = opts(1024, ContentSizeField::ThisPacket);
    let attempts: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(3000, 40 + i)).collect();
    for (i, data) in attempts.iter().enumerate() {
        if i > 0 {
            // 1030 sent raw: the client library would otherwise tolerate a stray 1604.
            c.send_frame(Code::CrcRetry, &[&name_field_raw(b"r.bin")]).unwrap();
        }
        // The next reply must be this upload's 1603: a 1604 for the 1030 fails here.
        let up = c.upload_bytes("r.bin", data, &o).unwrap();
        assert_eq!(up.server_cksum, crypto::cksum(data));
    }
    c.crc_ok("r.bin").unwrap();
    assert!(std::fs::read(server.stored_path(&id, "r.bin")).unwrap() == attempts[2]);
    assert_eq!(db_verified(&server.db_path(), &id, "r.bin"), Some(1));
    assert!(wait_until(Duration::from_secs(5), || tmp_is_empty(&server)), "discarded attempts left in tmp/");
}

#[test]
fn retry_with_ack_retry_answers_1604() {
    let server = TestServer::start(&["--ack-retry"]);
    let (mut c, id) = server.registered_client("ackretry");
    let o = opts(1024, ContentSizeField::ThisPacket);
    let first = pseudo_random(2500, 1);
    let second = pseudo_random(2500, 2);
    c.upload_bytes("r.bin", &first, &o).unwrap();
    c.crc_retry("r.bin", true).unwrap(); // reads the 1604
    c.upload_bytes("r.bin", &second, &o).unwrap();
    c.crc_ok("r.bin").unwrap();
    assert!(std::fs::read(server.stored_path(&id, "r.bin")).unwrap() == second);
    // 1031 after an acknowledged 1030.
    c.upload_bytes("q.bin", &first, &o).unwrap();
    c.crc_retry("q.bin", true).unwrap();
    c.crc_abort("q.bin").unwrap();
    assert!(!server.stored_path(&id, "q.bin").exists());
    // send_file with ack_retry set waits for the 1604 and stays in step.
    let path = server.temp_dir().join("plain.bin");
    std::fs::write(&path, &first).unwrap();
    let out = c.send_file("f.bin", &path, &UploadOptions { ack_retry: true, ..o }, &mut |_| {}).unwrap();
    assert_eq!(out, SendOutcome::Verified { cksum: crypto::cksum(&first), attempts: 1 });
}

#[test]
fn abort_stores_nothing_and_leaves_no_row() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("abort");
    let o = opts(1024, ContentSizeField::ThisPacket);
    let data = pseudo_random(5000, 5);
    let db = server.db_path();

    // upload, 1031 -> 1604
    c.upload_bytes("a.bin", &data, &o).unwrap();
    c.crc_abort("a.bin").unwrap();
    // upload, 1030 (no reply), 1031 -> 1604
    c.upload_bytes("b.bin", &data, &o).unwrap();
    c.send_frame(Code::CrcRetry, &[&name_field_raw(b"b.bin")]).unwrap();
    c.crc_abort("b.bin").unwrap();
    assert_eq!(walk_files(&server.files_dir()), Vec::<std::path::PathBuf>::new(), "nothing under files/");
    assert!(wait_until(Duration::from_secs(5), || tmp_is_empty(&server)), "aborted uploads left in tmp/");

    // An abort never destroys an earlier verified version.
    let v1 = pseudo_random(100, 8);
    upload_confirm_check(&server, &mut c, &id, "keep.bin", &v1, &o);
    c.upload_bytes("keep.bin", &pseudo_random(200, 9), &o).unwrap();
    c.crc_abort("keep.bin").unwrap();
    // The connection is in step and the worker has handled the abort once this round trip is done.
    upload_confirm_check(&server, &mut c, &id, "after.bin", &v1, &o);
    assert!(std::fs::read(server.stored_path(&id, "keep.bin")).unwrap() == v1);
    assert_eq!(db_verified(&db, &id, "keep.bin"), Some(1));
    // An aborted upload leaves no files row (it would point at nothing).
    for name in ["a.bin", "b.bin"] {
        assert_eq!(db_verified(&db, &id, name), None, "{name}: a files row after 1031");
    }
}

#[test]
fn registration_and_files_survive_a_restart() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("persist");
    let data = pseudo_random(50_000, 21);
    upload_confirm_check(&server, &mut c, &id, "p.bin", &data, &UploadOptions::default());
    drop(c);
    let status = server.stop();
    assert_eq!(status.code(), Some(0), "clean shutdown exit status: {status:?}");
    server.restart();

    let mut c = server.connect();
    c.reconnect(id, "persist", test_key()).unwrap();
    assert!(std::fs::read(server.stored_path(&id, "p.bin")).unwrap() == data);
    assert_eq!(db_verified(&server.db_path(), &id, "p.bin"), Some(1));
    upload_confirm_check(&server, &mut c, &id, "q.bin", &data[..1000], &UploadOptions::default());
    // The name is still taken after the restart.
    let mut other = server.connect();
    let e = other.register("persist").unwrap_err();
    assert_eq!(e.refusal_code(), Some(ResponseCode::RegistrationFailed));
}

#[test]
fn server_cksum_equals_cksum_command() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("cksum");
    let o = opts(64 * 1024, ContentSizeField::ThisPacket);
    for (i, n) in [0usize, 1, 100, 4096, 65_537, 1_000_003].into_iter().enumerate() {
        let path = server.temp_dir().join(format!("plain-{n}"));
        std::fs::write(&path, pseudo_random(n, 1000 + i as u64)).unwrap();
        let expect = cksum_cmd(&path);
        let name = format!("ck-{n}");
        let out = c.send_file(&name, &path, &o, &mut |_| {}).unwrap();
        assert_eq!(out, SendOutcome::Verified { cksum: expect, attempts: 1 }, "{n} bytes");
        assert_eq!(c.last_upload().unwrap().server_cksum, expect, "server cksum of {n} bytes");
        assert_eq!(cksum_cmd(&server.stored_path(&id, &name)), expect);
    }
}

#[test]
fn reuploads_keep_three_previous_versions() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("versions");
    let o = opts(1024, ContentSizeField::ThisPacket);
    let contents: Vec<Vec<u8>> = (0..5).map(|i| pseudo_random(1000 + 37 * i, 60 + i as u64)).collect();
    let vdir = server.data_dir().join("versions").join(id_hex(&id)).join("v.txt");
    for (k, data) in contents.iter().enumerate() {
        upload_confirm_check(&server, &mut c, &id, "v.txt", data, &o);
        // versions/<id>/v.txt/<n>, newest = largest n: the previous min(k, 3) uploads, in order.
        let mut kept: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for p in walk_files(&vdir) {
            let n: u64 = p.file_name().unwrap().to_str().unwrap().parse().expect("numeric version name");
            kept.insert(n, std::fs::read(&p).unwrap());
        }
        let kept: Vec<Vec<u8>> = kept.into_values().collect();
        let expect: Vec<Vec<u8>> = contents[k.saturating_sub(3)..k].to_vec();
        assert!(
            kept == expect,
            "after upload {k}: {} versions kept, not the previous {}",
            kept.len(),
            expect.len()
        );
    }
}

/// Write `bytes` one byte per write, pausing briefly now and then.
fn trickle(c: &mut Client, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        c.send_raw(std::slice::from_ref(b)).unwrap();
        if i % 8 == 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

#[test]
fn a_client_writing_one_byte_at_a_time() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    let name = name_field_raw(b"trickle");
    trickle(&mut c, &frame(&[0; 16], Code::Register, &[&name]));
    let Response::RegistrationOk { id } = expect_reply(&mut c, ResponseCode::RegistrationOk) else {
        unreachable!()
    };
    let spki = test_key().to_public_key().to_public_key_der().unwrap();
    trickle(&mut c, &frame(&id, Code::PublicKey, &[&name, spki.as_bytes()]));
    let Response::KeyAccepted { encrypted_key, .. } = expect_reply(&mut c, ResponseCode::KeyAccepted) else {
        unreachable!()
    };
    let key = crypto::decrypt_session_key(test_key(), &encrypted_key, OaepHash::Sha1).unwrap();
    let data = pseudo_random(100, 1);
    let file = name_field_raw(b"t.bin");
    for p in packet_frames(&id, &key, &file, &data, 64) {
        trickle(&mut c, &p);
    }
    let Response::FileReceived { content_size, file_name, cksum, .. } =
        expect_reply(&mut c, ResponseCode::FileReceived)
    else {
        unreachable!()
    };
    assert_eq!((content_size, file_name, cksum), (112, file, crypto::cksum(&data)));
    trickle(&mut c, &frame(&id, Code::CrcOk, &[&file]));
    expect_reply(&mut c, ResponseCode::Ack);
    assert_eq!(std::fs::read(server.stored_path(&id, "t.bin")).unwrap(), data);
}

#[test]
fn several_frames_in_one_write_and_frames_split_across_writes() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("batch");
    let key = *c.aes_key().unwrap();
    let a = pseudo_random(500, 1);
    let b = pseudo_random(3000, 2);
    c.upload_bytes("a.bin", &a, &UploadOptions::default()).unwrap();

    // One write: 1029 a.bin, three packets of b.bin, 1029 b.bin, 1025 with a taken name.
    let mut bytes = frame(&id, Code::CrcOk, &[&name_field_raw(b"a.bin")]);
    for p in packet_frames(&id, &key, &name_field_raw(b"b.bin"), &b, 1024) {
        bytes.extend_from_slice(&p);
    }
    bytes.extend_from_slice(&frame(&id, Code::CrcOk, &[&name_field_raw(b"b.bin")]));
    bytes.extend_from_slice(&frame(&[0; 16], Code::Register, &[&name_field_raw(b"batch")]));
    c.send_raw(&bytes).unwrap();
    expect_reply(&mut c, ResponseCode::Ack);
    let Response::FileReceived { cksum, .. } = expect_reply(&mut c, ResponseCode::FileReceived) else {
        unreachable!()
    };
    assert_eq!(cksum, crypto::cksum(&b));
    expect_reply(&mut c, ResponseCode::Ack);
    expect_reply(&mut c, ResponseCode::RegistrationFailed);
    assert_eq!(std::fs::read(server.stored_path(&id, "a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(server.stored_path(&id, "b.bin")).unwrap(), b);

    // The same kind of stream cut at awkward places: inside a header, inside a payload.
    let mut bytes = frame(&[0; 16], Code::Register, &[&name_field_raw(b"batch")]);
    bytes.extend_from_slice(&frame(&[0; 16], Code::Register, &[&name_field_raw(b"batch-2")]));
    bytes.extend_from_slice(&frame(&[0; 16], Code::Register, &[&name_field_raw(b"batch")]));
    for cut in [[0, 10, 150, 290, 300, 560, bytes.len()]] {
        for w in cut.windows(2) {
            c.send_raw(&bytes[w[0]..w[1]]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    expect_reply(&mut c, ResponseCode::RegistrationFailed);
    expect_reply(&mut c, ResponseCode::RegistrationOk);
    expect_reply(&mut c, ResponseCode::RegistrationFailed);
}

#[test]
fn a_reader_that_stops_reading_loses_no_reply() {
    // A quiet server (info, not debug): logging every refusal would dominate
    // the run time here.
    let launch = Launch { log_level: "info", ..Launch::default() };
    let mut server = TestServer::start_with(&[], launch, |_| {});
    let mut c = server.connect();
    let mut writer = c.stream().try_clone().unwrap();
    writer.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    // Reconnects (1027) with unknown ids: each 1606 echoes the id sent, so order and loss both show.
    let id_of = |i: usize| -> ClientId { (((i as u128 + 1) << 64) | 0xfeed).to_le_bytes() };
    const MAX_FRAMES: usize = 1_000_000;
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent2, stop2) = (sent.clone(), stop.clone());
    let w = std::thread::spawn(move || {
        let name = name_field_raw(b"nobody");
        for i in 0..MAX_FRAMES {
            if stop2.load(Ordering::SeqCst) {
                break;
            }
            writer.write_all(&frame(&id_of(i), Code::Reconnect, &[&name])).expect("write");
            sent2.store(i + 1, Ordering::SeqCst);
        }
    });
    // Wait until writes stall for good: the server has stopped reading this connection
    // (the kernel buffers both ways are full, and so is the server's 64 KiB of output).
    let t0 = Instant::now();
    let mut last = (0, Instant::now());
    let paused = loop {
        std::thread::sleep(Duration::from_millis(50));
        let n = sent.load(Ordering::SeqCst);
        if w.is_finished() || t0.elapsed() > Duration::from_secs(40) {
            break false;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(700) && n * 23 > 64 * 1024 {
            break true;
        }
    };
    stop.store(true, Ordering::SeqCst);
    assert!(paused, "the server never stopped reading: {} frames went in", sent.load(Ordering::SeqCst));
    // Now read every reply; the writer finishes its frame once the server reads again.
    c.stream().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0;
    loop {
        let finished = w.is_finished();
        if got < sent.load(Ordering::SeqCst) {
            match c.read_response() {
                Ok(Response::ReconnectDenied { id }) => {
                    assert_eq!(id, id_of(got), "reply {got} out of order")
                }
                other => panic!("reply {got} of {}: {other:?}", sent.load(Ordering::SeqCst)),
            }
            got += 1;
        } else if finished {
            break;
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    w.join().unwrap();
    assert_eq!(got, sent.load(Ordering::SeqCst));
    // The connection still works, and so does the server.
    c.register("after-backlog").unwrap();
    assert!(server.is_alive(), "server exited: {}", server.log_text());
}

#[test]
fn at_the_limit_a_new_connection_takes_the_slot_of_one_that_never_uploaded() {
    let server = TestServer::start(&["--max-connections", "4"]);
    let (mut uploader, uid) = server.registered_client("uploader");
    upload_confirm_check(&server, &mut uploader, &uid, "u.bin", b"progress", &UploadOptions::default());
    let held: Vec<(Client, ClientId)> =
        (0..3).map(|i| server.registered_client(&format!("held-{i}"))).collect();
    // The table is full: the fifth connection is served, in place of the
    // oldest connection that never uploaded (held-0).
    let mut c = server.connect();
    let id = c.register("late").unwrap();
    c.send_public_key("late", test_key()).unwrap();
    let extra = assert_closed(held[0].0.stream(), Duration::from_secs(5));
    assert!(extra.is_empty(), "the evicted connection got {} bytes", extra.len());
    server.wait_for_log("evicted", Duration::from_secs(5));
    upload_confirm_check(&server, &mut c, &id, "late.bin", b"in at last", &UploadOptions::default());
    // The uploader kept its slot.
    upload_confirm_check(&server, &mut uploader, &uid, "u2.bin", b"still here", &UploadOptions::default());
}

#[test]
fn two_clients_uploading_the_same_file_name_are_kept_apart() {
    let server = TestServer::start(&[]);
    let handles: Vec<_> = ["alice", "bob"]
        .into_iter()
        .enumerate()
        .map(|(i, who)| {
            let (mut c, id) = server.registered_client(who);
            std::thread::spawn(move || {
                let data = pseudo_random(700_000, 90 + i as u64);
                let up = c
                    .upload_bytes("same.txt", &data, &opts(64 * 1024, ContentSizeField::ThisPacket))
                    .unwrap();
                assert!(up.cksum_matches());
                c.crc_ok("same.txt").unwrap();
                (id, data)
            })
        })
        .collect();
    let results: Vec<(ClientId, Vec<u8>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(results[0].0, results[1].0);
    for (id, data) in &results {
        assert!(std::fs::read(server.stored_path(id, "same.txt")).unwrap() == *data);
        assert_eq!(db_verified(&server.db_path(), id, "same.txt"), Some(1));
    }
    assert_eq!(walk_files(&server.files_dir()).len(), 2);
}

#[test]
fn port_info_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [OsStr::new("--data-dir"), data.as_os_str(), OsStr::new("--log-level"), OsStr::new("info")];

    // A valid port.info: the server listens on 0.0.0.0 at that port. (A free
    // port can be taken by a parallel test before the server binds it: then
    // another is tried.)
    let (port, p) = (0..5)
        .find_map(|_| {
            let port = free_port();
            std::fs::write(dir.path().join("port.info"), format!("{port}\n")).unwrap();
            let p = RawServer::spawn(dir.path(), &args);
            let want = format!("listening on 0.0.0.0:{port}");
            wait_until(Duration::from_secs(20), || {
                p.log_text().contains(&want) || p.log_text().contains("Address already in use")
            });
            p.log_text().contains(&want).then_some((port, p))
        })
        .expect("the server never listened on the port of port.info");
    let mut c = Client::connect(("127.0.0.1", port), &test_client_options()).unwrap();
    c.register("port-info").unwrap();
    drop(c);
    drop(p);

    // An invalid port.info: a warning, then port 1256 (which may be taken on this machine).
    std::fs::write(dir.path().join("port.info"), "not-a-port\n").unwrap();
    let mut p = RawServer::spawn(dir.path(), &args);
    let settled = |p: &RawServer| {
        let l = p.log_text();
        l.contains("listening on") || l.contains("cannot start")
    };
    let end = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = p.wait_exit(Duration::from_millis(100)) {
            break Some(s);
        }
        if settled(&p) || Instant::now() > end {
            break None;
        }
    };
    let log = p.log_text();
    assert!(log.contains("WARN") && log.contains("port.info") && log.contains("1256"), "log:\n{log}");
    match exit {
        None => assert!(log.contains("listening on 0.0.0.0:1256"), "log:\n{log}"),
        Some(s) => {
            assert_eq!(s.code(), Some(1), "{s:?}");
            assert!(log.contains("cannot listen on 0.0.0.0:1256"), "log:\n{log}");
        }
    }
}

#[test]
fn startup_failures_exit_1_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&OsStr]| -> (std::process::ExitStatus, String) {
        let mut p = RawServer::spawn(dir.path(), args);
        let s = p
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("still running:\n{}", p.log_text()));
        (s, p.log_text())
    };

    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("data");
    let (s, log) =
        run(&[OsStr::new("--listen"), OsStr::new(&addr), OsStr::new("--data-dir"), data.as_os_str()]);
    assert_eq!(s.code(), Some(1), "{s:?}\n{log}");
    assert!(log.contains(&format!("cannot listen on {addr}")) && log.contains("in use"), "stderr:\n{log}");

    // Data directory below a regular file.
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let bad = dir.path().join("file").join("data");
    let (s, log) =
        run(&[OsStr::new("--listen"), OsStr::new("127.0.0.1:0"), OsStr::new("--data-dir"), bad.as_os_str()]);
    assert_eq!(s.code(), Some(1), "{s:?}\n{log}");
    assert!(log.contains("cannot start") && log.contains(&bad.display().to_string()), "stderr:\n{log}");

    // A database file that is not a database.
    let d2 = dir.path().join("d2");
    std::fs::create_dir(&d2).unwrap();
    std::fs::write(d2.join("backupd.db"), vec![0x5a; 8192]).unwrap();
    let (s, log) =
        run(&[OsStr::new("--listen"), OsStr::new("127.0.0.1:0"), OsStr::new("--data-dir"), d2.as_os_str()]);
    assert_eq!(s.code(), Some(1), "{s:?}\n{log}");
    assert!(log.contains("cannot start") && log.contains("database"), "stderr:\n{log}");
}

/// Every server flag: its default exactly as `--help` shows it, and its
/// environment variable.
const SERVER_FLAGS: &[(&str, &str, &str)] = &[
    ("--listen", "0.0.0.0:<port from ./port.info, else 1256>", "BACKUPD_LISTEN"),
    ("--data-dir", "backupd-data", "BACKUPD_DATA_DIR"),
    ("--db", "<data-dir>/backupd.db", "BACKUPD_DB"),
    ("--max-connections", "256", "BACKUPD_MAX_CONNECTIONS"),
    ("--max-connections-per-ip", "64", "BACKUPD_MAX_CONNECTIONS_PER_IP"),
    ("--max-unauthenticated-per-ip", "32", "BACKUPD_MAX_UNAUTHENTICATED_PER_IP"),
    ("--login-timeout", "10s", "BACKUPD_LOGIN_TIMEOUT"),
    ("--max-clients", "100000", "BACKUPD_MAX_CLIENTS"),
    ("--registration-rate", "10", "BACKUPD_REGISTRATION_RATE"),
    ("--registration-burst", "100", "BACKUPD_REGISTRATION_BURST"),
    ("--session-rate", "50", "BACKUPD_SESSION_RATE"),
    ("--session-burst", "512", "BACKUPD_SESSION_BURST"),
    ("--max-packet", "16MiB", "BACKUPD_MAX_PACKET"),
    ("--max-file-size", "4294967295", "BACKUPD_MAX_FILE_SIZE"),
    ("--memory-budget", "64MiB", "BACKUPD_MEMORY_BUDGET"),
    ("--keep-versions", "3", "BACKUPD_KEEP_VERSIONS"),
    ("--quota", "0", "BACKUPD_QUOTA"),
    ("--quota-files", "0", "BACKUPD_QUOTA_FILES"),
    ("--min-free", "64MiB", "BACKUPD_MIN_FREE"),
    ("--db-busy-timeout", "5s", "BACKUPD_DB_BUSY_TIMEOUT"),
    ("--sync-mode", "syncfs", "BACKUPD_SYNC_MODE"),
    ("--oaep-hash", "sha1", "BACKUPD_OAEP_HASH"),
    ("--ack-retry", "off", "BACKUPD_ACK_RETRY"),
    ("--idle-timeout", "60s", "BACKUPD_IDLE_TIMEOUT"),
    ("--header-timeout", "10s", "BACKUPD_HEADER_TIMEOUT"),
    ("--stale-upload-timeout", "15m", "BACKUPD_STALE_UPLOAD_TIMEOUT"),
    ("--shutdown-timeout", "10s", "BACKUPD_SHUTDOWN_TIMEOUT"),
    ("--metrics-file", "off", "BACKUPD_METRICS_FILE"),
    ("--metrics-interval", "10s", "BACKUPD_METRICS_INTERVAL"),
    ("--metrics-max-clients", "1000", "BACKUPD_METRICS_MAX_CLIENTS"),
    ("--log-level", "info", "BACKUPD_LOG_LEVEL"),
    ("--log-file", "standard error", "BACKUPD_LOG_FILE"),
];

/// The S3 tier's flags: in the README always, in `--help` only in builds
/// with the `s3` feature.
const S3_FLAGS: &[(&str, &str, &str)] = &[
    ("--s3-endpoint", "off", "BACKUPD_S3_ENDPOINT"),
    ("--s3-bucket", "none", "BACKUPD_S3_BUCKET"),
    ("--s3-region", "us-east-1", "BACKUPD_S3_REGION"),
    ("--s3-prefix", "none", "BACKUPD_S3_PREFIX"),
    ("--s3-mode", "replica", "BACKUPD_S3_MODE"),
    ("--s3-timeout", "30s", "BACKUPD_S3_TIMEOUT"),
    ("--cache-size", "1GiB", "BACKUPD_CACHE_SIZE"),
    ("--s3-credentials", "the AWS_* variables", "BACKUPD_S3_CREDENTIALS"),
];

/// The flags `--help` lists in this build.
fn help_flags() -> Vec<(&'static str, &'static str, &'static str)> {
    let s3: &[_] = if cfg!(feature = "s3") { S3_FLAGS } else { &[] };
    SERVER_FLAGS.iter().chain(s3).copied().collect()
}

/// `backupd ARGS` with no BACKUPD_* variable set (a value set in the
/// environment would show in `--help` and change what it parses).
fn backupd_output(args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(server_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BACKUPD_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().unwrap()
}

/// The option blocks of a `--help` text: each runs from its "  --flag" line
/// to the next option line (or the end of the options).
fn option_blocks(text: &str) -> BTreeMap<String, String> {
    let mut blocks: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if !line.is_empty() && !line.starts_with(' ') {
            current = None; // a section heading ("Options:") or trailing text
        }
        // Option lines are indented 2 ("  -h, --help") or 6 ("      --listen <LISTEN>");
        // deeper lines starting with '-' are lists of possible values.
        if (2..=6).contains(&(line.len() - t.len())) && t.starts_with('-') {
            let flag = t.split([' ', ',']).find(|w| w.starts_with("--")).unwrap_or(t).to_string();
            current = Some(flag.clone());
            blocks.insert(flag, String::new());
        }
        if let Some(f) = &current {
            let b = blocks.get_mut(f).unwrap();
            b.push_str(line);
            b.push('\n');
        }
    }
    blocks
}

/// Every `[label: ...]` annotation in `block` (label "default" or "env").
fn annotations<'a>(block: &'a str, label: &str) -> Vec<&'a str> {
    let open = format!("[{label}: ");
    block
        .match_indices(&open)
        .map(|(at, _)| {
            let rest = &block[at + open.len()..];
            &rest[..rest.find(']').expect("unclosed annotation")]
        })
        .collect()
}

#[test]
fn help_lists_every_flag_with_its_default_and_variable() {
    for args in [&["--help"][..], &["serve", "--help"]] {
        let out = backupd_output(args);
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        let text = String::from_utf8(out.stdout).unwrap();
        let blocks = option_blocks(&text);
        let flags = help_flags();
        for &(flag, default, var) in &flags {
            let block = blocks.get(flag).unwrap_or_else(|| panic!("{args:?}: {flag} missing:\n{text}"));
            assert_eq!(annotations(block, "default"), [default], "{args:?}: {flag}'s default:\n{block}");
            // clap shows `[env: NAME=]`, the variable's value after the `=` (none here).
            assert_eq!(
                annotations(block, "env"),
                [format!("{var}=")],
                "{args:?}: {flag}'s variable:\n{block}"
            );
        }
        for flag in blocks.keys() {
            assert!(
                flags.iter().any(|f| f.0 == flag) || flag == "--help" || flag == "--version",
                "{args:?}: untested flag {flag}"
            );
        }
    }
}

#[test]
fn readme_lists_every_server_flag_as_help_does() {
    let readme = include_str!("../README.md");
    // Rows of the configuration table: | `--flag ARG` | `VAR` | default | meaning |
    let rows: BTreeMap<&str, (&str, &str)> = readme
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            let flag = cells[0].trim_start_matches("| `").split([' ', '`']).next().unwrap();
            (flag, (cells[1].trim_matches('`'), cells[2].trim_matches('`')))
        })
        .collect();
    for &(flag, default, var) in SERVER_FLAGS.iter().chain(S3_FLAGS) {
        let (v, d) = rows.get(flag).unwrap_or_else(|| panic!("{flag} missing from the README's table"));
        assert_eq!((*v, *d), (var, default), "README row of {flag}");
    }
    assert_eq!(rows.len(), SERVER_FLAGS.len() + S3_FLAGS.len(), "README rows: {:?}", rows.keys());
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--no-such-flag"][..],
        &["--max-connections", "many"],
        &["--sync-mode", "sometimes"],
        &["serve", "--login-timeout", "soon"],
        &["restore", "alice"],
    ] {
        let out = backupd_output(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {:?}\n{stderr}", out.status);
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    // A word that is no subcommand is named as such, after options too
    // (clap alone said it "cannot be used with '--data-dir'").
    for args in [&["bogus"][..], &["--data-dir", "d", "bogus"], &["--listen", "127.0.0.1:1", "verfy", "x"]] {
        let out = backupd_output(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {:?}\n{stderr}", out.status);
        let word = args.iter().find(|w| ["bogus", "verfy"].contains(w)).unwrap();
        assert!(stderr.contains(&format!("error: unrecognized subcommand '{word}'")), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot be used with"), "{args:?}: {stderr}");
    }
    // The exit codes are documented in --help.
    let help = String::from_utf8(backupd_output(&["--help"]).stdout).unwrap();
    for code in ["0 ", "1 ", "2 ", "3 ", "130 "] {
        assert!(help.contains(&format!("\n  {code}")), "exit code {code}not in --help:\n{help}");
    }
}

/// The worker's two threads (issue 14): an upload still being received is
/// the packet thread's, a received one waiting for its 1029 is the committing
/// worker's. A shutdown with one of each leaves neither temp file behind and
/// publishes neither; a client that hangs up mid-upload leaves nothing either,
/// and the server keeps serving.
#[test]
fn temp_files_of_received_and_half_received_uploads_are_removed_by_whichever_thread_holds_them() {
    let mut server = TestServer::start(&["--shutdown-timeout", "2s"]);
    let o = opts(1024, ContentSizeField::ThisPacket);
    // Received, 1603 answered, no 1029: staged at the committing worker.
    let (mut staged, sid) = server.registered_client("staged");
    let data = pseudo_random(5000, 14);
    assert!(staged.upload_bytes("staged.bin", &data, &o).unwrap().cksum_matches());
    // Packet 1 of 5 only: being received at the packet thread.
    let (mut half, hid) = server.registered_client("half");
    let key = *half.aes_key().unwrap();
    let nf = name_field_raw(b"half.bin");
    let frames = packet_frames(&hid, &key, &nf, &pseudo_random(5000, 15), 1024);
    assert_eq!(frames.len(), 5);
    half.send_raw(&frames[0]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || walk_files(&server.data_dir().join("tmp")).len() == 2));

    // A third client hangs up in the middle of its upload: its temp file goes.
    {
        let (mut gone, gid) = server.registered_client("gone");
        let key = *gone.aes_key().unwrap();
        let nf = name_field_raw(b"gone.bin");
        let frames = packet_frames(&gid, &key, &nf, &pseudo_random(5000, 16), 1024);
        gone.send_raw(&frames[..2].concat()).unwrap();
        assert!(wait_until(Duration::from_secs(10), || walk_files(&server.data_dir().join("tmp")).len() == 3));
    }
    assert!(
        wait_until(Duration::from_secs(10), || walk_files(&server.data_dir().join("tmp")).len() == 2),
        "the temp file of a closed connection's upload stayed"
    );
    // The server still serves: a whole upload by another client.
    let (mut other, oid) = server.registered_client("other");
    upload_confirm_check(&server, &mut other, &oid, "other.bin", &pseudo_random(3000, 17), &o);

    let status = server.stop();
    assert!(status.success(), "{status:?}\n{}", server.log_text());
    server.wait_for_log("shut down cleanly", Duration::from_secs(5));
    assert!(
        tmp_is_empty(&server),
        "a temp file outlived the shutdown: {:?}",
        walk_files(&server.data_dir().join("tmp"))
    );
    assert!(!server.stored_path(&sid, "staged.bin").exists());
    assert!(!server.stored_path(&hid, "half.bin").exists());
    assert_eq!(db_verified(&server.db_path(), &sid, "staged.bin").unwrap_or(0), 0);
    drop((staged, half));
}

/// A launch with `BACKUPD_FAULTS` set to `spec`.
fn faults(spec: &'static str) -> Launch {
    let tweak = move |cmd: &mut std::process::Command| {
        cmd.env("BACKUPD_FAULTS", spec);
    };
    Launch { tweak: Some(Arc::new(tweak)), ..Launch::default() }
}

/// Large uploads go to the disk direct (O_DIRECT) past their first 8 MiB,
/// in 1 MiB chunks (src/worker/sink.rs): sizes at and around that point and
/// the chunk and 4 KiB edges, packets that straddle them, every packet
/// convention, all stored byte-identical. Once as is (the trace shows that
/// direct writes happened) and once with every direct write refused as a
/// filesystem without O_DIRECT refuses it (the page-cache fallback).
#[test]
fn large_uploads_written_direct_are_stored_byte_identical() {
    use ContentSizeField::*;
    const FROM: usize = 8 * MIB;
    let cases = [
        (FROM, MIB, ThisPacket),
        (FROM + 1, MIB, ThisPacket),
        (FROM + MIB, MIB, ThisPacket),
        (FROM + MIB + 4095, 777_777, ThisPacket),
        (FROM + MIB + 4096, MIB, ThisPacket),
        (FROM + 3 * MIB + 4097, 65_536, WholeFile),
        (FROM + 2 * MIB + 5, MIB, PerPacketEncrypted),
    ];
    // (faults, arguments, direct writes made, direct writes refused)
    let runs: [(&str, &[&str], bool, usize); 3] = [
        ("trace", &[], true, 0),
        // Every direct write refused: the uploads with a direct write to
        // make (all but the first two: 8 MiB, and 8 MiB + 1 whose one byte
        // past is the tail) see it refused at their first chunk, and at
        // their second when it was queued behind the first before the
        // refusal came back (8 MiB + 3 MiB + 4097, 8 MiB + 2 MiB + 5); the
        // rest of each then through the page cache.
        ("trace,fail@direct-write", &[], true, 7),
        // The chunk buffers do not fit in the memory budget: none are taken.
        ("trace", &["--memory-budget", "2MiB"], false, 0),
    ];
    for (spec, args, direct, refused) in runs {
        let server = TestServer::start_with(args, faults(spec), |_| {});
        let (mut c, id) = server.registered_client("large");
        for (i, (n, p, conv)) in cases.into_iter().enumerate() {
            let data = pseudo_random(n, 300 + i as u64);
            upload_confirm_check(&server, &mut c, &id, &format!("large-{i}-{n}.bin"), &data, &opts(p, conv));
        }
        assert!(wait_until(Duration::from_secs(5), || tmp_is_empty(&server)), "staging files left in tmp/");
        let log = server.log_text();
        let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count("fault point direct-write") > 0, direct, "{spec} {args:?}: direct writes made");
        assert_eq!(count("direct write refused"), refused, "{spec} {args:?}: direct writes refused");
        let no_room = if direct { 0 } else { 6 };
        assert_eq!(count("no room in the memory budget to write direct"), no_room, "{spec} {args:?}");
    }
}

/// A budget too tight for the direct writer's buffers beside the share kept
/// for every connection's piece: 3 MiB + 12 KiB of buffers plus 64 KiB, with
/// 256 connections. An upload crosses 8 MiB in a packet of 32 bytes, with
/// nothing else in flight: were its buffers granted then from the whole
/// budget, the 64 KiB left could never hold the 128 KiB piece its next
/// packet needs, and it would wait for itself. Direct buffers come from the
/// budget's open part only, which cannot hold them here: no upload writes
/// direct, and the 12 MiB upload is stored byte-identical (the client's read
/// of its 1603 gives up after 30 s: a hang guard). The pauses only let each
/// packet reach the worker alone.
#[test]
fn a_budget_too_tight_for_direct_buffers_beside_the_pieces_cannot_stall_an_upload() {
    const GRANT: usize = 3 * (MIB + 4096);
    let budget = (GRANT + 64 * 1024).to_string();
    let server = TestServer::start(&["--memory-budget", &budget]);
    let (mut c, id) = server.registered_client("tight");
    let key = *c.aes_key().expect("session key");
    let name = name_field_raw(b"tight.bin");
    let data = pseudo_random(12 * MIB, 900);
    let ct = crypto::encrypt_all(&key, &data);
    let parts = [&ct[..8 * MIB], &ct[8 * MIB..8 * MIB + 32], &ct[8 * MIB + 32..]];
    for (i, part) in parts.iter().enumerate() {
        c.send_raw(&packet_frame(&id, part.len() as u32, data.len() as u32, i as u16 + 1, 3, &name, part))
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    match c.read_response() {
        Ok(Response::FileReceived { cksum, .. }) => assert_eq!(cksum, crypto::cksum(&data)),
        other => panic!("expected 1603, got {other:?}; log tail:\n{}", server.log_text()),
    }
    c.crc_ok("tight.bin").unwrap();
    assert!(std::fs::read(server.stored_path(&id, "tight.bin")).unwrap() == data, "stored with other bytes");
    let log = server.log_text();
    assert!(log.contains("leaves room for 0 upload(s) writing direct"), "{log}");
    assert!(log.contains("no room in the memory budget to write direct"), "{log}");
}

/// Wait (20 s at most) until `tmp` holds `n` temp files of 9 MiB or more:
/// `n` uploads past their first 8 MiB and their first direct chunk.
fn past_9_mib(tmp: &std::path::Path, n: usize) -> bool {
    wait_until(Duration::from_secs(20), || {
        let files = walk_files(tmp);
        files.len() == n
            && files.iter().all(|p| std::fs::metadata(p).is_ok_and(|m| m.len() >= 9 * MIB as u64))
    })
}

/// At most four uploads write direct at once (each holds three 1 MiB
/// buffers): six large uploads all past their first 8 MiB together, two go
/// on through the page cache; all six are stored byte-identical.
#[test]
fn at_most_four_uploads_write_direct_at_once_and_the_others_are_stored_too() {
    let server = TestServer::start(&[]);
    let tmp = server.data_dir().join("tmp");
    let uploads: Vec<_> = (0..6)
        .map(|i| {
            let (c, id) = server.registered_client(&format!("big{i}"));
            let key = *c.aes_key().expect("session key");
            let name = name_field_raw(format!("big-{i}.bin").as_bytes());
            let data = pseudo_random(12 * MIB + 100 * i, 400 + i as u64);
            let frames = packet_frames(&id, &key, &name, &data, MIB);
            (c, id, name, data, frames)
        })
        .collect();
    let mut uploads = uploads;
    // Ten packets each: every upload is past 8 MiB and has written its first chunk ...
    for (c, _, _, _, frames) in &mut uploads {
        c.send_raw(&frames[..10].concat()).unwrap();
    }
    assert!(past_9_mib(&tmp, 6), "six temp files of 9 MiB or more");
    // ... before any ends.
    for (c, id, name, data, frames) in &mut uploads {
        c.send_raw(&frames[10..].concat()).unwrap();
        match c.read_response() {
            Ok(Response::FileReceived { cksum, .. }) => assert_eq!(cksum, crypto::cksum(data)),
            other => panic!("expected 1603, got {other:?}"),
        }
        c.send_frame(Code::CrcOk, &[&name[..]]).unwrap();
        expect_reply(c, ResponseCode::Ack);
        let stored = server.stored_path(
            id,
            std::str::from_utf8(&name[..name.iter().position(|&b| b == 0).unwrap()]).unwrap(),
        );
        assert!(std::fs::read(stored).unwrap() == *data, "a large upload stored with other bytes");
    }
    let cached = server.log_text().lines().filter(|l| l.contains("uploads write direct already")).count();
    assert_eq!(cached, 2, "uploads beyond the four going through the page cache");
}

/// Peers that send little but hold much: four connections start large
/// uploads, pass 8 MiB (each takes a place to write direct and 3 MiB of the
/// memory budget) and stall. Another client's large upload and a small one
/// are still stored (the large one through the page cache); once the four
/// are gone their places and budget are free again: the next large upload
/// writes direct, and no temp file is left.
#[test]
fn uploads_stalled_past_8_mib_hold_no_place_once_their_connections_are_gone() {
    let server = TestServer::start(&[]);
    let tmp = server.data_dir().join("tmp");
    let mut stalled = Vec::new();
    for i in 0..4 {
        let (mut c, id) = server.registered_client(&format!("staller{i}"));
        let key = *c.aes_key().expect("session key");
        let name = name_field_raw(format!("held-{i}.bin").as_bytes());
        let frames = packet_frames(&id, &key, &name, &pseudo_random(16 * MIB, 500 + i as u64), MIB);
        c.send_raw(&frames[..10].concat()).unwrap();
        stalled.push(c);
    }
    assert!(past_9_mib(&tmp, 4), "four temp files of 9 MiB or more");
    let o = opts(MIB, ContentSizeField::ThisPacket);
    let (mut c, id) = server.registered_client("patient");
    let direct_refused = |s: &TestServer| s.log_text().matches("uploads write direct already").count();
    upload_confirm_check(&server, &mut c, &id, "during.bin", &pseudo_random(12 * MIB, 600), &o);
    upload_confirm_check(&server, &mut c, &id, "small.bin", &pseudo_random(4096, 601), &o);
    assert_eq!(direct_refused(&server), 1, "the large upload during the stall went through the page cache");
    drop(stalled);
    assert!(
        wait_until(Duration::from_secs(10), || tmp_is_empty(&server)),
        "the stalled uploads' temp files left"
    );
    upload_confirm_check(&server, &mut c, &id, "after.bin", &pseudo_random(12 * MIB, 602), &o);
    assert_eq!(direct_refused(&server), 1, "a place still held after the stalled connections closed");
}

/// Small uploads (all of them in their first content piece) wait for their
/// 1029 in temp files without a name: nothing in tmp/, a descriptor held.
/// At most 32 at once (the others are named in tmp/); every one is stored
/// byte-identical once confirmed, a dropped one leaves nothing, a
/// replacement goes through tmp/ under its name. With `fail@unnamed` (a
/// filesystem without `O_TMPFILE`), every upload is named.
#[test]
fn small_uploads_wait_without_a_name_at_most_32_and_the_rest_in_tmp() {
    let server = TestServer::start(&[]);
    let o = UploadOptions::default();
    let mut staged: Vec<_> = (0..40)
        .map(|i| {
            let (mut c, id) = server.registered_client(&format!("small{i}"));
            let data = pseudo_random(4096 + i, 700 + i as u64);
            assert!(c.upload_bytes("s.bin", &data, &o).unwrap().cksum_matches());
            (c, id, data)
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || server.unnamed_temps() == 32),
        "files without a name: {}",
        server.unnamed_temps()
    );
    assert_eq!(walk_files(&server.tmp_dir()).len(), 8, "the uploads past the 32 are named in tmp/");
    // One of them hangs up: its file goes with its descriptor, nothing is stored.
    let (gone, gone_id, _) = staged.remove(0);
    drop(gone);
    assert!(wait_until(Duration::from_secs(10), || server.unnamed_temps() == 31));
    for (c, id, data) in &mut staged {
        c.crc_ok("s.bin").unwrap();
        assert!(std::fs::read(server.stored_path(id, "s.bin")).unwrap() == *data);
    }
    assert!(!server.stored_path(&gone_id, "s.bin").exists());
    assert!(wait_until(Duration::from_secs(10), || server.unnamed_temps() == 0 && tmp_is_empty(&server)));
    // A replacement of a stored file, from a file without a name.
    let (c, id, older) = &mut staged[0];
    let newer = pseudo_random(3000, 799);
    upload_confirm_check(&server, c, id, "s.bin", &newer, &o);
    assert!(tmp_is_empty(&server));
    let kept = walk_files(&server.data_dir().join("versions"));
    assert_eq!(kept.len(), 1, "the replaced version is kept");
    assert!(std::fs::read(&kept[0]).unwrap() == *older);

    // No files without a name here: the same small upload waits in tmp/.
    let named = TestServer::start_with(&[], faults("fail@unnamed"), |_| {});
    named.wait_for_log("small uploads use named ones", Duration::from_secs(5));
    let (mut c, id) = named.registered_client("named");
    let data = pseudo_random(4096, 800);
    assert!(c.upload_bytes("n.bin", &data, &o).unwrap().cksum_matches());
    assert_eq!(walk_files(&named.tmp_dir()).len(), 1);
    assert_eq!(named.unnamed_temps(), 0);
    c.crc_ok("n.bin").unwrap();
    assert!(std::fs::read(named.stored_path(&id, "n.bin")).unwrap() == data);
    assert!(tmp_is_empty(&named));
}

/// Many uploads and their 1029s in one write, then a half-close: the stream
/// crosses the loop's 8 KiB read-ahead at every kind of place (inside a
/// header, fixed fields, content; between frames), small files' packets fit
/// in one read-ahead and larger ones go straight to their pieces. Every reply
/// comes in order, every file is stored byte-identical, and the half-close
/// that arrived with the last bytes is seen (the connection ends).
#[test]
fn uploads_in_one_write_across_read_ahead_boundaries() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("ahead");
    let key = *c.aes_key().unwrap();
    let sizes = [1usize, 15, 16, 17, 4096, 8191, 8192, 8193, 3000, 20_000, 0, 5000, 12_345, 100];
    let mut bytes = Vec::new();
    let mut files = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let data = pseudo_random(len, i as u64 + 100);
        let name = name_field_raw(format!("f{i}.bin").as_bytes());
        // Packets of 4 KiB + 7 bytes of content: pieces and read-aheads out of step.
        for p in packet_frames(&id, &key, &name, &data, 4103) {
            bytes.extend_from_slice(&p);
        }
        bytes.extend_from_slice(&frame(&id, Code::CrcOk, &[&name]));
        files.push((format!("f{i}.bin"), data));
    }
    c.send_raw(&bytes).unwrap();
    c.stream().shutdown(std::net::Shutdown::Write).unwrap();
    for (name, data) in &files {
        let Response::FileReceived { cksum, .. } = expect_reply(&mut c, ResponseCode::FileReceived) else {
            unreachable!()
        };
        assert_eq!(cksum, crypto::cksum(data), "{name}");
        expect_reply(&mut c, ResponseCode::Ack);
    }
    for (name, data) in &files {
        assert_eq!(&std::fs::read(server.stored_path(&id, name)).unwrap(), data, "{name}");
    }
    let rest = assert_closed(c.stream(), Duration::from_secs(30));
    assert!(rest.is_empty(), "bytes after the last reply: {rest:?}");
}
