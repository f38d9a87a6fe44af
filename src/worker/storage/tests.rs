//! Storage tests: publish and undo, nested names, links, tmp/ and orphans.

use super::*;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

fn open() -> (tempfile::TempDir, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(&dir.path().join("data")).unwrap();
    (dir, s)
}

/// Stage `content` as upload `upload` and publish it as `name` (no commit).
fn publish(s: &Storage, id: &ClientId, name: &str, upload: u64, content: &[u8]) -> io::Result<Publish> {
    use std::io::Write;
    s.temp_files(UNNAMED_MAX)?.create(upload)?.write_all(content)?;
    install(s, id, name, upload, None)
}

fn install(
    s: &Storage,
    id: &ClientId,
    name: &str,
    upload: u64,
    unnamed: Option<&File>,
) -> io::Result<Publish> {
    let mut dirty = Dirty::default();
    let (p, folder) = s.plan_publish(id, name, upload)?;
    s.save_previous(&p, name, &mut dirty)?;
    s.install(upload, unnamed, &p, folder.as_ref(), name, &mut dirty)?;
    Ok(p)
}

/// [`publish`] through a temp file without a name.
fn publish_unnamed(
    s: &Storage,
    id: &ClientId,
    name: &str,
    upload: u64,
    content: &[u8],
) -> io::Result<Publish> {
    use std::io::Write;
    let (mut f, _slot) = s.temp_files(UNNAMED_MAX)?.create_unnamed().ok_or(io::ErrorKind::Unsupported)?;
    f.write_all(content)?;
    install(s, id, name, upload, Some(&f))
}

#[test]
fn at_most_unnamed_max_temp_files_without_a_name_live_at_once() {
    let (_t, s) = open();
    let temps = s.temp_files(UNNAMED_MAX).unwrap();
    let mut held: Vec<_> = (0..UNNAMED_MAX).map(|_| temps.create_unnamed().unwrap()).collect();
    assert!(temps.create_unnamed().is_none());
    held.pop();
    let again = temps.create_unnamed().unwrap();
    assert!(temps.create_unnamed().is_none());
    drop((held, again));
    assert!(temps.create_unnamed().is_some());
    // None of them left anything behind.
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
}

fn stored(s: &Storage, id: &ClientId, name: &str) -> PathBuf {
    s.root().join(Storage::relative_path(id, name))
}

/// Named temp files and temp files without a name (a replacement of those
/// is linked into tmp/ under its name, then renamed) alike.
#[test]
fn publish_and_undo_keep_the_previous_version() {
    type Publisher = fn(&Storage, &ClientId, &str, u64, &[u8]) -> io::Result<Publish>;
    for (publish_as, id) in [(publish as Publisher, [0xab; 16]), (publish_unnamed as Publisher, [0xcd; 16])] {
        let (_t, s) = open();
        let p1 = publish_as(&s, &id, "f", 1, b"one").unwrap();
        assert_eq!(p1.saved_previous, None);
        let p2 = publish_as(&s, &id, "f", 2, b"two").unwrap();
        assert_eq!(fs::read(stored(&s, &id, "f")).unwrap(), b"two");
        assert_eq!(s.versions(&id, "f"), vec![2]);
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0, "nothing left in tmp/");
        s.undo(&p2).unwrap();
        s.undo(&p2).unwrap(); // idempotent
        assert_eq!(fs::read(stored(&s, &id, "f")).unwrap(), b"one");
        assert!(s.versions(&id, "f").is_empty());
        s.undo(&p1).unwrap();
        assert!(!stored(&s, &id, "f").exists());
    }
    let (_t, s) = open();
    let id = [0xab; 16];
    // Undo after the link but before the rename leaves the current file alone.
    publish(&s, &id, "f", 3, b"three").unwrap();
    let (p, _) = s.plan_publish(&id, "f", 4).unwrap();
    s.save_previous(&p, "f", &mut Dirty::default()).unwrap();
    s.undo(&p).unwrap();
    assert_eq!(fs::read(stored(&s, &id, "f")).unwrap(), b"three");
    assert!(s.versions(&id, "f").is_empty(), "the extra link is removed");
}

#[test]
fn undo_with_keep_versions_0_restores_the_verified_file() {
    // With --keep-versions 0 a publish over a verified file must still be
    // undoable (failed commit, or a crash before it): the previous file is
    // linked for the duration of the publish and pruned only after commit.
    let (_t, s) = open();
    let id = [0xcd; 16];
    publish(&s, &id, "f", 1, b"verified").unwrap();
    let p2 = publish(&s, &id, "f", 2, b"unconfirmed").unwrap();
    s.undo(&p2).unwrap();
    assert_eq!(fs::read(stored(&s, &id, "f")).unwrap(), b"verified");
    // After a successful commit, pruning to 0 leaves no version behind.
    publish(&s, &id, "f", 3, b"second").unwrap();
    s.prune_versions(&id, "f", 0, &mut Usage::default()).unwrap();
    assert!(s.versions(&id, "f").is_empty());
    assert!(!s.root().join("versions").join(id_hex(&id)).join("f").exists());
    assert_eq!(fs::read(stored(&s, &id, "f")).unwrap(), b"second");
}

#[test]
fn nested_names_are_stored_nested_and_versioned() {
    let (_t, s) = open();
    let id = [0x11; 16];
    let name = "docs/2026/report.pdf";
    publish(&s, &id, name, 1, b"v1").unwrap();
    let p = publish(&s, &id, name, 2, b"v2").unwrap();
    let hex = id_hex(&id);
    assert_eq!(p.target, format!("files/{hex}/docs/2026/report.pdf"));
    assert_eq!(p.saved_previous, Some(format!("versions/{hex}/docs/2026/report.pdf/2")));
    assert_eq!(fs::read(stored(&s, &id, name)).unwrap(), b"v2");
    assert_eq!(fs::read(s.root().join(p.saved_previous.as_ref().unwrap())).unwrap(), b"v1");
    // A file and a folder below a name that once was a file: told apart by kind.
    publish(&s, &id, "docs/2026/report.pdf.d", 3, b"x").unwrap();
    assert_eq!(s.versions(&id, name), vec![2]);
    for d in ["files", "versions"] {
        let mode = fs::metadata(s.root().join(d).join(&hex).join("docs/2026")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{d}");
    }
    let mut freed = Usage::default();
    s.prune_versions(&id, name, 0, &mut freed).unwrap();
    assert_eq!(freed, Usage { bytes: 2, files: 1 }, "version 2 (\"v1\") is gone");
    assert!(!s.root().join("versions").join(&hex).exists(), "empty version folders are removed");
    // A component that is a file where a folder is needed, and the reverse: that file fails.
    let e = publish(&s, &id, "docs/2026/report.pdf/inner", 4, b"y").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{e}");
    assert!(publish(&s, &id, "docs/2026", 5, b"z").is_err());
    assert_eq!(fs::read(stored(&s, &id, name)).unwrap(), b"v2");
    assert!(fs::metadata(stored(&s, &id, "docs/2026")).unwrap().is_dir());
    // Bad paths never reach the disk.
    for bad in ["a//b", "../x", "a/../../x", "/abs", "a/."] {
        assert!(s.plan_publish(&id, bad, 6).is_err(), "{bad}");
    }
}

#[test]
fn nothing_is_written_or_removed_through_a_link() {
    let (t, s) = open();
    let id = [0x22; 16];
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("f"), b"not yours").unwrap();
    let hex = id_hex(&id);
    symlink(&outside, s.root().join("files").join(&hex)).unwrap();
    assert_eq!(publish(&s, &id, "f", 1, b"evil").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
    assert_eq!(publish(&s, &id, "new", 2, b"evil").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
    let p = Publish { target: format!("files/{hex}/f"), saved_previous: None };
    assert!(s.undo(&p).is_err());
    assert_eq!(fs::read(outside.join("f")).unwrap(), b"not yours");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    // A link where the file itself is expected.
    fs::remove_file(s.root().join("files").join(&hex)).unwrap();
    fs::create_dir(s.root().join("files").join(&hex)).unwrap();
    symlink(outside.join("f"), stored(&s, &id, "f")).unwrap();
    assert!(publish(&s, &id, "f", 3, b"evil").is_err());
    assert!(s.undo(&Publish { target: format!("files/{hex}/f"), saved_previous: None }).is_err());
    assert_eq!(fs::read(outside.join("f")).unwrap(), b"not yours");
    // Startup moves the link itself aside.
    let moved = s.scan_files(|_, _| true).unwrap();
    assert_eq!(moved, 1);
    assert!(fs::symlink_metadata(stored(&s, &id, "f")).is_err());
    assert_eq!(fs::read(outside.join("f")).unwrap(), b"not yours");
    let orphans: Vec<_> =
        fs::read_dir(s.root().join("orphans")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(orphans.len(), 1);
    assert!(fs::symlink_metadata(&orphans[0]).unwrap().file_type().is_symlink());
}

#[test]
fn tmp_cleanup_removes_only_our_temp_files() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("7.part"), b"keep").unwrap();
    // tmp/ itself a link: moved aside at open, its target untouched.
    fs::create_dir(&data).unwrap();
    symlink(&outside, data.join("tmp")).unwrap();
    let s = Storage::open(&data).unwrap();
    assert!(fs::symlink_metadata(data.join("tmp")).unwrap().is_dir());
    assert_eq!(s.clear_tmp().unwrap(), (0, 0));
    assert_eq!(fs::read(outside.join("7.part")).unwrap(), b"keep");
    // Inside tmp/: ours removed, anything else moved to orphans/.
    fs::write(data.join("tmp/12.part"), b"x").unwrap();
    fs::write(data.join("tmp/notes.txt"), b"x").unwrap();
    fs::create_dir(data.join("tmp/9.part")).unwrap();
    symlink(outside.join("7.part"), data.join("tmp/8.part")).unwrap();
    assert_eq!(s.clear_tmp().unwrap(), (1, 3));
    assert_eq!(fs::read_dir(data.join("tmp")).unwrap().count(), 0);
    assert_eq!(fs::read(outside.join("7.part")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(data.join("orphans")).unwrap().count(), 4);
}

/// Reconciliation moves files without a verified row to orphans/ under a
/// flattened name cut to 200 bytes; a client's UTF-8 file name must not
/// make that cut panic (the server could then never start).
#[test]
fn orphan_names_are_cut_on_a_character_boundary() {
    let (_t, s) = open();
    let id = [0x5a; 16];
    let name = "é".repeat(125); // 250 bytes: byte 200 of "<hex>_<name>" falls inside an 'é'
    assert!(validate_file_name(name.as_bytes()).is_ok());
    publish(&s, &id, &name, 1, b"x").unwrap();
    publish(&s, &id, "a/b/kept", 2, b"k").unwrap();
    let mut seen = Vec::new();
    let moved = s
        .scan_files(|p, size| {
            seen.push((p.to_string(), size));
            p.ends_with("kept")
        })
        .unwrap();
    assert_eq!(moved, 1);
    seen.sort();
    assert_eq!(seen[0], (Storage::relative_path(&id, "a/b/kept"), 1));
    assert!(!stored(&s, &id, &name).exists());
    let o: Vec<_> = fs::read_dir(s.root().join("orphans")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(fs::read(&o[0]).unwrap(), b"x");
}

/// A version's name is its number as `relative_version_path` writes it;
/// anything a number parser would also read (`0123`, `+5`) is a stray.
#[test]
fn only_numbers_written_as_the_server_writes_them_name_versions() {
    let max = u64::MAX.to_string();
    let names = [
        ("0", Some(0)),
        ("1796107377410885845", Some(1796107377410885845)),
        (max.as_str(), Some(u64::MAX)),
        ("0123", None),
        ("00", None),
        ("+5", None),
        ("-1", None),
        ("5 ", None),
        ("", None),
        ("18446744073709551616", None),
        ("notes", None),
    ];
    for (name, n) in names {
        assert_eq!(version_number(OsStr::new(name)), n, "{name:?}");
    }
}
