//! The admin commands' side of the S3 tier (cargo feature `s3`): reading
//! copies from the bucket where the local ones are gone (`restore`,
//! `verify`), and `backupd s3 resync`, which queues every stored file and
//! version that the bucket lacks.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::process::ExitCode;

use super::store::{Store, StoreArgs};
use crate::config::s3::S3Args;
use crate::protocol::{id_hex, ClientId};
use crate::worker::db::{Db, Write};
use crate::worker::s3::client::Bucket;
use crate::worker::storage::tier::Tier;

/// The bucket as the admin commands read it.
pub struct Remote {
    bucket: Bucket,
    /// Each client's versions in the bucket, by file name (listed once per client).
    versions: RefCell<HashMap<ClientId, HashMap<String, Vec<u64>>>>,
}

impl Remote {
    /// The bucket of these flags, None without `--s3-endpoint`.
    pub fn from_args(args: &S3Args) -> Result<Option<Remote>, String> {
        let Some(settings) = args.settings()? else { return Ok(None) };
        let bucket = Bucket::new(&settings)?;
        Ok(Some(Remote { bucket, versions: RefCell::new(HashMap::new()) }))
    }

    /// A reader of the object of a path relative to the data directory.
    pub fn open(&self, rel: &str) -> io::Result<Box<dyn io::Read>> {
        match Tier::open(&self.bucket, rel)? {
            Some(r) => Ok(r),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "not in the bucket either")),
        }
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
                    if let Ok(n) = n.parse() {
                        map.entry(name.to_string()).or_default().push(n);
                    }
                }
            }
            map
        });
        per_client.get(name).cloned().unwrap_or_default()
    }
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
                    eprintln!("backupd: s3 resync: {rel} is neither on the local disk nor in the bucket");
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
