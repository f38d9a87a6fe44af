//! End-to-end tests of the admin commands (`backupd clients`, `files`,
//! `verify`, `restore`, `remove-client`, `reset-key`, `snapshot`): a real
//! server receives files from the test client, then each command runs as a
//! subprocess on its data directory. 127.0.0.1, temp directories, every
//! wait bounded.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backupd::client::UploadOptions;
use backupd::crypto::cksum;
use backupd::protocol::{id_hex, ClientId, Response};
use common::*;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(120);

type Run = AdminRun;

/// Run `backupd ARGS --data-dir DATA` (no BACKUPD_* variables from outside);
/// killed past the timeout.
fn admin(data: &Path, args: &[&str]) -> Run {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.extend([std::ffi::OsStr::new("--data-dir"), data.as_os_str()]);
    admin_env(&all, &[])
}

/// Run `backupd ARGS` with exactly the BACKUPD_* variables given.
fn admin_env(args: &[&std::ffi::OsStr], env: &[(&str, &Path)]) -> Run {
    run_admin(args, env, ADMIN_TIMEOUT)
}

/// Run and expect exit `code`.
fn admin_ok(data: &Path, args: &[&str], code: i32) -> Run {
    let r = admin(data, args);
    assert_eq!(r.code, code, "backupd {args:?}: {r:?}");
    r
}

/// Upload `data` as `name` and confirm it (1029).
fn send(c: &mut backupd::client::Client, name: &str, data: &[u8]) {
    let up = c.upload_bytes(name, data, &UploadOptions::default()).unwrap();
    assert!(up.cksum_matches());
    c.crc_ok(name).unwrap();
}

/// The escaping of the --json outputs is JSON to a real reader.
#[test]
fn json_str_writes_what_a_json_reader_reads() {
    let s = "a\"b\\c\nd\u{1}é\u{2028}";
    let doc = format!("[{{\"k\":{},\"n\":12,\"t\":true,\"z\":null,\"e\":[]}}]", backupd::json::json_str(s));
    let v = json(&doc);
    assert_eq!(v.arr()[0]["k"].str(), s);
    assert_eq!(v.arr()[0]["n"].num(), 12);
}

// ---------------------------------------------------------------------------
// A store with two clients
// ---------------------------------------------------------------------------

struct Fixture {
    server: TestServer,
    alice: ClientId,
    bob: ClientId,
    /// alice's files: name -> current content.
    files: BTreeMap<&'static str, Vec<u8>>,
    /// The first content of `doc.txt`, kept as version 1.
    doc_v1: Vec<u8>,
}

/// alice: `doc.txt` (uploaded twice, a second apart), `b.bin`, `c.bin`; bob: `x`.
fn fixture() -> Fixture {
    let server = TestServer::start(&[]);
    let (mut a, alice) = server.registered_client("alice");
    let doc_v1 = pseudo_random(3000, 1);
    send(&mut a, "doc.txt", &doc_v1);
    // The next copy must be received in a later second than the first was
    // written: --before compares with whole-second database times.
    std::thread::sleep(Duration::from_millis(1100));
    let mut files = BTreeMap::new();
    files.insert("doc.txt", pseudo_random(5000, 2));
    files.insert("b.bin", pseudo_random(70_000, 3));
    files.insert("c.bin", Vec::new());
    for (n, d) in &files {
        send(&mut a, n, d);
    }
    let (mut b, bob) = server.registered_client("bob");
    send(&mut b, "x", b"bob's file");
    Fixture { server, alice, bob, files, doc_v1 }
}

#[test]
fn clients_and_files_in_text_and_json_while_the_server_runs() {
    let f = fixture();
    let data = f.server.data_dir();
    let text = admin_ok(&data, &["clients"], 0).stdout;
    let header = text.lines().next().unwrap();
    for col in ["ID", "NAME", "LAST SEEN", "FILES", "BYTES", "LAST BACKUP", "QUOTA"] {
        assert!(header.contains(col), "{header}");
    }
    // Options written before the subcommand are the subcommand's.
    let first: Vec<&std::ffi::OsStr> = vec!["--data-dir".as_ref(), data.as_os_str(), "clients".as_ref()];
    let r = admin_env(&first, &[]);
    assert_eq!((r.code, &r.stdout), (0, &text), "backupd --data-dir D clients: {r:?}");
    // ... and a value that is a subcommand's name stays the value: the data
    // directory "reset-key" (a link to this one), listed by `files`.
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&data, cwd.path().join("reset-key")).unwrap();
    let tricky: Vec<&std::ffi::OsStr> =
        ["--data-dir", "reset-key", "files", "alice", "--json"].iter().map(std::ffi::OsStr::new).collect();
    let r = run_admin_in(Some(cwd.path()), &tricky, &[], ADMIN_TIMEOUT);
    assert_eq!(r.code, 0, "backupd --data-dir reset-key files alice: {r:?}");
    assert_eq!(json(&r.stdout).arr().len(), 3, "{r:?}");
    let alice_line = text.lines().find(|l| l.contains("alice")).expect("alice listed");
    assert!(alice_line.starts_with(&id_hex(&f.alice)), "{alice_line}");
    let stored: u64 = f.files.values().map(|d| d.len() as u64).sum::<u64>() + f.doc_v1.len() as u64;
    assert!(alice_line.split_whitespace().any(|w| w == stored.to_string()), "{alice_line}");

    let list = json(&admin_ok(&data, &["clients", "--json"], 0).stdout);
    assert_eq!(list.arr().len(), 2);
    let a = list.arr().iter().find(|c| c["name"].str() == "alice").unwrap();
    assert_eq!(a["id"].str(), id_hex(&f.alice));
    assert_eq!(a["files"].num(), 3);
    assert_eq!(a["versions"].num(), 1);
    assert_eq!(a["bytes"].num(), stored);
    assert_eq!(a["has_key"], true);
    assert!(a["last_backup"].str().ends_with('Z'));
    assert!(a["quota"].is_null());

    // By name and by id, text and JSON.
    for who in ["alice".to_string(), id_hex(&f.alice)] {
        let rows = json(&admin_ok(&data, &["files", &who, "--json"], 0).stdout);
        assert_eq!(rows.arr().len(), 3, "{who}");
        for r in rows.arr() {
            let content = &f.files[r["name"].str()];
            assert_eq!(r["client"].str(), "alice");
            assert_eq!(r["size"].num(), content.len() as u64);
            assert_eq!(r["cksum"].num(), u64::from(cksum(content)));
            assert_eq!(r["versions"].num(), u64::from(r["name"].str() == "doc.txt"));
        }
    }
    let all = json(&admin_ok(&data, &["files", "--json", "--versions"], 0).stdout);
    assert_eq!(all.arr().len(), 4);
    let doc = all.arr().iter().find(|r| r["name"].str() == "doc.txt").unwrap();
    let history = doc["history"].arr();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["version"].num(), 1);
    assert_eq!(history[0]["size"].num(), f.doc_v1.len() as u64);
    let text = admin_ok(&data, &["files", "alice", "--versions"], 0).stdout;
    assert!(text.contains("doc.txt") && text.contains("version 1") && text.contains("b.bin"), "{text}");
    assert!(!text.contains("bob"), "{text}");

    // The server's environment variables name the store too.
    let clients = [std::ffi::OsStr::new("clients"), std::ffi::OsStr::new("--json")];
    let r = admin_env(&clients, &[("BACKUPD_DATA_DIR", &data)]);
    assert_eq!(json(&r.stdout).arr().len(), 2, "{r:?}");
    let elsewhere = f.server.temp_dir().join("elsewhere.db");
    let r = admin_env(&clients, &[("BACKUPD_DATA_DIR", &data), ("BACKUPD_DB", &elsewhere)]);
    assert!(r.code == 1 && r.stderr.contains("no database at"), "{r:?}");

    let r = admin_ok(&data, &["files", "nobody"], 1);
    assert!(r.stderr.contains("no client named \"nobody\""), "{r:?}");
    // Usage errors are exit 2.
    admin_ok(&data, &["files", "--frobnicate"], 2);
    admin_ok(&data, &["restore", "alice"], 2);
}

/// A client names itself: a name with a bidi override (U+202E) and an emoji
/// joined by zero-width joiners registers (field devices name themselves so),
/// and a stored file's name may hold a zero-width joiner too. The human output
/// of `clients`, `files`, `verify` and `restore` shows them escaped as the log
/// lines do (`\u{202e}`), so a name can neither reorder nor hide what the
/// operator reads in a terminal; `--json` carries them exact.
#[test]
fn names_with_invisible_characters_are_escaped_in_the_human_output_and_exact_in_json() {
    let server = TestServer::start(&[]);
    let name = "invoice\u{202e}fdp.exe \u{1f469}\u{200d}\u{1f4bb} al\u{ad}ice";
    let file = "notes\u{200d}.txt";
    let (mut c, id) = server.registered_client(name);
    send(&mut c, file, b"first");
    send(&mut c, file, b"second");
    let data = server.data_dir();
    let raw = |out: &str| out.contains(['\u{202e}', '\u{200d}', '\u{ad}']);

    let text = admin_ok(&data, &["clients"], 0).stdout;
    assert!(!raw(&text), "{text:?}");
    assert!(text.contains("invoice\\u{202e}fdp.exe \u{1f469}\\u{200d}\u{1f4bb} al\\u{ad}ice"), "{text:?}");
    let text = admin_ok(&data, &["files", name, "--versions"], 0).stdout;
    assert!(!raw(&text) && text.contains("notes\\u{200d}.txt"), "{text:?}");
    let to = server.temp_dir().join("restored");
    let r = admin_ok(&data, &["restore", name, "--to", to.to_str().unwrap()], 0);
    assert!(!raw(&r.stdout) && r.stdout.contains("restored notes\\u{200d}.txt"), "{r:?}");
    assert_eq!(std::fs::read(to.join(file)).unwrap(), b"second", "restored under its exact name");
    std::fs::write(server.stored_path(&id, file), b"damage").unwrap();
    let r = admin_ok(&data, &["verify"], 3);
    assert!(!raw(&r.stdout) && r.stdout.contains("mismatched"), "{r:?}");
    let r = admin_ok(&data, &["restore", &format!("id:{}", id_hex(&id)), "--to", to.to_str().unwrap()], 1);
    assert!(!raw(&r.stdout) && !raw(&r.stderr), "{r:?}");

    let clients = json(&admin_ok(&data, &["clients", "--json"], 0).stdout);
    assert_eq!(clients.arr()[0]["name"].str(), name);
    let files = json(&admin_ok(&data, &["files", "--json"], 0).stdout);
    assert_eq!((files.arr()[0]["client"].str(), files.arr()[0]["name"].str()), (name, file));
    let items = json(&admin_ok(&data, &["verify", "--json"], 3).stdout);
    assert!(items.arr().iter().any(|i| i["client"].str() == name && i["name"].str() == file), "{items:?}");
}

/// Every file (name and content) below `dir`.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    walk_files(dir)
        .into_iter()
        .map(|p| (p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn restore_is_byte_identical_and_never_overwrites_without_force() {
    let f = fixture();
    let data = f.server.data_dir();
    let out = f.server.temp_dir().join("out");
    let o = out.to_str().unwrap();
    admin_ok(&data, &["restore", "alice", "--to", o], 0);
    let expect: BTreeMap<String, Vec<u8>> = f.files.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    assert!(tree(&out) == expect, "restored files differ");

    // An older version, by number and by time.
    let v1 = f.server.temp_dir().join("v1");
    admin_ok(&data, &["restore", "alice", "doc.txt", "--to", v1.to_str().unwrap(), "--version", "1"], 0);
    assert!(std::fs::read(v1.join("doc.txt")).unwrap() == f.doc_v1);
    let rows = json(&admin_ok(&data, &["files", "alice", "--json"], 0).stdout);
    let received = &rows.arr().iter().find(|r| r["name"].str() == "doc.txt").unwrap()["received"];
    let before = f.server.temp_dir().join("before");
    let b = before.to_str().unwrap();
    admin_ok(&data, &["restore", "alice", "doc.txt", "--to", b, "--before", received.str()], 0);
    assert!(std::fs::read(before.join("doc.txt")).unwrap() == f.doc_v1);
    // Nothing was received before 2000.
    admin_ok(&data, &["restore", "alice", "--to", b, "--before", "2000-01-01", "--force"], 1);
    admin_ok(&data, &["restore", "alice", "b.bin", "--to", b, "--version", "1"], 1);

    // An existing file is kept without --force, replaced with it.
    std::fs::write(out.join("b.bin"), b"mine").unwrap();
    let r = admin_ok(&data, &["restore", "alice", "b.bin", "--to", o], 1);
    assert!(r.stderr.contains("exists") && r.stderr.contains("--force"), "{r:?}");
    assert_eq!(std::fs::read(out.join("b.bin")).unwrap(), b"mine");
    admin_ok(&data, &["restore", "alice", "b.bin", "--to", o, "--force"], 0);
    assert!(std::fs::read(out.join("b.bin")).unwrap() == f.files["b.bin"]);
    let leftovers: Vec<_> =
        walk_files(&out).into_iter().filter(|p| p.to_string_lossy().contains(".restore-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Something asked for that is not there: the rest is restored, exit 1.
    let part = f.server.temp_dir().join("part");
    let r = admin_ok(&data, &["restore", "alice", "c.bin", "nope.txt", "--to", part.to_str().unwrap()], 1);
    assert!(r.stderr.contains("nope.txt"), "{r:?}");
    assert_eq!(std::fs::read(part.join("c.bin")).unwrap(), b"");
    admin_ok(&data, &["restore", "carol", "--to", part.to_str().unwrap()], 1);
}

/// Add a file with a nested name straight into the store (the server does
/// not accept `/` in names yet; the admin commands already treat names as
/// relative paths). The server must be stopped.
fn add_nested(server: &TestServer, id: &ClientId, name: &str, content: &[u8]) {
    let path = server.stored_path(id, name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute(
        "INSERT INTO files(ID, FileName, PathName, Verified, Size, Cksum, ReceivedAt)
         VALUES (?1, ?2, ?3, 1, ?4, ?5, '2026-01-02T03:04:05Z')",
        rusqlite::params![
            &id[..],
            name,
            format!("files/{}/{name}", id_hex(id)),
            content.len() as i64,
            cksum(content)
        ],
    )
    .unwrap();
}

#[test]
fn restore_of_a_folder_recreates_nested_paths() {
    let mut f = fixture();
    f.server.stop();
    add_nested(&f.server, &f.alice, "docs/2026/report.pdf", b"report");
    add_nested(&f.server, &f.alice, "docs/notes.txt", b"notes");
    add_nested(&f.server, &f.alice, "docs2/other", b"other");
    let data = f.server.data_dir();
    let out = f.server.temp_dir().join("out");
    admin_ok(&data, &["restore", "alice", "docs", "--to", out.to_str().unwrap()], 0);
    let got = tree(&out);
    let want: BTreeMap<String, Vec<u8>> =
        [("docs/2026/report.pdf", &b"report"[..]), ("docs/notes.txt", b"notes")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
    assert_eq!(got, want);
    admin_ok(&data, &["verify", "alice"], 0);
    // The same folder however it is written; `..` names nothing.
    for (i, arg) in ["./docs", "docs//", "/docs/./", "docs//2026/../2026"].iter().enumerate() {
        let out = f.server.temp_dir().join(format!("out{i}"));
        let code = if arg.contains("..") { 1 } else { 0 };
        let r = admin_ok(&data, &["restore", "alice", arg, "--to", out.to_str().unwrap()], code);
        if code == 0 {
            assert_eq!(tree(&out), want, "{arg}");
        } else {
            assert!(r.stderr.contains("is not a stored file or folder"), "{arg}: {r:?}");
        }
    }
    let out = f.server.temp_dir().join("out-sub");
    admin_ok(&data, &["restore", "alice", "docs//2026", "--to", out.to_str().unwrap()], 0);
    assert_eq!(tree(&out).keys().collect::<Vec<_>>(), ["docs/2026/report.pdf"]);
}

/// A stored name may have components of up to 250 bytes: restore writes
/// them (its temp file's name must stay within the 255 bytes of a name).
#[test]
fn restore_writes_the_longest_names_the_server_stores() {
    let f = fixture();
    let long = "\u{e9}".repeat(125); // 250 bytes of UTF-8
    let mut c = f.server.connect();
    c.reconnect(f.alice, "alice", test_key()).unwrap();
    send(&mut c, &long, b"long name");
    let out = f.server.temp_dir().join("out");
    admin_ok(&f.server.data_dir(), &["restore", "alice", &long, "--to", out.to_str().unwrap()], 0);
    assert_eq!(std::fs::read(out.join(&long)).unwrap(), b"long name");
}

#[test]
fn verify_finds_a_flipped_byte_a_missing_file_an_unreadable_one_and_a_stray() {
    let f = fixture();
    let data = f.server.data_dir();
    let r = admin_ok(&data, &["verify"], 0);
    assert!(r.stdout.contains("checked 4 files and 1 versions") && r.stdout.contains("all well"), "{r:?}");
    let clean = json(&admin_ok(&data, &["verify", "--json"], 0).stdout);
    assert_eq!(clean.arr().len(), 5);
    assert!(clean.arr().iter().all(|i| i["status"].str() == "ok"));

    // Damage alice's store while the server runs.
    let doc = f.server.stored_path(&f.alice, "doc.txt");
    let mut bytes = std::fs::read(&doc).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&doc, &bytes).unwrap();
    std::fs::remove_file(f.server.stored_path(&f.alice, "c.bin")).unwrap();
    let b = f.server.stored_path(&f.alice, "b.bin");
    std::fs::remove_file(&b).unwrap();
    std::fs::create_dir(&b).unwrap(); // opens, but cannot be read
    std::fs::write(f.server.stored_path(&f.alice, "stray.bin"), b"?").unwrap();
    let versions = data.join("versions").join(id_hex(&f.alice)).join("doc.txt");
    std::fs::write(versions.join("not-a-version"), b"?").unwrap();

    let r = admin_ok(&data, &["verify"], 3);
    for word in [
        "mismatched",
        "missing",
        "unreadable",
        "unregistered",
        "stray.bin",
        "stray ",
        "not-a-version",
        "4 problem(s)",
        "1 stray entry",
    ] {
        assert!(r.stdout.contains(word), "{word}: {r:?}");
    }
    let items = json(&admin_ok(&data, &["verify", "alice", "--json"], 3).stdout);
    let status = |name: &str| {
        items
            .arr()
            .iter()
            .find(|i| i["name"].str() == name && i["version"] != 1)
            .map(|i| i["status"].str().to_string())
    };
    assert_eq!(status("doc.txt").as_deref(), Some("mismatched"));
    assert_eq!(status("c.bin").as_deref(), Some("missing"));
    assert_eq!(status("b.bin").as_deref(), Some("unreadable"));
    assert_eq!(status("stray.bin").as_deref(), Some("unregistered"));
    assert_eq!(status("doc.txt/not-a-version").as_deref(), Some("stray"));
    let mismatch = items.arr().iter().find(|i| i["status"].str() == "mismatched").unwrap();
    assert_eq!(mismatch["cksum"].num(), u64::from(cksum(&bytes)));
    assert_eq!(mismatch["expected_cksum"].num(), u64::from(cksum(&f.files["doc.txt"])));
    // bob's store is intact.
    admin_ok(&data, &["verify", "bob"], 0);
    let _ = f.bob;
}

/// A symbolic link or a FIFO where a stored file belongs: `verify` reports
/// each as unreadable (it neither follows the link, which the server would
/// not, nor blocks on the FIFO), `restore` refuses them, and `snapshot`
/// leaves them out (its copy then reports them missing).
#[test]
fn the_admin_commands_follow_no_link_and_never_block_on_a_fifo() {
    let f = fixture();
    let data = f.server.data_dir();
    let outside = f.server.temp_dir().join("outside.bin");
    std::fs::write(&outside, &f.files["b.bin"]).unwrap();
    let b = f.server.stored_path(&f.alice, "b.bin");
    std::fs::remove_file(&b).unwrap();
    std::os::unix::fs::symlink(&outside, &b).unwrap();
    let doc = f.server.stored_path(&f.alice, "doc.txt");
    std::fs::remove_file(&doc).unwrap();
    let fifo = std::ffi::CString::new(doc.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let run = |args: &[&str], code: i32| {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.extend([std::ffi::OsStr::new("--data-dir"), data.as_os_str()]);
        let r = run_admin(&all, &[], Duration::from_secs(30));
        assert_eq!(r.code, code, "backupd {args:?}: {r:?}");
        r
    };
    let items = json(&run(&["verify", "alice", "--json"], 3).stdout);
    let item = |name: &str| {
        items.arr().iter().find(|i| i["name"].str() == name && i["version"] != 1).cloned().unwrap()
    };
    assert_eq!(item("b.bin")["status"].str(), "unreadable", "{items:?}");
    assert!(item("b.bin")["error"].str().contains("a symbolic link"), "{items:?}");
    assert_eq!(item("doc.txt")["status"].str(), "unreadable", "{items:?}");
    assert!(item("doc.txt")["error"].str().contains("a FIFO"), "{items:?}");
    let out = f.server.temp_dir().join("restored");
    let r = run(&["restore", "alice", "b.bin", "--to", out.to_str().unwrap()], 1);
    assert!(r.stderr.contains("a symbolic link"), "{r:?}");
    let r = run(&["restore", "alice", "doc.txt", "--to", out.to_str().unwrap()], 1);
    assert!(r.stderr.contains("a FIFO"), "{r:?}");
    assert!(!out.join("b.bin").exists() && !out.join("doc.txt").exists());
    let snap = f.server.temp_dir().join("snap");
    let r = run(&["snapshot", snap.to_str().unwrap()], 0);
    assert!(r.stderr.contains("not a regular file; left out"), "{r:?}");
    assert!(std::fs::symlink_metadata(snap.join(b.strip_prefix(&data).unwrap())).is_err());
    let mut all: Vec<&std::ffi::OsStr> = ["verify", "alice", "--json"].map(std::ffi::OsStr::new).to_vec();
    all.extend([std::ffi::OsStr::new("--data-dir"), snap.as_os_str()]);
    let copy = json(&run_admin(&all, &[], Duration::from_secs(30)).stdout);
    let missing = |name: &str| {
        copy.arr()
            .iter()
            .any(|i| i["name"].str() == name && i["version"] != 1 && i["status"].str() == "missing")
    };
    assert!(missing("b.bin") && missing("doc.txt"), "{copy:?}");
    // A row (of a foreign or edited database) naming a path outside the
    // data directory: not read, by any route.
    let outside_sum = cksum(&f.files["b.bin"]);
    let conn = rusqlite::Connection::open(f.server.db_path()).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    for (i, path) in
        [outside.to_str().unwrap().to_string(), format!("files/{}/../../../outside.bin", id_hex(&f.bob))]
            .iter()
            .enumerate()
    {
        conn.execute(
            "UPDATE files SET PathName = ?1, Size = ?2, Cksum = ?3 WHERE FileName = 'x'",
            rusqlite::params![path, f.files["b.bin"].len() as i64, outside_sum as i64],
        )
        .unwrap();
        let to = f.server.temp_dir().join(format!("restored-bob-{i}"));
        let r = run(&["restore", "bob", "x", "--to", to.to_str().unwrap()], 1);
        assert!(r.stderr.contains("is outside the data directory"), "{path}: {r:?}");
        assert!(!to.join("x").exists());
        let r = run(&["verify", "bob"], 3);
        assert!(r.stdout.contains("outside the data directory"), "{path}: {r:?}");
    }
}

/// Entries under versions/ that are not versions the server wrote (another
/// name, a number written otherwise such as `0123`, a file in a client's
/// folder itself, a folder that is no client's): `verify` reports each as a
/// stray, one line each, and they are no problem (exit 0: no stored copy is
/// damaged); no command takes `0123` for a version (before, `files
/// --versions` listed it as one that does not exist), and the server's
/// pruning neither counts nor trips on it (before, `0123` read as version
/// 123, the oldest: pruning failed on it and kept every real version).
#[test]
fn stray_entries_under_versions_are_reported_and_never_taken_for_versions() {
    let server = TestServer::start(&["--keep-versions", "1"]);
    let (mut c, id) = server.registered_client("carol");
    send(&mut c, "doc.txt", b"one");
    send(&mut c, "doc.txt", b"two");
    let data = server.data_dir();
    let versions = data.join("versions").join(id_hex(&id));
    let strays = [
        versions.join("doc.txt").join("0123"),
        versions.join("doc.txt").join("+7"),
        versions.join("doc.txt").join("notes"),
        versions.join("loose"),
        data.join("versions").join("not-a-client").join("x"),
    ];
    for p in &strays {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"?").unwrap();
    }

    let r = admin_ok(&data, &["verify"], 0);
    for p in &strays {
        let line = format!("stray         {}", p.display());
        assert!(r.stdout.lines().any(|l| l.starts_with(&line)), "{line}: {r:?}");
    }
    assert!(r.stdout.contains("checked 1 files and 1 versions"), "{r:?}");
    assert!(r.stdout.contains("all well; 5 stray entries under versions/"), "{r:?}");
    let items = json(&admin_ok(&data, &["verify", "--json"], 0).stdout);
    assert_eq!(
        items.arr().iter().filter(|i| i["status"].str() == "stray").count(),
        strays.len(),
        "{items:?}"
    );
    let files = json(&admin_ok(&data, &["files", "carol", "--json", "--versions"], 0).stdout);
    assert_eq!(files.arr()[0]["versions"].num(), 1, "{files:?}");
    let to = server.temp_dir().join("out");
    let r = admin_ok(&data, &["restore", "carol", "--to", to.to_str().unwrap(), "--version", "2"], 1);
    assert!(r.stderr.contains("no version 2 is kept"), "{r:?}");

    // The server prunes its versions past the strays, which it leaves alone.
    send(&mut c, "doc.txt", b"three");
    send(&mut c, "doc.txt", b"four");
    let kept: Vec<Vec<u8>> = walk_files(&versions.join("doc.txt"))
        .into_iter()
        .filter(|p| !strays.contains(p))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(kept, vec![b"three".to_vec()], "--keep-versions 1");
    assert!(strays.iter().all(|p| p.exists()), "a stray was removed");
    assert!(!server.log_text().contains("cannot prune"), "{}", server.log_text());
}

#[test]
fn writing_commands_refuse_while_the_data_directory_is_locked() {
    // The running server holds the data directory's lock.
    let mut f = fixture();
    let data = f.server.data_dir();
    let held = format!("in use by process {}", f.server.pid());
    for args in [&["remove-client", "bob"][..], &["reset-key", "alice"]] {
        let r = admin_ok(&data, args, 1);
        assert!(r.stderr.contains(&held) && r.stderr.contains("stop the server first"), "{r:?}");
    }
    // Nothing changed; read-only commands still work.
    let list = json(&admin_ok(&data, &["clients", "--json"], 0).stdout);
    assert_eq!(list.arr().len(), 2);
    assert!(list.arr().iter().all(|c| c["has_key"] == true));
    f.server.stop();
    admin_ok(&data, &["reset-key", "alice"], 0);
    // A missing data directory is an error, not created.
    let missing = f.server.temp_dir().join("missing");
    admin_ok(&missing, &["reset-key", "alice"], 1);
    assert!(!missing.exists());
}

#[test]
fn remove_client_deletes_or_keeps_the_files() {
    let mut f = fixture();
    let (mut c, carol) = f.server.registered_client("carol");
    send(&mut c, "keep.me", b"carol's data");
    drop(c);
    f.server.stop();
    let data = f.server.data_dir();

    // A link in bob's folder, and bob's versions folder a link: removed
    // themselves, never what they point to.
    let outside = f.server.temp_dir().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"not bob's").unwrap();
    std::os::unix::fs::symlink(outside.join("precious"), f.server.stored_path(&f.bob, "link")).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("versions").join(id_hex(&f.bob))).unwrap();
    let r = admin_ok(&data, &["remove-client", &id_hex(&f.bob)], 0);
    assert!(r.stdout.contains("removed client bob"), "{r:?}");
    assert!(!data.join("files").join(id_hex(&f.bob)).exists());
    assert!(data.join("versions").join(id_hex(&f.bob)).symlink_metadata().is_err());
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"not bob's");
    admin_ok(&data, &["remove-client", "carol", "--keep-files"], 0);
    assert!(!data.join("files").join(id_hex(&carol)).exists());
    let kept: Vec<PathBuf> = walk_files(&data.join("orphans"));
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), b"carol's data");
    admin_ok(&data, &["remove-client", "bob"], 1);

    let list = json(&admin_ok(&data, &["clients", "--json"], 0).stdout);
    let names: Vec<&str> = list.arr().iter().map(|c| c["name"].str()).collect();
    assert_eq!(names, ["alice"]);
    assert_eq!(json(&admin_ok(&data, &["files", "--json"], 0).stdout).arr().len(), 3);
    admin_ok(&data, &["verify"], 0);

    // The server starts on the result, and the name is free again.
    f.server.restart();
    let mut c = f.server.connect();
    c.register("bob").unwrap();
    let mut a = f.server.connect();
    a.reconnect(f.alice, "alice", test_key()).unwrap();
}

#[test]
fn reset_key_lets_a_new_connection_set_a_new_key() {
    let mut f = fixture();
    f.server.stop();
    let data = f.server.data_dir();
    let r = admin_ok(&data, &["reset-key", "alice"], 0);
    // The hint names a client command line that exists (the client's unit
    // tests parse it with its real command line definition;
    // tests/client_cli.rs runs it after a reset).
    assert!(
        r.stdout.contains(
            "`backup-client send PATH... --server HOST:PORT --name NAME --register` does it \
             (`backup-client --register` in a folder with transfer.info)"
        ),
        "{r:?}"
    );
    let list = json(&admin_ok(&data, &["clients", "--json"], 0).stdout);
    let a = list.arr().iter().find(|c| c["name"].str() == "alice").unwrap();
    assert_eq!(a["has_key"], false);

    f.server.restart();
    // The old key no longer reconnects.
    let mut c = f.server.connect();
    match c.reconnect(f.alice, "alice", test_key()) {
        Err(backupd::client::ClientError::Refused(Response::ReconnectDenied { .. })) => {}
        other => panic!("reconnect with the forgotten key: {other:?}"),
    }
    // Another connection cannot set the key: only a registration connection may.
    let stranger_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let mut stranger = f.server.connect();
    stranger.set_id(f.alice);
    match stranger.send_public_key("alice", &stranger_key) {
        Err(backupd::client::ClientError::Refused(Response::GeneralError)) => {}
        other => panic!("a 1026 outside a registration connection: {other:?}"),
    }
    // Registering the name again resumes the registration with the same id,
    // and that connection sends the new key (1026).
    let new_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap();
    let mut c = f.server.connect();
    assert_eq!(c.register("alice").unwrap(), f.alice, "the same client, not a new one");
    c.send_public_key("alice", &new_key).unwrap();
    send(&mut c, "after-reset.txt", b"new key");
    let mut c = f.server.connect();
    c.reconnect(f.alice, "alice", &new_key).unwrap();
    // Its files were kept.
    let rows = json(&admin_ok(&data, &["files", "alice", "--json"], 0).stdout);
    assert_eq!(rows.arr().len(), 4);
}

#[test]
fn snapshot_copies_the_database_and_links_the_files_while_the_server_runs() {
    let f = fixture();
    let data = f.server.data_dir();
    let snap = f.server.temp_dir().join("snap");
    let s = snap.to_str().unwrap();
    admin_ok(&data, &["snapshot", s], 0);

    let count = |db: &Path, table: &str| -> i64 {
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    };
    for table in ["clients", "files"] {
        assert_eq!(count(&snap.join("backupd.db"), table), count(&f.server.db_path(), table), "{table}");
    }
    let linked = walk_files(&snap.join("files")).len() + walk_files(&snap.join("versions")).len();
    assert_eq!(linked, 5);
    for p in walk_files(&data.join("files")).into_iter().chain(walk_files(&data.join("versions"))) {
        let rel = p.strip_prefix(&data).unwrap();
        let (a, b) = (std::fs::metadata(&p).unwrap(), std::fs::metadata(snap.join(rel)).unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "{} is not a hard link", rel.display());
    }
    // The snapshot is a data directory of its own.
    let r = admin_ok(&snap, &["verify"], 0);
    assert!(r.stdout.contains("checked 4 files and 1 versions"), "{r:?}");
    let rows = json(&admin_ok(&snap, &["files", "--json"], 0).stdout);
    assert_eq!(rows.arr().len(), 4);
    // Marked as one (a server or a writing command takes it), and no longer locked.
    assert!(snap.join("backupd.layout").is_file());
    admin_ok(&snap, &["reset-key", "bob"], 0);
    // Only into a new or empty directory.
    let r = admin_ok(&data, &["snapshot", s], 1);
    assert!(r.stderr.contains("not empty"), "{r:?}");
}

#[test]
fn read_only_commands_leave_the_stored_files_alone() {
    let mut f = fixture();
    let data = f.server.data_dir();
    let listing = || -> Vec<(PathBuf, i64, u64)> {
        let mut v: Vec<_> = walk_files(&data)
            .into_iter()
            .filter(|p| !p.to_string_lossy().contains("backupd.db"))
            .map(|p| {
                let m = std::fs::metadata(&p).unwrap();
                (p, m.mtime_nsec() + m.mtime() * 1_000_000_000, m.len())
            })
            .collect();
        v.sort();
        v
    };
    let server_pid = f.server.pid();
    let lock = data.join("backupd.lock");
    let lock_state = || {
        let m = std::fs::metadata(&lock).unwrap();
        (std::fs::read_to_string(&lock).unwrap(), m.mtime(), m.mtime_nsec())
    };
    for running in [true, false] {
        if !running {
            f.server.stop();
        }
        let before = listing();
        let lock_before = lock_state();
        let out = f.server.temp_dir().join(format!("out-{running}"));
        let snap = f.server.temp_dir().join(format!("snap-{running}"));
        admin_ok(&data, &["clients"], 0);
        admin_ok(&data, &["files", "--versions"], 0);
        admin_ok(&data, &["verify"], 0);
        admin_ok(&data, &["restore", "alice", "--to", out.to_str().unwrap()], 0);
        admin_ok(&data, &["snapshot", snap.to_str().unwrap()], 0);
        assert_eq!(listing(), before, "running: {running}");
        // The lock file is as it was (the server's pid while it runs, empty
        // after its clean stop): no read-only command took it.
        assert_eq!(lock_state(), lock_before, "a read-only command took the lock");
        let holder = if running { format!("{server_pid}\n") } else { String::new() };
        assert_eq!(lock_before.0, holder);
    }
}

#[test]
fn snapshots_and_verify_during_uploads_are_consistent() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let server = TestServer::start(&[]);
    let data = server.data_dir();
    let (mut c, _) = server.registered_client("busy");
    send(&mut c, "seed", b"seed");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let uploader = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            // Replacements (versions, intents) and new names, until told to stop.
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 5000 {
                let name = if i.is_multiple_of(3) { format!("new-{i}") } else { format!("f{}", i % 4) };
                send(&mut c, &name, &pseudo_random(4096 + i as usize, i));
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
            i
        })
    };
    // Snapshots until a hundred uploads ran alongside (bounded either way).
    let mut k = 0;
    while k < 40 && (k < 4 || done.load(Ordering::Relaxed) < 100) {
        let snap = server.temp_dir().join(format!("snap-{k}"));
        admin_ok(&data, &["snapshot", snap.to_str().unwrap()], 0);
        let r = admin(&snap, &["verify"]);
        assert_eq!(r.code, 0, "snapshot {k} is not consistent: {r:?}");
        if k % 8 == 0 {
            // The live store, verified while files are published.
            let r = admin(&data, &["verify"]);
            assert_eq!(r.code, 0, "verify during uploads: {r:?}");
        }
        k += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let uploads = uploader.join().unwrap();
    assert!(uploads > 0);
}

#[test]
fn a_snapshot_of_a_publish_caught_half_way_is_repaired_as_after_a_crash() {
    let mut f = fixture();
    f.server.stop();
    let data = f.server.data_dir();
    // Replace doc.txt as a publish does before its commit: intent row,
    // previous version linked, new content renamed over the file; plus a new
    // file renamed into files/ whose row never came.
    let doc = f.server.stored_path(&f.alice, "doc.txt");
    let hex = id_hex(&f.alice);
    let saved = format!("versions/{hex}/doc.txt/99999999999999999999");
    std::fs::hard_link(&doc, data.join(&saved)).unwrap();
    let staged = data.join("tmp").join("1.part");
    std::fs::write(&staged, b"not committed").unwrap();
    std::fs::rename(&staged, &doc).unwrap();
    std::fs::write(f.server.stored_path(&f.alice, "uncommitted.bin"), b"?").unwrap();
    let conn = rusqlite::Connection::open(f.server.db_path()).unwrap();
    conn.execute(
        "INSERT INTO publish_intents(Upload, Target, SavedPrevious) VALUES (1, ?1, ?2)",
        (format!("files/{hex}/doc.txt"), &saved),
    )
    .unwrap();
    drop(conn);
    admin_ok(&data, &["verify", "alice"], 3);

    let snap = f.server.temp_dir().join("snap");
    admin_ok(&data, &["snapshot", snap.to_str().unwrap()], 0);
    admin_ok(&snap, &["verify"], 0);
    let out = f.server.temp_dir().join("out");
    admin_ok(&snap, &["restore", "alice", "doc.txt", "--to", out.to_str().unwrap()], 0);
    assert!(std::fs::read(out.join("doc.txt")).unwrap() == f.files["doc.txt"]);
    assert!(!snap.join("files").join(&hex).join("uncommitted.bin").exists());
    // The store itself is untouched (the server repairs it at its start).
    assert_eq!(std::fs::read(&doc).unwrap(), b"not committed");
}

/// Every entry below `dir` with its content (folders as empty), to compare.
fn listing(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
                out.insert(p, Vec::new());
            } else if !p.to_string_lossy().contains("backupd.db") {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

#[test]
fn restore_refuses_a_destination_inside_the_data_directory() {
    let mut f = fixture();
    let data = f.server.data_dir();
    let tmp = f.server.temp_dir().to_path_buf();
    let hex = id_hex(&f.alice);
    let before = listing(&data);
    let link = tmp.join("link");
    std::os::unix::fs::symlink(data.join("files"), &link).unwrap();
    let inside = [
        // Over the current copy, while the server runs.
        data.join("files").join(&hex),
        data.clone(),
        data.join("new-folder"),
        // Through a link, and through `..` below a folder that does not exist.
        link.join(&hex),
        tmp.join("nothing").join("..").join("data").join("files"),
    ];
    for to in &inside {
        let t = to.to_str().unwrap();
        for args in [
            &["restore", "alice", "doc.txt", "--version", "1", "--to", t, "--force"][..],
            &["restore", "alice", "--to", t],
        ] {
            let r = admin_ok(&data, args, 1);
            assert!(r.stderr.contains("inside the data directory"), "{args:?}: {r:?}");
        }
    }
    assert!(listing(&data) == before, "something was written into the data directory");
    assert!(!tmp.join("nothing").exists());
    admin_ok(&data, &["verify"], 0);

    // DIR outside, but a stored name that leads back into the data directory.
    f.server.stop();
    let sneaky = format!("data/files/{hex}/doc.txt");
    add_nested(&f.server, &f.alice, &sneaky, b"not alice's doc");
    let r = admin_ok(&data, &["restore", "alice", &sneaky, "--to", tmp.to_str().unwrap(), "--force"], 1);
    assert!(r.stderr.contains("inside the data directory"), "{r:?}");
    assert!(std::fs::read(f.server.stored_path(&f.alice, "doc.txt")).unwrap() == f.files["doc.txt"]);
    admin_ok(&data, &["verify"], 0);
}

#[test]
fn a_client_named_with_another_clients_id_cannot_stand_for_it() {
    let mut f = fixture();
    let data = f.server.data_dir();
    let bob = id_hex(&f.bob);
    // A name of 32 hex characters is a name like any other to the server (a
    // device may use its machine id): registered.
    let mut device = f.server.connect();
    device.register("0123456789abcdef0123456789abcdef").expect("a name in an id's form registers");
    drop(device);
    f.server.stop();
    // A client named with another client's id (here: alice renamed in the database).
    let conn = rusqlite::Connection::open(f.server.db_path()).unwrap();
    conn.execute("UPDATE clients SET Name=?1 WHERE ID=?2", rusqlite::params![&bob, &f.alice[..]]).unwrap();
    drop(conn);
    let out = f.server.temp_dir().join("out");
    let o = out.to_str().unwrap();
    for args in [
        &["restore", &bob, "--to", o][..],
        &["files", &bob],
        &["verify", &bob],
        &["remove-client", &bob],
        &["reset-key", &bob],
    ] {
        let r = admin_ok(&data, args, 1);
        assert!(
            r.stderr.contains(&format!("id:{bob}")) && r.stderr.contains(&format!("name:{bob}")),
            "{r:?}"
        );
    }
    assert!(!out.exists() || walk_files(&out).is_empty());
    let list = json(&admin_ok(&data, &["clients", "--json"], 0).stdout);
    assert_eq!(list.arr().len(), 3, "alice, bob and the device");
    assert_eq!(list.arr().iter().filter(|c| c["has_key"] == true).count(), 2);
    // Said which, each means its own client.
    admin_ok(&data, &["restore", &format!("id:{bob}"), "--to", o], 0);
    assert_eq!(tree(&out).keys().collect::<Vec<_>>(), ["x"]);
    let theirs = f.server.temp_dir().join("theirs");
    admin_ok(&data, &["restore", &format!("name:{bob}"), "--to", theirs.to_str().unwrap()], 0);
    assert_eq!(tree(&theirs).len(), 3);
    admin_ok(&data, &["remove-client", &format!("id:{bob}")], 0);
    // Now the argument is only alice's name.
    let rows = json(&admin_ok(&data, &["files", &bob, "--json"], 0).stdout);
    assert_eq!(rows.arr().len(), 3);
    admin_ok(&data, &["files", &format!("id:{bob}")], 1);
}

#[test]
fn restore_looks_again_at_a_copy_the_server_is_publishing_before_calling_it_damaged() {
    let mut f = fixture();
    f.server.stop();
    let data = f.server.data_dir();
    // doc.txt as a publish leaves it between its rename and its commit: the
    // new content in place, the row still the old one's.
    let new = pseudo_random(6000, 9);
    let doc = f.server.stored_path(&f.alice, "doc.txt");
    let staged = data.join("tmp").join("9.part");
    std::fs::write(&staged, &new).unwrap();
    std::fs::rename(&staged, &doc).unwrap();
    let out = f.server.temp_dir().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut child = std::process::Command::new(server_bin())
        .args(["restore", "alice", "doc.txt", "--to", out.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .env_remove("BACKUPD_DATA_DIR")
        .env_remove("BACKUPD_DB")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The commit comes while restore holds its copy (its temp file is there),
    // or after it gave up.
    let temp = out.join(format!(".doc.txt.restore-{}", child.id()));
    let seen =
        wait_until(ADMIN_TIMEOUT, || temp.exists() || child.try_wait().map(|s| s.is_some()).unwrap_or(true));
    assert!(seen);
    let conn = rusqlite::Connection::open(f.server.db_path()).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute(
        "UPDATE files SET Size=?1, Cksum=?2 WHERE ID=?3 AND FileName='doc.txt'",
        rusqlite::params![new.len() as i64, cksum(&new), &f.alice[..]],
    )
    .unwrap();
    drop(conn);
    let r = child.wait_with_output().unwrap();
    assert!(r.status.success(), "restore during a publish: {r:?}");
    assert!(std::fs::read(out.join("doc.txt")).unwrap() == new);

    // A copy that stays wrong is still called damaged, and not restored.
    let mut bytes = new.clone();
    bytes[10] ^= 1;
    std::fs::write(&doc, &bytes).unwrap();
    let again = f.server.temp_dir().join("again");
    let r = admin_ok(&data, &["restore", "alice", "doc.txt", "--to", again.to_str().unwrap()], 1);
    assert!(r.stderr.contains("the stored copy is damaged"), "{r:?}");
    assert!(!again.join("doc.txt").exists());
    assert!(walk_files(&again).is_empty(), "a temp file was left");
}

#[test]
fn a_refused_or_failed_snapshot_leaves_nothing_behind() {
    let f = fixture();
    let data = f.server.data_dir();
    let before = listing(&data);
    // Inside the data directory, directly or through `..`: refused, nothing made.
    let inside = data.join("snapX");
    let r = admin_ok(&data, &["snapshot", inside.to_str().unwrap()], 1);
    assert!(r.stderr.contains("inside the data directory"), "{r:?}");
    let r = admin_ok(&data, &["snapshot", &format!("{}/../data/snapY/z", data.display())], 1);
    assert!(r.stderr.contains("inside the data directory"), "{r:?}");
    assert!(listing(&data) == before, "the refused snapshots left something");

    // On another filesystem (a tmpfs): refused before anything is made,
    // whether DIR is new or an empty folder there; a retry says the same.
    let other = f.server.temp_dir().join("other");
    std::fs::create_dir(&other).unwrap();
    if !mount_tmpfs(&other, "4m") {
        println!("cannot mount a tmpfs here: the other-filesystem half skipped");
        return;
    }
    let _unmount = Unmount(&other);
    std::fs::create_dir(other.join("empty")).unwrap();
    for dir in [other.join("new"), other.join("empty"), other.join("new")] {
        let r = admin_ok(&data, &["snapshot", dir.to_str().unwrap()], 1);
        assert!(r.stderr.contains("another filesystem"), "{r:?}");
    }
    assert_eq!(listing(&other).into_keys().collect::<Vec<_>>(), [other.join("empty")]);

    // A failure after DIR was made (here: the copy of the database, over
    // the file size limit, with SIGXFSZ ignored so that the write fails):
    // DIR is removed again, or emptied when it was there before.
    let late = f.server.temp_dir().join("late");
    let empty = f.server.temp_dir().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for dir in [&late, &empty] {
        let out = std::process::Command::new("sh")
            .args(["-c", "trap '' XFSZ; ulimit -f 2; exec \"$0\" \"$@\""])
            .arg(server_bin())
            .args(["snapshot", dir.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
            .env_remove("BACKUPD_DATA_DIR")
            .env_remove("BACKUPD_DB")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("backupd.db.part"), "{stderr}");
        if dir == &late {
            assert!(!late.exists(), "{:?}", listing(&late).keys());
        } else {
            assert!(listing(&empty).is_empty(), "{:?}", listing(&empty).keys());
        }
    }
    // And then it is made there.
    admin_ok(&data, &["snapshot", late.to_str().unwrap()], 0);
    admin_ok(&late, &["verify"], 0);
}

/// The no-systemd SIGHUP lines of docs/OPERATIONS.md ("Logs and rotation"),
/// for the data directory `data`.
fn sighup_recipe(data: &Path) -> String {
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md")).unwrap();
    let start = docs.find("f=/var/lib/backupd/backupd.lock").expect("the recipe in OPERATIONS.md");
    let end = start + docs[start..].find("```").unwrap();
    docs[start..end].replace("/var/lib/backupd", data.to_str().unwrap())
}

fn sh(script: &str) {
    let o = std::process::Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_lock_names_no_process_after_a_clean_exit_and_the_sighup_recipe_signals_only_the_server() {
    let mut f = fixture();
    let data = f.server.data_dir();
    let lock = data.join("backupd.lock");
    let recipe = sighup_recipe(&data);
    assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), f.server.pid().to_string());
    sh(&recipe);
    f.server.wait_for_log("SIGHUP: ", Duration::from_secs(10));

    // Stopped cleanly: the pid is gone; and after a writing command.
    f.server.stop();
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "");
    admin_ok(&data, &["reset-key", "bob"], 0);
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "");

    // A pid left by a server that was killed, now another process's: an
    // unrelated one, and another backupd server (of another data directory).
    let mut unrelated = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let mut other = TestServer::start(&[]);
    for pid in [unrelated.id(), other.pid()] {
        std::fs::write(&lock, format!("{pid}\n")).unwrap();
        sh(&recipe);
    }
    assert!(unrelated.try_wait().unwrap().is_none(), "the recipe signalled an unrelated process");
    let _ = unrelated.kill();
    let _ = unrelated.wait();
    // The other server got nothing: a SIGHUP sent before its SIGTERM is
    // handled (and logged) before it stops.
    other.stop();
    assert!(!other.log_text().contains("SIGHUP"), "{}", other.log_text());
}

/// A store on a read-only filesystem (a dead box's SD card mounted ro, a
/// snapshot on read-only media): `clients`, `files`, `verify` and `restore`
/// read it (SQLite could not make its WAL's shared-memory file there).
#[test]
fn the_reading_commands_work_on_a_read_only_mount() {
    let mut mounted = false;
    let mut server = TestServer::start_with(&["--min-free", "0"], Launch::default(), |temp| {
        let d = temp.join("data");
        std::fs::create_dir(&d).unwrap();
        mounted = mount_tmpfs(&d, "8m");
    });
    if !mounted {
        println!("cannot mount a tmpfs here: skipped");
        return;
    }
    let data = server.data_dir();
    let _unmount = Unmount(&data);
    let payload = pseudo_random(20_000, 3);
    let (mut c, _) = server.registered_client("ro");
    send(&mut c, "docs/a.bin", &payload);
    drop(c);
    server.stop();
    let ro = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(&data).status().unwrap();
    assert!(ro.success());
    assert!(admin_ok(&data, &["clients"], 0).stdout.contains("ro"));
    assert!(admin_ok(&data, &["files", "ro"], 0).stdout.contains("docs/a.bin"));
    admin_ok(&data, &["verify"], 0);
    let out = tempfile::tempdir().unwrap();
    admin_ok(&data, &["restore", "ro", "--to", out.path().to_str().unwrap()], 0);
    assert_eq!(std::fs::read(out.path().join("docs/a.bin")).unwrap(), payload);
}

/// Run `backupd ARGS` as the user nobody (uid and gid 65534), with no
/// BACKUPD_* variables, in `/`; None (with a note) when the tests do not
/// run as root and so cannot change user.
fn admin_as_nobody(args: &[&std::ffi::OsStr]) -> Option<Run> {
    use std::os::unix::process::CommandExt;
    if unsafe { libc::geteuid() } != 0 {
        println!("not root: cannot run a command as another user; skipped");
        return None;
    }
    let mut cmd = std::process::Command::new(server_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BACKUPD_") {
            cmd.env_remove(&k);
        }
    }
    let out = cmd.args(args).current_dir("/").uid(65534).gid(65534).output().expect("spawn backupd");
    Some(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A user who may not look inside the data directory (mode 0700, another
/// owner) is told so, with the path, not that there is no database.
#[test]
fn a_data_directory_the_user_may_not_enter_says_permission_denied_not_no_database() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start(&[]);
    let (mut c, _) = server.registered_client("alice");
    send(&mut c, "a.txt", b"hello");
    let data = server.data_dir();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let temp = server.temp_dir();
    let mode = |m| std::fs::set_permissions(temp, std::fs::Permissions::from_mode(m)).unwrap();
    for (temp_mode, denied) in [(0o700, data.clone()), (0o755, server.db_path())] {
        mode(temp_mode);
        for cmd in ["clients", "files", "verify"] {
            let args = [std::ffi::OsStr::new(cmd), "--data-dir".as_ref(), data.as_os_str()];
            let Some(r) = admin_as_nobody(&args) else { return };
            assert_eq!(r.code, 1, "{cmd}: {r:?}");
            assert!(!r.stderr.contains("no database") && !r.stderr.contains("no data directory"), "{r:?}");
            let line = format!("{}: Permission denied", denied.display());
            assert!(r.stderr.contains(&line), "{cmd} should say {line:?}: {r:?}");
            assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
        }
    }
    mode(0o700);
    // A database that is truly not there is still "no database".
    let r = admin_env(
        &[
            "clients".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--db".as_ref(),
            temp.join("none.db").as_os_str(),
        ],
        &[],
    );
    assert!(r.code == 1 && r.stderr.contains("no database at"), "{r:?}");
}

/// One environment file serves the server and the verify unit: a bad value
/// in a variable only the server reads does not stop the admin commands
/// (they do not read it), while the server still refuses it (exit 2).
#[test]
fn a_bad_server_only_variable_does_not_break_the_admin_commands() {
    let server = TestServer::start(&[]);
    let (mut c, _) = server.registered_client("alice");
    send(&mut c, "a.txt", b"hello");
    let data = server.data_dir();
    let bad = [
        ("BACKUPD_LISTEN", "garbage"),
        ("BACKUPD_MAX_CONNECTIONS", "abc"),
        ("BACKUPD_SYNC_MODE", "foo"),
        ("BACKUPD_LOG_LEVEL", "loud"),
        ("BACKUPD_QUOTA", "bogus"),
        ("BACKUPD_QUOTA_FILES", "many"),
    ];
    for (var, val) in bad {
        let env = [(var, Path::new(val)), ("BACKUPD_DATA_DIR", data.as_path())];
        for args in
            [&["verify"][..], &["files"], &["files", "alice", "--json"], &["clients"], &["clients", "--json"]]
        {
            let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
            let r = admin_env(&args, &env);
            assert_eq!(r.code, 0, "{var}={val} backupd {args:?}: {r:?}");
            assert!(r.stdout.contains("alice") || args[0] == "verify", "{var}={val} {args:?}: {r:?}");
        }
        // Options before the subcommand too.
        let first = ["--data-dir".as_ref(), data.as_os_str(), "files".as_ref()];
        let r = admin_env(&first, &[(var, Path::new(val))]);
        assert_eq!(r.code, 0, "{var}={val} backupd --data-dir D files: {r:?}");
    }
    // A good value is still what `clients` shows beside each client's use.
    let r = admin_env(
        &["clients".as_ref(), "--json".as_ref()],
        &[("BACKUPD_QUOTA", Path::new("1MiB")), ("BACKUPD_DATA_DIR", &data)],
    );
    assert_eq!(json(&r.stdout).arr()[0]["quota"]["bytes"].num(), 1 << 20, "{r:?}");
    // The server, with or without `serve`, refuses the bad value as before.
    let elsewhere = server.temp_dir().join("other");
    for serve in [&[][..], &["serve"]] {
        let mut args: Vec<&std::ffi::OsStr> = serve.iter().map(std::ffi::OsStr::new).collect();
        args.extend(["--data-dir".as_ref(), elsewhere.as_os_str()]);
        let r = run_admin(&args, &[("BACKUPD_LISTEN", Path::new("garbage"))], Duration::from_secs(30));
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("invalid value 'garbage' for '--listen"), "{r:?}");
    }
}

/// One file row that cannot be read (a cksum written as text by hand) is
/// reported as such, and hides no other row: `verify` names it (exit 3) and
/// checks the rest; `files` and `clients` list the rest and name it on
/// standard error (exit 1).
#[test]
fn a_damaged_file_row_is_named_and_hides_no_other() {
    let mut server = TestServer::start(&[]);
    let (mut a, _) = server.registered_client("alice");
    send(&mut a, "a.txt", b"first");
    send(&mut a, "b.txt", b"second");
    let (mut b, _) = server.registered_client("bob");
    send(&mut b, "x", b"bob's");
    drop((a, b));
    server.stop();
    let db = rusqlite::Connection::open(server.db_path()).unwrap();
    assert_eq!(db.execute("UPDATE files SET Cksum = 'abc' WHERE FileName = 'a.txt'", []).unwrap(), 1);
    drop(db);
    let data = server.data_dir();

    let r = admin_ok(&data, &["verify"], 3);
    let line = r.stdout.lines().find(|l| l.starts_with("damaged")).unwrap_or_else(|| panic!("{r:?}"));
    assert!(line.contains("alice/a.txt") && line.contains("Cksum"), "{r:?}");
    assert!(r.stdout.contains("checked 2 files") && r.stdout.contains("1 damaged"), "{r:?}");
    assert!(!r.stdout.contains("unregistered"), "its stored copy is no stray: {r:?}");
    let items = json(&admin_ok(&data, &["verify", "--json"], 3).stdout);
    let status = |name: &str| {
        items.arr().iter().find(|i| i["name"].str() == name).map(|i| i["status"].str().to_string())
    };
    assert_eq!(status("a.txt").as_deref(), Some("damaged"));
    assert_eq!((status("b.txt").as_deref(), status("x").as_deref()), (Some("ok"), Some("ok")));

    let r = admin_ok(&data, &["files"], 1);
    assert!(r.stdout.contains("b.txt") && r.stdout.contains("x") && !r.stdout.contains("a.txt"), "{r:?}");
    assert!(r.stderr.contains("client \"alice\" file \"a.txt\": database row damaged"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    let r = admin_ok(&data, &["files", "bob", "--json"], 0);
    assert_eq!(json(&r.stdout).arr().len(), 1, "{r:?}");
    let r = admin_ok(&data, &["clients"], 1);
    assert!(r.stdout.contains("alice") && r.stdout.contains("bob"), "{r:?}");
    assert!(r.stderr.contains("client \"alice\" file \"a.txt\": database row damaged"), "{r:?}");
}
