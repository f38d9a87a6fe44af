//! End-to-end tests of the `backup-client` binary against the real backupd
//! (and, where a misbehaving server is needed, a small scripted server on a
//! thread). Everything runs on 127.0.0.1 in temp directories, and every wait
//! has a timeout.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backupd::client::identity::{format_me_info, load_identity, parse_me_info, Identity};
use backupd::crypto::{self, Cksum, OaepHash, StreamDecryptor};
use backupd::protocol::{
    id_hex, PacketHeader, RequestHeader, Response, NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN,
};
use base64::Engine;
use common::*;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;

/// Builds the text of a `me.info` from the id's lowercase hex.
type MeInfoFixture<'a> = Box<dyn Fn(&str) -> String + 'a>;

const CLI_TIMEOUT: Duration = Duration::from_secs(180);

fn cli_bin() -> &'static str {
    env!("CARGO_BIN_EXE_backup-client")
}

/// The result of one run of the client.
struct CliRun {
    code: i32,
    stdout: String,
    stderr: String,
    /// Largest VmHWM/VmRSS seen while it ran, in KiB (when asked for).
    peak_rss_kib: u64,
}

impl std::fmt::Debug for CliRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

fn read_rss_kib(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .filter(|l| l.starts_with("VmHWM:") || l.starts_with("VmRSS:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// Run the client in `dir` with `args`; kill it past the timeout.
fn run_cli(dir: &Path, args: &[&str]) -> CliRun {
    run_cli_with(dir, args, false)
}

fn run_cli_with(dir: &Path, args: &[&str], watch_rss: bool) -> CliRun {
    let mut child = Command::new(cli_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("BACKUP_SERVER")
        .env_remove("BACKUP_NAME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup-client");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pid = child.id();
    let end = Instant::now() + CLI_TIMEOUT;
    let mut peak = 0;
    let status = loop {
        if watch_rss {
            peak = peak.max(read_rss_kib(pid));
        }
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("backup-client {args:?} did not finish within {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(if watch_rss { 5 } else { 10 }));
    };
    CliRun {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        peak_rss_kib: peak,
    }
}

/// `send FILES --server ADDR --name NAME` plus extra flags.
fn send_args<'a>(addr: &'a str, name: &'a str, files: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["send"];
    v.extend_from_slice(files);
    v.extend_from_slice(&["--server", addr, "--name", name, "--quiet"]);
    v.extend_from_slice(extra);
    v
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A fresh client directory inside a temp dir.
fn client_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn wait_log_count(server: &TestServer, needle: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if server.log_text().matches(needle).count() >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("log never showed {needle:?} {n} times:\n{}", server.log_text());
}

// ---------------------------------------------------------------------------
// Against the real server
// ---------------------------------------------------------------------------

#[test]
fn first_run_registers_second_run_reconnects() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    let data = pseudo_random(100_000, 7);
    write_file(dir.path(), "a.bin", &data);

    let run = run_cli(dir.path(), &send_args(&addr, "alice", &["a.bin"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("a.bin: 100000 bytes"), "{run:?}");
    assert!(run.stdout.contains("verified"), "{run:?}");

    // me.info: name, 32 lowercase hex, one base64 line; mode 0600.
    let me = dir.path().join("me.info");
    let text = std::fs::read_to_string(&me).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "alice");
    assert_eq!(lines[1].len(), 32);
    assert!(lines[1].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(std::fs::metadata(&me).unwrap().permissions().mode() & 0o777, 0o600);
    let ident = load_identity(&me).unwrap();
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "a.bin")).unwrap(), data);

    // Second run: reconnects with the same identity (registering again would be refused).
    let data2 = pseudo_random(5000, 8);
    write_file(dir.path(), "a.bin", &data2);
    let run = run_cli(dir.path(), &send_args(&addr, "alice", &["a.bin"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(std::fs::read_to_string(&me).unwrap(), text, "me.info unchanged");
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "a.bin")).unwrap(), data2);
    server.wait_for_log(": reconnected", Duration::from_secs(10));

    // A different --name than me.info's is a local error.
    let run = run_cli(dir.path(), &send_args(&addr, "mallory", &["a.bin"], &[]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("belongs to \"alice\""), "{run:?}");
}

#[test]
fn legacy_transfer_info_mode() {
    let server = TestServer::start(&[]);
    let dir = client_dir();
    let a = pseudo_random(3000, 1);
    let b = pseudo_random(70_000, 2);
    write_file(dir.path(), "one.txt", &a);
    let sub = dir.path().join("sub dir");
    std::fs::create_dir(&sub).unwrap();
    let b_path = write_file(&sub, "two.bin", &b);
    let info = format!("{}\r\nlegacy user\r\none.txt\r\n{}\r\n", server.addr(), b_path.display());
    std::fs::write(dir.path().join("transfer.info"), info).unwrap();

    let run = run_cli(dir.path(), &["--quiet"]);
    assert_eq!(run.code, 0, "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    assert_eq!(ident.name, "legacy user");
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "one.txt")).unwrap(), a);
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "two.bin")).unwrap(), b);

    // And again with no arguments at all: unchanged files are skipped
    // without connecting; a changed one is sent after reconnecting.
    let run = run_cli(dir.path(), &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("2 file(s): 0 sent, 2 unchanged"), "{run:?}");
    assert!(!run.stderr.contains("reconnected"), "{run:?}");
    write_file(dir.path(), "one.txt", b"changed");
    let run = run_cli(dir.path(), &[]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("reconnected"), "{run:?}");
    assert!(run.stderr.contains("2 file(s): 1 sent, 1 unchanged"), "{run:?}");
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "one.txt")).unwrap(), b"changed");

    // No transfer.info: a usage error with a hint.
    let empty = client_dir();
    let run = run_cli(empty.path(), &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("transfer.info"), "{run:?}");
}

#[test]
fn several_files_over_one_connection_and_sizes_byte_identical() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("one", vec![0x5a]),
        ("sixteen", pseudo_random(16, 3)),
        ("twenty-mib", pseudo_random(20 << 20, 4)),
    ];
    for (n, d) in &files {
        write_file(dir.path(), n, d);
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let run = run_cli(dir.path(), &send_args(&addr, "carol", &names, &["--json"]));
    assert_eq!(run.code, 0, "{run:?}");
    let objs: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(objs.len(), files.len(), "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    for ((n, d), obj) in files.iter().zip(&objs) {
        assert_eq!(json_field(obj, "name"), *n);
        assert_eq!(json_field(obj, "status"), "verified");
        assert_eq!(json_field(obj, "verified"), "true");
        assert_eq!(json_field(obj, "size"), d.len().to_string());
        let stored = server.stored_path(&ident.id, n);
        assert_eq!(json_field(obj, "cksum"), cksum_cmd(&stored).to_string(), "{n}");
        assert!(std::fs::read(&stored).unwrap() == *d, "{n} differs");
    }
    wait_log_count(&server, "verified and stored", files.len());
    assert_eq!(server.log_text().matches(": connected").count(), 1, "{}", server.log_text());
}

#[test]
fn packet_options_and_conventions() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    let d = pseudo_random(1_000_000, 9);
    write_file(dir.path(), "f", &d);
    let ident_path = dir.path().join("me.info");
    // --all: the same unchanged file is sent again each time.
    for extra in [
        &["--single-packet", "--all"][..],
        &["--packet-size", "1000", "--all"],
        &["--packet-size", "64KiB", "--packet-convention", "whole-file", "--all"],
        &["--packet-size", "4000", "--packet-convention", "per-chunk", "--all"],
    ] {
        let run = run_cli(dir.path(), &send_args(&addr, "dave", &["f"], extra));
        assert_eq!(run.code, 0, "{extra:?}: {run:?}");
        let ident = load_identity(&ident_path).unwrap();
        assert!(std::fs::read(server.stored_path(&ident.id, "f")).unwrap() == d, "{extra:?}");
    }
    // More than 65535 packets is refused locally.
    let run = run_cli(dir.path(), &send_args(&addr, "dave", &["f"], &["--packet-size", "8", "--all"]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("65535"), "{run:?}");
}

#[test]
fn foreign_me_info_formats() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let key = test_key();
    let pkcs1 = key.to_pkcs1_der().unwrap();
    let pkcs8 = key.to_pkcs8_der().unwrap();
    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    let wrap = |s: &str, w: usize, eol: &str| -> String {
        s.as_bytes().chunks(w).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(eol)
    };
    let fixtures: Vec<(&str, MeInfoFixture)> = vec![
        // Upper-case id, PKCS#1 on one line (PyCryptodome's default DER).
        ("py", Box::new(|id: &str| format!("py\n{}\n{}\n", id.to_uppercase(), b64(pkcs1.as_bytes())))),
        // Crypto++ Base64Encoder: PKCS#8 wrapped at 72 columns.
        ("cpp", Box::new(|id: &str| format!("cpp\n{id}\n{}\n", wrap(&b64(pkcs8.as_bytes()), 72, "\n")))),
        // Windows line ends, 64 columns, no padding, trailing blank line.
        (
            "win",
            Box::new(|id: &str| {
                let k = b64(pkcs1.as_bytes());
                format!("win\r\n{id}\r\n{}\r\n\r\n", wrap(k.trim_end_matches('='), 64, "\r\n"))
            }),
        ),
        // All at once: upper-case id, CRLF, PKCS#8 wrapped at 76 (MIME), no final line end.
        (
            "all",
            Box::new(|id: &str| {
                format!("all\r\n{}\r\n{}", id.to_uppercase(), wrap(&b64(pkcs8.as_bytes()), 76, "\r\n"))
            }),
        ),
        // Classic Mac line ends (a lone CR), key on one line.
        ("mac", Box::new(|id: &str| format!("mac\r{}\r{}\r", id.to_uppercase(), b64(pkcs1.as_bytes())))),
    ];
    for (name, make) in &fixtures {
        let (_c, id) = server.registered_client(name);
        let dir = client_dir();
        let text = make(&id_hex(&id));
        std::fs::write(dir.path().join("me.info"), &text).unwrap();
        assert_eq!(parse_me_info(&text).unwrap().id, id);
        let d = pseudo_random(12_345, 5);
        write_file(dir.path(), "x.bin", &d);
        let run = run_cli(dir.path(), &send_args(&addr, name, &["x.bin"], &[]));
        assert_eq!(run.code, 0, "{name}: {run:?}");
        assert_eq!(std::fs::read(server.stored_path(&id, "x.bin")).unwrap(), d, "{name}");
        // The foreign file is left as it was.
        assert_eq!(std::fs::read_to_string(dir.path().join("me.info")).unwrap(), text);
    }

    // A broken me.info is a local error, reported for every file.
    let dir = client_dir();
    std::fs::write(dir.path().join("me.info"), "py\nnot-an-id\nAAAA\n").unwrap();
    write_file(dir.path(), "x.bin", b"x");
    let run = run_cli(dir.path(), &send_args(&addr, "py", &["x.bin"], &["--json"]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("bad identity"), "{run:?}");
    assert_eq!(json_field(run.stdout.trim(), "status"), "local_error");
}

#[test]
fn server_down_is_exit_4() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let dir = client_dir();
    write_file(dir.path(), "a", b"abc");
    write_file(dir.path(), "b", b"def");
    let run =
        run_cli(dir.path(), &send_args(&addr, "erin", &["a", "b"], &["--json", "--connect-timeout", "2s"]));
    assert_eq!(run.code, 4, "{run:?}");
    let objs: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(objs.len(), 2, "{run:?}");
    for o in objs {
        assert_eq!(json_field(o, "status"), "network_error", "{o}");
        assert_eq!(json_field(o, "exit_code"), "4");
    }
    assert!(!dir.path().join("me.info").exists());
}

#[test]
fn name_taken_is_exit_2_and_register_replaces_me_info_only_on_success() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let (_c, _id) = server.registered_client("frank");
    let dir = client_dir();
    write_file(dir.path(), "a", b"abc");
    let run = run_cli(dir.path(), &send_args(&addr, "frank", &["a"], &[]));
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("already taken"), "{run:?}");
    assert!(!dir.path().join("me.info").exists(), "no identity saved after 1601");

    // --register with an existing me.info: refused -> the old file stays.
    let run = run_cli(dir.path(), &send_args(&addr, "gina", &["a"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    let before = std::fs::read_to_string(dir.path().join("me.info")).unwrap();
    let run = run_cli(dir.path(), &send_args(&addr, "frank", &["a"], &["--register"]));
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join("me.info")).unwrap(), before);
    // --register under a free name: replaced.
    let run = run_cli(dir.path(), &send_args(&addr, "gina2", &["a"], &["--register", "--key-bits", "2048"]));
    assert_eq!(run.code, 0, "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    assert_eq!(ident.name, "gina2");
    assert_eq!(rsa::traits::PublicKeyParts::size(&ident.key), 256);
}

/// An identity that cannot be saved is found out before registering: exit
/// 1, the path named, and the name still free (without the check the client
/// registered, uploaded, exited 0 and the name was taken for good).
#[test]
fn identity_that_cannot_be_saved_registers_nothing() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    write_file(dir.path(), "a", b"abc");
    // A path under a regular file: its folder cannot be created, even by root.
    write_file(dir.path(), "blocker", b"a file, not a folder");
    let run =
        run_cli(dir.path(), &send_args(&addr, "nora", &["a"], &["--identity", "blocker/me.info", "--json"]));
    assert_eq!(run.code, 1, "{run:?}");
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{run:?}");
    assert!(errors[0].contains("cannot save the identity to blocker/me.info"), "{run:?}");
    assert!(errors[0].contains("nothing was registered"), "{run:?}");
    assert_eq!(json_field(run.stdout.trim(), "status"), "local_error", "{run:?}");
    // --register over an existing identity is checked the same way.
    std::fs::create_dir(dir.path().join("folder")).unwrap();
    std::fs::create_dir(dir.path().join("folder/me.info")).unwrap();
    let run = run_cli(
        dir.path(),
        &send_args(&addr, "nora", &["a"], &["--identity", "folder/me.info", "--register"]),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cannot save the identity to folder/me.info: it is a folder"), "{run:?}");
    // Nothing was registered: the name is free.
    let run = run_cli(dir.path(), &send_args(&addr, "nora", &["a"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "a")).unwrap(), b"abc");
}

/// When the identity cannot be saved after registering after all, nothing is
/// uploaded: exit 1, and the message gives the id and the command that frees
/// the name (without the fix the client uploaded and exited 0).
#[test]
fn identity_lost_after_registering_uploads_nothing() {
    let dir = client_dir();
    let id_dir = dir.path().join("id");
    std::fs::create_dir(&id_dir).unwrap();
    let fake = FakeServer::start(Script::BreakFolderOn1026 { dir: id_dir });
    let addr = fake.addr.to_string();
    write_file(dir.path(), "a", b"abc");
    write_file(dir.path(), "b", b"def");
    let run =
        run_cli(dir.path(), &send_args(&addr, "oscar", &["a", "b"], &["--identity", "id/me.info", "--json"]));
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(fake.codes(), [0, 1025, 1026], "no upload after the identity was lost");
    let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{run:?}");
    let hex = "42".repeat(16);
    for needle in [
        format!("registered as oscar (id {hex}) but could not save id/me.info"),
        "nothing was uploaded".into(),
        "run `backupd reset-key oscar` on the server".into(),
    ] {
        assert!(errors[0].contains(&needle), "{needle:?}: {run:?}");
    }
    for obj in run.stdout.lines() {
        assert_eq!(json_field(obj, "status"), "local_error", "{run:?}");
        assert_eq!(json_field(obj, "exit_code"), "1", "{run:?}");
    }
    assert_eq!(run.stdout.lines().count(), 2, "{run:?}");
}

#[test]
fn reconnect_denied_is_exit_2() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    let key = test_key().to_pkcs8_der().unwrap();
    let text = format!(
        "henry\n{}\n{}\n",
        "00112233445566778899aabbccddeeff",
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    );
    std::fs::write(dir.path().join("me.info"), &text).unwrap();
    write_file(dir.path(), "a", b"abc");
    let run = run_cli(dir.path(), &send_args(&addr, "henry", &["a"], &["--json"]));
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(json_field(run.stdout.trim(), "status"), "reconnect_denied");
    assert!(run.stderr.contains("--register"), "{run:?}");
}

/// The text between the backquotes that start with `start`.
fn quoted_command<'a>(text: &'a str, start: &str) -> &'a str {
    let from = text.find(&format!("`{start}")).unwrap_or_else(|| panic!("no `{start}... in {text}")) + 1;
    let len = text[from..].find('`').unwrap_or_else(|| panic!("unterminated `{start}... in {text}"));
    &text[from..from + len]
}

/// A me.info with this client's id but another key: exit 2 (crypto error)
/// with a hint that names the way out, and the way out works: the
/// `backupd reset-key` of the hint (server stopped), then the client command
/// its own hint names (without the fix there was no hint).
#[test]
fn key_mismatch_hints_at_reset_key_and_register_again() {
    let mut server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    write_file(dir.path(), "a", b"abc");
    let run = run_cli(dir.path(), &send_args(&addr, "pia", &["a"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    // Same name and id, another key.
    let other = Identity { key: test_key().clone(), ..ident.clone() };
    std::fs::write(dir.path().join("other.info"), format_me_info(&other).unwrap()).unwrap();
    let run = run_cli(dir.path(), &send_args(&addr, "pia", &["a"], &["--identity", "other.info", "--json"]));
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(json_field(run.stdout.trim(), "status"), "crypto_error", "{run:?}");
    let hint = format!(
        "the private key in other.info does not match the key the server holds for pia (id {}): the operator \
         can run `backupd reset-key pia` on the server, then register again with \
         `backup-client send PATH... --server HOST:PORT --name NAME --register`",
        id_hex(&ident.id)
    );
    assert!(run.stderr.contains("cannot decrypt the 128-byte session key"), "{run:?}");
    assert!(run.stderr.contains(&hint), "{run:?}");

    // Follow the hints: the operator's command, then the one `backupd reset-key` prints.
    server.stop();
    let data = server.data_dir();
    let mut reset: Vec<&std::ffi::OsStr> = quoted_command(&run.stderr, "backupd reset-key")
        .split(' ')
        .skip(1)
        .map(std::ffi::OsStr::new)
        .collect();
    reset.extend([std::ffi::OsStr::new("--data-dir"), data.as_os_str()]);
    let r = run_admin(&reset, &[], CLI_TIMEOUT);
    assert_eq!(r.code, 0, "{r:?}");
    server.restart();
    let addr = server.addr().to_string();
    let mut again: Vec<&str> = quoted_command(&r.stdout, "backup-client send")
        .split(' ')
        .skip(1)
        .map(|w| match w {
            "PATH..." => "a",
            "HOST:PORT" => &addr,
            "NAME" => "pia",
            w => w,
        })
        .collect();
    again.extend(["--identity", "other.info", "--quiet"]);
    let run = run_cli(dir.path(), &again);
    assert_eq!(run.code, 0, "{again:?}: {run:?}");
    let renewed = load_identity(&dir.path().join("other.info")).unwrap();
    assert_eq!((renewed.name.as_str(), renewed.id), ("pia", ident.id), "the same client again");
    assert!(renewed.key != *test_key(), "a new key");
    // From now on that identity reconnects.
    let run = run_cli(dir.path(), &send_args(&addr, "pia", &["a"], &["--identity", "other.info", "--all"]));
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn missing_file_is_exit_1_and_others_still_go() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    write_file(dir.path(), "ok", b"fine");
    let run = run_cli(dir.path(), &send_args(&addr, "ivy", &["nope", "ok"], &[]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("nope: NOT sent"), "{run:?}");
    assert!(run.stdout.contains("ok: 4 bytes"), "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "ok")).unwrap(), b"fine");
    // Usage errors are exit 1 too; --help and --version are 0.
    assert_eq!(run_cli(dir.path(), &["send", "ok"]).code, 1);
    assert_eq!(run_cli(dir.path(), &["--bogus"]).code, 1);
    let help = run_cli(dir.path(), &["--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("Exit codes"), "{help:?}");
    assert_eq!(run_cli(dir.path(), &["--version"]).code, 0);
}

/// A 256 MiB upload: the client's peak RSS stays under 32 MiB.
#[test]
fn large_upload_memory_is_bounded() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    let path = dir.path().join("big.bin");
    let size: u64 = 256 << 20;
    {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) {
            for chunk in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    let run = run_cli_with(dir.path(), &send_args(&addr, "jack", &["big.bin"], &["--json"]), true);
    assert_eq!(run.code, 0, "{run:?}");
    let obj = run.stdout.trim();
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    let stored = server.stored_path(&ident.id, "big.bin");
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), size);
    assert_eq!(json_field(obj, "cksum"), cksum_cmd(&stored).to_string());
    assert_eq!(json_field(obj, "cksum"), cksum_cmd(&path).to_string());
    eprintln!("client peak RSS: {} KiB; {obj}", run.peak_rss_kib);
    assert!(run.peak_rss_kib > 0, "RSS was never sampled");
    assert!(run.peak_rss_kib < 32 * 1024, "client peak RSS {} KiB >= 32 MiB", run.peak_rss_kib);
}

// ---------------------------------------------------------------------------
// Against a scripted server
// ---------------------------------------------------------------------------

#[derive(Clone, PartialEq, Eq)]
enum Script {
    /// Every 1603 carries a wrong cksum; `ack_retry`: answer 1030 with 1604.
    WrongCksum { ack_retry: bool },
    /// The first upload is answered 1607 and the connection closed.
    FailFirstUpload,
    /// On the first file packet (before reading further), the file being
    /// sent is truncated to 1 MiB or grown by a byte.
    ChangeFile { path: PathBuf, grow: bool },
    /// A well-behaved server that keeps every verified file (after its 1029)
    /// under `dir/<name>`, names taken as paths (what the server half of
    /// issue 10 does): end-to-end checks of nested names until backupd has them.
    Store { dir: PathBuf },
    /// Every upload of this file name is answered 1607 (the connection stays open).
    Refuse { name: String },
    /// On 1026, before answering, the (empty) folder `dir` is replaced by a
    /// regular file: the client's identity, checked to be writable before it
    /// registered, can no longer be saved there.
    BreakFolderOn1026 { dir: PathBuf },
}

/// A minimal protocol-v3 server on a thread. Records the request codes it
/// sees, with 0 for each new connection.
struct FakeServer {
    addr: SocketAddr,
    codes: Arc<Mutex<Vec<u16>>>,
}

impl FakeServer {
    fn start(script: Script) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let codes = Arc::new(Mutex::new(Vec::new()));
        let log = codes.clone();
        std::thread::spawn(move || {
            let mut public_key = None;
            let mut failed_once = false;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                log.lock().unwrap().push(0);
                serve(stream, &script, &log, &mut public_key, &mut failed_once);
            }
        });
        FakeServer { addr, codes }
    }

    fn codes(&self) -> Vec<u16> {
        self.codes.lock().unwrap().clone()
    }
}

fn serve(
    mut s: TcpStream,
    script: &Script,
    log: &Mutex<Vec<u16>>,
    public_key: &mut Option<rsa::RsaPublicKey>,
    failed_once: &mut bool,
) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let id = [0x42u8; 16];
    let mut aes = [0u8; 32];
    let mut upload: Option<(StreamDecryptor, Cksum, u32, Vec<u8>)> = None;
    // The last file received (name, plaintext), kept until its 1029.
    let mut received: Option<(String, Vec<u8>)> = None;
    loop {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let hdr = RequestHeader::decode(&h);
        let mut payload = vec![0u8; hdr.payload_size as usize];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        log.lock().unwrap().push(hdr.code);
        let mut out = Vec::new();
        let mut close = false;
        match hdr.code {
            1025 => Response::RegistrationOk { id }.encode(&mut out),
            1026 => {
                if let Script::BreakFolderOn1026 { dir } = script {
                    std::fs::remove_dir(dir).unwrap();
                    std::fs::write(dir, "not a folder").unwrap();
                }
                let (pk, _) = crypto::parse_public_key(&payload[NAME_FIELD_LEN..]).unwrap();
                aes = crypto::random_aes_key();
                let encrypted_key = crypto::encrypt_session_key(&pk, &aes, OaepHash::Sha1).unwrap();
                *public_key = Some(pk);
                Response::KeyAccepted { id, encrypted_key }.encode(&mut out)
            }
            1027 => match public_key {
                Some(pk) if hdr.client_id == id => {
                    aes = crypto::random_aes_key();
                    let encrypted_key = crypto::encrypt_session_key(pk, &aes, OaepHash::Sha1).unwrap();
                    Response::ReconnectOk { id, encrypted_key }.encode(&mut out)
                }
                _ => Response::ReconnectDenied { id: hdr.client_id }.encode(&mut out),
            },
            1028 => {
                let ph = PacketHeader::decode(&payload).unwrap();
                if let (Script::ChangeFile { path, grow }, 1) = (script, ph.packet_number) {
                    let f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                    if *grow {
                        (&f).write_all(b"!").unwrap();
                    } else {
                        f.set_len(1 << 20).unwrap();
                    }
                }
                let (dec, ck, total, plain) =
                    upload.get_or_insert_with(|| (StreamDecryptor::new(&aes), Cksum::new(), 0, Vec::new()));
                *total += (payload.len() - PACKET_HEADER_LEN) as u32;
                let keep = matches!(script, Script::Store { .. });
                dec.update(&mut payload[PACKET_HEADER_LEN..], |b| {
                    ck.update(b);
                    if keep {
                        plain.extend_from_slice(b)
                    }
                });
                if ph.packet_number == ph.total_packets {
                    let (dec, mut ck, total, mut plain) = upload.take().unwrap();
                    dec.finish(|b| {
                        ck.update(b);
                        if keep {
                            plain.extend_from_slice(b)
                        }
                    })
                    .unwrap();
                    received = Some((String::from_utf8(ph.file_name.bytes().to_vec()).unwrap(), plain));
                    let mut cksum = ck.finalize();
                    match script {
                        Script::WrongCksum { .. } => cksum = !cksum,
                        Script::FailFirstUpload if !*failed_once => {
                            *failed_once = true;
                            Response::GeneralError.encode(&mut out);
                            close = true;
                        }
                        Script::Refuse { name } if ph.file_name.bytes() == name.as_bytes() => {
                            Response::GeneralError.encode(&mut out);
                        }
                        Script::FailFirstUpload
                        | Script::ChangeFile { .. }
                        | Script::Store { .. }
                        | Script::Refuse { .. }
                        | Script::BreakFolderOn1026 { .. } => {}
                    }
                    if out.is_empty() {
                        let file_name = ph.file_name.0;
                        Response::FileReceived { id, content_size: total, file_name, cksum }.encode(&mut out);
                    }
                }
            }
            1030 => {
                if *script == (Script::WrongCksum { ack_retry: true }) {
                    Response::Ack { id }.encode(&mut out)
                }
            }
            1029 => {
                if let (Script::Store { dir }, Some((name, plain))) = (script, received.take()) {
                    assert!(
                        !name.starts_with('/') && !name.split('/').any(|c| c == ".." || c == "."),
                        "{name}"
                    );
                    let path = dir.join(&name);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(path, plain).unwrap();
                }
                Response::Ack { id }.encode(&mut out)
            }
            1031 => Response::Ack { id }.encode(&mut out),
            _ => {
                Response::GeneralError.encode(&mut out);
                close = true;
            }
        }
        if s.write_all(&out).is_err() || close {
            return;
        }
    }
}

fn expected_attempts(packets: usize, attempts: usize) -> Vec<u16> {
    let mut v = Vec::new();
    for a in 0..attempts {
        if a > 0 {
            v.push(1030);
        }
        v.extend(std::iter::repeat_n(1028, packets));
    }
    v
}

#[test]
fn wrong_cksum_three_attempts_then_abort_exit_3() {
    for ack_retry in [false, true] {
        let fake = FakeServer::start(Script::WrongCksum { ack_retry });
        let addr = fake.addr.to_string();
        let dir = client_dir();
        write_file(dir.path(), "w.bin", &pseudo_random(2500, 11));
        // The client does not need to know whether the server acks 1030.
        let run =
            run_cli(dir.path(), &send_args(&addr, "kim", &["w.bin"], &["--packet-size", "1000", "--json"]));
        assert_eq!(run.code, 3, "ack_retry={ack_retry}: {run:?}");
        let obj = run.stdout.trim();
        assert_eq!(json_field(obj, "status"), "cksum_mismatch");
        assert_eq!(json_field(obj, "attempts"), "3");
        assert_eq!(json_field(obj, "verified"), "false");
        let mut expect = vec![0, 1025, 1026];
        expect.extend(expected_attempts(3, 3)); // 2512 bytes of ciphertext in 1000-byte packets
        expect.push(1031);
        assert_eq!(fake.codes(), expect, "ack_retry={ack_retry}");
    }
    // With --ack-retry the client waits for the 1604 before resending.
    let fake = FakeServer::start(Script::WrongCksum { ack_retry: true });
    let addr = fake.addr.to_string();
    let dir = client_dir();
    write_file(dir.path(), "w.bin", b"tiny");
    let run =
        run_cli(dir.path(), &send_args(&addr, "kim", &["w.bin"], &["--ack-retry", "--read-timeout", "10s"]));
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stdout.contains("NOT verified: cksum still wrong after 3 attempts"), "{run:?}");
}

#[test]
fn general_error_is_retried_on_a_new_connection() {
    let fake = FakeServer::start(Script::FailFirstUpload);
    let addr = fake.addr.to_string();
    let dir = client_dir();
    write_file(dir.path(), "r.bin", &pseudo_random(5000, 12));
    let run = run_cli(dir.path(), &send_args(&addr, "lee", &["r.bin"], &["--packet-size", "4096"]));
    assert_eq!(run.code, 0, "{run:?}");
    // 1607 + close after the first upload: the client notices the closed
    // connection and reconnects with the identity it has just saved.
    let mut expect = vec![0, 1025, 1026, 1028, 1028, 0, 1027, 1028, 1028, 1029];
    assert_eq!(fake.codes(), expect);
    // With --retries 0 the 1607 is final: exit 2.
    let fake = FakeServer::start(Script::FailFirstUpload);
    let addr = fake.addr.to_string();
    let dir = client_dir();
    write_file(dir.path(), "r.bin", b"abc");
    let run = run_cli(dir.path(), &send_args(&addr, "lee", &["r.bin"], &["--retries", "0", "--json"]));
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(json_field(run.stdout.trim(), "status"), "server_error");
    expect = vec![0, 1025, 1026, 1028];
    assert_eq!(fake.codes(), expect);
}

#[test]
fn a_refused_file_does_not_report_the_cksum_of_the_file_before() {
    let fake = FakeServer::start(Script::Refuse { name: "bad.bin".into() });
    let dir = client_dir();
    write_file(dir.path(), "ok.bin", b"fine");
    write_file(dir.path(), "bad.bin", b"refused");
    let addr = fake.addr.to_string();
    let run =
        run_cli(dir.path(), &send_args(&addr, "nn", &["ok.bin", "bad.bin"], &["--retries", "0", "--json"]));
    assert_eq!(run.code, 2, "{run:?}");
    let by = json_by_name(&run);
    assert_eq!(by["ok.bin"].0, "verified");
    let bad = &by["bad.bin"].1;
    assert_eq!(json_field(bad, "status"), "server_error", "{bad}");
    assert_eq!(json_field(bad, "cksum"), "null", "{bad}");
    assert_eq!(json_field(bad, "server_cksum"), "null", "{bad}");
}

#[test]
fn file_changing_size_while_read_is_reported_and_never_confirmed() {
    for grow in [false, true] {
        let dir = client_dir();
        // Far larger than the socket buffers: the client cannot have read it all
        // before the server, which stops reading at packet 1, changes it.
        let path = dir.path().join("live.log");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            for i in 0..64u64 {
                f.write_all(&pseudo_random(1 << 20, i + 100)).unwrap();
            }
            f.flush().unwrap();
        }
        let fake = FakeServer::start(Script::ChangeFile { path: path.clone(), grow });
        let addr = fake.addr.to_string();
        let run = run_cli(
            dir.path(),
            &send_args(&addr, "max", &["live.log"], &["--packet-size", "64KiB", "--json"]),
        );
        assert_eq!(run.code, 1, "grow={grow}: {run:?}");
        let obj = run.stdout.trim();
        assert_eq!(json_field(obj, "status"), "file_changed", "{obj}");
        assert_eq!(json_field(obj, "verified"), "false");
        let codes = fake.codes();
        assert!(!codes.contains(&1029), "grow={grow}: {codes:?}");
        // The upload was cut short: never all 1025 packets of the file.
        assert!(codes.iter().filter(|&&c| c == 1028).count() < 1025, "grow={grow}");
    }
}

// ---------------------------------------------------------------------------
// Folders, incremental runs, excludes (issue 10)
// ---------------------------------------------------------------------------

/// Every file below `root` as (prefix/relative path, contents).
fn tree_files(root: &Path, prefix: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    walk_files(root)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            (format!("{prefix}{rel}"), std::fs::read(&p).unwrap())
        })
        .collect()
}

/// A small tree: nested folders, an empty file, spaces and non-ASCII names, a larger file.
fn make_tree(root: &Path) {
    for (rel, data) in [
        ("a.txt", b"alpha\n".to_vec()),
        ("empty", Vec::new()),
        ("sub/b.txt", b"bravo\n".to_vec()),
        ("sub/deeper/c.bin", pseudo_random(300_000, 21)),
        ("with space/ünï cödé.txt", b"unicode\n".to_vec()),
        ("sub/deeper/sixteen", pseudo_random(16, 22)),
    ] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

/// The JSON objects of a run, by `name`: (status, whole object).
fn json_by_name(run: &CliRun) -> std::collections::BTreeMap<String, (String, String)> {
    run.stdout
        .lines()
        .map(|o| (json_field(o, "name").to_string(), (json_field(o, "status").to_string(), o.to_string())))
        .collect()
}

/// Back up `docs` twice; the stored tree (under `stored(id)`) must equal the
/// source byte for byte after each run, and the second run skips every file.
/// Returns the client directory.
fn backup_tree_twice(
    addr: &str,
    stored: impl Fn(&backupd::protocol::ClientId) -> PathBuf,
) -> tempfile::TempDir {
    let dir = client_dir();
    let docs = dir.path().join("docs");
    make_tree(&docs);
    let source = tree_files(&docs, "docs/");
    let run = run_cli(dir.path(), &send_args(addr, "tree", &["docs"], &["--json"]));
    assert_eq!(run.code, 0, "{run:?}");
    let objs = json_by_name(&run);
    assert_eq!(objs.keys().collect::<Vec<_>>(), source.keys().collect::<Vec<_>>(), "{run:?}");
    assert!(objs.values().all(|(st, _)| st == "verified"), "{run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    let root = stored(&ident.id);
    assert_eq!(tree_files(&root, ""), source, "stored tree after the first run");

    let run = run_cli(dir.path(), &send_args(addr, "tree", &["docs"], &["--json"]));
    assert_eq!(run.code, 0, "{run:?}");
    let objs = json_by_name(&run);
    assert_eq!(objs.len(), source.len(), "{run:?}");
    for (name, (status, obj)) in &objs {
        assert_eq!(status, "unchanged", "{obj}");
        assert_eq!(json_field(obj, "size"), source[name].len().to_string(), "{obj}");
        assert_eq!(json_field(obj, "cksum"), crypto::cksum(&source[name]).to_string(), "{obj}");
        assert_eq!(json_field(obj, "exit_code"), "0");
    }
    assert_eq!(tree_files(&root, ""), source, "stored tree after the second run");
    dir
}

/// A fake server that stores what it verifies under a temp dir: (dir, server, address).
fn storing_fake() -> (tempfile::TempDir, FakeServer, String) {
    let store = client_dir();
    let fake = FakeServer::start(Script::Store { dir: store.path().to_path_buf() });
    let addr = fake.addr.to_string();
    (store, fake, addr)
}

#[test]
fn folder_tree_twice_against_a_storing_server() {
    let (store, fake, addr) = storing_fake();
    let _dir = backup_tree_twice(&addr, |_| store.path().to_path_buf());
    // One connection: the second run had nothing to send and did not connect.
    assert_eq!(fake.codes().iter().filter(|&&c| c == 0).count(), 1, "{:?}", fake.codes());
}

#[test]
fn folder_tree_twice_byte_for_byte() {
    let server = TestServer::start(&[]);
    let _dir = backup_tree_twice(&server.addr().to_string(), |id| server.files_dir().join(id_hex(id)));
    wait_log_count(&server, "verified and stored", 6);
    assert_eq!(server.log_text().matches(": connected").count(), 1, "the second run did not connect");
}

#[test]
fn paths_are_named_like_tar() {
    let (store, _fake, addr) = storing_fake();
    let dir = client_dir();
    make_tree(&dir.path().join("docs"));
    // Absolute: the leading / goes. `.` and everything up to a `..` go.
    let abs = dir.path().join("docs/sub");
    let abs_s = abs.to_str().unwrap();
    let run = run_cli(
        dir.path(),
        &send_args(&addr, "tar", &[abs_s, "./docs/../docs/with space", "docs/./a.txt"], &["--json"]),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let names: Vec<String> = json_by_name(&run).into_keys().collect();
    let rel = abs_s.trim_start_matches('/');
    let mut expect = vec![
        format!("{rel}/b.txt"),
        format!("{rel}/deeper/c.bin"),
        format!("{rel}/deeper/sixteen"),
        "docs/with space/ünï cödé.txt".to_string(),
        "docs/a.txt".to_string(),
    ];
    expect.sort();
    assert_eq!(names, expect, "{run:?}");
    assert_eq!(std::fs::read(store.path().join(rel).join("b.txt")).unwrap(), b"bravo\n");
    // `send .` from inside a folder: names relative to it.
    let run = run_cli(
        &dir.path().join("docs/sub"),
        &send_args(&addr, "tar", &["."], &["--json", "--identity", "../../me.info"]),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let names: Vec<String> = json_by_name(&run).into_keys().collect();
    assert_eq!(names, ["b.txt", "deeper/c.bin", "deeper/sixteen"], "{run:?}");
}

#[test]
fn legacy_mode_names_by_base_name_also_for_folders() {
    let (store, _fake, addr) = storing_fake();
    let dir = client_dir();
    let data = client_dir();
    make_tree(&data.path().join("docs"));
    let single = write_file(data.path(), "single.txt", b"one");
    let info = format!("{addr}\nlegacy\n{}\n{}\n", data.path().join("docs").display(), single.display());
    std::fs::write(dir.path().join("transfer.info"), info).unwrap();
    let run = run_cli(dir.path(), &["--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let mut expect = tree_files(&data.path().join("docs"), "docs/");
    expect.insert("single.txt".into(), b"one".to_vec());
    assert_eq!(
        json_by_name(&run).into_keys().collect::<Vec<_>>(),
        expect.keys().cloned().collect::<Vec<_>>()
    );
    assert_eq!(tree_files(store.path(), ""), expect);
}

/// The progress bar is drawn only on a terminal: under `script(1)` (a pty)
/// it shows the files and bytes of the run; with stderr on a pipe, nothing.
#[test]
fn progress_bar_only_on_a_terminal() {
    let (_store, _fake, addr) = storing_fake();
    let dir = client_dir();
    write_file(dir.path(), "a.bin", &pseudo_random(3 << 20, 31));
    write_file(dir.path(), "b.bin", &pseudo_random(1 << 20, 32));
    let run = run_cli(dir.path(), &["send", "a.bin", "b.bin", "--server", &addr, "--name", "pty"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stderr.contains("files [") && !run.stderr.contains('\x1b'), "{run:?}");
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("no script(1) here: the terminal half is not checked");
        return;
    }
    let cmd = format!("{} send a.bin b.bin --all --server {addr} --name pty", cli_bin());
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    let end = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("script did not finish within {CLI_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let screen = reader.join().unwrap();
    assert!(status.success(), "{status:?}: {screen}");
    assert!(screen.contains("/2 files ["), "{screen}");
    assert!(screen.contains("/4.00 MiB"), "{screen}");
    assert!(screen.contains("b.bin: 1048576 bytes") && screen.contains("verified"), "{screen}");
}

/// The name of each path in the record beside `me.info` (there must be one record).
fn record_names(dir: &Path) -> Vec<String> {
    let records: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".sent"))
        .collect();
    match records.as_slice() {
        [] => Vec::new(),
        [one] => {
            let name = one.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with("me.info.") && name.len() == "me.info.".len() + 32 + 5, "{name}");
            let text = std::fs::read_to_string(one).unwrap();
            assert!(text.starts_with("# backup-client record v1"), "{text}");
            text.lines().skip(1).map(|l| l.split('\t').next().unwrap().to_string()).collect()
        }
        more => panic!("several records: {more:?}"),
    }
}

#[test]
fn incremental_runs_skip_unchanged_files() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    write_file(dir.path(), "a.txt", b"first a");
    write_file(dir.path(), "b.txt", b"first b");
    let send = |extra: &[&str]| {
        let mut e = vec!["--json"];
        e.extend_from_slice(extra);
        let run = run_cli(dir.path(), &send_args(&addr, "incr", &["a.txt", "b.txt"], &e));
        assert_eq!(run.code, 0, "{run:?}");
        let by = json_by_name(&run);
        (by["a.txt"].0.clone(), by["b.txt"].0.clone(), run)
    };
    let (a, b, _) = send(&[]);
    assert_eq!((a.as_str(), b.as_str()), ("verified", "verified"));
    assert_eq!(record_names(dir.path()), ["a.txt", "b.txt"]);
    let ident = load_identity(&dir.path().join("me.info")).unwrap();

    // Unchanged: skipped, the recorded cksum reported, no connection.
    let (a, b, run) = send(&[]);
    assert_eq!((a.as_str(), b.as_str()), ("unchanged", "unchanged"), "{run:?}");
    let obj = &json_by_name(&run)["a.txt"].1;
    assert_eq!(json_field(obj, "cksum"), crypto::cksum(b"first a").to_string());
    assert_eq!(json_field(obj, "verified"), "false");
    assert!(json_field(obj, "reason").contains("unchanged"), "{obj}");
    assert_eq!(server.log_text().matches(": connected").count(), 1);

    // A new size is sent; so is the same size with another mtime.
    write_file(dir.path(), "b.txt", b"second bb");
    let (a, b, _) = send(&[]);
    assert_eq!((a.as_str(), b.as_str()), ("unchanged", "verified"));
    write_file(dir.path(), "a.txt", b"other a");
    let f = std::fs::File::options().write(true).open(dir.path().join("a.txt")).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
    let (a, b, _) = send(&[]);
    assert_eq!((a.as_str(), b.as_str()), ("verified", "unchanged"));
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "a.txt")).unwrap(), b"other a");
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "b.txt")).unwrap(), b"second bb");

    // --all sends everything.
    let (a, b, _) = send(&["--all"]);
    assert_eq!((a.as_str(), b.as_str()), ("verified", "verified"));
    wait_log_count(&server, "verified and stored", 6);

    // Without --json nothing is printed for unchanged files; the count says it.
    let run = run_cli(dir.path(), &["send", "a.txt", "b.txt", "--server", &addr, "--name", "incr"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(run.stderr.contains("2 file(s): 0 sent, 2 unchanged, 0 skipped, 0 failed"), "{run:?}");
}

#[test]
fn only_files_acknowledged_after_1029_are_recorded() {
    // Wrong cksum three times: aborted with 1031, nothing recorded, sent again next run.
    let fake = FakeServer::start(Script::WrongCksum { ack_retry: false });
    let dir = client_dir();
    write_file(dir.path(), "w.bin", b"data");
    let addr = fake.addr.to_string();
    let args = send_args(&addr, "rec", &["w.bin"], &["--json"]);
    assert_eq!(run_cli(dir.path(), &args).code, 3);
    assert!(record_names(dir.path()).is_empty());
    let run = run_cli(dir.path(), &args);
    assert_eq!(json_field(run.stdout.trim(), "status"), "cksum_mismatch", "{run:?}");

    // 1607 with no retry: not recorded; retried on a new connection: recorded.
    let fake = FakeServer::start(Script::FailFirstUpload);
    let dir = client_dir();
    write_file(dir.path(), "r.bin", b"abc");
    let addr = fake.addr.to_string();
    let run = run_cli(dir.path(), &send_args(&addr, "rec", &["r.bin"], &["--retries", "0"]));
    assert_eq!(run.code, 2, "{run:?}");
    assert!(record_names(dir.path()).is_empty());
    let run = run_cli(dir.path(), &send_args(&addr, "rec", &["r.bin"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(record_names(dir.path()), ["r.bin"]);
}

#[test]
fn excludes_symlinks_special_files_and_own_files() {
    let server = TestServer::start(&[]);
    let addr = server.addr().to_string();
    let dir = client_dir();
    write_file(dir.path(), "a.txt", b"alpha");
    write_file(dir.path(), "b.log", b"log");
    std::os::unix::fs::symlink("a.txt", dir.path().join("link")).unwrap();
    let fifo = std::ffi::CString::new(dir.path().join("pipe").into_os_string().into_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    write_file(&mkdir(dir.path().join("sub")), "c.txt", b"nested");

    // `send .`: flat names for the files in the folder itself; sub/ is excluded.
    let ex = ["--json", "--exclude", "*.log", "--exclude", "sub"];
    let run = run_cli(dir.path(), &send_args(&addr, "ex", &["."], &ex));
    assert_eq!(run.code, 0, "{run:?}");
    let st = |run: &CliRun| -> Vec<(String, String)> {
        json_by_name(run).into_iter().map(|(n, (s, _))| (n, s)).collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    };
    assert_eq!(
        st(&run),
        pairs(&[
            ("a.txt", "verified"),
            ("b.log", "excluded"),
            ("link", "symlink"),
            ("pipe", "special_file"),
            ("sub", "excluded")
        ]),
        "{run:?}"
    );
    assert!(run.stderr.contains("warning: ./link: symlink not followed"), "{run:?}");
    assert!(run.stderr.contains("warning: ./pipe: special file (fifo)"), "{run:?}");
    assert!(!run.stderr.contains("b.log"), "exclusions are no warning: {run:?}");
    let ident = load_identity(&dir.path().join("me.info")).unwrap();
    let stored = tree_files(&server.files_dir().join(id_hex(&ident.id)), "");
    assert_eq!(stored.keys().collect::<Vec<_>>(), ["a.txt"]);

    // Again: me.info and its record are the client's own (never sent), a.txt is unchanged.
    let run = run_cli(dir.path(), &send_args(&addr, "ex", &["."], &ex));
    assert_eq!(run.code, 0, "{run:?}");
    let own = st(&run);
    assert_eq!(own[0], ("a.txt".to_string(), "unchanged".to_string()));
    assert_eq!(own.iter().filter(|(_, s)| s == "own_file").count(), 2, "{run:?}");

    // --follow-symlinks: the link is sent as a file with the target's bytes.
    let run =
        run_cli(dir.path(), &send_args(&addr, "ex", &["."], &[&ex[..], &["--follow-symlinks"]].concat()));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(json_by_name(&run)["link"].0, "verified", "{run:?}");
    assert_eq!(std::fs::read(server.stored_path(&ident.id, "link")).unwrap(), b"alpha");

    // A fifo named on the command line is skipped with a warning too; exit 0.
    let run = run_cli(dir.path(), &send_args(&addr, "ex", &["pipe"], &[]));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("special file (fifo)"), "{run:?}");
    // A bad pattern is a usage error, before anything is sent.
    let run = run_cli(dir.path(), &send_args(&addr, "ex", &["a.txt"], &["--exclude", "a["]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("--exclude \"a[\""), "{run:?}");
}

/// Create the folder (and its parents) and return its path.
fn mkdir(p: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// 10,000 files (100 folders of 100): sent once, then all skipped without
/// connecting. (The speed of that second run is measured in docs/CLIENT.md,
/// not asserted here.)
#[test]
fn ten_thousand_unchanged_files_are_all_skipped() {
    let (store, fake, addr) = storing_fake();
    let dir = client_dir();
    for d in 0..100 {
        let sub = mkdir(dir.path().join(format!("many/d{d:02}")));
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f:02}")), format!("{d}/{f}")).unwrap();
        }
    }
    let run = run_cli(dir.path(), &send_args(&addr, "many", &["many"], &["--json"]));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.matches("\"status\":\"verified\"").count(), 10_000);
    let codes = fake.codes().len();
    let t = Instant::now();
    let run = run_cli(dir.path(), &send_args(&addr, "many", &["many"], &["--json"]));
    eprintln!("10,000 unchanged files: {:?} (walk included)", t.elapsed());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.matches("\"status\":\"unchanged\"").count(), 10_000);
    assert_eq!(fake.codes().len(), codes, "nothing sent, no connection");
    assert_eq!(std::fs::read(store.path().join("many/d42/f17")).unwrap(), b"42/17");
}
