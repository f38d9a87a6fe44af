//! Every refusal rule of issue 2 (sections 1, 4 and 6) against the real
//! `backupd` binary. Each case asserts the exact reply code, and then either
//! that the connection is closed, or that it is still usable by making a
//! request succeed on it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backupd::client::{Client, ContentSizeField, UploadOptions};
use backupd::crypto;
use backupd::protocol::{ClientId, Code, Response, ResponseCode, NAME_FIELD_LEN};
use common::*;
use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};

use ResponseCode::{Ack, FileReceived, GeneralError, ReconnectDenied, RegistrationFailed, RegistrationOk};

const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// A client name no other test uses.
fn fresh_name(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::SeqCst))
}

/// Prove a connection usable: a registration on it succeeds (1600).
fn assert_usable_by_register(c: &mut Client) {
    let name = fresh_name("usable");
    c.send_frame(Code::Register, &[&name_field_raw(name.as_bytes())]).unwrap();
    expect_reply(c, RegistrationOk);
}

/// Prove a connection with a session usable: a good upload gets its 1603 as
/// the very next reply (so no stray reply was queued) and 1029 gets 1604.
fn assert_usable_by_upload(c: &mut Client) {
    let name = fresh_name("ok");
    let data = pseudo_random(500, 77); // under every --max-file-size used here
    let up = c.upload_bytes(&name, &data, &UploadOptions { packet_size: 128, ..Default::default() }).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    c.crc_ok(&name).unwrap();
}

/// The session of a client: its id and AES key.
fn session(c: &Client) -> (ClientId, [u8; 32]) {
    (c.id(), *c.aes_key().expect("session key"))
}

/// Send `bytes`, expect 1607, expect the close.
fn assert_1607_and_close(server: &TestServer, what: &str, bytes: &[u8]) {
    let mut c = server.connect();
    c.send_raw(bytes).unwrap();
    match c.read_response() {
        Ok(Response::GeneralError) => {}
        other => panic!("{what}: expected 1607, got {other:?}"),
    }
    let extra = assert_closed(c.stream(), CLOSE_WITHIN);
    assert!(extra.is_empty(), "{what}: {} bytes after the 1607", extra.len());
}

#[test]
fn framing_errors_get_1607_and_close() {
    let server = TestServer::start(&[]);
    let z = [0u8; 16];
    let name = name_field_raw(b"framing");
    let unterminated = [b'a'; NAME_FIELD_LEN];
    let key = test_key().to_public_key().to_public_key_der().unwrap().as_bytes().to_vec();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let with_payload = |h: Vec<u8>, p: &[u8]| [h, p.to_vec()].concat();
    // Wrong version, unknown codes.
    for v in [0u8, 2, 4, 255] {
        cases.push((format!("version {v}"), with_payload(raw_header(&z, v, 1025, 255), &name)));
    }
    for code in [0u16, 1024, 1032, 1600, 65535] {
        cases.push((format!("code {code}"), with_payload(raw_header(&z, 3, code, 255), &name)));
    }
    // Payload sizes outside each code's bounds; payloads over a bound are not sent at all.
    for code in [1025u16, 1027, 1029, 1030, 1031] {
        cases.push((
            format!("{code} with 254 bytes"),
            with_payload(raw_header(&z, 3, code, 254), &name[..254]),
        ));
        cases.push((format!("{code} with 256 bytes (header only)"), raw_header(&z, 3, code, 256)));
        cases.push((format!("{code} with 0 bytes"), raw_header(&z, 3, code, 0)));
    }
    let short_key = with_payload(raw_header(&z, 3, 1026, 255 + 159), &[&name[..], &key[..159]].concat());
    cases.push(("1026 with a 159-byte key".into(), short_key));
    cases.push(("1026 with 255+2049 bytes (header only)".into(), raw_header(&z, 3, 1026, 255 + 2049)));
    cases.push(("1028 with 266 bytes".into(), with_payload(raw_header(&z, 3, 1028, 266), &[0; 266])));
    cases.push(("1028 over --max-packet (header only)".into(), raw_header(&z, 3, 1028, (16 << 20) + 1)));
    cases.push(("1028 of 4 GiB (header only)".into(), raw_header(&z, 3, 1028, u32::MAX)));
    // 255-byte name fields without a NUL.
    for code in [Code::Register, Code::Reconnect, Code::CrcOk, Code::CrcRetry, Code::CrcAbort] {
        cases.push((format!("{code:?} with an unterminated name"), frame(&z, code, &[&unterminated])));
    }
    cases.push(("1026 with an unterminated name".into(), frame(&z, Code::PublicKey, &[&unterminated, &key])));
    cases.push((
        "1028 with an unterminated file name".into(),
        packet_frame(&z, 16, 1, 1, 1, &unterminated, &[0; 16]),
    ));
    for (what, bytes) in &cases {
        assert_1607_and_close(&server, what, bytes);
    }
    // The operator is told which setting refused a packet too large (a
    // client that sends a whole file in one packet).
    server.wait_for_log("for code 1028 exceeds its bound 16777216 (--max-packet;", Duration::from_secs(5));
    // A session does not change this: a framing error on a connection that has a key.
    let (mut c, _) = server.registered_client("framing-session");
    c.send_raw(&raw_header(&c.id(), 3, 1029, 1000)).unwrap();
    expect_reply(&mut c, GeneralError);
    assert_closed(c.stream(), CLOSE_WITHIN);
    // The server itself is fine.
    let (mut c, _) = server.registered_client("framing-after");
    assert_usable_by_upload(&mut c);
}

#[test]
fn register_refusals_keep_the_connection() {
    let server = TestServer::start(&[]);
    let mut c1 = server.connect();
    c1.register("taken").unwrap();
    let mut c2 = server.connect();
    for _ in 0..2 {
        let e = c2.register("taken").unwrap_err();
        assert_eq!(e.refusal_code(), Some(RegistrationFailed), "{e}");
    }
    // Taken by a name registered on the same connection.
    c2.register("mine").unwrap();
    assert_eq!(c2.register("mine").unwrap_err().refusal_code(), Some(RegistrationFailed));
    // Names the server will not register: empty, control characters.
    for bad in [&b""[..], b"tab\tname", b"new\nline"] {
        c2.send_frame(Code::Register, &[&name_field_raw(bad)]).unwrap();
        expect_reply(&mut c2, GeneralError);
    }
    assert_usable_by_register(&mut c2);
    assert_usable_by_register(&mut c1);
}

#[test]
fn public_key_refusals_keep_the_connection() {
    let server = TestServer::start(&[]);
    let mut c = server.connect();
    let id = c.register("pk").unwrap();
    let other_id = server.connect().register("pk-other").unwrap();
    let good = test_key().to_public_key().to_public_key_der().unwrap().as_bytes().to_vec();
    let pk = name_field_raw(b"pk");
    let key_of = |bits: usize| {
        // A public key of any size (no primes needed): top bit set, odd.
        let n = (BigUint::from(1u32) << (bits - 1)) + BigUint::from(12345u32);
        let k = RsaPublicKey::new_unchecked(n, BigUint::from(65537u32));
        let mut der = k.to_public_key_der().unwrap().as_bytes().to_vec();
        der.resize(der.len().max(160), 0);
        der
    };
    let mut trailing_junk = good.clone();
    trailing_junk.extend_from_slice(&[0, 0, 1]);
    let cases: Vec<(&str, ClientId, [u8; NAME_FIELD_LEN], Vec<u8>)> = vec![
        ("unknown id", [0x42; 16], pk, good.clone()),
        ("name of another client", id, name_field_raw(b"pk-other"), good.clone()),
        ("id of another client", other_id, pk, good.clone()),
        ("all zero key", id, pk, vec![0; 162]),
        ("garbage key", id, pk, pseudo_random(300, 5)),
        ("non-zero bytes after the DER", id, pk, trailing_junk),
        ("512-bit key", id, pk, key_of(512)),
        ("1000-bit key", id, pk, key_of(1000)),
        ("4104-bit key", id, pk, key_of(4104)),
    ];
    for (what, hid, name, key) in &cases {
        c.send_raw(&frame(hid, Code::PublicKey, &[name, key])).unwrap();
        match c.read_response() {
            Ok(Response::GeneralError) => {}
            other => panic!("{what}: expected 1607, got {other:?}"),
        }
    }
    // No session came of any of them.
    let mut p = packet_frames(&id, &[0; 32], &name_field_raw(b"x"), b"x", 1024);
    c.send_raw(&p.remove(0)).unwrap();
    expect_reply(&mut c, GeneralError);
    // The same connection: a valid key now works, and so does an upload.
    c.set_id(id);
    c.send_public_key("pk", test_key()).unwrap();
    assert_usable_by_upload(&mut c);
}

#[test]
fn reconnect_refusals_get_1606_with_the_sent_id() {
    let server = TestServer::start(&[]);
    let (_, id) = server.registered_client("rc");
    let no_key_id = server.connect().register("rc-nokey").unwrap();
    let mut c = server.connect();
    let cases: [(&str, ClientId, &[u8]); 5] = [
        ("unknown id", [0x5a; 16], b"rc"),
        ("zero id", [0; 16], b"rc"),
        ("wrong name", id, b"rc-nokey"),
        ("empty name", id, b""),
        ("no key on file", no_key_id, b"rc-nokey"),
    ];
    for (what, hid, name) in cases {
        c.send_raw(&frame(&hid, Code::Reconnect, &[&name_field_raw(name)])).unwrap();
        match c.read_response() {
            Ok(Response::ReconnectDenied { id: echoed }) => assert_eq!(echoed, hid, "{what}: 1606 id"),
            other => panic!("{what}: expected 1606, got {other:?}"),
        }
    }
    // Register again on the same connection, as clients do after 1606.
    let new_id = c.register("rc-again").unwrap();
    c.send_public_key("rc-again", test_key()).unwrap();
    assert_eq!(c.id(), new_id);
    assert_usable_by_upload(&mut c);
    // And a proper reconnect on a connection that was denied before.
    let mut d = server.connect();
    d.send_raw(&frame(&[1; 16], Code::Reconnect, &[&name_field_raw(b"rc")])).unwrap();
    expect_reply(&mut d, ReconnectDenied);
    d.reconnect(id, "rc", test_key()).unwrap();
    assert_usable_by_upload(&mut d);
}

#[test]
fn a_session_key_belongs_to_its_connection() {
    let server = TestServer::start(&[]);
    let (mut a, a_id) = server.registered_client("owner");
    let (a_id2, a_key) = session(&a);
    assert_eq!(a_id, a_id2);
    let (mut b, b_id) = server.registered_client("other");
    let data = pseudo_random(100, 1);
    let file = name_field_raw(b"stolen.bin");

    // A valid id and correctly encrypted packets, on a connection that never got the key.
    let mut thief = server.connect();
    for p in packet_frames(&a_id, &a_key, &file, &data, 1024) {
        thief.send_raw(&p).unwrap();
    }
    expect_reply(&mut thief, GeneralError);
    assert_usable_by_register(&mut thief);
    // Registered but without a key yet.
    let mut fresh = server.connect();
    let f_id = fresh.register("fresh").unwrap();
    fresh.send_raw(&packet_frames(&f_id, &a_key, &file, &data, 1024)[0]).unwrap();
    expect_reply(&mut fresh, GeneralError);
    assert_usable_by_register(&mut fresh);
    // On a connection with a session, a header id other than the session's.
    for p in packet_frames(&b_id, &a_key, &file, &data, 1024) {
        a.send_raw(&p).unwrap();
    }
    expect_reply(&mut a, GeneralError);
    // 1029 from another client's connection for a file this one staged.
    a.upload_bytes("mine.bin", &data, &UploadOptions::default()).unwrap();
    b.send_frame(Code::CrcOk, &[&name_field_raw(b"mine.bin")]).unwrap();
    expect_reply(&mut b, GeneralError);
    a.crc_ok("mine.bin").unwrap();
    assert_usable_by_upload(&mut a);
    assert_usable_by_upload(&mut b);
    assert!(!server.stored_path(&a_id, "stolen.bin").exists());
    assert!(!server.stored_path(&b_id, "stolen.bin").exists());
}

#[test]
fn bad_file_names_get_1607_and_nothing_is_written() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("names");
    let (_, key) = session(&c);
    let long = vec![b'n'; 251];
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "empty"),
        (b".", "'.' or '..'"),
        (b"..", "'.' or '..'"),
        // Paths are taken tar-like (tests/field_clients.rs); a dot component never.
        (b"../escape", "'.' or '..'"),
        (b"..\\escape", "'.' or '..'"),
        (b"a/./b", "'.' or '..'"),
        (b"/", "empty"),
        (b"C:\\", "empty"),
        ("d/invoice\u{202E}fdp.exe".as_bytes(), "bidi"),
        (b"new\nline", "control"),
        (b"tab\there", "control"),
        (b"del\x7f", "control"),
        (b"bad\xff\xfeutf8", "UTF-8"),
        (&long, "over the 250-byte limit"),
    ];
    let data = pseudo_random(40, 2);
    for (i, (raw, why)) in cases.iter().enumerate() {
        let field = name_field_raw(raw);
        // A two-packet upload sent back to back: exactly one 1607 for it.
        for p in packet_frames(&id, &key, &field, &data, 32) {
            c.send_raw(&p).unwrap();
        }
        match c.read_response() {
            Ok(Response::GeneralError) => {}
            other => panic!("name {raw:?}: expected 1607, got {other:?}"),
        }
        // One log line saying why.
        let refusals = || -> Vec<String> {
            server.log_text().lines().filter(|l| l.contains("refused: file name")).map(String::from).collect()
        };
        wait_until(Duration::from_secs(2), || refusals().len() > i);
        let lines = refusals();
        assert_eq!(lines.len(), i + 1, "name {raw:?}: log lines:\n{}", server.log_text());
        assert!(lines[i].contains(why), "no reason {why:?} logged for {raw:?}: {}", lines[i]);
        // 1029/1030/1031 naming it are refused too.
        c.send_frame(Code::CrcOk, &[&field]).unwrap();
        expect_reply(&mut c, GeneralError);
    }
    // The connection works; a 250-byte name is fine; bytes after the NUL are not part of the name.
    assert_usable_by_upload(&mut c);
    let n250 = "n".repeat(250);
    c.upload_bytes(&n250, &data, &UploadOptions::default()).unwrap();
    c.crc_ok(&n250).unwrap();
    let mut field = name_field_raw(b"after-nul.txt\0junk/../x");
    field[200] = 0xff;
    for p in packet_frames(&id, &key, &field, &data, 1024) {
        c.send_raw(&p).unwrap();
    }
    let Response::FileReceived { file_name, .. } = expect_reply(&mut c, FileReceived) else { unreachable!() };
    assert_eq!(file_name, field, "1603 echoes the field as received");
    c.send_frame(Code::CrcOk, &[&name_field_raw(b"after-nul.txt")]).unwrap();
    expect_reply(&mut c, Ack);
    assert_eq!(std::fs::read(server.stored_path(&id, "after-nul.txt")).unwrap(), data);
    // Nothing outside files/<id>/ but the three good files; nothing outside the data dir.
    let mut stored: Vec<String> = walk_files(&server.files_dir())
        .iter()
        .map(|p| p.strip_prefix(server.files_dir()).unwrap().to_string_lossy().into_owned())
        .collect();
    stored.sort();
    assert_eq!(stored.len(), 3, "{stored:?}");
    let outside: Vec<_> =
        walk_files(server.temp_dir()).into_iter().filter(|p| !p.starts_with(server.data_dir())).collect();
    assert!(outside.is_empty(), "{outside:?}");
}

#[test]
fn packet_numbering_errors() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("numbers");
    let (_, key) = session(&c);
    let data = pseudo_random(100, 3); // 112 bytes of ciphertext
    let ct = crypto::encrypt_all(&key, &data);
    let f = name_field_raw(b"n.bin");
    let g = name_field_raw(b"other.bin");
    let pf = |content_size: u32, num: u16, total: u16, name: &[u8; NAME_FIELD_LEN], content: &[u8]| {
        packet_frame(&id, content_size, 100, num, total, name, content)
    };
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("packet 0", vec![pf(112, 0, 1, &f, &ct)]),
        ("total 0", vec![pf(112, 0, 0, &f, &ct)]),
        ("packet 2 of 1", vec![pf(112, 2, 1, &f, &ct)]),
        ("starts at packet 2", vec![pf(56, 2, 2, &f, &ct[56..])]),
        ("skips packet 2", vec![pf(40, 1, 3, &f, &ct[..40]), pf(32, 3, 3, &f, &ct[80..])]),
        ("repeats packet 1 as 2", vec![pf(56, 1, 2, &f, &ct[..56]), pf(56, 1, 2, &f, &ct[..56])]),
        ("total changes", vec![pf(56, 1, 2, &f, &ct[..56]), pf(56, 2, 3, &f, &ct[56..])]),
        ("name changes", vec![pf(56, 1, 2, &f, &ct[..56]), pf(56, 2, 2, &g, &ct[56..])]),
    ];
    for (what, packets) in cases {
        for p in &packets {
            c.send_raw(p).unwrap();
        }
        // A repeated packet 1 restarts the upload (clients resend from packet 1): then
        // packet 2 is missing, and the refusal is for the next case's first frame.
        if what == "repeats packet 1 as 2" {
            c.send_raw(&pf(56, 2, 2, &f, &ct[56..])).unwrap();
            let Response::FileReceived { cksum, .. } = expect_reply(&mut c, FileReceived) else {
                unreachable!()
            };
            assert_eq!(cksum, crypto::cksum(&data));
            c.send_frame(Code::CrcAbort, &[&f]).unwrap();
            expect_reply(&mut c, Ack);
            continue;
        }
        match c.read_response() {
            Ok(Response::GeneralError) => {}
            other => panic!("{what}: expected 1607, got {other:?}"),
        }
        assert_usable_by_upload(&mut c);
    }
    assert!(!server.stored_path(&id, "n.bin").exists());
}

#[test]
fn size_and_content_rule_violations() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("sizes");
    let (_, key) = session(&c);
    let f = name_field_raw(b"s.bin");
    let d20 = pseudo_random(20, 4); // ciphertext 32
    let ct20 = crypto::encrypt_all(&key, &d20);
    let d32 = pseudo_random(32, 5); // ciphertext 48, full padding block
    let wrong_key_ct = crypto::encrypt_all(&[0x33; 32], &d32);
    let d10 = pseudo_random(10, 6);
    let ct10 = crypto::encrypt_all(&key, &d10); // 16 bytes
    let pf = |cs: u32, orig: u32, num: u16, total: u16, content: &[u8]| {
        packet_frame(&id, cs, orig, num, total, &f, content)
    };
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("content_size neither this packet nor the file", vec![pf(40, 20, 1, 1, &ct20)]),
        (
            "content_size wrong in packet 2",
            vec![pf(16, 20, 1, 2, &ct20[..16]), pf(33, 20, 2, 2, &ct20[16..])],
        ),
        ("ciphertext short of the size", vec![pf(31, 20, 1, 1, &ct20[..31])]),
        (
            "ciphertext over the size in one packet",
            vec![pf(48, 20, 1, 1, &[ct20.clone(), vec![0; 16]].concat())],
        ),
        (
            "last packet before the ciphertext is complete",
            vec![pf(16, 20, 1, 2, &ct20[..16]), pf(8, 20, 2, 2, &ct20[16..24])],
        ),
        (
            "empty packet before the last",
            vec![pf(32, 20, 1, 3, &ct20), pf(0, 20, 2, 3, &[]), pf(0, 20, 3, 3, &[])],
        ),
        ("empty first packet", vec![pf(0, 20, 1, 1, &[])]),
        ("orig_file_size changes", vec![pf(16, 20, 1, 2, &ct20[..16]), pf(16, 21, 2, 2, &ct20[16..])]),
        ("wrong key: decryption fails", vec![pf(48, 32, 1, 1, &wrong_key_ct)]),
        (
            "bit flipped in the padding",
            vec![pf(32, 20, 1, 1, &{
                let mut x = ct20.clone();
                x[31] ^= 1;
                x
            })],
        ),
        // Per-packet streams must each be complete and say their own size truly.
        ("per-packet stream with a false orig_file_size", vec![pf(16, 5, 1, 1, &ct10)]),
        (
            "a second stream after a stream that spanned packets",
            vec![pf(16, 20, 1, 3, &ct20[..16]), pf(16, 20, 2, 3, &ct20[16..]), pf(16, 10, 3, 3, &ct10)],
        ),
    ];
    for (what, packets) in cases {
        for p in &packets {
            c.send_raw(p).unwrap();
        }
        match c.read_response() {
            Ok(Response::GeneralError) => {}
            other => panic!("{what}: expected 1607, got {other:?}"),
        }
        assert_usable_by_upload(&mut c);
    }
    server.wait_for_log("decryption failed", Duration::from_secs(1));
    assert!(!server.stored_path(&id, "s.bin").exists());
    assert!(wait_until(Duration::from_secs(5), || walk_files(&server.data_dir().join("tmp")).is_empty()));
}

#[test]
fn over_size_is_refused_where_it_happens_with_one_1607() {
    let server = TestServer::start(&["--max-file-size", "1000"]);
    let (mut c, id) = server.registered_client("limit");
    let (_, key) = session(&c);
    let o = UploadOptions { packet_size: 256, ..Default::default() };

    // Over --max-file-size: refused at packet 1, before packets 2..4 are even sent.
    let big = pseudo_random(1001, 1); // 1008 bytes of ciphertext, 4 packets of 256
    let packets = packet_frames(&id, &key, &name_field_raw(b"big.bin"), &big, 256);
    assert_eq!(packets.len(), 4);
    c.send_raw(&packets[0]).unwrap();
    expect_reply(&mut c, GeneralError);
    for p in &packets[1..] {
        c.send_raw(p).unwrap(); // swallowed: no reply
    }
    assert_usable_by_upload(&mut c);

    // The client library sends all packets back to back: one 1607, then the connection works.
    let e = c.upload_bytes("big.bin", &big, &o).unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    let ok = pseudo_random(1000, 2);
    let up = c.upload_bytes("ok.bin", &ok, &o).unwrap();
    assert_eq!(up.content_size, 1008);
    c.crc_ok("ok.bin").unwrap();
    assert_eq!(std::fs::read(server.stored_path(&id, "ok.bin")).unwrap(), ok);
    // Per-packet streams add up: 600 + 600 plaintext bytes exceed 1000.
    let e = c
        .upload_bytes(
            "pp.bin",
            &pseudo_random(1200, 3),
            &UploadOptions {
                packet_size: 600,
                content_size: ContentSizeField::PerPacketEncrypted,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    assert_usable_by_upload(&mut c);

    // Ciphertext over the total: refused at packet 2 of 3, before packet 3 is sent.
    let d = pseudo_random(20, 4); // ciphertext 32
    let ct = crypto::encrypt_all(&key, &d);
    let f = name_field_raw(b"over.bin");
    c.send_raw(&packet_frame(&id, 16, 20, 1, 3, &f, &ct[..16])).unwrap();
    c.send_raw(&packet_frame(&id, 32, 20, 2, 3, &f, &[ct[16..].to_vec(), vec![0; 16]].concat())).unwrap();
    expect_reply(&mut c, GeneralError);
    c.send_raw(&packet_frame(&id, 16, 20, 3, 3, &f, &[0; 16])).unwrap(); // swallowed
    assert_usable_by_upload(&mut c);

    // All in one write: refused upload, then a good one: exactly 1607 then 1603.
    let mut bytes: Vec<u8> = packets.concat();
    let good = pseudo_random(300, 5);
    bytes.extend(packet_frames(&id, &key, &name_field_raw(b"good.bin"), &good, 100).concat());
    c.send_raw(&bytes).unwrap();
    expect_reply(&mut c, GeneralError);
    let Response::FileReceived { cksum, .. } = expect_reply(&mut c, FileReceived) else { unreachable!() };
    assert_eq!(cksum, crypto::cksum(&good));

    // Any other frame ends the skipping: refused packet 1 of 4, a 1025, then packet 2 is refused too.
    c.send_raw(&packets[0]).unwrap();
    expect_reply(&mut c, GeneralError);
    c.send_frame(Code::Register, &[&name_field_raw(b"limit")]).unwrap();
    expect_reply(&mut c, RegistrationFailed);
    c.send_raw(&packets[1]).unwrap();
    expect_reply(&mut c, GeneralError);
    // (and packets 3 and 4 of it are swallowed)
    c.send_raw(&packets[2..].concat()).unwrap();
    assert_usable_by_upload(&mut c);
    assert!(!server.stored_path(&id, "big.bin").exists() && !server.stored_path(&id, "over.bin").exists());
}

#[test]
fn confirmations_for_files_this_connection_did_not_upload() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("confirm");
    let data = pseudo_random(500, 6);
    let field = |n: &[u8]| name_field_raw(n);
    // Never uploaded.
    for code in [Code::CrcOk, Code::CrcRetry, Code::CrcAbort] {
        c.send_frame(code, &[&field(b"never.bin")]).unwrap();
        expect_reply(&mut c, GeneralError);
    }
    assert_usable_by_upload(&mut c);
    // Confirmed already: a second 1029 is refused.
    c.upload_bytes("twice.bin", &data, &UploadOptions::default()).unwrap();
    c.crc_ok("twice.bin").unwrap();
    c.send_frame(Code::CrcOk, &[&field(b"twice.bin")]).unwrap();
    expect_reply(&mut c, GeneralError);
    // 1029 after 1030 (the staged copy was discarded): refused; 1031 after 1030: 1604.
    c.upload_bytes("retried.bin", &data, &UploadOptions::default()).unwrap();
    c.send_frame(Code::CrcRetry, &[&field(b"retried.bin")]).unwrap();
    c.send_frame(Code::CrcOk, &[&field(b"retried.bin")]).unwrap();
    expect_reply(&mut c, GeneralError);
    c.send_frame(Code::CrcAbort, &[&field(b"retried.bin")]).unwrap();
    expect_reply(&mut c, Ack);
    assert!(!server.stored_path(&id, "retried.bin").exists());
    // A header id that is not the session's.
    c.upload_bytes("hid.bin", &data, &UploadOptions::default()).unwrap();
    c.send_raw(&frame(&[9; 16], Code::CrcOk, &[&field(b"hid.bin")])).unwrap();
    expect_reply(&mut c, GeneralError);
    c.crc_ok("hid.bin").unwrap();
    // The same client on a second connection cannot confirm what the first staged.
    c.upload_bytes("elsewhere.bin", &data, &UploadOptions::default()).unwrap();
    let mut c2 = server.connect();
    c2.reconnect(id, "confirm", test_key()).unwrap();
    c2.send_frame(Code::CrcOk, &[&field(b"elsewhere.bin")]).unwrap();
    expect_reply(&mut c2, GeneralError);
    assert_usable_by_upload(&mut c2);
    c.crc_ok("elsewhere.bin").unwrap();
    // No session at all.
    let mut c3 = server.connect();
    c3.send_raw(&frame(&id, Code::CrcOk, &[&field(b"hid.bin")])).unwrap();
    expect_reply(&mut c3, GeneralError);
    assert_usable_by_register(&mut c3);
    assert_usable_by_upload(&mut c);
}

#[test]
fn header_and_idle_timeouts_close_the_connection() {
    let server = TestServer::start(&["--header-timeout", "1s", "--idle-timeout", "2s"]);
    // Half a header, then nothing.
    let mut half = server.connect();
    half.send_raw(&raw_header(&[0; 16], 3, 1025, 255)[..10]).unwrap();
    // Idle after a request.
    let mut idle = server.connect();
    idle.register("idle").unwrap();
    // With its key, so that the name stays taken once this connection is gone.
    idle.send_public_key("idle", test_key()).unwrap();
    // A connection that keeps talking stays open past both limits.
    let mut busy = server.connect();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        busy.send_frame(Code::Register, &[&name_field_raw(b"idle")]).unwrap();
        expect_reply(&mut busy, RegistrationFailed);
    }
    assert_closed(half.stream(), CLOSE_WITHIN);
    assert_closed(idle.stream(), CLOSE_WITHIN);
    server.wait_for_log("header not complete", Duration::from_secs(1));
    server.wait_for_log("idle for", Duration::from_secs(1));
    assert_usable_by_register(&mut busy);
}

#[test]
fn stale_staged_uploads_are_purged() {
    let server = TestServer::start(&["--stale-upload-timeout", "1s"]);
    let (mut c, id) = server.registered_client("stale");
    c.upload_bytes("stale.bin", &pseudo_random(100, 1), &UploadOptions::default()).unwrap();
    assert!(wait_until(Duration::from_secs(10), || server.log_text().contains("untouched for")));
    c.send_frame(Code::CrcOk, &[&name_field_raw(b"stale.bin")]).unwrap();
    expect_reply(&mut c, GeneralError);
    assert!(!server.stored_path(&id, "stale.bin").exists());
    assert!(wait_until(Duration::from_secs(5), || walk_files(&server.data_dir().join("tmp")).is_empty()));
    assert_usable_by_upload(&mut c);
}
