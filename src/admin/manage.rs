//! The commands that write: `backupd remove-client` and `backupd reset-key`.
//!
//! Both take the data directory's lock first ([`crate::datadir::acquire`])
//! and refuse, exit 1, while a server (or another writing command) holds
//! it: the server keeps its clients in memory and would not see the change.

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::params;

use super::store::{ClientInfo, Store, StoreArgs};
use crate::datadir::{self, DirLock};
use crate::protocol::id_hex;
use crate::worker::storage::create_private_dir;

/// Remove a client's registration and, unless --keep-files, its files and versions.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoveClientArgs {
    /// The client: its name or its id (32 hex characters)
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
    /// The client: its name or its id (32 hex characters)
    pub client: String,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// The lock, then the database for writing, then the client.
fn open_locked(args: &StoreArgs, spec: &str) -> Result<(DirLock, Store, ClientInfo), String> {
    args.check_data_dir()?;
    let lock = datadir::acquire(&args.data_dir)
        .map_err(|e| format!("{e}; stop the server first (this command changes the data directory)"))?;
    let store = Store::open_read_write(args)?;
    let client = store.resolve(spec)?;
    Ok((lock, store, client))
}

pub fn reset_key(args: &ResetKeyArgs) -> Result<ExitCode, String> {
    let (_lock, store, client) = open_locked(&args.store, &args.client)?;
    store
        .conn
        .execute("UPDATE clients SET PublicKey=NULL WHERE ID=?1", params![&client.id[..]])
        .map_err(|e| store.err(e))?;
    println!(
        "reset the key of {} ({}): its next connection may send a new public key (1026) with this id \
         and name",
        client.name,
        id_hex(&client.id)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn remove_client(args: &RemoveClientArgs) -> Result<ExitCode, String> {
    let (_lock, mut store, client) = open_locked(&args.store, &args.client)?;
    let hex = id_hex(&client.id);
    // The rows go first: files left behind by a crash after this are found
    // without a row at the next start and moved to orphans/, never served.
    let tx = store.conn.transaction().map_err(|e| format!("database: {e}"))?;
    let files = tx
        .execute("DELETE FROM files WHERE ID=?1", params![&client.id[..]])
        .and_then(|n| tx.execute("DELETE FROM clients WHERE ID=?1", params![&client.id[..]]).map(|_| n))
        .map_err(|e| format!("database: {e}"))?;
    tx.commit().map_err(|e| format!("database: {e}"))?;
    let storage = &store.storage;
    let dirs = [storage.client_dir(&client.id), storage.versions_root().join(&hex)];
    if args.keep_files {
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let dest = storage.root().join("orphans").join(format!("removed-{hex}-{stamp}"));
        create_private_dir(&dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
        for (dir, sub) in dirs.iter().zip(["files", "versions"]) {
            move_if_present(dir, &dest.join(sub))?;
        }
        println!(
            "removed client {} ({hex}) and {files} file row(s); its files are kept in {}",
            client.name,
            dest.display()
        );
    } else {
        for dir in &dirs {
            match fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("cannot remove {}: {e}", dir.display()))
                }
                _ => {}
            }
        }
        println!("removed client {} ({hex}), its {files} file row(s), files and versions", client.name);
    }
    Ok(ExitCode::SUCCESS)
}

fn move_if_present(from: &Path, to: &Path) -> Result<(), String> {
    match fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot move {} to {}: {e}", from.display(), to.display()))
        }
        _ => Ok(()),
    }
}
