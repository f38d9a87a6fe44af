//! Quotas and free space (issue 11, "Server features" 4), against the real
//! binary: `--quota`, `--quota-files` and `--min-free` refuse an upload at
//! its first packet with 1607 and one log line naming the limit; a replaced
//! version frees its space once pruned; `backupd clients` and the metrics
//! show the figures.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use backupd::client::{Client, UploadOptions};
use backupd::protocol::ResponseCode::GeneralError;
use common::*;

/// Upload `data` as `name` and confirm it (1029 answered by 1604).
fn send(c: &mut Client, name: &str, data: &[u8]) {
    let up = c.upload_bytes(name, data, &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches(), "{up:?}");
    c.crc_ok(name).unwrap();
}

/// Send packet 1 of an upload of `len` bytes on its own: it must get a 1607
/// before the rest is sent (the rest is then swallowed, no reply).
fn refused_at_packet_1(c: &mut Client, name: &str, len: usize) {
    let (id, key) = (c.id(), *c.aes_key().expect("session key"));
    let packets = packet_frames(&id, &key, &name_field_raw(name.as_bytes()), &pseudo_random(len, 9), 256);
    assert!(packets.len() > 1);
    c.send_raw(&packets[0]).unwrap();
    expect_reply(c, GeneralError);
    for p in &packets[1..] {
        c.send_raw(p).unwrap();
    }
}

/// How many log lines contain `needle`.
fn log_lines(server: &TestServer, needle: &str) -> usize {
    server.log_text().lines().filter(|l| l.contains(needle)).count()
}

/// `backupd clients --json` (and the env the server was given) on `data`.
fn clients_json(data: &Path, extra: &[&str]) -> String {
    let mut cmd = Command::new(server_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BACKUPD_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .arg("clients")
        .arg("--json")
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .expect("run backupd clients");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn quota_bytes_refuses_at_packet_1_with_one_log_line() {
    let server = TestServer::start(&["--quota", "3000"]);
    let (mut c, _) = server.registered_client("capped");
    send(&mut c, "a.bin", &pseudo_random(2000, 1));
    refused_at_packet_1(&mut c, "b.bin", 1500);
    // The connection goes on: what fits is stored (2000 + 1000 = the quota).
    send(&mut c, "c.bin", &pseudo_random(1000, 2));
    server.wait_for_log("\"c.bin\" verified and stored", Duration::from_secs(10));
    let needle = "would exceed --quota 3000 bytes: it stores 2000 bytes and the file announces 1500";
    assert_eq!(log_lines(&server, needle), 1, "{}", server.log_text());
    assert!(server.log_text().contains("\"capped\""), "the line names the client");
    // At the quota, even one byte more is refused; the library's way too (all packets at once).
    let e = c.upload_bytes("d.bin", &[7], &UploadOptions::default()).unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    server.wait_for_log("it stores 3000 bytes and the file announces 1", Duration::from_secs(10));
    // An empty file still fits.
    send(&mut c, "empty.bin", &[]);
}

#[test]
fn quota_files_counts_current_files_and_versions() {
    let server = TestServer::start(&["--quota-files", "3", "--keep-versions", "1"]);
    let (mut c, _) = server.registered_client("few");
    send(&mut c, "a", b"one");
    send(&mut c, "a", b"two"); // "one" kept as a version: 2 files
    send(&mut c, "b", b"three"); // 3 files
    refused_at_packet_1(&mut c, "c", 600);
    server.wait_for_log("would exceed --quota-files 3: it stores 3 files", Duration::from_secs(10));
    // A replacement counts as a new file too (its copy is kept until pruned).
    let e = c.upload_bytes("b", b"four", &UploadOptions::default()).unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    server.wait_for_log("it stores 3 files (current and versions)\n", Duration::from_secs(10));
    let two = wait_until(Duration::from_secs(10), || log_lines(&server, "--quota-files 3") >= 2);
    assert!(two && log_lines(&server, "--quota-files 3") == 2, "{}", server.log_text());
}

#[test]
fn a_pruned_version_frees_its_space_and_usage_survives_a_restart() {
    // keep-versions 1: a, a again -> 2000 (one version kept); a a third time
    // fits (2000 + 1000) and leaves 2000 once its oldest version is pruned,
    // so b fits as well. Without the prune freeing space, b would not.
    let mut server = TestServer::start(&["--quota", "3000", "--keep-versions", "1"]);
    let (mut c, id) = server.registered_client("pruned");
    for seed in 1..=3 {
        send(&mut c, "a", &pseudo_random(1000, seed));
    }
    send(&mut c, "b", &pseudo_random(1000, 4));
    assert_eq!(std::fs::read(server.stored_path(&id, "a")).unwrap(), pseudo_random(1000, 3));
    refused_at_packet_1(&mut c, "x", 600);
    server.wait_for_log("it stores 3000 bytes and the file announces 600", Duration::from_secs(10));

    // The usage is computed again at start (files from the database, versions from the disk).
    drop(c);
    server.stop();
    server.restart();
    let mut c = server.connect();
    c.reconnect(id, "pruned", test_key()).expect("reconnect");
    let e = c.upload_bytes("y", &pseudo_random(10, 5), &UploadOptions::default()).unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    server.wait_for_log("it stores 3000 bytes and the file announces 10", Duration::from_secs(10));

    // keep-versions 0: a replaced file's space is free as soon as it is replaced.
    let server = TestServer::start(&["--quota", "2000", "--keep-versions", "0"]);
    let (mut c, _) = server.registered_client("nohistory");
    send(&mut c, "a", &pseudo_random(1000, 1));
    send(&mut c, "a", &pseudo_random(1000, 2)); // 1000 + 1000 announced: fits; 1000 after the prune
    send(&mut c, "b", &pseudo_random(1000, 3));
}

#[test]
fn clients_json_and_the_metrics_show_usage_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let prom = dir.path().join("backupd.prom");
    let prom_arg = prom.to_str().unwrap().to_string();
    let server = TestServer::start(&[
        "--quota",
        "10000",
        "--quota-files",
        "5",
        "--keep-versions",
        "1",
        "--metrics-file",
        &prom_arg,
        "--metrics-interval",
        "200ms",
    ]);
    let (mut c, _) = server.registered_client("shown");
    send(&mut c, "a", &pseudo_random(1000, 1));
    send(&mut c, "a", &pseudo_random(1500, 2));
    send(&mut c, "b", &pseudo_random(500, 3));
    // a (1500) + its version (1000) + b (500).
    let want_bytes = "backupd_client_bytes_stored{client=\"shown\"} 3000";
    let want_files = "backupd_client_files_stored{client=\"shown\"} 3";
    let read = || std::fs::read_to_string(&prom).unwrap_or_default();
    let ok =
        wait_until(Duration::from_secs(10), || read().contains(want_bytes) && read().contains(want_files));
    assert!(ok, "metrics never showed the client's usage:\n{}", read());

    let data = server.data_dir();
    let json = clients_json(&data, &["--quota", "10000", "--quota-files", "5"]);
    assert!(
        json.contains("\"quota\":{\"bytes\":10000,\"bytes_used\":3000,\"files\":5,\"files_used\":3}"),
        "{json}"
    );
    assert!(json.contains("\"bytes\":3000"), "{json}");
    // Without the limits the command shows none (as before quotas existed).
    assert!(clients_json(&data, &[]).contains("\"quota\":null"));
    // The same limits from the server's environment variables.
    let mut cmd = Command::new(server_bin());
    let out = cmd
        .args(["clients", "--data-dir"])
        .arg(&data)
        .env("BACKUPD_QUOTA", "10000")
        .env_remove("BACKUPD_QUOTA_FILES")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("shown")).expect("the client is listed");
    assert!(line.split_whitespace().any(|cell| cell == "3000/10000"), "{text}");
}

/// Unmounts (lazily) a tmpfs on drop, after killing the server using it.
struct Mounted {
    server: Option<TestServer>,
    mount: Option<std::path::PathBuf>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(p) = self.mount.take() {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

#[test]
fn min_free_refuses_an_upload_that_would_leave_too_little() {
    // Anywhere: a --min-free larger than any disk refuses every upload.
    let server = TestServer::start(&["--min-free", "1000TiB"]);
    // Said once at start, not only in each refusal.
    server.wait_for_log(
        "less than --min-free (1099511627776000): every upload is refused",
        Duration::from_secs(10),
    );
    let (mut c, _) = server.registered_client("nospace");
    refused_at_packet_1(&mut c, "a.bin", 600);
    server.wait_for_log("would go below --min-free 1099511627776000 bytes", Duration::from_secs(10));
    // One line per upload, however many packets it has: a second upload, a second line.
    let e = c.upload_bytes("b.bin", &pseudo_random(3000, 3), &UploadOptions::default()).unwrap_err();
    assert_eq!(e.refusal_code(), Some(GeneralError), "{e}");
    let refusals = |server: &TestServer| log_lines(server, "would go below --min-free");
    let two = wait_until(Duration::from_secs(10), || refusals(&server) >= 2);
    assert!(two && refusals(&server) == 2, "{}", server.log_text());

    // As root (CI): an 8 MiB tmpfs, 4 MiB kept free. 2 MiB fits, a further
    // 3 MiB would leave under 4 MiB, 1 MiB still fits.
    let mut mounted = None;
    let server = TestServer::start_with(&["--min-free", "4MiB"], Launch::default(), |temp| {
        let d = temp.join("data");
        std::fs::create_dir(&d).unwrap();
        if mount_tmpfs(&d, "8m") {
            mounted = Some(d);
        }
    });
    let is_mounted = mounted.is_some();
    let t = Mounted { server: Some(server), mount: mounted };
    if !is_mounted {
        println!("cannot mount a tmpfs here (not root?): only the huge --min-free case ran");
        return;
    }
    let server = t.server.as_ref().unwrap();
    let (mut c, _) = server.registered_client("small-disk");
    send(&mut c, "two", &pseudo_random(2 << 20, 1));
    refused_at_packet_1(&mut c, "three", 3 << 20);
    server.wait_for_log("would go below --min-free 4194304 bytes", Duration::from_secs(10));
    send(&mut c, "one", &pseudo_random(1 << 20, 2));
    // About 5 MiB left: 2 MiB more in 4,000-byte chunks each encrypted on its
    // own (packet 1 announces 4,000 bytes) is refused at the chunk that
    // would cross the line, not stored.
    let (id, key) = (c.id(), *c.aes_key().expect("session key"));
    let field = name_field_raw(b"chunks");
    c.send_raw(&per_chunk_frames(&id, &key, &field, &pseudo_random(2 << 20, 3), 4000)).unwrap();
    expect_reply(&mut c, GeneralError);
    let lines =
        wait_until(Duration::from_secs(10), || log_lines(server, "would go below --min-free 4194304") == 2);
    assert!(lines, "{}", server.log_text());
    assert!(!server.stored_path(&id, "chunks").exists());
}

/// Clients that encrypt each chunk on its own announce one chunk at a time
/// (packet 1's `orig_file_size` is its first chunk's): every chunk that
/// begins is checked against `--quota` with all the file's chunks so far, so
/// no file of theirs takes them past it. One 1607, the rest swallowed.
#[test]
fn per_chunk_uploads_are_checked_chunk_by_chunk() {
    let server = TestServer::start(&["--quota", "20000"]);
    let (mut c, id) = server.registered_client("chunky");
    let key = *c.aes_key().expect("session key");
    let field = name_field_raw(b"big.bin");
    // Ten chunks of 4,000: the sixth would make 24,000 > 20,000.
    c.send_raw(&per_chunk_frames(&id, &key, &field, &pseudo_random(40_000, 1), 4000)).unwrap();
    expect_reply(&mut c, GeneralError);
    server.wait_for_log("it stores 0 bytes and the file announces 24000", Duration::from_secs(10));
    assert!(!server.stored_path(&id, "big.bin").exists());
    // What fits is stored, sent the same way (the reply to it is the next one read:
    // the big file's later chunks had none).
    for (name, len) in [("fits.bin", 16_000usize), ("last.bin", 4_000)] {
        let data = pseudo_random(len, len as u64);
        let field = name_field_raw(name.as_bytes());
        c.send_raw(&per_chunk_frames(&id, &key, &field, &data, 4000)).unwrap();
        expect_reply(&mut c, backupd::protocol::ResponseCode::FileReceived);
        c.send_frame(backupd::protocol::Code::CrcOk, &[&field]).unwrap();
        expect_reply(&mut c, backupd::protocol::ResponseCode::Ack);
        assert_eq!(std::fs::read(server.stored_path(&id, name)).unwrap(), data, "{name}");
    }
    // At the quota: refused at packet 1.
    refused_at_packet_1(&mut c, "more.bin", 600);
    server.wait_for_log("it stores 20000 bytes and the file announces 600", Duration::from_secs(10));
    assert_eq!(log_lines(&server, "--quota 20000"), 2, "{}", server.log_text());
}
