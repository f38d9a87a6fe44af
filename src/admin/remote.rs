//! The admin commands' side of the S3 tier (cargo feature `s3`): reading
//! copies from the bucket where the local ones are gone (`restore`,
//! `verify`), and `backupd s3 resync`, which queues every stored file and
//! version that the bucket lacks.
//!
//! The bucket describes itself: each object carries its client's name, its
//! size and cksum in its metadata (see [`crate::worker::s3::client::Meta`]).
//! When the database is gone too (a lost box: no `--data-dir`, or an empty
//! one), [`open_store`] lists the bucket into a database in memory (the
//! clients, by the name in their objects' metadata, and their files), so
//! that `restore` and `verify` run as they do on a data directory, reading
//! every copy from the bucket and checking it against its metadata. The
//! data directory is then neither read nor created.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::process::ExitCode;

use rusqlite::params;

use super::output::shown;
use super::store::{Store, StoreArgs};
use crate::config::s3::S3Args;
use crate::protocol::{id_hex, parse_id_hex, ClientId};
use crate::worker::db::{Db, Write};
use crate::worker::s3::client::Bucket;
use crate::worker::storage::tier::Tier;
use crate::worker::storage::version_number;

/// The bucket as the admin commands read it.
pub struct Remote {
    bucket: Bucket,
    /// Each client's versions in the bucket, by file name (listed once per client).
    versions: RefCell<HashMap<ClientId, HashMap<String, Vec<u64>>>>,
    /// The size and cksum in the metadata of each object opened, by path
    /// relative to the data directory.
    recorded: RefCell<HashMap<String, (u64, u32)>>,
}

impl Remote {
    /// The bucket of these flags, None without `--s3-endpoint`.
    pub fn from_args(args: &S3Args) -> Result<Option<Remote>, String> {
        let Some(settings) = args.settings()? else { return Ok(None) };
        let bucket = Bucket::new(&settings)?;
        Ok(Some(Remote { bucket, versions: RefCell::default(), recorded: RefCell::default() }))
    }

    /// A reader of the object of a path relative to the data directory
    /// (streamed); its metadata is kept for [`Remote::recorded`].
    pub fn open(&self, rel: &str) -> io::Result<Box<dyn io::Read>> {
        match self.bucket.get(rel)? {
            Some((r, meta)) => {
                if let Some(m) = meta {
                    self.recorded.borrow_mut().insert(rel.to_string(), (m.size, m.cksum));
                }
                Ok(r)
            }
            None => Err(io::Error::new(io::ErrorKind::NotFound, "not in the bucket either")),
        }
    }

    /// When the object of `rel` was stored, as its metadata says (a HEAD).
    pub fn stored_secs(&self, rel: &str) -> Option<i64> {
        Some(self.bucket.head(rel).ok()??.1?.stored)
    }

    /// The size and cksum the metadata of an opened object records.
    pub fn recorded(&self, rel: &str) -> Option<(u64, u32)> {
        self.recorded.borrow().get(rel).copied()
    }

    /// The version numbers the bucket holds of a file (nothing when it cannot be listed).
    pub fn versions(&self, id: &ClientId, name: &str) -> Vec<u64> {
        let mut cache = self.versions.borrow_mut();
        let per_client = cache.entry(*id).or_insert_with(|| {
            let top = format!("versions/{}/", id_hex(id));
            let listed = self.bucket.list(&top).unwrap_or_else(|e| {
                eprintln!("backupd: cannot list the bucket's versions of client {}: {e}", id_hex(id));
                Vec::new()
            });
            let mut map: HashMap<String, Vec<u64>> = HashMap::new();
            for (rel, _) in listed {
                let Some(below) = rel.strip_prefix(&top) else { continue };
                if let Some((name, n)) = below.rsplit_once('/') {
                    if let Some(n) = version_number(std::ffi::OsStr::new(n)) {
                        map.entry(name.to_string()).or_default().push(n);
                    }
                }
            }
            map
        });
        per_client.get(name).cloned().unwrap_or_default()
    }
}

/// The store `restore` and `verify` read: the data directory's (the bucket
/// filling in the copies gone from it) or, with the S3 flags and no
/// database, the bucket's alone (see the module's doc).
pub fn open_store(store: &StoreArgs, s3: &S3Args) -> Result<Store, String> {
    let remote = Remote::from_args(s3)?;
    let db = store.db_path();
    match remote {
        Some(remote) if !super::store::db_file_exists(&db)? => {
            eprintln!("backupd: no database at {}: reading the bucket alone", db.display());
            let label = std::path::PathBuf::from(format!("(the bucket's listing of {})", s3_label(s3)));
            let conn = catalog(&remote, &label)?;
            Ok(Store::from_bucket(store.data_dir.clone(), conn, label, remote))
        }
        remote => {
            let mut st = Store::open_read_only(store)?;
            st.remote = remote;
            Ok(st)
        }
    }
}

fn s3_label(s3: &S3Args) -> String {
    let bucket = s3.s3_bucket.as_deref().unwrap_or("");
    match s3.s3_prefix.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => format!("{bucket}/{p}"),
        None => bucket.to_string(),
    }
}

/// A database in memory with the clients and files the bucket holds: a
/// client is named by the metadata of one of its objects (its id in hex
/// when they have none), a file's row has the size the listing gives.
fn catalog(remote: &Remote, label: &std::path::Path) -> Result<rusqlite::Connection, String> {
    let err = |e: rusqlite::Error| format!("{}: {e}", label.display());
    let conn = Db::in_memory().map_err(err)?;
    let listed = Tier::list(&remote.bucket, "files").map_err(|e| format!("cannot list the bucket: {e}"))?;
    let mut named: HashSet<ClientId> = HashSet::new();
    for (rel, size) in listed {
        let Some((hex, name)) = rel.strip_prefix("files/").and_then(|r| r.split_once('/')) else { continue };
        let Some(id) = parse_id_hex(hex) else { continue };
        if named.insert(id) {
            let meta =
                remote.bucket.head(&rel).map_err(|e| format!("cannot read {rel} in the bucket: {e}"))?;
            let client = meta.and_then(|(_, m)| m).map(|m| m.client).filter(|c| !c.is_empty());
            let client = client.unwrap_or_else(|| hex.to_string());
            // Names are unique: a second client with the same one goes by its id.
            let insert = "INSERT INTO clients(ID, Name) VALUES (?1, ?2)";
            if conn.execute(insert, params![&id[..], client]).is_err() {
                conn.execute(insert, params![&id[..], hex]).map_err(err)?;
            }
        }
        conn.execute(
            "INSERT OR REPLACE INTO files(ID, FileName, PathName, Verified, Size) VALUES (?1, ?2, ?3, 1, ?4)",
            params![&id[..], name, rel, i64::try_from(size).unwrap_or(i64::MAX)],
        )
        .map_err(err)?;
    }
    Ok(conn)
}

/// `backupd s3 ...`
#[derive(clap::Subcommand, Debug)]
pub enum S3Command {
    /// Queue every stored file and version that the bucket lacks (or holds
    /// with another size); prints how many. Works while the server runs: it
    /// sends them within a second
    Resync(ResyncArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct ResyncArgs {
    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub s3: S3Args,
}

pub fn run(cmd: &S3Command) -> Result<ExitCode, String> {
    match cmd {
        S3Command::Resync(a) => resync(a),
    }
}

fn resync(args: &ResyncArgs) -> Result<ExitCode, String> {
    let settings = args.s3.settings()?.ok_or("s3 resync needs --s3-endpoint (BACKUPD_S3_ENDPOINT)")?;
    let bucket = Bucket::new(&settings)?;
    let store = Store::open_read_only(&args.store)?;
    let mut in_bucket: HashMap<String, u64> = HashMap::new();
    for top in ["files", "versions"] {
        let listed = Tier::list(&bucket, top).map_err(|e| format!("cannot list the bucket: {e}"))?;
        in_bucket.extend(listed);
    }
    let queued: HashSet<String> = {
        let mut st = store.conn.prepare("SELECT Path FROM s3_queue").map_err(|e| store.err(e))?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(|e| store.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| store.err(e))?
    };
    let (mut writes, mut already, mut lost) = (Vec::new(), 0usize, 0usize);
    for f in store.files(None)?.into_iter().filter(|f| f.verified) {
        for c in store.copies(&f) {
            let Ok(rel) = c.path.strip_prefix(store.root()) else { continue };
            let rel = rel.to_string_lossy().into_owned();
            let local = std::fs::metadata(&c.path).ok().filter(|m| m.is_file()).map(|m| m.len());
            match (local, in_bucket.get(&rel)) {
                (Some(l), Some(b)) if l == *b => {}
                _ if queued.contains(&rel) => already += 1,
                (Some(_), _) => writes.push(Write::Enqueue { id: f.id, path: rel, delete: false }),
                (None, Some(_)) => {}
                (None, None) => {
                    eprintln!(
                        "backupd: s3 resync: {} is neither on the local disk nor in the bucket",
                        shown(&rel)
                    );
                    lost += 1;
                }
            }
        }
    }
    drop(store);
    if !writes.is_empty() {
        let mut db = Db::open(&args.store.db_path(), std::time::Duration::from_secs(10))
            .map_err(|e| format!("database {}: {e}", args.store.db_path().display()))?;
        db.apply(&writes).map_err(|e| format!("database {}: {e}", args.store.db_path().display()))?;
    }
    println!(
        "queued {} file(s) the bucket lacks ({already} already queued, {lost} lost: neither local nor in the bucket)",
        writes.len()
    );
    Ok(if lost > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
