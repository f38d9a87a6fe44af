//! `backupd snapshot DIR`: a consistent image of the store while the server
//! runs. files/ and versions/ are mirrored into DIR as hard links (no data is
//! copied; stored files are never modified in place, only replaced by
//! rename, so the links keep the content they had), then the database is
//! copied with SQLite's online backup API (one read transaction).
//!
//! Consistency, file by file, against the copied database:
//! - a file still the same inode in the store as the one linked was not
//!   replaced between its link and the copy of the database: its row and
//!   its content agree, or its publish was in progress, and then its intent
//!   row (committed before the rename) is in the copy and is undone in DIR
//!   here, as the server undoes one after a crash;
//! - a file replaced since it was linked is checked by cksum against its
//!   row: the linked copy, the store's current file or one of its kept
//!   versions (a publish keeps the content it replaces there, so a file
//!   replaced again after the copy of the database is still found) must be
//!   the one the row describes, or the snapshot is made again (at most five
//!   times);
//! - a file linked without a verified row in the copy (a publish that had
//!   not committed) is left out, as the server would move it out of files/.
//!
//! DIR is a data directory: `backupd --data-dir DIR` serves it,
//! `backupd verify --data-dir DIR` checks it. It is checked (new or empty,
//! outside the data directory, on its filesystem) before anything is made,
//! and a snapshot that fails after that removes what it made.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::Connection;

use super::output::shown;
use super::store::{cksum_file, refuse_inside_data_dir, resolved, walk, FileInfo, Store, StoreArgs};
use crate::datadir::{self, DirLock};
use crate::worker::db::{set_owner, Owner};
use crate::worker::storage::{Publish, Storage};

/// Write a consistent copy of the database and hard links of the stored files into DIR.
#[derive(clap::Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Directory to create (or an empty one), on the data directory's filesystem
    pub dir: std::path::PathBuf,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Attempts before giving up on files that keep changing.
const ATTEMPTS: usize = 5;

/// Copy the database into `dest` (one step: one read transaction).
fn backup_db(store: &Store, dest: &Path) -> Result<(), String> {
    let err = |e: rusqlite::Error| format!("backup to {}: {e}", dest.display());
    let mut dst = Connection::open(dest).map_err(err)?;
    {
        let b = Backup::new(&store.conn, &mut dst).map_err(err)?;
        let mut waits = 0;
        loop {
            match b.step(-1).map_err(err)? {
                StepResult::Done => break,
                StepResult::More => {}
                _ if waits < 200 => {
                    waits += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => return Err(format!("backup to {}: the database stayed busy", dest.display())),
            }
        }
    }
    dst.close().map_err(|(_, e)| err(e))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set permissions of {}: {e}", dest.display()))
}

/// Create a folder (and its parents) of the snapshot, mode 0700.
fn private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// Mirror `from` into `to` with hard links.
fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    private_dir(to)?;
    let rd = match fs::read_dir(from) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let t = e.file_type()?;
        if t.is_dir() {
            link_tree(&src, &dst)?;
            continue;
        }
        // A link, FIFO or device is no stored copy (the server follows none
        // and `verify` reports it): not carried into the snapshot.
        if !t.is_file() {
            eprintln!("backupd: snapshot: {} is not a regular file; left out", src.display());
            continue;
        }
        match fs::hard_link(&src, &dst) {
            // Pruned or replaced since it was listed: `settle` decides.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} is on another filesystem than the data directory (a snapshot is hard links)",
                        to.display()
                    ),
                ))
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot link {}: {e}", src.display()))),
            Ok(()) => {}
        }
    }
    Ok(())
}

/// Every refusal, before anything is created: DIR must be new or empty,
/// outside the data directory, and on its filesystem (a snapshot is hard
/// links). For a DIR still to be made, the filesystem is its deepest
/// existing ancestor's.
fn check_target(dir: &Path, root: &Path) -> Result<(), String> {
    match fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(format!("{} is not empty", dir.display()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    refuse_inside_data_dir(dir, root)?;
    let store = fs::metadata(root.join("files")).or_else(|_| fs::metadata(root));
    let store = store.map_err(|e| format!("data directory {}: {e}", root.display()))?;
    let target = resolved(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let here = target.ancestors().find_map(|a| fs::metadata(a).ok());
    if here.is_some_and(|m| m.dev() != store.dev()) {
        return Err(format!(
            "{} is on another filesystem than the data directory (a snapshot is hard links)",
            dir.display()
        ));
    }
    Ok(())
}

/// Make DIR a data directory (created if missing, locked while the
/// snapshot is made, then marked), so that a server started on it meanwhile
/// refuses it. Returns the lock and the new data directory's id.
fn prepare(dir: &Path) -> Result<(DirLock, String), String> {
    let lock = datadir::acquire_with_parents(dir)?;
    let id = datadir::prepare(&lock)?;
    Ok((lock, id))
}

/// After a failure: remove what the snapshot made, DIR itself when it was
/// not there before (it was new or empty: everything in it is ours).
fn remove_made(dir: &Path, existed: bool) {
    let result = if existed {
        fs::read_dir(dir).and_then(|rd| {
            rd.into_iter().try_for_each(|e| {
                let e = e?;
                if e.file_type()?.is_dir() {
                    fs::remove_dir_all(e.path())
                } else {
                    fs::remove_file(e.path())
                }
            })
        })
    } else {
        fs::remove_dir_all(dir)
    };
    if let Err(e) = result {
        eprintln!("backupd: snapshot: cannot remove what was made in {}: {e}", dir.display());
    }
}

/// Does the file at `path` hold what `row` describes?
fn holds(path: &Path, row: &FileInfo) -> bool {
    let (Some(size), Some(sum)) = (row.size, row.cksum) else { return false };
    cksum_file(path).ok() == Some((size, sum))
}

fn same_inode(a: &Path, b: &Path) -> bool {
    match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Make every verified row of the copy agree with its file in DIR (see the
/// module doc). False when one cannot be made to agree: start again.
fn settle(live: &Store, snap: &Store) -> Result<bool, String> {
    let rows: Vec<FileInfo> = snap.files(None)?.into_iter().filter(|f| f.verified).collect();
    for row in &rows {
        let (copy, current) = (snap.root().join(&row.path), live.root().join(&row.path));
        // Missing from the store as well (or no regular file there): a
        // damage `verify` reports, not a race.
        let absent =
            || copy.symlink_metadata().is_err() && !current.symlink_metadata().is_ok_and(|m| m.is_file());
        if same_inode(&copy, &current) || absent() || holds(&copy, row) {
            continue;
        }
        let Some(parent) = copy.parent() else { return Ok(false) };
        private_dir(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let temp = parent.join(format!(".snapshot-{}", std::process::id()));
        let _ = fs::remove_file(&temp);
        // The current file, or (replaced again since the copy) a kept version,
        // newest first. Linked before it is checked: what is checked stays.
        let fixed = live.copies(row).iter().any(|c| {
            let _ = fs::remove_file(&temp);
            fs::hard_link(&c.path, &temp).is_ok() && holds(&temp, row)
        });
        if fixed {
            fs::rename(&temp, &copy).map_err(|e| format!("cannot rename to {}: {e}", copy.display()))?;
            continue;
        }
        let _ = fs::remove_file(&temp);
        return Ok(false);
    }
    // Publishes caught in progress: undone as at the server's start, by the
    // server's own code on the snapshot (no link followed there either).
    let storage =
        Storage::open(snap.root()).map_err(|e| format!("snapshot {}: {e}", snap.root().display()))?;
    let mut st =
        snap.conn.prepare("SELECT Target, SavedPrevious FROM publish_intents").map_err(|e| snap.err(e))?;
    let intents = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| snap.err(e))?;
    drop(st);
    for (target, previous) in intents {
        let verified = rows.iter().any(|r| r.path == target);
        if previous.is_none() && verified {
            continue;
        }
        let p = Publish { target: target.clone(), saved_previous: previous };
        storage
            .undo(&p)
            .map_err(|e| format!("cannot undo the publish of {} in the snapshot: {e}", shown(&target)))?;
    }
    snap.conn.execute("DELETE FROM publish_intents", []).map_err(|e| snap.err(e))?;
    // Files whose publish had not committed.
    let keep: HashSet<PathBuf> = rows.iter().map(|r| snap.root().join(&r.path)).collect();
    let mut linked = Vec::new();
    walk(&snap.root().join("files"), &mut linked).map_err(|e| e.to_string())?;
    for path in linked.into_iter().filter(|p| !keep.contains(p)) {
        fs::remove_file(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    }
    Ok(true)
}

pub fn snapshot(args: &SnapshotArgs) -> Result<ExitCode, String> {
    let store = Store::open_read_only(&args.store)?;
    let root = store.root().to_path_buf();
    check_target(&args.dir, &root)?;
    let existed = args.dir.symlink_metadata().is_ok();
    let made = make(args, &store, &root);
    if made.is_err() {
        remove_made(&args.dir, existed);
    }
    made
}

/// The snapshot itself, into a DIR `check_target` accepted.
fn make(args: &SnapshotArgs, store: &Store, root: &Path) -> Result<ExitCode, String> {
    let (_lock, id) = prepare(&args.dir)?;
    let part = args.dir.join("backupd.db.part");
    for attempt in 1..=ATTEMPTS {
        for sub in ["files", "versions"] {
            match fs::remove_dir_all(args.dir.join(sub)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(format!("cannot clear {}: {e}", args.dir.join(sub).display()))
                }
                _ => {}
            }
        }
        let _ = fs::remove_file(&part);
        for sub in ["files", "versions"] {
            link_tree(&root.join(sub), &args.dir.join(sub)).map_err(|e| e.to_string())?;
        }
        backup_db(store, &part)?;
        // The copy belongs to DIR, not to the data directory it came from.
        let owner = Owner {
            id: id.clone(),
            path: fs::canonicalize(&args.dir).map_err(|e| e.to_string())?.to_string_lossy().into_owned(),
        };
        Connection::open(&part)
            .and_then(|c| set_owner(&c, &owner))
            .map_err(|e| format!("{}: {e}", part.display()))?;
        let snap = Store::open_read_write(&StoreArgs { data_dir: args.dir.clone(), db: Some(part.clone()) })?;
        let settled = settle(store, &snap)?;
        drop(snap);
        if settled {
            let db = args.dir.join("backupd.db");
            fs::rename(&part, &db).map_err(|e| format!("cannot rename to {}: {e}", db.display()))?;
            let mut files = Vec::new();
            for sub in ["files", "versions"] {
                walk(&args.dir.join(sub), &mut files).map_err(|e| e.to_string())?;
            }
            let bytes: u64 = files.iter().filter_map(|p| fs::metadata(p).ok()).map(|m| m.len()).sum();
            println!(
                "snapshot in {}: database and {} stored file(s) ({bytes} bytes) as hard links",
                args.dir.display(),
                files.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("backupd: snapshot: a file changed while attempt {attempt} was made; again");
    }
    Err(format!("files kept changing during {ATTEMPTS} attempts; try again when the server is less busy"))
}
