//! The data directory as the admin commands see it: the database opened
//! read-only (a WAL reader beside a running server) or, under the data
//! directory's lock, for writing; clients, file rows and the stored copies
//! of each file (current and earlier versions).
//!
//! This is the one place in the admin commands that knows where a file's
//! versions are kept ([`Store::copies`], [`Store::stored_files`]): the
//! layout itself is [`Storage`]'s (its relative paths). The reading
//! commands use plain paths and never write; the writing ones go through
//! the data directory's descriptors (see [`super::manage`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags};

use super::output::shown;
use crate::protocol::{id_hex, parse_id_hex, ClientId};
pub use crate::worker::db::DamagedRow;
pub use crate::worker::db::FileRow as FileInfo;
use crate::worker::db::{blob_id, check_owner, read_file_rows, read_file_rows_lenient, Opener};
use crate::worker::storage::{version_number, Storage};

/// Where the data is: the same flags and environment variables as the server.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Directory that holds files/, versions/ and the database
    #[arg(long, env = "BACKUPD_DATA_DIR", default_value = "backupd-data")]
    pub data_dir: PathBuf,

    /// SQLite database file [default: <data-dir>/backupd.db]
    #[arg(long, env = "BACKUPD_DB")]
    pub db: Option<PathBuf>,
}

impl StoreArgs {
    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| self.data_dir.join("backupd.db"))
    }

    /// Fail, with a hint, when the data directory does not exist; with the
    /// real error (permission denied, ...) when it cannot be looked at.
    pub fn check_data_dir(&self) -> Result<(), String> {
        match fs::metadata(&self.data_dir) {
            Ok(m) if m.is_dir() => return Ok(()),
            Err(e) if !absent(&e) => return Err(format!("data directory {}: {e}", self.data_dir.display())),
            _ => {}
        }
        match crate::datadir::dangling_link(&self.data_dir) {
            Some(why) => Err(format!("data directory {why}")),
            None => Err(format!("no data directory at {} (see --data-dir)", self.data_dir.display())),
        }
    }
}

/// Whether an error looking at a path says that it does not exist (rather
/// than that it could not be looked at: permission denied, a loop, I/O).
fn absent(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// Whether the database file `db_path` is there: false only when nothing is
/// at that path (or it is no regular file); an error that says why it
/// cannot be looked at (permission denied on a folder on its way) is
/// returned as that error, with the path, never as "no database".
pub fn db_file_exists(db_path: &Path) -> Result<bool, String> {
    match fs::metadata(db_path) {
        Ok(m) => Ok(m.is_file()),
        Err(e) if absent(&e) => Ok(false),
        Err(e) => Err(format!("database {}: {e}", db_path.display())),
    }
}

/// A registered client.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub id: ClientId,
    pub name: String,
    pub has_key: bool,
    pub last_seen: Option<String>,
}

/// One stored copy of a file: the current one (`index` 0) or an earlier
/// version (`index` 1 is the newest earlier one).
#[derive(Debug, Clone)]
pub struct Copy {
    pub index: usize,
    pub path: PathBuf,
}

/// How long a reader or writer waits for a busy database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Store {
    root: PathBuf,
    pub conn: Connection,
    db_path: PathBuf,
    /// The bucket, when the S3 flags are given: read where a local copy is gone.
    #[cfg(feature = "s3")]
    pub remote: Option<super::remote::Remote>,
}

/// Is `path` on a filesystem mounted read-only?
fn read_only_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a NUL-terminated path and a pointer to a local struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) }) == 0 && st.f_flag & libc::ST_RDONLY != 0
}

/// A path as the path part of an SQLite `file:` URI (`%`, `?` and `#` escaped).
fn uri_path(path: &Path) -> String {
    path.to_string_lossy().replace('%', "%25").replace('?', "%3f").replace('#', "%23")
}

impl Store {
    /// Open for reading only: never writes, never takes the lock, works
    /// while the server runs (and on a read-only filesystem).
    pub fn open_read_only(args: &StoreArgs) -> Result<Store, String> {
        Store::open(args, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX, Opener::Reader)
    }

    /// Open for writing (the caller holds the data directory's lock and the
    /// database's).
    pub fn open_read_write(args: &StoreArgs) -> Result<Store, String> {
        Store::open(args, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX, Opener::Writer)
    }

    fn open(args: &StoreArgs, flags: OpenFlags, opener: Opener) -> Result<Store, String> {
        let db_path = args.db_path();
        args.check_data_dir()?;
        if !db_file_exists(&db_path)? {
            return Err(format!("no database at {} (see --data-dir and --db)", db_path.display()));
        }
        let err = |e: rusqlite::Error| format!("database {}: {e}", db_path.display());
        let opened = Connection::open_with_flags(&db_path, flags)
            .and_then(|c| c.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())).map(|()| c));
        let conn = match opened {
            // On a read-only filesystem (a dead box's SD card mounted ro, a
            // snapshot on read-only media) SQLite cannot make the WAL's
            // shared-memory file beside the database; nothing can write the
            // database there either, so it is read as immutable.
            Err(_) if opener == Opener::Reader && read_only_fs(&db_path) => {
                let uri = format!("file:{}?immutable=1", uri_path(&db_path));
                Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI).map_err(err)?
            }
            other => other.map_err(err)?,
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        let store = Store {
            root: args.data_dir.clone(),
            conn,
            db_path,
            #[cfg(feature = "s3")]
            remote: None,
        };
        // Fail early, with the path, on a file that is not our database.
        store.conn.query_row("SELECT count(*) FROM clients", [], |_| Ok(())).map_err(|e| store.err(e))?;
        // And one recorded for another data directory.
        let id = crate::datadir::marker_id(&args.data_dir)?;
        check_owner(&store.conn, &store.db_path, &args.data_dir, id.as_deref(), opener)?;
        Ok(store)
    }

    /// A store whose database is `conn` (filled from the bucket, with
    /// `label` for its messages) and whose data directory `root` is not read.
    #[cfg(feature = "s3")]
    pub fn from_bucket(
        root: PathBuf,
        conn: Connection,
        label: PathBuf,
        remote: super::remote::Remote,
    ) -> Store {
        Store { root, conn, db_path: label, remote: Some(remote) }
    }

    /// The size and cksum a copy read from the bucket says it has (its
    /// metadata), once it was opened; None for a local copy.
    #[cfg(feature = "s3")]
    pub fn recorded(&self, path: &Path) -> Option<(u64, u32)> {
        let rel = path.strip_prefix(&self.root).ok()?;
        self.remote.as_ref()?.recorded(&rel.to_string_lossy())
    }

    #[cfg(not(feature = "s3"))]
    pub fn recorded(&self, _path: &Path) -> Option<(u64, u32)> {
        None
    }

    /// When a copy in the bucket was stored (nanoseconds since the epoch, as
    /// its metadata records it); None without the bucket or the metadata.
    #[cfg(feature = "s3")]
    pub fn stored_nanos(&self, path: &Path) -> Option<i128> {
        let rel = path.strip_prefix(&self.root).ok()?;
        self.remote.as_ref()?.stored_secs(&rel.to_string_lossy()).map(|s| i128::from(s) * 1_000_000_000)
    }

    #[cfg(not(feature = "s3"))]
    pub fn stored_nanos(&self, _path: &Path) -> Option<i128> {
        None
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A database error with the database's path.
    pub fn err(&self, e: rusqlite::Error) -> String {
        format!("database {}: {e}", self.db_path.display())
    }

    pub fn clients(&self) -> Result<Vec<ClientInfo>, String> {
        let mut st = self
            .conn
            .prepare("SELECT ID, Name, PublicKey IS NOT NULL, LastSeen FROM clients ORDER BY Name")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?, r.get(3)?))
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, has_key, last_seen) = row.map_err(|e| self.err(e))?;
            if let Some(id) = blob_id(&id) {
                out.push(ClientInfo { id, name, has_key, last_seen });
            }
        }
        Ok(out)
    }

    /// The client named by `spec`: `id:HEX` or `name:NAME`, or without a
    /// prefix its id as 32 hex characters or its name. An id wins over a
    /// name (a client cannot take another's place by naming itself with its
    /// id); a spec that is one client's id and another's name is refused as
    /// ambiguous.
    pub fn resolve(&self, spec: &str) -> Result<ClientInfo, String> {
        let clients = self.clients()?;
        let (by_id, by_name) = match (spec.strip_prefix("id:"), spec.strip_prefix("name:")) {
            (Some(hex), _) => (parse_id_hex(hex), None),
            (_, Some(name)) => (None, Some(name)),
            _ => (parse_id_hex(spec), Some(spec)),
        };
        let id_match = clients.iter().find(|c| by_id == Some(c.id));
        let name_match = clients.iter().find(|c| by_name == Some(c.name.as_str()));
        match (id_match, name_match) {
            (Some(a), Some(b)) if a.id != b.id => Err(format!(
                "\"{}\" is the id of client \"{}\" and the name of another client ({}); \
                 say which: id:{spec} or name:{spec}",
                shown(spec),
                shown(&a.name),
                id_hex(&b.id)
            )),
            (Some(c), _) | (None, Some(c)) => Ok(c.clone()),
            (None, None) => Err(format!(
                "no client named \"{}\" (give a name, a 32-hex id, name:NAME or id:HEX; see `backupd clients`)",
                shown(spec)
            )),
        }
    }

    /// The file rows of one client, or of all, sorted by client and name.
    pub fn files(&self, client: Option<&ClientId>) -> Result<Vec<FileInfo>, String> {
        read_file_rows(&self.conn, client).map_err(|e| self.err(e))
    }

    /// [`Store::files`], with the rows that cannot be read set aside
    /// (`clients`, `files` and `verify` name them and go on with the rest).
    pub fn files_checked(
        &self,
        client: Option<&ClientId>,
    ) -> Result<(Vec<FileInfo>, Vec<DamagedRow>), String> {
        read_file_rows_lenient(&self.conn, client).map_err(|e| self.err(e))
    }

    /// What a damaged row is, for a message: its client (by name when
    /// known) and file name.
    pub fn damaged_label(
        &self,
        d: &DamagedRow,
        names: &std::collections::HashMap<ClientId, String>,
    ) -> String {
        let who = match d.id {
            Some(id) => names.get(&id).map_or_else(|| id_hex(&id), |n| format!("\"{}\"", shown(n))),
            None => "?".into(),
        };
        format!("client {who} file \"{}\"", shown(&d.name))
    }

    /// Every stored copy of a verified file: the current one first, then the
    /// earlier versions, newest first (those in the bucket too, with the S3 flags).
    pub fn copies(&self, f: &FileInfo) -> Vec<Copy> {
        let mut out = vec![Copy { index: 0, path: self.root.join(&f.path) }];
        #[allow(unused_mut)]
        let mut versions = version_numbers(&self.root.join(Storage::relative_versions_dir(&f.id, &f.name)));
        #[cfg(feature = "s3")]
        if let Some(r) = &self.remote {
            versions.extend(r.versions(&f.id, &f.name));
            versions.sort_unstable();
            versions.dedup();
        }
        for (i, n) in versions.iter().rev().enumerate() {
            out.push(Copy {
                index: i + 1,
                path: self.root.join(Storage::relative_version_path(&f.id, &f.name, *n)),
            });
        }
        out
    }

    /// Whether the current copy of a verified file is gone from files/
    /// (the server keeps its row; docs/OPERATIONS.md, "A missing file").
    /// With the S3 tier a copy gone locally is missing only while its upload
    /// to the bucket is still queued (otherwise the bucket has it).
    pub fn is_missing(&self, f: &FileInfo) -> bool {
        let gone = matches!(fs::symlink_metadata(self.root.join(&f.path)), Err(e) if e.kind() == io::ErrorKind::NotFound);
        #[cfg(feature = "s3")]
        let gone = gone && self.remote.is_none() && self.upload_queued(&f.path);
        f.verified && gone
    }

    /// Whether the S3 queue still holds the upload of a stored path.
    #[cfg(feature = "s3")]
    fn upload_queued(&self, path: &str) -> bool {
        let q = "SELECT 1 FROM s3_queue WHERE Path = ?1 AND Op = 0";
        self.conn.query_row(q, [path], |_| Ok(())).is_ok()
    }

    /// Open a stored copy for reading: the local file or, when it is gone
    /// and the S3 flags are given, its object in the bucket.
    #[cfg(not(feature = "s3"))]
    pub fn open_copy(&self, path: &Path) -> io::Result<fs::File> {
        open_stored(Some(&self.root), path)
    }

    /// Open a stored copy for reading: the local file or, when it is gone
    /// and the S3 flags are given, its object in the bucket.
    #[cfg(feature = "s3")]
    pub fn open_copy(&self, path: &Path) -> io::Result<Box<dyn io::Read>> {
        match open_stored(Some(&self.root), path) {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.remote.is_some() => {
                let rel = path.strip_prefix(&self.root).map_err(|_| e)?;
                match &self.remote {
                    Some(r) => r.open(&rel.to_string_lossy()),
                    None => Err(io::ErrorKind::NotFound.into()),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The size and cksum of a stored copy (local, or in the bucket).
    pub fn cksum_copy(&self, path: &Path) -> io::Result<(u64, u32)> {
        copy_with_cksum(&mut self.open_copy(path)?, &mut io::sink())
    }

    /// Every non-directory entry under files/ and versions/, for a client or
    /// for every client directory, known or not (`verify` reports the ones
    /// that are no stored copy).
    pub fn stored_files(&self, client: Option<&ClientId>) -> io::Result<Vec<StoredEntry>> {
        let mut out = Vec::new();
        for (in_versions, top) in [(false, "files"), (true, "versions")].map(|(v, t)| (v, self.root.join(t)))
        {
            let dirs: Vec<PathBuf> = match client {
                Some(id) => vec![top.join(id_hex(id))],
                None => match fs::read_dir(&top) {
                    Ok(rd) => rd.map(|e| e.map(|e| e.path())).collect::<io::Result<_>>()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(e),
                },
            };
            for dir in dirs {
                let client_dir =
                    dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                if !dir.is_dir() {
                    if dir.symlink_metadata().is_ok() {
                        out.push(StoredEntry { in_versions, client_dir, name: String::new(), path: dir });
                    }
                    continue;
                }
                let mut files = Vec::new();
                walk(&dir, &mut files)?;
                for path in files {
                    let name = path.strip_prefix(&dir).unwrap_or(&path).to_string_lossy().into_owned();
                    out.push(StoredEntry { in_versions, client_dir: client_dir.clone(), name, path });
                }
            }
        }
        Ok(out)
    }
}

/// The versions kept in a file's versions folder, ascending: its regular
/// files named by a number (a folder there belongs to a deeper name).
fn version_numbers(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| version_number(&e.file_name()))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort_unstable();
    v
}

/// A file found on disk under files/ or versions/.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// Under versions/ (else files/).
    pub in_versions: bool,
    /// The directory name under files/ or versions/ (a client id in hex when well formed).
    pub client_dir: String,
    /// Its path below that directory (for a version: `<name>/<n>`).
    pub name: String,
    pub path: PathBuf,
}

/// `path` as it will be once created: its deepest existing ancestor resolved
/// (links followed, made absolute), the components below it (which do not
/// exist, so are no links) applied to that by name.
pub fn resolved(path: &Path) -> io::Result<PathBuf> {
    let abs = std::env::current_dir()?.join(path);
    let mut base = abs.as_path();
    let mut out = loop {
        match fs::canonicalize(base) {
            Ok(p) => break p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match base.parent() {
            Some(p) => base = p,
            None => return Err(io::ErrorKind::NotFound.into()),
        }
    };
    for c in abs.strip_prefix(base).unwrap_or(Path::new("")).components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    Ok(out)
}

/// Refuse a destination (`restore --to`, `snapshot DIR`) that is, or once
/// created would be, the data directory `root` or inside it: writing there
/// would change the store under the server. Both paths are resolved first.
pub fn refuse_inside_data_dir(dest: &Path, root: &Path) -> Result<(), String> {
    let d = resolved(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let r = resolved(root).map_err(|e| format!("data directory {}: {e}", root.display()))?;
    if d.starts_with(&r) {
        return Err(format!(
            "{} is inside the data directory {}; choose a directory outside it",
            dest.display(),
            root.display()
        ));
    }
    Ok(())
}

/// Every non-directory entry below `dir` (symbolic links are not followed).
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            walk(&e.path(), out)?;
        } else {
            out.push(e.path());
        }
    }
    Ok(())
}

/// Nanoseconds since the epoch of a file's modification time: when its
/// upload was written (a stored file is never modified afterwards).
pub fn mtime_nanos(path: &Path) -> io::Result<i128> {
    let m = fs::metadata(path)?.modified()?;
    Ok(match m.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    })
}

use crate::crypto::copy_with_cksum;

/// The size and cksum of a stored file (see [`open_stored`]).
pub fn cksum_file(path: &Path) -> io::Result<(u64, u32)> {
    copy_with_cksum(&mut open_stored(None, path)?, &mut io::sink())
}

/// Open a stored copy for reading, following no link, as the server does
/// (docs/SECURITY.md): the entry must be a regular file, neither a symbolic
/// link (`O_NOFOLLOW`) nor a FIFO or a device, which would block or never
/// end (`O_NONBLOCK`, then checked on the descriptor); with `root`, no
/// folder between it and the entry may be a link either. Anything else is
/// an error that names what the entry is.
pub fn open_stored(root: Option<&Path>, path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}, not a regular file (no link is followed in the data directory)"),
        )
    };
    if let Some(root) = root {
        // The path comes from a database row: it must stay inside.
        let inside = path.strip_prefix(root).ok().filter(|rel| {
            rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
                && !rel.as_os_str().is_empty()
        });
        let Some(rel) = inside else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is outside the data directory {}; not read", path.display(), root.display()),
            ));
        };
        let mut dir = root.to_path_buf();
        let mut parts = rel.components().peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                break;
            }
            dir.push(part);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(&format!(
                        "the folder {} on its way is a symbolic link",
                        dir.display()
                    )))
                }
                // Missing or not a folder: the open below says so.
                _ => {}
            }
        }
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| if e.raw_os_error() == Some(libc::ELOOP) { refuse("a symbolic link") } else { e })?;
    let t = f.metadata()?.file_type();
    if !t.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if t.is_dir() {
            "a folder"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else {
            "a special file"
        };
        return Err(refuse(what));
    }
    Ok(f)
}
