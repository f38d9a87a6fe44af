//! Issue 10, "What must hold: server": the habits of the protocol-v3 clients
//! in the field, one test per row of the table, against the real
//! binary. Each client is played byte for byte (frames built here, sent the
//! way that client sends them: all packets back to back, then the replies).

mod common;

use std::io::{BufWriter, Write};
use std::time::Duration;

use backupd::client::{Client, UploadOptions};
use backupd::crypto::{self, ciphertext_len, encrypt_all};
use backupd::protocol::{ClientId, Code, Response, ResponseCode, NAME_FIELD_LEN};
use common::*;

use ResponseCode::{Ack, GeneralError};

type NameField = [u8; NAME_FIELD_LEN];

/// The session of a client: its id and AES key.
fn session(c: &Client) -> (ClientId, [u8; 32]) {
    (c.id(), *c.aes_key().expect("session key"))
}

/// Log lines containing `needle`.
fn log_lines(server: &TestServer, needle: &str) -> usize {
    server.log_text().lines().filter(|l| l.contains(needle)).count()
}

/// A good upload on the connection gets its 1603 as the very next reply (so
/// nothing stray was queued before it) and its 1604. Returns once its log
/// line is in: every line logged before it is too (log_lines may count).
fn assert_usable(server: &TestServer, c: &mut Client, name: &str) {
    let data = pseudo_random(300, 99);
    let up = c.upload_bytes(name, &data, &UploadOptions { packet_size: 128, ..Default::default() }).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    c.crc_ok(name).unwrap();
    server.wait_for_log(&format!("\"{name}\" verified and stored"), Duration::from_secs(10));
}

/// The 1603 for an upload: checks the echoed name field and the cksum.
fn expect_received(c: &mut Client, field: &NameField, data: &[u8]) -> u32 {
    match c.read_response() {
        Ok(Response::FileReceived { file_name, cksum, content_size, .. }) => {
            assert_eq!(file_name, *field, "the 1603 echoes the name field as sent");
            assert_eq!(cksum, crypto::cksum(data));
            content_size
        }
        other => panic!("expected 1603, got {other:?}"),
    }
}

#[test]
fn per_chunk_client_file_size_a_multiple_of_4000() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("per-chunk");
    let (_, key) = session(&c);
    for (name, len) in [("twelve.bin", 12_000usize), ("four.bin", 4_000), ("odd.bin", 9_001)] {
        let data = pseudo_random(len, len as u64);
        let field = name_field_raw(name.as_bytes());
        // Packets 1..n of n, then (for a multiple of 4,000) the empty chunk n+1 of n.
        c.send_raw(&per_chunk_frames(&id, &key, &field, &data, 4000)).unwrap();
        // The 1603 counts the ciphertext received: the chunks, and the empty
        // chunk after a full last one (the upload ends with it: it tells a
        // last chunk from a count that wrapped past 65,535), except after a
        // single packet, which ends the file at once (swallowed after the 1603).
        let empty = if len % 4000 == 0 && len > 4000 { 16 } else { 0 };
        let stored: u64 = data.chunks(4000).map(|ch| ciphertext_len(ch.len() as u64)).sum::<u64>() + empty;
        assert_eq!(expect_received(&mut c, &field, &data) as u64, stored);
        // The empty chunk had no reply: the next one is the 1604 for the 1029.
        c.send_frame(Code::CrcOk, &[&field]).unwrap();
        expect_reply(&mut c, Ack);
        assert_eq!(std::fs::read(server.stored_path(&id, name)).unwrap(), data, "{name}");
        assert_eq!(db_verified(&server.db_path(), &id, name), Some(1));
    }
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(log_lines(&server, "refused"), 0, "the empty chunk is not logged:\n{}", server.log_text());
}

#[test]
fn empty_file_as_packet_1_of_0() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("empty");
    let (_, key) = session(&c);
    let field = name_field_raw(b"empty.txt");
    let frames = per_chunk_frames(&id, &key, &field, &[], 4000);
    assert_eq!(frames, packet_frame(&id, 16, 0, 1, 0, &field, &encrypt_all(&key, &[])));
    c.send_raw(&frames).unwrap();
    assert_eq!(expect_received(&mut c, &field, &[]), 16);
    c.send_frame(Code::CrcOk, &[&field]).unwrap();
    expect_reply(&mut c, Ack);
    assert_eq!(std::fs::read(server.stored_path(&id, "empty.txt")).unwrap(), b"");
    assert_eq!(db_verified(&server.db_path(), &id, "empty.txt"), Some(1));
    assert_usable(&server, &mut c, "after.bin");
}

/// Send `data` encrypted as one CBC stream in `packet` -byte packets, the
/// u16 numbers and total wrapping as a field client's counters do.
/// `whole`: `content_size` is the whole ciphertext length in every packet
/// (and when the ciphertext is a multiple of the packet size an empty
/// packet ends it); otherwise the packet's own length. Streams the frames:
/// nothing is held but the ciphertext. Returns the packet count.
fn send_wrapping(c: &Client, field: &NameField, data: &[u8], packet: usize, whole: bool) -> u64 {
    let (id, key) = session(c);
    let ct = encrypt_all(&key, data);
    let mut pieces: Vec<&[u8]> = ct.chunks(packet).collect();
    if whole && ct.len().is_multiple_of(packet) {
        pieces.push(&[]);
    }
    let total = pieces.len() as u16; // modulo 65,536
    let mut w = BufWriter::with_capacity(1 << 20, c.stream());
    for (i, p) in pieces.iter().enumerate() {
        let cs = if whole { ct.len() } else { p.len() } as u32;
        let number = (i + 1) as u16; // wraps past 65,535
        w.write_all(&packet_frame(&id, cs, data.len() as u32, number, total, field, p)).unwrap();
    }
    w.flush().unwrap();
    pieces.len() as u64
}

/// Upload `data` as one stream in `packet`-byte packets whose numbers wrap
/// (see `send_wrapping`), confirm it, and check the stored file.
fn wrapped_upload_is_stored(
    server: &TestServer,
    c: &mut Client,
    name: &str,
    data: &[u8],
    packet: usize,
    whole: bool,
) {
    let field = name_field_raw(name.as_bytes());
    let sent = send_wrapping(c, &field, data, packet, whole);
    assert!(sent > 65_536, "{name}: {sent} packets: the numbers wrapped");
    assert_eq!(expect_received(c, &field, data) as u64, ciphertext_len(data.len() as u64));
    c.send_frame(Code::CrcOk, &[&field]).unwrap();
    expect_reply(c, Ack);
    assert!(
        std::fs::read(server.stored_path(&c.id(), name)).unwrap() == data,
        "{name}: the stored file differs"
    );
}

/// The smaller wrap: 16-byte packets of a file just over 65,535 of them, in
/// both conventions (with the whole-ciphertext one ending in an empty packet).
#[test]
fn wrapped_counters_small_packets() {
    let server = TestServer::start(&[]);
    let (mut c, _) = server.registered_client("wrap16");
    let data = pseudo_random(65_540 * 16 + 5, 7);
    wrapped_upload_is_stored(&server, &mut c, "cs-packet.bin", &data, 16, false);
    wrapped_upload_is_stored(&server, &mut c, "cs-whole.bin", &data, 16, true);
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(log_lines(&server, "refused"), 0, "{}", server.log_text());
}

/// Per-chunk encryption past 65,535 packets: numbers and the total wrap
/// and no field counts the file's bytes, so a full chunk numbered as the
/// total is the end only if the empty chunk follows it; a non-empty chunk
/// after it is the count going on. 16-byte chunks: the end is pending at
/// every wrap point, and the file (a multiple of 16) ends with the empty
/// chunk; then a file with a short last chunk. One 1603 each, stored whole.
#[test]
fn per_chunk_client_past_65535_packets() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("wrap-chunks");
    let (_, key) = session(&c);
    for (name, len) in [("multiple.bin", 65_540 * 16), ("short.bin", 65_540 * 16 + 5)] {
        let data = pseudo_random(len, len as u64);
        let field = name_field_raw(name.as_bytes());
        c.send_raw(&per_chunk_frames(&id, &key, &field, &data, 16)).unwrap();
        expect_received(&mut c, &field, &data);
        c.send_frame(Code::CrcOk, &[&field]).unwrap();
        expect_reply(&mut c, Ack);
        assert_eq!(std::fs::read(server.stored_path(&id, name)).unwrap(), data, "{name}");
    }
    // 65,537 chunks: the total wraps to 1 and packet 1 of 1 looks like a
    // single-packet file, which it ends. The client gets one 1603 (its cksum
    // does not match), the rest is swallowed: it aborts and stays in step.
    let data = pseudo_random(65_537 * 16, 3);
    let field = name_field_raw(b"total-one.bin");
    c.send_raw(&per_chunk_frames(&id, &key, &field, &data, 16)).unwrap();
    match c.read_response() {
        Ok(Response::FileReceived { cksum, .. }) => assert_ne!(cksum, crypto::cksum(&data)),
        other => panic!("expected 1603, got {other:?}"),
    }
    c.send_frame(Code::CrcAbort, &[&field]).unwrap();
    expect_reply(&mut c, Ack);
    assert!(!server.stored_path(&id, "total-one.bin").exists());
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(log_lines(&server, "refused"), 0, "{}", server.log_text());
}

/// A per-chunk client that sends no empty chunk after a full last one (and
/// waits for its 1603): the file ends there after a short wait.
#[test]
fn per_chunk_client_without_the_empty_chunk() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("no-empty-chunk");
    let (_, key) = session(&c);
    let data = pseudo_random(12_000, 5);
    let field = name_field_raw(b"three.bin");
    let mut frames = per_chunk_frames(&id, &key, &field, &data, 4000);
    let empty = packet_frame(&id, 16, 0, 4, 3, &field, &encrypt_all(&key, &[]));
    assert!(frames.ends_with(&empty));
    frames.truncate(frames.len() - empty.len());
    c.send_raw(&frames).unwrap();
    assert_eq!(expect_received(&mut c, &field, &data), 3 * 4016);
    c.send_frame(Code::CrcOk, &[&field]).unwrap();
    expect_reply(&mut c, Ack);
    assert_eq!(std::fs::read(server.stored_path(&id, "three.bin")).unwrap(), data);
    assert_usable(&server, &mut c, "after.bin");
}

/// A per-chunk client that counts more chunks than the total it announced
/// (4,000 + 4,000 + 500 bytes as "of 2", or three full chunks and the empty
/// one as "of 2"): past the total the count could only be going on toward
/// 65,536 more packets, which such a client sends back to back; this one
/// stops and waits. It gets one 1607 about a second later (it waited for the
/// idle timeout, with no reply, before), and the connection stays usable.
#[test]
fn per_chunk_client_past_its_total_gets_a_1607_when_it_stops() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("miscounting");
    let (_, key) = session(&c);
    let chunk = |k: u16, data: &[u8]| {
        packet_frame(
            &id,
            ciphertext_len(data.len() as u64) as u32,
            data.len() as u32,
            k,
            2,
            &field_of("m.bin"),
            &encrypt_all(&key, data),
        )
    };
    let a = pseudo_random(8500, 31);
    let short = [chunk(1, &a[..4000]), chunk(2, &a[4000..8000]), chunk(3, &a[8000..])].concat();
    let b = pseudo_random(12_000, 32);
    let full = [chunk(1, &b[..4000]), chunk(2, &b[4000..8000]), chunk(3, &b[8000..]), chunk(4, &[])].concat();
    for (i, frames) in [short, full].into_iter().enumerate() {
        let t = std::time::Instant::now();
        c.send_raw(&frames).unwrap();
        expect_reply(&mut c, GeneralError);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_usable(&server, &mut c, &format!("after{i}.bin"));
        assert_eq!(log_lines(&server, "past the total of 2 it announced, then none for a second"), i + 1);
    }
    assert!(!server.stored_path(&id, "m.bin").exists());
}

/// The row: 1 KiB packets, the total ciphertext in every packet's
/// content_size, a file over 64 MiB (about 66,000 packets).
#[test]
fn wrapped_counters_over_64_mib_in_1_kib_packets() {
    let server = TestServer::start(&[]);
    let (mut c, _) = server.registered_client("wrap1k");
    let data = pseudo_random((64 << 20) + 300_001, 11);
    wrapped_upload_is_stored(&server, &mut c, "big.bin", &data, 1024, true);
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(log_lines(&server, "refused"), 0, "{}", server.log_text());
}

#[test]
fn paths_are_stored_nested_tar_like() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("paths");
    let (_, key) = session(&c);
    let cases = [
        ("/home/user/docs/report.pdf", "home/user/docs/report.pdf", true),
        ("docs/2026/report.pdf", "docs/2026/report.pdf", false),
        ("C:\\Users\\me\\cv.docx", "Users/me/cv.docx", true),
    ];
    for (i, (sent, stored, _)) in cases.iter().enumerate() {
        let data = pseudo_random(5000 + i, i as u64);
        let field = name_field_raw(sent.as_bytes());
        c.send_raw(&packet_frames(&id, &key, &field, &data, 1024).concat()).unwrap();
        expect_received(&mut c, &field, &data);
        c.send_frame(Code::CrcOk, &[&field]).unwrap();
        expect_reply(&mut c, Ack);
        assert_eq!(std::fs::read(server.stored_path(&id, stored)).unwrap(), data, "{sent}");
        assert_eq!(db_verified(&server.db_path(), &id, stored), Some(1), "{sent}");
    }
    // The 1029/1030/1031 match by the path the name stands for: packets as
    // `/a/b`, confirmation as `a/b` (and `\a\b`).
    let data = pseudo_random(700, 9);
    for (packets_as, confirmed_as) in [("/a/b.txt", "a/b.txt"), ("a//b.txt", "\\a\\b.txt")] {
        let field = name_field_raw(packets_as.as_bytes());
        c.send_raw(&packet_frames(&id, &key, &field, &data, 256).concat()).unwrap();
        expect_received(&mut c, &field, &data);
        c.send_frame(Code::CrcOk, &[&name_field_raw(confirmed_as.as_bytes())]).unwrap();
        expect_reply(&mut c, Ack);
    }
    let field = name_field_raw(b"/a/c.txt");
    c.send_raw(&packet_frames(&id, &key, &field, &data, 256).concat()).unwrap();
    expect_received(&mut c, &field, &data);
    c.send_frame(Code::CrcRetry, &[&name_field_raw(b"a/c.txt")]).unwrap();
    c.send_frame(Code::CrcAbort, &[&name_field_raw(b"C:a\\c.txt")]).unwrap();
    expect_reply(&mut c, Ack);
    assert_eq!(std::fs::read(server.stored_path(&id, "a/b.txt")).unwrap(), data);
    assert!(!server.stored_path(&id, "a/c.txt").exists());
    assert_usable(&server, &mut c, "after.bin");
    // One info line per upload that had a root or drive removed.
    let stripped = cases.iter().filter(|c| c.2).count() + 2;
    assert_eq!(log_lines(&server, "leading root or drive removed"), stripped, "{}", server.log_text());
    // Nothing anywhere but under files/<id>/.
    let mut files: Vec<_> = walk_files(&server.files_dir());
    files.sort();
    assert_eq!(files.len(), 5, "{files:?}");
    assert!(files.iter().all(|f| f.starts_with(server.files_dir().join(backupd::protocol::id_hex(&id)))));
}

#[test]
fn a_component_that_is_a_file_where_a_folder_is_needed_gets_1607_and_the_connection_stays() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("clash");
    let data = pseudo_random(100, 3);
    let o = UploadOptions::default();
    c.upload_bytes("x", &data, &o).unwrap();
    c.crc_ok("x").unwrap();
    // `x` is a file: `x/y` cannot be stored.
    c.upload_bytes("x/y", &data, &o).unwrap();
    let e = c.crc_ok("x/y").unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    // The reverse: `d/e` makes `d` a folder; a file `d` cannot replace it.
    c.upload_bytes("d/e", &data, &o).unwrap();
    c.crc_ok("d/e").unwrap();
    c.upload_bytes("d", &data, &o).unwrap();
    let e = c.crc_ok("d").unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(std::fs::read(server.stored_path(&id, "x")).unwrap(), data);
    assert_eq!(std::fs::read(server.stored_path(&id, "d/e")).unwrap(), data);
}

#[test]
fn traversal_is_refused_once_and_nothing_is_written() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("climber");
    let (_, key) = session(&c);
    let field = name_field_raw(b"../../secret.txt");
    let data = pseudo_random(3000, 4);
    c.send_raw(&packet_frames(&id, &key, &field, &data, 1024).concat()).unwrap();
    expect_reply(&mut c, GeneralError);
    c.send_frame(Code::CrcOk, &[&field]).unwrap();
    expect_reply(&mut c, GeneralError);
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(log_lines(&server, "refused: file name"), 1, "{}", server.log_text());
    let outside: Vec<_> = walk_files(server.temp_dir())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "secret.txt"))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
}

/// A refused upload of more than 65,535 packets (its numbers wrap, so a
/// packet numbered 1 comes again): exactly one 1607 and one log line.
#[test]
fn one_1607_for_a_long_refused_upload() {
    let server = TestServer::start(&[]);
    let (mut c, _) = server.registered_client("long-refusal");
    let data = pseudo_random(65_600 * 16 - 1, 5);
    let field = name_field_raw(b"../long.bin");
    let sent = send_wrapping(&c, &field, &data, 16, false);
    assert!(sent > 65_536, "{sent} packets");
    expect_reply(&mut c, GeneralError);
    // The next reply is the next upload's 1603: nothing was queued in between.
    assert_usable(&server, &mut c, "after.bin");
    assert_eq!(log_lines(&server, "refused"), 1, "{}", server.log_text());
    // The same with per-chunk encryption (each 16-byte chunk its own stream).
    let (id, key) = session(&c);
    c.send_raw(&per_chunk_frames(&id, &key, &field, &data, 16)).unwrap();
    expect_reply(&mut c, GeneralError);
    assert_usable(&server, &mut c, "after-chunks.bin");
    assert_eq!(log_lines(&server, "refused"), 2, "{}", server.log_text());
}

/// A packet that does not follow the upload in progress (another name
/// field, or another total, in one packet of a back-to-back upload) refuses
/// it once: the rest of that upload and more packets like the stray one are
/// swallowed, so the client reads one 1607 and the next reply is its next
/// upload's 1603.
#[test]
fn a_stray_packet_mid_upload_gets_one_1607() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("stray");
    let (_, key) = session(&c);
    let data = pseudo_random(11 * 1024 - 100, 21);
    let field = field_of("a.bin");
    for (case, stray_name, stray_total) in [(1, "b.bin", 11u16), (2, "a.bin", 12), (3, "b.bin", 11)] {
        let mut frames = packet_frames(&id, &key, &field, &data, 1024);
        assert_eq!(frames.len(), 11);
        let ct = encrypt_all(&key, &data);
        let stray = &ct[2 * 1024..3 * 1024];
        let n = data.len() as u32;
        frames[2] = packet_frame(&id, 1024, n, 3, stray_total, &field_of(stray_name), stray);
        if case == 3 {
            // The stray packet's upload goes on instead of the first one.
            for (k, f) in frames.iter_mut().enumerate().skip(3) {
                let p = &ct[k * 1024..((k + 1) * 1024).min(ct.len())];
                *f = packet_frame(&id, p.len() as u32, n, k as u16 + 1, 11, &field_of(stray_name), p);
            }
        }
        c.send_raw(&frames.concat()).unwrap();
        expect_reply(&mut c, GeneralError);
        assert_usable(&server, &mut c, &format!("after{case}.bin"));
        assert_eq!(log_lines(&server, "refused"), case, "{}", server.log_text());
    }
    assert!(!server.stored_path(&id, "a.bin").exists() && !server.stored_path(&id, "b.bin").exists());
}

/// Uploads the worker fails (here: encrypted under another key, so every
/// per-chunk stream fails its padding check) get one 1607 however many of
/// their packets the loop had already passed on, and their later packets,
/// the per-chunk client's empty chunk n+1 of n included, none.
#[test]
fn uploads_failed_by_the_worker_get_one_1607() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("failures");
    let (_, key) = session(&c);
    let data = pseudo_random(40_000, 8);
    // Every chunk under a wrong key: the first packet fails.
    c.send_raw(&per_chunk_frames(&id, &[0x11; 32], &field_of("all.bin"), &data, 4000)).unwrap();
    expect_reply(&mut c, GeneralError);
    assert_usable(&server, &mut c, "after1.bin");
    // Only the last chunk under a wrong key: the last packet fails, then the empty chunk comes.
    let field = field_of("late.bin");
    let mut frames = Vec::new();
    for (i, chunk) in data.chunks(4000).enumerate() {
        let k = if i == 9 { [0x11; 32] } else { key };
        frames.extend(packet_frame(&id, 4016, 4000, i as u16 + 1, 10, &field, &encrypt_all(&k, chunk)));
    }
    frames.extend(packet_frame(&id, 16, 0, 11, 10, &field, &encrypt_all(&key, &[])));
    c.send_raw(&frames).unwrap();
    expect_reply(&mut c, GeneralError);
    assert_usable(&server, &mut c, "after2.bin");
    assert_eq!(log_lines(&server, "refused"), 2, "{}", server.log_text());
    assert!(!server.stored_path(&id, "all.bin").exists() && !server.stored_path(&id, "late.bin").exists());
}

fn field_of(name: &str) -> NameField {
    name_field_raw(name.as_bytes())
}

/// Nested files are the server's own after a restart: startup recovery walks
/// the folders under files/<id>/ and leaves verified files in place.
#[test]
fn nested_files_survive_a_restart() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("restart");
    let data = pseudo_random(1000, 12);
    for name in ["top.txt", "docs/2026/report.pdf", "docs/notes.txt"] {
        c.upload_bytes(name, &data, &UploadOptions::default()).unwrap();
        c.crc_ok(name).unwrap();
    }
    // A new version of a nested file: the previous one is kept under versions/, nested too.
    let v2 = pseudo_random(1000, 13);
    c.upload_bytes("docs/notes.txt", &v2, &UploadOptions::default()).unwrap();
    c.crc_ok("docs/notes.txt").unwrap();
    let versions =
        server.data_dir().join("versions").join(backupd::protocol::id_hex(&id)).join("docs/notes.txt");
    let kept = walk_files(&versions);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), data);
    // An unconfirmed nested file left on disk by hand: not the server's, moved aside.
    let stray = server.stored_path(&id, "docs/stray.bin");
    std::fs::write(&stray, b"stray").unwrap();
    drop(c);
    server.restart();
    assert_eq!(std::fs::read(server.stored_path(&id, "docs/notes.txt")).unwrap(), v2);
    for name in ["top.txt", "docs/2026/report.pdf", "docs/notes.txt"] {
        let want = if name == "docs/notes.txt" { &v2 } else { &data };
        assert_eq!(std::fs::read(server.stored_path(&id, name)).unwrap(), *want, "{name}");
        assert_eq!(db_verified(&server.db_path(), &id, name), Some(1), "{name}");
    }
    assert!(!stray.exists(), "a file with no verified row stays in files/");
    let log = server.log_text();
    assert!(log.contains("docs/stray.bin\" has no verified database row"), "{log}");
}
