//! `backupd snapshot DIR`: a consistent image of the store while the server
//! runs. The database is copied with SQLite's online backup API (one read
//! transaction), then files/ and versions/ are mirrored into DIR as hard
//! links (no data is copied; stored files are never modified in place, only
//! replaced by rename, so the links keep the content they had).
//!
//! Consistency: the copy is kept only if no write was committed to the
//! database between the start of the backup and the last link
//! (`PRAGMA data_version`); otherwise it is made again. A publish caught
//! half way is then in the copy exactly as after a crash at that moment:
//! its intent row is in the database and the next start on DIR undoes it.
//! DIR is a data directory: `backupd --data-dir DIR` serves it,
//! `backupd verify --data-dir DIR` checks it.

use std::fs;
use std::io;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::Connection;

use super::store::{Store, StoreArgs};
use crate::worker::storage::create_private_dir;

/// Write a consistent copy of the database and hard links of the stored files into DIR.
#[derive(clap::Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Directory to create (or an empty one), on the data directory's filesystem
    pub dir: std::path::PathBuf,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Attempts before giving up on a database that keeps changing.
const ATTEMPTS: usize = 5;

fn data_version(store: &Store) -> Result<i64, String> {
    store.conn.query_row("PRAGMA data_version", [], |r| r.get(0)).map_err(|e| store.err(e))
}

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

/// Mirror `from` into `to` with hard links; returns (files, bytes).
fn link_tree(from: &Path, to: &Path) -> io::Result<(u64, u64)> {
    create_private_dir(to)?;
    let rd = match fs::read_dir(from) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut files, mut bytes) = (0, 0);
    for e in rd {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            let (f, b) = link_tree(&src, &dst)?;
            files += f;
            bytes += b;
            continue;
        }
        match fs::hard_link(&src, &dst) {
            Ok(()) => {
                files += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
            // Pruned or moved since it was listed: the version check decides.
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
        }
    }
    Ok((files, bytes))
}

/// DIR must be new or empty, and outside the data directory.
fn prepare(dir: &Path, root: &Path) -> Result<(), String> {
    match fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(format!("{} is not empty", dir.display()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_private_dir(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?
        }
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    let (d, r) = (fs::canonicalize(dir), fs::canonicalize(root));
    if let (Ok(d), Ok(r)) = (d, r) {
        if d.starts_with(&r) {
            return Err(format!("{} is inside the data directory", dir.display()));
        }
    }
    Ok(())
}

pub fn snapshot(args: &SnapshotArgs) -> Result<ExitCode, String> {
    let store = Store::open_read_only(&args.store)?;
    let root = store.root().to_path_buf();
    prepare(&args.dir, &root)?;
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
        let before = data_version(&store)?;
        backup_db(&store, &part)?;
        let mut linked = (0, 0);
        for sub in ["files", "versions"] {
            let (f, b) = link_tree(&root.join(sub), &args.dir.join(sub)).map_err(|e| e.to_string())?;
            linked = (linked.0 + f, linked.1 + b);
        }
        if data_version(&store)? == before {
            let db = args.dir.join("backupd.db");
            fs::rename(&part, &db).map_err(|e| format!("cannot rename to {}: {e}", db.display()))?;
            println!(
                "snapshot in {}: database and {} stored file(s) ({} bytes) as hard links",
                args.dir.display(),
                linked.0,
                linked.1
            );
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("backupd: snapshot: the database changed during attempt {attempt}; again");
    }
    Err(format!(
        "the database kept changing during {ATTEMPTS} attempts; try again when the server is less busy"
    ))
}
