//! The commands that write: `backupd remove-client` and `backupd reset-key`.
//!
//! Both take the data directory's lock first ([`crate::datadir::acquire_existing`]),
//! then the database's ([`crate::datadir::lock_database`]), and refuse, exit 1,
//! while a server (or another writing command) holds either: the server keeps
//! its clients in memory and would not see the change.

use std::ffi::OsStr;
use std::io;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::params;

use super::output::shown;
use super::store::{ClientInfo, Store, StoreArgs};
use crate::datadir::{self, DbLock, Dir, DirLock, Kind};
use crate::protocol::id_hex;
use crate::protocol::{REGISTER_AGAIN, REGISTER_AGAIN_LEGACY};

/// Remove a client's registration and, unless --keep-files, its files and versions.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoveClientArgs {
    /// The client: its id (32 hex characters) or its name; id:HEX or name:NAME to say which
    pub client: String,

    /// Keep the client's files and versions: they are moved to
    /// orphans/removed-<id>-<time>/ instead of being deleted
    #[arg(long)]
    pub keep_files: bool,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Forget a client's public key, so that its next connection can set a new one.
#[derive(clap::Args, Debug, Clone)]
pub struct ResetKeyArgs {
    /// The client: its id (32 hex characters) or its name; id:HEX or name:NAME to say which
    pub client: String,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// The data directory's lock and the database's, held while a command writes.
struct Locks {
    dir: DirLock,
    _db: DbLock,
}

/// The locks, then the database for writing, then the client.
fn open_locked(args: &StoreArgs, spec: &str) -> Result<(Locks, Store, ClientInfo), String> {
    args.check_data_dir()?;
    let in_use = |e: String| {
        if e.contains(" is in use by process ") {
            format!("{e}; stop the server first (this command changes the data directory)")
        } else {
            e
        }
    };
    let lock = datadir::acquire_existing(&args.data_dir).map_err(in_use)?;
    let db_lock = datadir::lock_database(&args.db_path()).map_err(in_use)?;
    let store = Store::open_read_write(args)?;
    let client = store.resolve(spec)?;
    Ok((Locks { dir: lock, _db: db_lock }, store, client))
}

pub fn reset_key(args: &ResetKeyArgs) -> Result<ExitCode, String> {
    let (_lock, store, client) = open_locked(&args.store, &args.client)?;
    store
        .conn
        .execute("UPDATE clients SET PublicKey=NULL WHERE ID=?1", params![&client.id[..]])
        .map_err(|e| store.err(e))?;
    println!(
        "reset the key of {} ({}): the client registers its name again (1025 is answered with the same \
         id) and sends its new key (1026) on that connection; `{REGISTER_AGAIN}` does it (`{}` in a folder \
         with transfer.info)",
        shown(&client.name),
        id_hex(&client.id),
        REGISTER_AGAIN_LEGACY
    );
    Ok(ExitCode::SUCCESS)
}

pub fn remove_client(args: &RemoveClientArgs) -> Result<ExitCode, String> {
    let (locks, mut store, client) = open_locked(&args.store, &args.client)?;
    let lock = &locks.dir;
    let hex = id_hex(&client.id);
    // The rows go first: files left behind by a crash after this are found
    // without a row at the next start and moved to orphans/, never served.
    let tx = store.conn.transaction().map_err(|e| format!("database: {e}"))?;
    let files = crate::worker::db::delete_client(&tx, &client.id).map_err(|e| format!("database: {e}"))?;
    tx.commit().map_err(|e| format!("database: {e}"))?;
    // Through the data directory's descriptors, as the server: the client's
    // entries are moved or removed themselves, never anything through a link.
    let root = lock.dir();
    let d = lock.path().display();
    let err = |what: &str, e: io::Error| format!("data directory {d}: cannot {what}: {e}");
    let mut tops = Vec::new();
    for sub in ["files", "versions"] {
        match root.open_dir(sub) {
            Ok(top) => tops.push((sub, top)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&format!("open {sub}/"), e)),
        }
    }
    if args.keep_files {
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let name = format!("removed-{hex}-{stamp}");
        let kept = format!("orphans/{name}");
        let (orphans, _) = root.ensure_dir("orphans").map_err(|e| err("create orphans/", e))?;
        let (dest, _) = orphans.ensure_dir(&name).map_err(|e| err(&format!("create {kept}"), e))?;
        for (sub, top) in &tops {
            match top.rename(&hex, &dest, sub) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(err(&format!("move {sub}/{hex} to {kept}/{sub}"), e))
                }
                _ => {}
            }
        }
        for dir in tops.iter().map(|(_, t)| t).chain([&dest, &orphans, root]) {
            dir.sync().map_err(|e| err("sync", e))?;
        }
        println!(
            "removed client {} ({hex}) and {files} file row(s); its files are kept in {}",
            shown(&client.name),
            lock.path().join(&kept).display()
        );
    } else {
        for (sub, top) in &tops {
            remove_tree(top, OsStr::new(&hex)).map_err(|e| err(&format!("remove {sub}/{hex}"), e))?;
            top.sync().map_err(|e| err("sync", e))?;
        }
        println!(
            "removed client {} ({hex}), its {files} file row(s), files and versions",
            shown(&client.name)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Remove the entry `name` of `parent` and, for a folder, everything in it:
/// a link (or anything that is not a folder) is removed itself, never what
/// it points to. Missing: nothing to do.
fn remove_tree(parent: &Dir, name: &OsStr) -> io::Result<()> {
    match parent.stat(name)? {
        None => Ok(()),
        Some(m) if m.kind == Kind::Dir => {
            let dir = parent.open_dir(name)?;
            for (entry, _) in dir.entries()? {
                remove_tree(&dir, &entry)?;
            }
            parent.remove_dir(name)
        }
        Some(_) => parent.remove_file(name),
    }
}
