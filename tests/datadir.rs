//! The data directory has one owner and holds no surprises (issue 9): the
//! lock, the marker, no link followed, every write error reaching the
//! client, no dangling row after an abort, crash points repaired at the next
//! start, torn files noticed. Real binary (a debug build, so the
//! `BACKUPD_FAULTS` seam is active), real SQLite, temp directories.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backupd::client::{Client, UploadOptions};
use backupd::protocol::{id_hex, ClientId, ResponseCode};
use common::*;

/// A launch whose `BACKUPD_FAULTS` is whatever `faults` holds at each (re)start.
fn with_faults(faults: &Arc<Mutex<String>>) -> Launch {
    let cell = faults.clone();
    let tweak = move |cmd: &mut std::process::Command| {
        let f = cell.lock().unwrap().clone();
        if f.is_empty() {
            cmd.env_remove("BACKUPD_FAULTS");
        } else {
            cmd.env("BACKUPD_FAULTS", f);
        }
    };
    Launch { tweak: Some(Arc::new(tweak)), ..Launch::default() }
}

/// Restart with these faults and a reconnected client.
fn restart_with(
    server: &mut TestServer,
    faults: &Arc<Mutex<String>>,
    spec: &str,
    who: (ClientId, &str),
) -> Client {
    *faults.lock().unwrap() = spec.to_string();
    server.restart();
    let mut c = server.connect();
    c.reconnect(who.0, who.1, test_key()).unwrap();
    c
}

fn upload_confirm(c: &mut Client, name: &str, data: &[u8]) {
    assert!(c.upload_bytes(name, data, &UploadOptions::default()).unwrap().cksum_matches());
    c.crc_ok(name).unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// The files row (Verified, Size, Cksum, PathName) of a name.
fn row(db: &Path, id: &ClientId, name: &str) -> Option<(i64, Option<i64>, Option<i64>, String)> {
    use rusqlite::OptionalExtension;
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT Verified, Size, Cksum, PathName FROM files WHERE ID=?1 AND FileName=?2",
        (&id[..], name),
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )
    .optional()
    .unwrap()
}

fn intents(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row("SELECT count(*) FROM publish_intents", [], |r| r.get(0)).unwrap()
}

/// The verified row of `name` describes exactly `data`, which is the file on disk.
fn assert_verified(server: &TestServer, id: &ClientId, name: &str, data: &[u8], tag: &str) {
    assert_verified_in(server, &server.db_path(), id, name, data, tag)
}

/// [`assert_verified`] with the database at `db`.
fn assert_verified_in(server: &TestServer, db: &Path, id: &ClientId, name: &str, data: &[u8], tag: &str) {
    assert_eq!(std::fs::read(server.stored_path(id, name)).unwrap(), data, "{tag}: {name} on disk");
    let (verified, size, cksum, path) = row(db, id, name).expect("a files row");
    assert_eq!(verified, 1, "{tag}: {name} verified");
    assert_eq!(size, Some(data.len() as i64), "{tag}: {name} size");
    assert_eq!(cksum, Some(backupd::crypto::cksum(data) as i64), "{tag}: {name} cksum");
    assert_eq!(path, format!("files/{}/{name}", id_hex(id)), "{tag}: {name} path");
}

/// Every file and folder below `dir` with its mode and (for files) content.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u32, Option<Vec<u8>>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let content = meta.is_file().then(|| std::fs::read(&p).unwrap());
        out.insert(p.clone(), (meta.permissions().mode(), content));
        if meta.is_dir() {
            out.extend(tree(&p));
        }
    }
    out
}

fn raw_server(cwd: &Path, data: &Path) -> RawServer {
    raw_server_with(cwd, data, &[])
}

/// A server started with exactly `--data-dir data`, a free port and `extra`.
fn raw_server_with(cwd: &Path, data: &Path, extra: &[&OsStr]) -> RawServer {
    let mut args: Vec<&OsStr> =
        vec![OsStr::new("--listen"), OsStr::new("127.0.0.1:0"), OsStr::new("--data-dir"), data.as_os_str()];
    args.extend(extra);
    RawServer::spawn(cwd, &args)
}

/// A server start with `--data-dir data`, a free port and `extra` that must
/// be refused: it exits 1 (within a hang guard); its output.
fn refused_start(data: &Path, extra: &[&OsStr]) -> AdminRun {
    let mut args: Vec<&OsStr> =
        vec![OsStr::new("--listen"), OsStr::new("127.0.0.1:0"), OsStr::new("--data-dir"), data.as_os_str()];
    args.extend(extra);
    let out = run_admin(&args, &[], Duration::from_secs(20));
    assert_eq!(out.code, 1, "{out:?}");
    out
}

#[test]
fn a_second_server_on_the_same_directory_exits_1_and_the_first_keeps_its_upload() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("first");
    let data = pseudo_random(20_000, 1);
    // Staged in tmp/, awaiting its 1029 while the second server tries to start.
    assert!(c.upload_bytes("staged", &data, &UploadOptions::default()).unwrap().cksum_matches());
    let mut second = raw_server(server.temp_dir(), &server.data_dir());
    let status = second.wait_exit(Duration::from_secs(10)).expect("the second server must exit at once");
    assert_eq!(status.code(), Some(1), "{}", second.log_text());
    let want =
        format!("data directory {} is in use by process {}", server.data_dir().display(), server.pid());
    let said = wait_until(Duration::from_secs(5), || second.log_text().contains(&want));
    assert!(said, "expected {want:?} in:\n{}", second.log_text());
    c.crc_ok("staged").unwrap();
    assert_verified(&server, &id, "staged", &data, "after the second server");
    assert!(server.is_alive());
    // Once the first is gone, the directory can be taken again.
    assert!(server.stop().success());
    let mut third = raw_server(server.temp_dir(), &server.data_dir());
    let listening = wait_until(Duration::from_secs(20), || third.log_text().contains("listening on"));
    assert!(listening && third.wait_exit(Duration::ZERO).is_none(), "{}", third.log_text());
}

#[test]
fn a_non_empty_folder_without_the_marker_is_refused_untouched() {
    let temp = tempfile::tempdir().unwrap();
    let home = temp.path().join("home");
    std::fs::create_dir_all(home.join("tmp")).unwrap();
    std::fs::create_dir_all(home.join("files")).unwrap();
    std::fs::write(home.join("tmp/draft.txt"), b"draft").unwrap();
    std::fs::write(home.join("files/stray"), b"mine").unwrap();
    std::fs::write(home.join("notes.txt"), b"notes").unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = tree(&home);
    let mut s = raw_server(temp.path(), &home);
    let status = s.wait_exit(Duration::from_secs(10)).expect("must refuse at once");
    assert_eq!(status.code(), Some(1));
    let log = s.log_text();
    assert!(log.contains("is not empty and has no backupd.layout marker"), "{log}");
    assert!(log.contains("files, notes.txt, tmp"), "the message names what it found: {log}");
    assert!(log.contains("--data-dir"), "the message says how to proceed: {log}");
    assert_eq!(tree(&home), before, "the folder was changed");
    assert_eq!(std::fs::metadata(&home).unwrap().permissions().mode() & 0o777, 0o755);
}

#[test]
fn an_empty_existing_folder_is_taken_and_marked() {
    let server = TestServer::start_with(&[], Launch::default(), |temp| {
        std::fs::create_dir(temp.join("data")).unwrap();
    });
    let marker = std::fs::read_to_string(server.data_dir().join("backupd.layout")).unwrap();
    let (first, id) = marker.split_once('\n').unwrap();
    assert_eq!(first, "backupd data directory, layout 1");
    let id = id.strip_prefix("id ").and_then(|i| i.strip_suffix('\n')).unwrap();
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{marker:?}");
    let lock = std::fs::read_to_string(server.data_dir().join("backupd.lock")).unwrap();
    assert_eq!(lock.trim(), server.pid().to_string());
}

#[test]
fn tmp_as_a_link_to_another_folder_is_moved_aside_and_that_folder_survives() {
    let mut server = TestServer::start(&[]);
    let (c, id) = server.registered_client("tmp-link");
    drop(c);
    assert!(server.stop().success());
    let other = server.temp_dir().join("other");
    std::fs::create_dir(&other).unwrap();
    for f in ["1.part", "2.part", "precious.txt"] {
        std::fs::write(other.join(f), f.as_bytes()).unwrap();
    }
    std::fs::remove_dir(server.tmp_dir()).unwrap();
    symlink(&other, server.tmp_dir()).unwrap();
    server.restart();
    for f in ["1.part", "2.part", "precious.txt"] {
        assert_eq!(std::fs::read(other.join(f)).unwrap(), f.as_bytes(), "{f} in the link's target");
    }
    assert!(std::fs::symlink_metadata(server.tmp_dir()).unwrap().is_dir(), "a real tmp/ again");
    let orphans: Vec<_> = std::fs::read_dir(server.data_dir().join("orphans")).unwrap().flatten().collect();
    assert_eq!(orphans.len(), 1);
    assert!(orphans[0].file_type().unwrap().is_symlink(), "the link itself is set aside");
    assert!(server.log_text().contains("tmp in the data directory is not a folder"));
    // And uploads go to the real tmp/.
    let mut c = server.connect();
    c.reconnect(id, "tmp-link", test_key()).unwrap();
    upload_confirm(&mut c, "after", b"after");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 3);
}

#[test]
fn a_client_folder_replaced_by_a_link_is_never_written_through() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("victim");
    upload_confirm(&mut c, "a", b"first");
    let client_dir = server.files_dir().join(id_hex(&id));
    let other = server.temp_dir().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("a"), b"not the server's").unwrap();
    std::fs::rename(&client_dir, server.temp_dir().join("saved")).unwrap();
    symlink(&other, &client_dir).unwrap();
    for name in ["a", "b"] {
        assert!(c
            .upload_bytes(name, b"through the link?", &UploadOptions::default())
            .unwrap()
            .cksum_matches());
        let err = c.crc_ok(name).expect_err("publishing through a link must fail");
        assert_eq!(err.refusal_code(), Some(ResponseCode::GeneralError), "{err}");
    }
    assert_eq!(std::fs::read(other.join("a")).unwrap(), b"not the server's");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1, "nothing new in the link's target");
    server.wait_for_log("cannot publish", Duration::from_secs(5));
    assert!(row(&server.db_path(), &id, "b").is_none());
    assert!(wait_until(Duration::from_secs(5), || walk_files(&server.tmp_dir()).is_empty()));
    // At the next start the link is moved aside; the verified row whose file
    // is gone stays verified, reported missing.
    drop(c);
    server.restart();
    assert!(std::fs::symlink_metadata(&client_dir).is_err());
    assert_eq!(std::fs::read(other.join("a")).unwrap(), b"not the server's");
    server.wait_for_log(&format!("verified file files/{}/a of client", id_hex(&id)), Duration::from_secs(5));
    assert_eq!(row(&server.db_path(), &id, "a").unwrap().0, 1);
}

/// Each write, sync and rename step made to fail: 1607, no published file,
/// the previous version and its row in place; the server goes on serving.
fn failing_steps(mode: &str) {
    let faults = Arc::new(Mutex::new(String::new()));
    let mut server = TestServer::start_with(&["--sync-mode", mode], with_faults(&faults), |_| {});
    let (mut c, id) = server.registered_client("steps");
    let v1 = pseudo_random(30_000, 1);
    upload_confirm(&mut c, "victim", &v1);
    drop(c);
    let mut points = vec!["link", "sync-previous", "rename", "sync-publish", "after-rename"];
    if mode == "fsync" {
        points.push("fdatasync");
    }
    for (i, point) in points.iter().enumerate() {
        let tag = format!("{mode} fail@{point}");
        let fresh = format!("fresh-{i}");
        let spec = format!("fail@{point}:victim,fail@{point}:{fresh}");
        let replace_only = matches!(*point, "link" | "sync-previous");
        let mut c = restart_with(&mut server, &faults, &spec, (id, "steps"));
        let v2 = pseudo_random(20_000, 100 + i as u64);
        for name in ["victim", fresh.as_str()] {
            assert!(c.upload_bytes(name, &v2, &UploadOptions::default()).unwrap().cksum_matches());
            match c.crc_ok(name) {
                Err(e) => assert_eq!(e.refusal_code(), Some(ResponseCode::GeneralError), "{tag} {name}: {e}"),
                // A new file has no previous version to link and sync.
                Ok(()) if replace_only && name != "victim" => {}
                Ok(()) => panic!("{tag}: {name} got 1604"),
            }
        }
        assert_verified(&server, &id, "victim", &v1, &tag);
        if !replace_only {
            assert!(!server.stored_path(&id, &fresh).exists(), "{tag}: {fresh} published");
            assert!(row(&server.db_path(), &id, &fresh).is_none(), "{tag}: {fresh} has a row");
        }
        let versions = walk_files(&server.data_dir().join("versions"));
        assert!(versions.iter().all(|v| std::fs::read(v).unwrap() == v1), "{tag}: versions {versions:?}");
        assert!(
            wait_until(Duration::from_secs(5), || walk_files(&server.tmp_dir()).is_empty()),
            "{tag}: tmp/"
        );
        assert_eq!(intents(&server.db_path()), 0, "{tag}: intents left");
        upload_confirm(&mut c, &format!("ok-{i}"), b"still serving");
    }
}

#[test]
fn every_failed_sync_rename_or_link_gives_1607_with_syncfs() {
    failing_steps("syncfs");
}

#[test]
fn every_failed_sync_rename_or_link_gives_1607_with_fsync() {
    failing_steps("fsync");
}

/// A failed syncfs reports a writeback error once, to itself: an upload
/// written before it (whose data that writeback may have lost) gets 1607 at
/// its 1029, whoever's file the failing sync was for, and is stored when
/// sent again; one begun after the failure is stored at once.
#[test]
fn an_upload_written_before_a_failed_sync_is_refused_and_stored_when_sent_again() {
    let faults = Arc::new(Mutex::new("fail@sync-publish:x".to_string()));
    let server = TestServer::start_with(&["--sync-mode", "syncfs"], with_faults(&faults), |_| {});
    let (mut early, id) = server.registered_client("early");
    let (mut failing, _) = server.registered_client("failing");
    let y = pseudo_random(50_000, 7);
    assert!(early.upload_bytes("y", &y, &UploadOptions::default()).unwrap().cksum_matches());
    assert!(failing.upload_bytes("x", b"x", &UploadOptions::default()).unwrap().cksum_matches());
    let e = failing.crc_ok("x").expect_err("the sync of x's batch fails");
    assert_eq!(e.refusal_code(), Some(ResponseCode::GeneralError), "x: {e}");
    let e = early.crc_ok("y").expect_err("y was written before the failed sync");
    assert_eq!(e.refusal_code(), Some(ResponseCode::GeneralError), "y: {e}");
    server.wait_for_log("was being written when a sync of the data directory failed", Duration::from_secs(5));
    assert!(row(&server.db_path(), &id, "y").is_none(), "a row for the refused y");
    assert!(!server.stored_path(&id, "y").exists(), "the refused y published");
    upload_confirm(&mut early, "y", &y);
    assert_verified(&server, &id, "y", &y, "y sent again");
    upload_confirm(&mut early, "z", b"begun after the failure");
    assert!(wait_until(Duration::from_secs(5), || walk_files(&server.tmp_dir()).is_empty()), "tmp/");
}

#[test]
fn a_failed_write_or_writeback_fails_the_upload() {
    for (point, len) in [("write", 50_000), ("write-behind", (8 << 20) + 100_000)] {
        for mode in ["syncfs", "fsync"] {
            let spec = format!("fail@{point}");
            let launch = with_faults(&Arc::new(Mutex::new(spec.clone())));
            let server = TestServer::start_with(&["--sync-mode", mode], launch, |_| {});
            let (mut c, id) = server.registered_client("writer");
            let opts = UploadOptions { packet_size: 1 << 20, ..Default::default() };
            let err = c.upload_bytes("big", &pseudo_random(len, 3), &opts).expect_err(&spec);
            assert_eq!(err.refusal_code(), Some(ResponseCode::GeneralError), "{spec} {mode}: {err}");
            assert!(c.crc_ok("big").is_err(), "{spec} {mode}: 1604 for a failed upload");
            assert!(!server.stored_path(&id, "big").exists());
            assert!(wait_until(Duration::from_secs(5), || walk_files(&server.tmp_dir()).is_empty()));
            server.wait_for_log("cannot write temp file", Duration::from_secs(5));
        }
    }
}

#[test]
fn an_abort_leaves_no_row_pointing_at_nothing() {
    let server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("aborter");
    assert!(c.upload_bytes("never", b"x", &UploadOptions::default()).unwrap().cksum_matches());
    c.crc_abort("never").unwrap();
    let v1 = pseudo_random(1000, 1);
    upload_confirm(&mut c, "kept", &v1);
    assert!(c
        .upload_bytes("kept", &pseudo_random(2000, 2), &UploadOptions::default())
        .unwrap()
        .cksum_matches());
    c.crc_abort("kept").unwrap();
    upload_confirm(&mut c, "sync", b"round trip: the worker has handled the aborts");
    assert!(row(&server.db_path(), &id, "never").is_none(), "a row for an aborted upload");
    assert_verified(&server, &id, "kept", &v1, "after an aborted second version");
}

/// A server whose faults can be set at each restart, and a client `who`
/// with one file `name` stored (10,000 bytes, returned).
fn with_one_file(who: &str, name: &str) -> (TestServer, Arc<Mutex<String>>, ClientId, Vec<u8>) {
    let faults = Arc::new(Mutex::new(String::new()));
    let server = TestServer::start_with(&[], with_faults(&faults), |_| {});
    let (mut c, id) = server.registered_client(who);
    let data = pseudo_random(10_000, 1);
    upload_confirm(&mut c, name, &data);
    (server, faults, id, data)
}

/// Crash points between the rename and the commit, and between the commit
/// and the 1604: the next start repairs them as docs/ARCHITECTURE.md says.
#[test]
fn crashes_around_the_commit_are_repaired_at_the_next_start() {
    let (mut server, faults, id, v1) = with_one_file("crashy", "victim");
    let crash = |server: &mut TestServer, point: &str, name: &str, data: &[u8]| {
        let mut c = restart_with(server, &faults, &format!("crash@{point}:{name}"), (id, "crashy"));
        assert!(c.upload_bytes(name, data, &UploadOptions::default()).unwrap().cksum_matches());
        let r = c.crc_ok(name);
        assert!(r.as_ref().is_err_and(|e| e.is_network()), "{point} {name}: {r:?}");
        assert_eq!(server.wait(Duration::from_secs(10)).code(), Some(86), "{point}: not the injected crash");
        *faults.lock().unwrap() = String::new();
        server.restart();
        server.wait_for_log(&format!("fault injection: crash at {point} {name}"), Duration::from_secs(5));
    };
    let orphans = |server: &TestServer| walk_files(&server.data_dir().join("orphans"));
    // Replacing a verified file, crash after the rename, before the commit:
    // the intent puts the previous version back.
    for point in ["intent", "link", "after-rename"] {
        crash(&mut server, point, "victim", &pseudo_random(12_000, 2));
        assert_verified(&server, &id, "victim", &v1, point);
        assert_eq!(intents(&server.db_path()), 0, "{point}: intents");
    }
    assert!(server.log_text().contains("undid unacknowledged publish"));
    // A new file, crash before the commit: it has no verified row, so it goes to orphans/.
    let fresh = pseudo_random(5_000, 3);
    crash(&mut server, "after-rename", "fresh", &fresh);
    assert!(!server.stored_path(&id, "fresh").exists());
    assert!(row(&server.db_path(), &id, "fresh").is_none());
    assert!(orphans(&server).iter().any(|p| std::fs::read(p).unwrap() == fresh), "fresh not in orphans/");
    // Crash after the commit, before the 1604: the new version stands, recorded.
    let v2 = pseudo_random(14_000, 4);
    crash(&mut server, "commit", "victim", &v2);
    assert_verified(&server, &id, "victim", &v2, "commit");
    assert_eq!(intents(&server.db_path()), 0);
    let versions = walk_files(&server.data_dir().join("versions"));
    assert!(versions.iter().any(|v| std::fs::read(v).unwrap() == v1), "previous version kept");
    let mut c = server.connect();
    c.reconnect(id, "crashy", test_key()).unwrap();
    upload_confirm(&mut c, "victim", b"v3");
}

fn unsynced_marks(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.query_row("SELECT count(*) FROM unsynced_files", [], |r| r.get(0)).unwrap()
}

/// New files with syncfs get one sync per batch, after their rows: a crash
/// between the two (a power cut, simulated by undoing on disk what the sync
/// had not yet made durable) must leave no row without its whole file, and
/// keep a file that did reach the disk whole.
#[test]
fn a_crash_between_new_rows_and_their_sync_keeps_only_whole_files() {
    let faults = Arc::new(Mutex::new(String::new()));
    let mut server = TestServer::start_with(&["--sync-mode", "syncfs"], with_faults(&faults), |_| {});
    let (mut c, id) = server.registered_client("cut");
    upload_confirm(&mut c, "before", b"acknowledged earlier");
    drop(c);
    let orphans = |server: &TestServer| walk_files(&server.data_dir().join("orphans"));
    // What the power cut took: nothing, the rename, the file's data; or what
    // someone put there instead: a link to a copy of the file elsewhere,
    // which is never followed (read, it would pass the check).
    type Cut = fn(&Path);
    let cases: [(&str, Cut); 4] = [
        ("whole", |_| {}),
        ("unrenamed", |p| std::fs::remove_file(p).unwrap()),
        ("torn", |p| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(3000).unwrap()),
        ("linked", |p| {
            let copy = p.parent().unwrap().parent().unwrap().parent().unwrap().parent().unwrap().join("copy");
            std::fs::rename(p, &copy).unwrap();
            symlink(&copy, p).unwrap();
        }),
    ];
    for (i, (name, cut)) in cases.into_iter().enumerate() {
        let data = pseudo_random(9_000, 40 + i as u64);
        let mut c = restart_with(&mut server, &faults, &format!("crash@recorded:{name}"), (id, "cut"));
        assert!(c.upload_bytes(name, &data, &UploadOptions::default()).unwrap().cksum_matches());
        let r = c.crc_ok(name);
        assert!(r.as_ref().is_err_and(|e| e.is_network()), "{name}: {r:?}");
        assert_eq!(server.wait(Duration::from_secs(10)).code(), Some(86), "{name}: not the injected crash");
        assert!(row(&server.db_path(), &id, name).is_some(), "{name}: the row went in before the crash");
        assert_eq!(unsynced_marks(&server.db_path()), 1, "{name}: its mark went in with it");
        cut(&server.stored_path(&id, name));
        *faults.lock().unwrap() = String::new();
        server.restart();
        server.wait_for_log(&format!("fault injection: crash at recorded {name}"), Duration::from_secs(5));
        let mut c = server.connect();
        c.reconnect(id, "cut", test_key()).unwrap();
        upload_confirm(&mut c, &format!("after-{name}"), b"serving");
        let dropped = format!("files/{}/{name} of client {} was being stored", id_hex(&id), id_hex(&id));
        if name == "whole" {
            assert_verified(&server, &id, name, &data, name);
            assert!(!server.log_text().contains(&dropped), "{name}: dropped");
        } else {
            assert!(row(&server.db_path(), &id, name).is_none(), "{name}: a row without its whole file");
            assert!(!server.stored_path(&id, name).exists(), "{name}: left in files/");
            assert!(server.log_text().contains(&dropped), "{name}: not logged");
        }
        assert!(!server.log_text().contains("is missing; its row is kept"), "{name}: reported as damage");
        assert_verified(&server, &id, "before", b"acknowledged earlier", name);
    }
    // The torn file and the link are set aside, never deleted; the link's target is untouched.
    assert!(orphans(&server).iter().any(|p| std::fs::read(p).unwrap().len() == 3000), "torn not in orphans/");
    let orphaned = std::fs::read_dir(server.data_dir().join("orphans")).unwrap();
    assert!(
        orphaned
            .map(|e| e.unwrap().path())
            .any(|p| std::fs::symlink_metadata(p).unwrap().file_type().is_symlink()),
        "the link not in orphans/"
    );
    let copy = server.data_dir().parent().unwrap().join("copy");
    assert_eq!(std::fs::read(&copy).unwrap(), pseudo_random(9_000, 43), "the link's target");
    // Marks of a batch whose sync is done go once its 1604s are out: a file
    // lost after its 1604 (here with the server killed at once) is damage,
    // reported at start, never taken for an upload that was not acknowledged.
    assert!(wait_until(Duration::from_secs(5), || unsynced_marks(&server.db_path()) == 0), "marks left");
    let mut c = server.connect();
    c.reconnect(id, "cut", test_key()).unwrap();
    upload_confirm(&mut c, "acked", b"told it was stored");
    assert!(wait_until(Duration::from_secs(5), || unsynced_marks(&server.db_path()) == 0), "marks left");
    server.kill();
    std::fs::remove_file(server.stored_path(&id, "acked")).unwrap();
    server.restart();
    server.wait_for_log(
        &format!("verified file files/{}/acked of client {} is missing", id_hex(&id), id_hex(&id)),
        Duration::from_secs(5),
    );
    assert_eq!(row(&server.db_path(), &id, "acked").unwrap().0, 1, "acked: its row kept");
}

/// Run `backupd ARGS --data-dir DATA` and expect exit `code`.
fn admin_ok(data: &Path, args: &[&str], code: i32) -> AdminRun {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([OsStr::new("--data-dir"), data.as_os_str()]);
    let r = run_admin(&all, &[], Duration::from_secs(120));
    assert_eq!(r.code, code, "backupd {args:?}: {r:?}");
    r
}

/// A verified file missing at start (files/ moved to another disk with a
/// link left, which start-up sets aside, never following it) keeps its row:
/// an error line names it, `verify`, `files` and `restore` say it is
/// missing, and once the folder is back the next start takes the files as
/// they were (nothing to orphans/). An upload of a missing name simply
/// stores the new file.
#[test]
fn a_verified_file_missing_at_start_keeps_its_row_and_is_taken_back() {
    let metrics = tempfile::tempdir().unwrap();
    let prom = metrics.path().join("backupd.prom");
    let mut server = TestServer::start(&["--metrics-file", prom.to_str().unwrap()]);
    let (mut c, id) = server.registered_client("moved");
    let a = pseudo_random(7_000, 61);
    let b = pseudo_random(3_000, 62);
    upload_confirm(&mut c, "a.bin", &a);
    upload_confirm(&mut c, "docs/b.txt", &b);
    drop(c);
    assert!(server.stop().success());
    let data = server.data_dir();
    let files = data.join("files");
    let other = server.temp_dir().join("other-disk");
    std::fs::rename(&files, &other).unwrap();
    symlink(&other, &files).unwrap();
    server.restart();
    for name in ["a.bin", "docs/b.txt"] {
        server.wait_for_log(
            &format!("verified file files/{}/{name} of client {} is missing", id_hex(&id), id_hex(&id)),
            Duration::from_secs(5),
        );
        assert_eq!(row(&server.db_path(), &id, name).unwrap().0, 1, "{name}: its row kept verified");
    }
    server.wait_for_log("2 verified file(s) are missing from files/", Duration::from_secs(5));
    // While they are missing the admin commands say so.
    let r = admin_ok(&data, &["verify"], 3);
    assert!(r.stdout.contains("missing") && r.stdout.contains("2 problem(s)"), "{r:?}");
    let r = admin_ok(&data, &["files", "moved"], 0);
    assert_eq!(r.stdout.matches("(missing)").count(), 2, "{r:?}");
    let listed = json(&admin_ok(&data, &["files", "moved", "--json"], 0).stdout);
    assert!(listed.arr().iter().all(|f| f["missing"] == true), "{listed:?}");
    let out = server.temp_dir().join("restored-while-missing");
    let r = admin_ok(&data, &["restore", "moved", "a.bin", "--to", out.to_str().unwrap()], 1);
    assert!(r.stderr.contains("a.bin: the stored copy is missing"), "{r:?}");
    assert!(!out.join("a.bin").exists());
    assert!(server.stop().success());

    // The folder back: taken as it was, nothing moved to orphans/.
    std::fs::remove_dir(&files).unwrap();
    std::fs::rename(&other, &files).unwrap();
    server.restart();
    let mut c = server.connect();
    c.reconnect(id, "moved", test_key()).unwrap();
    upload_confirm(&mut c, "after", b"serving");
    assert_verified(&server, &id, "a.bin", &a, "back");
    assert_verified(&server, &id, "docs/b.txt", &b, "back");
    assert!(!server.log_text().contains("has no verified database row"), "{}", server.log_text());
    assert!(walk_files(&data.join("orphans")).iter().all(|p| p.is_symlink()), "only the link set aside");
    let r = admin_ok(&data, &["verify"], 0);
    assert!(r.stdout.contains("checked 3 files") && r.stdout.contains("all well"), "{r:?}");
    let out = server.temp_dir().join("restored");
    admin_ok(&data, &["restore", "moved", "--to", out.to_str().unwrap()], 0);
    assert_eq!(std::fs::read(out.join("a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(out.join("docs/b.txt")).unwrap(), b);

    // A name sent again while its file is missing is simply stored anew.
    drop(c);
    assert!(server.stop().success());
    std::fs::remove_file(server.stored_path(&id, "a.bin")).unwrap();
    server.restart();
    let mut c = server.connect();
    c.reconnect(id, "moved", test_key()).unwrap();
    let fresh = pseudo_random(5_000, 63);
    upload_confirm(&mut c, "a.bin", &fresh);
    assert_verified(&server, &id, "a.bin", &fresh, "sent again");
    admin_ok(&data, &["verify"], 0);
    drop(c);
    assert!(server.stop().success());
    // Its row was replaced, not added to: the client's use is what it stores
    // (written at shutdown), as `backupd clients` reads it from the store.
    let text = std::fs::read_to_string(&prom).unwrap();
    let stored = (fresh.len() + b.len() + b"serving".len()).to_string();
    for line in ["backupd_files_stored 3", "backupd_client_files_stored{client=\"moved\"} 3"] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    let bytes = format!("backupd_client_bytes_stored{{client=\"moved\"}} {stored}");
    assert!(text.lines().any(|l| l == bytes), "{bytes} in:\n{text}");
    let listed = admin_ok(&data, &["clients"], 0).stdout;
    assert!(listed.lines().any(|l| l.contains("moved") && l.contains(&stored)), "{listed}");
}

/// Many verified files missing at start: the first 20 named one line each,
/// then one summary line counting all of them; every row kept.
#[test]
fn many_missing_files_are_named_up_to_twenty_and_counted() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("many");
    let names: Vec<String> = (0..23).map(|i| format!("f{i:02}")).collect();
    for n in &names {
        upload_confirm(&mut c, n, n.as_bytes());
    }
    drop(c);
    assert!(server.stop().success());
    std::fs::remove_dir_all(server.files_dir().join(id_hex(&id))).unwrap();
    server.restart();
    server.wait_for_log(
        "23 verified file(s) are missing from files/ (the first 20 named above)",
        Duration::from_secs(5),
    );
    let named = server.log_text().lines().filter(|l| l.contains("is missing; its row is kept")).count();
    assert_eq!(named, 20, "{}", server.log_text());
    for n in &names {
        assert_eq!(row(&server.db_path(), &id, n).unwrap().0, 1, "{n}: its row kept verified");
    }
    assert!(server.stop().success());
}

/// The steps of each commit, in order, as the trace shows them (repeats of
/// one step, e.g. one fsync per folder, folded).
fn steps(log: &str, name: &str) -> Vec<Vec<String>> {
    let mut commits = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("fault point ").nth(1) {
            let (point, file) = rest.split_once(' ').unwrap_or((rest, ""));
            if file.trim() == name && cur.last().map(String::as_str) != Some(point) {
                cur.push(point.to_string());
            }
        } else if line.contains(&format!("{name:?} verified and stored")) {
            cur.push("1604".into());
            commits.push(std::mem::take(&mut cur));
        }
    }
    commits
}

#[test]
fn the_durability_steps_come_in_order_before_the_1604() {
    for mode in ["syncfs", "fsync"] {
        let launch = with_faults(&Arc::new(Mutex::new("trace".into())));
        let server = TestServer::start_with(&["--sync-mode", mode], launch, |_| {});
        let (mut c, _) = server.registered_client("tracer");
        upload_confirm(&mut c, "t", b"one");
        upload_confirm(&mut c, "t", b"two");
        let first = if mode == "fsync" { vec!["fdatasync"] } else { vec![] };
        // With syncfs a batch of new files has one sync, after its rows.
        let new_steps = if mode == "fsync" {
            ["rename", "sync-publish", "after-rename", "commit", "1604"].as_slice()
        } else {
            ["rename", "after-rename", "recorded", "sync-publish", "commit", "1604"].as_slice()
        };
        let new: Vec<&str> = first.iter().copied().chain(new_steps.iter().copied()).collect();
        let replace: Vec<&str> = first
            .iter()
            .copied()
            .chain([
                "intent",
                "link",
                "sync-previous",
                "rename",
                "sync-publish",
                "after-rename",
                "commit",
                "1604",
            ])
            .collect();
        // The log is read from the server's stderr by a thread: wait for the second 1604's line.
        wait_until(Duration::from_secs(5), || steps(&server.log_text(), "t").len() >= 2);
        let got = steps(&server.log_text(), "t");
        assert_eq!(got, vec![new, replace], "{mode}");
    }
}

/// One syncfs covers one filesystem: with the database on another, a batch
/// of new files keeps the sync of its files before the database's own.
#[test]
fn a_database_on_another_filesystem_keeps_the_files_sync_before_the_commit() {
    let db_dir = tempfile::tempdir().unwrap();
    if !mount_tmpfs(db_dir.path(), "16m") {
        println!("cannot mount a tmpfs here: skipped");
        return;
    }
    let _unmount = Unmount(db_dir.path());
    let db = db_dir.path().join("backupd.db");
    let launch = with_faults(&Arc::new(Mutex::new("trace".into())));
    let mut server = TestServer::start_with(&["--db", db.to_str().unwrap()], launch, |_| {});
    let (mut c, id) = server.registered_client("apart");
    upload_confirm(&mut c, "t", b"one");
    wait_until(Duration::from_secs(5), || !steps(&server.log_text(), "t").is_empty());
    assert_eq!(
        steps(&server.log_text(), "t"),
        vec![vec!["rename", "sync-publish", "after-rename", "commit", "1604"]]
    );
    assert!(server.log_text().contains("database not on the data directory's filesystem"));
    assert_eq!(std::fs::read(server.stored_path(&id, "t")).unwrap(), b"one");
    assert_eq!(row(&db, &id, "t").expect("a files row in the database apart").0, 1);
    drop(c);
    assert!(server.stop().success());
}

#[test]
fn a_torn_file_is_reported_at_start_and_left_in_place() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("torn");
    upload_confirm(&mut c, "whole", &pseudo_random(4000, 1));
    upload_confirm(&mut c, "cut", &pseudo_random(4000, 2));
    drop(c);
    assert!(server.stop().success());
    let cut = server.stored_path(&id, "cut");
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(1000).unwrap();
    server.restart();
    let want = format!(
        "verified file files/{}/cut of client {} is 1000 bytes on disk but 4000",
        id_hex(&id),
        id_hex(&id)
    );
    server.wait_for_log(&want, Duration::from_secs(5));
    server.wait_for_log("1 verified file(s) differ in size", Duration::from_secs(5));
    assert_eq!(std::fs::metadata(&cut).unwrap().len(), 1000, "left in place");
    assert_eq!(row(&server.db_path(), &id, "cut").unwrap().0, 1);
    assert!(!server.log_text().contains(&format!("files/{}/whole of client", id_hex(&id))));
}

/// A crash in the middle of a large upload's direct writes (at the writer
/// thread's first chunk past 8 MiB, src/worker/sink.rs) loses nothing
/// acknowledged: the file stored before is whole and verified, the
/// unfinished upload's temp file is removed at the next start and leaves no
/// row, and the upload sent again is stored whole.
#[test]
fn a_crash_during_a_large_uploads_direct_writes_loses_nothing_acknowledged() {
    let (mut server, faults, id, before) = with_one_file("direct", "before");
    let big = pseudo_random(12 << 20, 2);
    let mut c = restart_with(&mut server, &faults, "crash@direct-write", (id, "direct"));
    let r = c.upload_bytes("big", &big, &UploadOptions::default());
    assert!(r.as_ref().is_err_and(|e| e.is_network()), "the upload went through: {r:?}");
    assert_eq!(server.wait(Duration::from_secs(10)).code(), Some(86), "not the injected crash");
    let tmp = server.data_dir().join("tmp");
    let parts: Vec<u64> = walk_files(&tmp).iter().map(|p| std::fs::metadata(p).unwrap().len()).collect();
    assert!(matches!(parts[..], [n] if n >= 8 << 20), "the crash was not past 8 MiB: temp files {parts:?}");
    *faults.lock().unwrap() = String::new();
    server.restart();
    server.wait_for_log("removed 1 unfinished upload", Duration::from_secs(5));
    assert!(walk_files(&tmp).is_empty(), "temp file left");
    assert_verified(&server, &id, "before", &before, "after the crash");
    assert!(!server.stored_path(&id, "big").exists());
    assert!(row(&server.db_path(), &id, "big").is_none(), "a row for the unfinished upload");
    let mut c = server.connect();
    c.reconnect(id, "direct", test_key()).unwrap();
    upload_confirm(&mut c, "big", &big);
    assert_verified(&server, &id, "big", &big, "sent again");
}

/// `backupd ARGS` (admin commands), with `--data-dir data --db db` added.
fn admin_on(data: &Path, db: &Path, args: &[&str]) -> AdminRun {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([OsStr::new("--data-dir"), data.as_os_str(), OsStr::new("--db"), db.as_os_str()]);
    run_admin(&all, &[], Duration::from_secs(60))
}

/// A server started with exactly `--data-dir data --db db` (and a free port).
fn raw_server_db(cwd: &Path, data: &Path, db: &Path) -> RawServer {
    raw_server_with(cwd, data, &[OsStr::new("--db"), db.as_os_str()])
}

/// A server whose database is outside its data directory (in the temp dir
/// returned, as `live.db`), with one client that stored `name` (`content`).
fn server_with_outside_db(
    client: &str,
    name: &str,
    content: &[u8],
) -> (tempfile::TempDir, PathBuf, TestServer, ClientId) {
    let dbs = tempfile::tempdir().unwrap();
    let db = dbs.path().join("live.db");
    let server = TestServer::start(&["--db", db.to_str().unwrap()]);
    let (mut c, id) = server.registered_client(client);
    upload_confirm(&mut c, name, content);
    (dbs, db, server, id)
}

/// The server must refuse at once, exit 1, saying all of `needles`.
fn assert_refused(mut s: RawServer, needles: &[&str]) -> String {
    let status = s.wait_exit(Duration::from_secs(20)).expect("must refuse at once");
    let log = s.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    for n in needles {
        assert!(log.contains(n), "expected {n:?} in:\n{log}");
    }
    log
}

/// What the data directory's lock file holds is rewritten by every start:
/// the rest of the tree is compared.
fn tree_but_lock(dir: &Path) -> BTreeMap<PathBuf, (u32, Option<Vec<u8>>)> {
    let mut t = tree(dir);
    t.remove(&dir.join("backupd.lock"));
    t
}

#[test]
fn a_database_outside_the_data_directory_is_locked_while_the_server_runs() {
    let (_dbs, db, server, id) = server_with_outside_db("alice", "a", b"kept verified");
    // A second server with another data directory and the same database.
    let other = server.temp_dir().join("other-data");
    let second = raw_server_db(server.temp_dir(), &other, &db);
    let in_use = format!("database {} is in use by process {}", db.display(), server.pid());
    assert_refused(second, &[&in_use]);
    // A writing admin command, the same way.
    let empty = server.temp_dir().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for cmd in [&["reset-key", "alice"][..], &["remove-client", "alice"][..]] {
        let r = admin_on(&empty, &db, cmd);
        assert_eq!(r.code, 1, "{r:?}");
        assert!(r.stderr.contains(&in_use) && r.stderr.contains("stop the server first"), "{r:?}");
    }
    // The reading ones keep working beside it.
    let data = server.data_dir();
    for cmd in [&["clients"][..], &["files", "alice"][..], &["verify", "alice"][..]] {
        let r = admin_on(&data, &db, cmd);
        assert_eq!(r.code, 0, "{cmd:?}: {r:?}");
    }
    let out = server.temp_dir().join("restored");
    let r = admin_on(&data, &db, &["restore", "alice", "--to", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"kept verified");
    let snap = server.temp_dir().join("snap");
    let r = admin_on(&data, &db, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    // And the server kept its rows and its client.
    assert_verified_in(&server, &db, &id, "a", b"kept verified", "beside the refused ones");
    let mut c = server.connect();
    c.reconnect(id, "alice", test_key()).unwrap();
    upload_confirm(&mut c, "a2", b"and it takes more");
}

#[test]
fn a_database_serves_only_the_data_directory_it_records() {
    let (_dbs, db, mut server, id) = server_with_outside_db("alice", "a", b"kept verified");
    assert!(server.stop().success());
    let canonical = std::fs::canonicalize(server.data_dir()).unwrap();
    let owner = canonical.to_str().unwrap();
    // A server with another data directory and this database.
    let other = server.temp_dir().join("other-data");
    let wrong = raw_server_db(server.temp_dir(), &other, &db);
    assert_refused(wrong, &[&db.display().to_string(), owner, &other.display().to_string(), "--data-dir"]);
    // A writing command with another data directory (here an empty folder).
    let empty = server.temp_dir().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = admin_on(&empty, &db, &["reset-key", "alice"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains(owner) && r.stderr.contains(&empty.display().to_string()), "{r:?}");
    // A reader beside another marked data directory too (one without a
    // marker may be a lost disk, read from the bucket).
    assert!(other.join("backupd.layout").is_file());
    let r = admin_on(&other, &db, &["clients"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains(owner), "{r:?}");
    // Nothing was marked unverified, nothing moved: the right start serves it.
    assert_eq!(db_verified(&db, &id, "a"), Some(1));
    server.restart();
    let orphans = server.data_dir().join("orphans");
    assert!(!orphans.exists() || walk_files(&orphans).is_empty());
    assert_verified_in(&server, &db, &id, "a", b"kept verified", "after the refused starts");
}

#[test]
fn a_data_directory_with_stored_files_and_no_database_is_refused_untouched() {
    let (_dbs, db, mut server, id) = server_with_outside_db("bob", "b", b"stored once");
    assert!(server.stop().success());
    let data = server.data_dir();
    let before = tree_but_lock(&data);
    // Started by hand without the --db the server runs with.
    let s = raw_server(server.temp_dir(), &data);
    let missing = data.join("backupd.db");
    assert_refused(
        s,
        &[&format!("no database at {}", missing.display()), "--db", "move the data directory away"],
    );
    assert_eq!(tree_but_lock(&data), before, "the data directory was changed");
    assert!(!missing.exists());
    // With the right --db, everything is where it was.
    server.restart();
    assert_eq!(db_verified(&db, &id, "b"), Some(1));
    assert_verified_in(&server, &db, &id, "b", b"stored once", "after the refused start");
}

/// A database file of 0 bytes (a failed copy, a full disk, `> backupd.db`)
/// is no database: SQLite would take it as a new one and start-up would
/// send every stored file to orphans/. Refused like a missing one.
#[test]
fn an_empty_database_file_beside_stored_files_is_refused_untouched() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("dora");
    upload_confirm(&mut c, "d", b"stored before the copy failed");
    drop(c);
    assert!(server.stop().success());
    let data = server.data_dir();
    let db = server.db_path();
    let saved = std::fs::read(&db).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::write(&db, b"").unwrap();
    let before = tree_but_lock(&data);
    let s = raw_server(server.temp_dir(), &data);
    assert_refused(s, &[&format!("the database {} is empty (0 bytes)", db.display()), "--db"]);
    assert_eq!(tree_but_lock(&data), before, "the data directory was changed");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
    // The database put back: everything is where it was.
    std::fs::write(&db, saved).unwrap();
    server.restart();
    assert_verified(&server, &id, "d", b"stored before the copy failed", "after the refused start");
}

/// The marker rewritten by hand without its id (or copied from another data
/// directory): the database still records this very folder, so the message
/// says the marker is what changed and how to put its id back; done as it
/// says, the server starts and serves what it stored.
#[test]
fn a_rewritten_marker_is_named_as_such_and_its_id_can_be_put_back() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("erin");
    upload_confirm(&mut c, "e", b"before the marker was lost");
    drop(c);
    assert!(server.stop().success());
    let data = server.data_dir();
    let marker = data.join("backupd.layout");
    let original = std::fs::read_to_string(&marker).unwrap();
    let dir_id = original.lines().nth(1).and_then(|l| l.strip_prefix("id ")).unwrap().to_string();
    // Without an id the start gives the marker a new one first (as for a
    // directory marked by hand before ids), then finds it is not the one
    // the database records.
    for rewritten in [
        "backupd data directory, layout 1\n",
        "backupd data directory, layout 1\nid 0123456789abcdef0123456789abcdef\n",
    ] {
        std::fs::write(&marker, rewritten).unwrap();
        let log = assert_refused(
            raw_server(server.temp_dir(), &data),
            &["but its marker", "the marker was rewritten", &format!("`id {dir_id}`")],
        );
        assert!(!log.contains(&format!("start with --data-dir {}", data.display())), "{log}");
    }
    // As the message says.
    std::fs::write(&marker, format!("backupd data directory, layout 1\nid {dir_id}\n")).unwrap();
    server.restart();
    assert_verified(&server, &id, "e", b"before the marker was lost", "after the marker was put back");
}

#[test]
fn a_database_of_an_earlier_version_is_adopted_by_the_data_directory_it_is_first_opened_with() {
    let mut server = TestServer::start(&[]);
    let (mut c, id) = server.registered_client("carol");
    upload_confirm(&mut c, "c", b"from before");
    drop(c);
    assert!(server.stop().success());
    // As an earlier backupd left them: no id in the marker, no settings table.
    let marker = server.data_dir().join("backupd.layout");
    std::fs::write(&marker, "backupd data directory, layout 1\n").unwrap();
    let conn = rusqlite::Connection::open(server.db_path()).unwrap();
    conn.execute_batch("DROP TABLE settings").unwrap();
    drop(conn);
    server.restart();
    assert_verified(&server, &id, "c", b"from before", "adopted");
    let text = std::fs::read_to_string(&marker).unwrap();
    let id_line =
        text.lines().nth(1).and_then(|l| l.strip_prefix("id ")).expect("an id in the marker").to_string();
    let conn =
        rusqlite::Connection::open_with_flags(server.db_path(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let recorded: String =
        conn.query_row("SELECT Value FROM settings WHERE Key='data_dir_id'", [], |r| r.get(0)).unwrap();
    assert_eq!(recorded, id_line);
    drop(conn);
    assert!(server.stop().success());
    // From now on it is that directory's: another one is refused.
    let other = server.temp_dir().join("other-data");
    let s = raw_server_db(server.temp_dir(), &other, &server.db_path());
    assert_refused(s, &["belongs to the data directory"]);
}

/// A data directory that belongs to another user (typically after a run as
/// root): the start is refused, exit 1, and the message says what to do.
#[test]
fn a_data_directory_of_another_user_is_refused_with_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if unsafe { libc::geteuid() } != 0 {
        println!("not root: cannot start the server as another user; skipped");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = std::process::Command::new(server_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(&data);
    // SAFETY: setgid/setuid are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied") && err.contains("runs as uid 65534") && err.contains("chown -R"),
        "{err}"
    );
}

/// A data directory is made when it is missing, but not its parents: a
/// mistyped path (`/var/lib/bakcupd/data`) is refused, nothing created,
/// rather than made into a new, empty store.
#[test]
fn a_data_directory_in_a_missing_folder_is_refused_not_made() {
    let temp = tempfile::tempdir().unwrap();
    let typo = temp.path().join("bakcupd").join("data");
    let out = refused_start(&typo, &[]);
    assert!(out.stderr.contains("its parent folder does not exist"), "{out:?}");
    assert!(!temp.path().join("bakcupd").exists(), "nothing is created");
}

/// A data directory that is a link to a folder that is gone (a disk not
/// mounted): the server and the admin commands say so, and nothing is made
/// at the link's target.
#[test]
fn a_data_directory_link_to_nowhere_is_named_as_such() {
    let temp = tempfile::tempdir().unwrap();
    let target = temp.path().join("mnt").join("sd").join("backupd");
    let link = temp.path().join("data");
    symlink(&target, &link).unwrap();
    let out = refused_start(&link, &[]);
    assert!(out.stderr.contains("is a symbolic link to") && out.stderr.contains("does not exist"), "{out:?}");
    let verify = [OsStr::new("verify"), OsStr::new("--data-dir"), link.as_os_str()];
    let out = run_admin(&verify, &[], Duration::from_secs(20));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("is a symbolic link to"), "{out:?}");
    assert!(!temp.path().join("mnt").exists(), "nothing is created");
}

/// The database's lock file (`<db>.lock`, beside a database kept outside
/// the data directory) replaced by a link: the start is refused, the link's
/// target neither written nor truncated.
#[test]
fn a_database_lock_file_that_is_a_link_is_never_written_through() {
    let temp = tempfile::tempdir().unwrap();
    let dbdir = temp.path().join("db");
    std::fs::create_dir(&dbdir).unwrap();
    let victim = temp.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    symlink(&victim, dbdir.join("backupd.db.lock")).unwrap();
    let data = temp.path().join("data");
    let db = dbdir.join("backupd.db");
    let out = refused_start(&data, &[OsStr::new("--db"), db.as_os_str()]);
    assert!(out.stderr.contains("backupd.db.lock is a symbolic link"), "{out:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
}

/// The data directory moved or removed while the server runs, or its lock
/// files deleted (as "stale", so that a second server could start beside
/// it): the server notices within seconds, logs one error line naming what
/// changed, stops as on SIGTERM and exits 1, instead of acknowledging
/// uploads into a folder nobody will find or sharing it with another server.
#[test]
fn a_data_directory_removed_or_unlocked_while_serving_stops_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["moved", "unlocked"] {
        let data = tmp.path().join(format!("data-{case}"));
        let mut s = raw_server(tmp.path(), &data);
        assert!(
            wait_until(Duration::from_secs(20), || s.log_text().contains("listening on")),
            "{}",
            s.log_text()
        );
        assert!(
            s.wait_exit(Duration::from_secs(3)).is_none(),
            "stopped with nothing changed:\n{}",
            s.log_text()
        );
        let what = if case == "moved" {
            std::fs::rename(&data, tmp.path().join("elsewhere")).unwrap();
            format!("{} was removed while the server ran: stopping", data.display())
        } else {
            std::fs::remove_file(data.join("backupd.lock")).unwrap();
            std::fs::remove_file(data.join("backupd.db.lock")).unwrap();
            format!("{} was removed while the server ran: stopping", data.join("backupd.lock").display())
        };
        let status = s.wait_exit(Duration::from_secs(20)).expect("the server must stop");
        let log = s.log_text();
        assert_eq!(status.code(), Some(1), "{case}: {log}");
        assert!(log.contains(&what), "{case}: {log}");
        assert!(!log.contains("shut down cleanly"), "{case}: {log}");
    }
}
