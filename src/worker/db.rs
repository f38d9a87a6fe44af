//! The SQLite database: schema, migrations, and the few writes the server
//! makes, always in one transaction per batch.
//!
//! Only the worker thread owns the [`Db`]. The tables `clients` and `files`
//! keep the columns that existing tools know (see docs/PROTOCOL.md); the extra
//! columns (`files.Size`, `files.Cksum`, `files.ReceivedAt`,
//! `clients.RegisteredAt`) and the `publish_intents` table are ours. Session AES keys are never written: `AESKey` stays NULL. The
//! `settings` table records the data directory the database belongs to
//! ([`check_owner`]).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use crate::protocol::{ClientId, CLIENT_ID_LEN};

/// A registered client as loaded at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: ClientId,
    pub name: String,
    /// DER SubjectPublicKeyInfo, once the client sent one.
    pub public_key: Option<Vec<u8>>,
}

/// A verified file row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    pub id: ClientId,
    pub name: String,
    pub path: String,
    pub verified: bool,
    pub size: Option<u64>,
    pub cksum: Option<u32>,
    /// When it was recorded (ISO-8601 UTC).
    pub received: Option<String>,
}

/// One write of a batch.
#[derive(Debug, Clone)]
pub enum Write {
    InsertClient {
        id: ClientId,
        name: String,
    },
    /// A client's rows go: its files' rows and its own ([`delete_client`]).
    RemoveClient {
        id: ClientId,
    },
    SetPublicKey {
        id: ClientId,
        der: Vec<u8>,
    },
    Touch {
        id: ClientId,
    },
    FileVerified {
        id: ClientId,
        name: String,
        path: String,
        size: u64,
        cksum: u32,
    },
    ClearIntent {
        upload: u64,
    },
    /// The file at `path` was recorded before its one sync (new files with
    /// syncfs, see `commit.rs`): until cleared, startup checks it is whole.
    MarkUnsynced {
        path: String,
    },
    /// Every such mark goes: the syncs they waited for are done.
    ClearUnsynced,
    /// A new file's row (and its S3 queue row) goes again: its one sync
    /// failed, or startup found it not whole on disk.
    DropFile {
        id: ClientId,
        name: String,
        path: String,
    },
    /// Queue a stored file (`path` relative to the data directory) for the
    /// bucket, or with `delete` its removal from it (S3 tier).
    #[cfg(feature = "s3")]
    Enqueue {
        id: ClientId,
        path: String,
        delete: bool,
    },
}

#[cfg(feature = "s3")]
/// One row of the S3 queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRow {
    pub seq: i64,
    pub id: ClientId,
    pub path: String,
    pub delete: bool,
    /// The client's name ("" when it has no row any more).
    pub client: String,
    /// The size and cksum the files table records for this path (a current
    /// file; None for a version).
    pub recorded: Option<(u64, u32)>,
}

/// A publish in progress, recorded before any rename so that a crash in the
/// middle can be undone at the next start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub upload: u64,
    pub target: String,
    pub saved_previous: Option<String>,
}

pub struct Db {
    conn: Connection,
    busy_timeout: Duration,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clients(
    ID BLOB(16) PRIMARY KEY,
    Name TEXT UNIQUE NOT NULL,
    PublicKey BLOB,
    LastSeen TEXT,
    AESKey BLOB
);
CREATE TABLE IF NOT EXISTS files(
    ID BLOB(16) NOT NULL,
    FileName TEXT NOT NULL,
    PathName TEXT NOT NULL,
    Verified INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ID, FileName)
);
CREATE TABLE IF NOT EXISTS publish_intents(
    Upload INTEGER PRIMARY KEY,
    Target TEXT NOT NULL,
    SavedPrevious TEXT
);
CREATE TABLE IF NOT EXISTS unsynced_files(
    PathName TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS settings(
    Key TEXT PRIMARY KEY,
    Value TEXT NOT NULL
);
";

/// The S3 tier's queue (feature `s3`): a row per stored file (or pruned
/// version, `Op` 1) the bucket has not confirmed yet. Written by the worker
/// only, in the transaction of the file's verified row.
#[cfg(feature = "s3")]
const S3_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS s3_queue(
    Seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ID BLOB(16) NOT NULL,
    Path TEXT NOT NULL,
    Op INTEGER NOT NULL DEFAULT 0,
    QueuedAt INTEGER NOT NULL,
    UNIQUE (Path, Op)
);
";

/// The data directory a database belongs to, as it records it (table
/// `settings`): the id of its marker and its path when last used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub path: String,
}

/// The data directory `conn` records, None when it records none (a database
/// of an earlier backupd, whose `settings` table may not exist). Reads only.
pub fn owner(conn: &Connection) -> rusqlite::Result<Option<Owner>> {
    let get = |key: &str| {
        conn.query_row("SELECT Value FROM settings WHERE Key=?1", [key], |r| r.get::<_, String>(0)).optional()
    };
    match get("data_dir_id") {
        Ok(Some(id)) => Ok(Some(Owner { id, path: get("data_dir")?.unwrap_or_default() })),
        Ok(None) => Ok(None),
        Err(e) if e.to_string().contains("no such table") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Record `owner` as the data directory `conn` belongs to.
pub fn set_owner(conn: &Connection, owner: &Owner) -> rusqlite::Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS settings(Key TEXT PRIMARY KEY, Value TEXT NOT NULL)")?;
    let set = "INSERT OR REPLACE INTO settings(Key, Value) VALUES (?1, ?2)";
    conn.execute(set, params!["data_dir_id", owner.id])?;
    conn.execute(set, params!["data_dir", owner.path])?;
    Ok(())
}

/// Who opens a database, for [`check_owner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opener {
    /// The server: records a database that records no data directory yet as
    /// this one's, and a moved data directory's new path.
    Server,
    /// A writing admin command: the data directory must be the one recorded.
    Writer,
    /// A reading admin command: refused only beside another marked data
    /// directory (one without a marker may be a disk lost, read from the
    /// bucket with the S3 tier).
    Reader,
}

/// Does the database at `db` (open as `conn`) belong to the data directory
/// at `data_dir`, whose marker holds `id`? A database that records another
/// id is refused (see [`Opener`] for a data directory without one): the
/// message names both folders and the way out.
pub fn check_owner(
    conn: &Connection,
    db: &Path,
    data_dir: &Path,
    id: Option<&str>,
    opener: Opener,
) -> Result<(), String> {
    let adopt = opener == Opener::Server;
    let err = |e: rusqlite::Error| format!("database {}: {e}", db.display());
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let path = path.to_string_lossy().into_owned();
    match (owner(conn).map_err(err)?, id) {
        (Some(o), Some(id)) if o.id == id => {
            if adopt && o.path != path {
                set_owner(conn, &Owner { id: id.to_string(), path }).map_err(err)?;
            }
            Ok(())
        }
        (Some(_), None) if opener == Opener::Reader => Ok(()),
        // The very folder the database records, with another marker: the
        // marker was rewritten (by hand, without its id) or copied in.
        (Some(o), marker) if o.path == path => Err(format!(
            "database {} records the data directory {} with id {}, but its marker {} holds {}: the \
             marker was rewritten or copied from another data directory. If {} is that data \
             directory, put its id back: the marker's two lines are `backupd data directory, layout \
             1` and `id {}`. Otherwise give it a database of its own with --db (see \
             docs/OPERATIONS.md, \"One database, one data directory\")",
            db.display(),
            o.path,
            o.id,
            data_dir.join(crate::datadir::MARKER_FILE).display(),
            marker.map_or_else(|| "no id".to_string(), |m| format!("the id {m}")),
            data_dir.display(),
            o.id
        )),
        (Some(o), _) => Err(format!(
            "database {} belongs to the data directory {} (id {}), not to {}: start with --data-dir {} \
             --db {}, or give {} a database of its own with --db (a database serves the one data \
             directory it was first used with; see docs/OPERATIONS.md)",
            db.display(),
            o.path,
            o.id,
            data_dir.display(),
            o.path,
            db.display(),
            data_dir.display()
        )),
        (None, Some(id)) if adopt => {
            set_owner(conn, &Owner { id: id.to_string(), path }).map_err(err)?;
            log::info!("database {} recorded as the data directory {}'s", db.display(), data_dir.display());
            Ok(())
        }
        (None, _) => Ok(()),
    }
}

/// Delete client `id`'s rows: its files' rows, then its own (one statement
/// each, in the caller's transaction); how many file rows went. Used by
/// `backupd remove-client` and by the server when it reclaims a keyless
/// registration at `--max-clients`.
pub fn delete_client(conn: &Connection, id: &ClientId) -> rusqlite::Result<usize> {
    let files = conn.prepare_cached("DELETE FROM files WHERE ID=?1")?.execute(params![&id[..]])?;
    conn.prepare_cached("DELETE FROM clients WHERE ID=?1")?.execute(params![&id[..]])?;
    Ok(files)
}

#[cfg(feature = "s3")]
/// Seconds since the epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Each client's rows in the S3 queue (the admin commands' `s3 pending`);
/// empty when the database has no queue yet.
pub fn queued_per_client(conn: &Connection) -> rusqlite::Result<std::collections::HashMap<ClientId, u64>> {
    let mut out = std::collections::HashMap::new();
    let mut st = match conn.prepare("SELECT ID, COUNT(*) FROM s3_queue GROUP BY ID") {
        Ok(st) => st,
        Err(e) if e.to_string().contains("no such table") => return Ok(out),
        Err(e) => return Err(e),
    };
    let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (id, n) = row?;
        if let Some(id) = blob_id(&id) {
            out.insert(id, n.max(0) as u64);
        }
    }
    Ok(out)
}

pub use crate::units::{iso8601, now_iso8601, parse_iso8601};

fn is_retryable(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked))
}

/// A client id from a database blob (None when it is not 16 bytes).
pub fn blob_id(b: &[u8]) -> Option<ClientId> {
    if b.len() != CLIENT_ID_LEN {
        return None;
    }
    let mut id = [0u8; CLIENT_ID_LEN];
    id.copy_from_slice(b);
    Some(id)
}

/// The rows of the files table, of one client or of all, by client and name
/// (also used by the admin commands on a read-only connection).
pub fn read_file_rows(conn: &Connection, client: Option<&ClientId>) -> rusqlite::Result<Vec<FileRow>> {
    let mut st = conn.prepare(FILE_ROWS)?;
    let rows = st.query_map(params![client.map(|c| &c[..])], file_row)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, mut f) = row?;
        if let Some(id) = blob_id(&id) {
            f.id = id;
            out.push(f);
        }
    }
    Ok(out)
}

/// The file rows' query: all, or one client's (`?1`), by client and name.
const FILE_ROWS: &str = "SELECT ID, FileName, PathName, Verified, Size, Cksum, ReceivedAt FROM files
     WHERE ?1 IS NULL OR ID = ?1 ORDER BY ID, FileName";

/// One row of [`FILE_ROWS`] with its id as stored.
fn file_row(r: &rusqlite::Row) -> rusqlite::Result<(Vec<u8>, FileRow)> {
    Ok((
        r.get::<_, Vec<u8>>(0)?,
        FileRow {
            id: [0; CLIENT_ID_LEN],
            name: r.get(1)?,
            path: r.get(2)?,
            verified: r.get::<_, i64>(3)? != 0,
            size: r.get::<_, Option<i64>>(4)?.and_then(|s| u64::try_from(s).ok()),
            cksum: r.get::<_, Option<i64>>(5)?.and_then(|c| u32::try_from(c).ok()),
            received: r.get(6)?,
        },
    ))
}

/// A file row that cannot be read as a [`FileRow`] (a value of the wrong
/// type: `Cksum` text written by hand, a name that is not UTF-8): what can
/// be read of it, to name it, and why it cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRow {
    /// The client's id, when the `ID` column holds one.
    pub id: Option<ClientId>,
    /// `FileName` (lossy), empty when it is no text.
    pub name: String,
    /// `PathName`, when it is text.
    pub path: Option<String>,
    pub error: String,
}

/// [`read_file_rows`] for the admin commands: a row that cannot be read is
/// set aside as a [`DamagedRow`] rather than failing the whole read, so that
/// one bad row hides no other. The server keeps [`read_file_rows`] (one
/// such row still fails its start-up as before).
pub fn read_file_rows_lenient(
    conn: &Connection,
    client: Option<&ClientId>,
) -> rusqlite::Result<(Vec<FileRow>, Vec<DamagedRow>)> {
    use rusqlite::types::ValueRef;
    let mut st = conn.prepare(FILE_ROWS)?;
    let mut rows = st.query(params![client.map(|c| &c[..])])?;
    let (mut good, mut damaged) = (Vec::new(), Vec::new());
    while let Some(r) = rows.next()? {
        match file_row(r) {
            Ok((id, mut f)) => {
                if let Some(id) = blob_id(&id) {
                    f.id = id;
                    good.push(f);
                }
            }
            Err(e) => {
                let text = |i| match r.get_ref(i) {
                    Ok(ValueRef::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
                    _ => None,
                };
                let id = match r.get_ref(0) {
                    Ok(ValueRef::Blob(b)) => blob_id(b),
                    _ => None,
                };
                damaged.push(DamagedRow {
                    id,
                    name: text(1).unwrap_or_default(),
                    path: text(2),
                    error: e.to_string(),
                });
            }
        }
    }
    Ok((good, damaged))
}

impl Db {
    /// Open or create the database: WAL, synchronous=FULL, foreign keys on,
    /// the schema and its migrations.
    pub fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Db> {
        let existed = path.exists();
        let conn = Connection::open(path)?;
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(busy_timeout)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!("database journal mode is {mode}, not WAL");
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        let db = Db { conn, busy_timeout };
        db.create()?;
        Ok(db)
    }

    /// The open connection (for [`check_owner`]).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The schema (and its migrations) in the open database.
    fn create(&self) -> rusqlite::Result<()> {
        self.retry(|c| c.execute_batch(SCHEMA))?;
        #[cfg(feature = "s3")]
        self.retry(|c| c.execute_batch(S3_SCHEMA))?;
        self.migrate()
    }

    /// A database with our schema in memory only: `restore` and `verify`
    /// fill one from the bucket when the data directory is lost (S3 tier).
    #[cfg(feature = "s3")]
    pub fn in_memory() -> rusqlite::Result<Connection> {
        let db = Db { conn: Connection::open_in_memory()?, busy_timeout: Duration::ZERO };
        db.create()?;
        Ok(db.conn)
    }

    /// Add our extra columns to a database created by an older server.
    /// `clients.RegisteredAt` starts as the row's `LastSeen` (for a client
    /// without a key, when it registered), in the same transaction.
    fn migrate(&self) -> rusqlite::Result<()> {
        let extra = [
            ("files", "Size", "INTEGER", ""),
            ("files", "Cksum", "INTEGER", ""),
            ("files", "ReceivedAt", "TEXT", ""),
            ("clients", "RegisteredAt", "TEXT", "UPDATE clients SET RegisteredAt = LastSeen;"),
        ];
        for (table, col, ty, fill) in extra {
            let mut cols = Vec::new();
            {
                let mut st = self.conn.prepare(&format!("PRAGMA table_info({table})"))?;
                let rows = st.query_map([], |r| r.get::<_, String>(1))?;
                for r in rows {
                    cols.push(r?);
                }
            }
            if !cols.iter().any(|c| c.eq_ignore_ascii_case(col)) {
                let sql =
                    format!("BEGIN IMMEDIATE; ALTER TABLE {table} ADD COLUMN {col} {ty}; {fill} COMMIT;");
                self.retry(|c| {
                    c.execute_batch(&sql).inspect_err(|_| {
                        let _ = c.execute_batch("ROLLBACK");
                    })
                })?;
            }
        }
        Ok(())
    }

    /// Run `f`, retrying SQLITE_BUSY / SQLITE_LOCKED with backoff until the
    /// busy timeout has passed (SQLite's own busy handler covers most waits;
    /// this loop covers the cases it does not, such as LOCKED).
    fn retry<T>(&self, mut f: impl FnMut(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        let deadline = Instant::now() + self.busy_timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            match f(&self.conn) {
                Err(e) if is_retryable(&e) && Instant::now() < deadline => {
                    thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    /// Each client's most recent verified file time (seconds since the epoch), by name.
    pub fn last_verified(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        let mut st = self.conn.prepare(
            "SELECT c.Name, MAX(f.ReceivedAt) FROM files f JOIN clients c ON c.ID = f.ID
             WHERE f.Verified = 1 GROUP BY f.ID",
        )?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, at) = row?;
            if let Some(secs) = at.as_deref().and_then(parse_iso8601) {
                out.push((name, secs));
            }
        }
        Ok(out)
    }

    /// Each client's verified files: how many and their total size (the
    /// current files' part of [`super::Usage`]).
    pub fn current_usage(&self) -> rusqlite::Result<std::collections::HashMap<ClientId, super::Usage>> {
        let mut st = self.conn.prepare(
            "SELECT ID, COUNT(*), TOTAL(MAX(COALESCE(Size, 0), 0)) FROM files WHERE Verified = 1 GROUP BY ID",
        )?;
        let rows =
            st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get::<_, f64>(2)?)))?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (id, files, bytes) = row?;
            if let Some(id) = blob_id(&id) {
                out.insert(id, super::Usage { bytes: bytes as u64, files: files.max(0) as u64 });
            }
        }
        Ok(out)
    }

    /// Every client on record, the earliest registered first (rows of the
    /// same second in the order they were inserted).
    pub fn load_clients(&self) -> rusqlite::Result<Vec<ClientRecord>> {
        let mut st =
            self.conn.prepare("SELECT ID, Name, PublicKey FROM clients ORDER BY RegisteredAt, rowid")?;
        let rows = st.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<Vec<u8>>>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, public_key) = row?;
            match blob_id(&id) {
                Some(id) => out.push(ClientRecord { id, name, public_key }),
                None => log::warn!("database: client {name:?} has a malformed id; ignored"),
            }
        }
        Ok(out)
    }

    pub fn file_rows(&self) -> rusqlite::Result<Vec<FileRow>> {
        read_file_rows(&self.conn, None)
    }

    /// Does client `id` have a row with no key on file and no file row
    /// (verified or not)? What a keyless registration must be to be reclaimed.
    pub fn keyless_without_files(&self, id: &ClientId) -> rusqlite::Result<bool> {
        let found: Option<bool> = self
            .conn
            .query_row(
                "SELECT PublicKey IS NULL AND NOT EXISTS (SELECT 1 FROM files WHERE ID=?1)
                 FROM clients WHERE ID=?1",
                params![&id[..]],
                |r| r.get(0),
            )
            .optional()?;
        Ok(found.unwrap_or(false))
    }

    /// Is there a verified row for this file?
    pub fn is_verified(&self, id: &ClientId, name: &str) -> rusqlite::Result<bool> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT Verified FROM files WHERE ID=?1 AND FileName=?2",
                params![&id[..], name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0) != 0)
    }

    pub fn intents(&self) -> rusqlite::Result<Vec<Intent>> {
        let mut st = self.conn.prepare("SELECT Upload, Target, SavedPrevious FROM publish_intents")?;
        let rows = st.query_map([], |r| {
            Ok(Intent { upload: r.get::<_, i64>(0)? as u64, target: r.get(1)?, saved_previous: r.get(2)? })
        })?;
        rows.collect()
    }

    /// Record publish intents, durably, before any rename happens.
    pub fn add_intents(&mut self, intents: &[Intent]) -> rusqlite::Result<()> {
        self.transaction(|tx| {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO publish_intents(Upload, Target, SavedPrevious) VALUES (?1, ?2, ?3)",
            )?;
            for i in intents {
                st.execute(params![i.upload as i64, i.target, i.saved_previous])?;
            }
            Ok(())
        })
    }

    /// Apply a batch of writes in one transaction whose commit does not
    /// sync the WAL (`synchronous=NORMAL`): the caller makes it durable with
    /// its own syncfs before anyone is told (new files with syncfs, see
    /// `commit.rs`). NORMAL, not OFF: SQLite still syncs around its
    /// checkpoints, so a checkpoint never gets ahead of that syncfs.
    pub fn apply_unsynced(&mut self, writes: &[Write]) -> rusqlite::Result<()> {
        self.conn.execute_batch("PRAGMA synchronous=NORMAL")?;
        let r = self.apply(writes);
        // Back to FULL whatever happened: every other commit syncs itself.
        let back = self.conn.execute_batch("PRAGMA synchronous=FULL");
        r.and(back)
    }

    /// The files recorded before their one sync whose marks were not
    /// cleared (see [`Write::MarkUnsynced`]).
    pub fn unsynced_files(&self) -> rusqlite::Result<Vec<String>> {
        let mut st = self.conn.prepare("SELECT PathName FROM unsynced_files")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Apply a batch of writes in one transaction (retried as a whole).
    pub fn apply(&mut self, writes: &[Write]) -> rusqlite::Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        let now = now_iso8601();
        self.transaction(|tx| {
            for w in writes {
                match w {
                    Write::InsertClient { id, name } => {
                        tx.prepare_cached(
                            "INSERT INTO clients(ID, Name, LastSeen, RegisteredAt) VALUES (?1, ?2, ?3, ?3)",
                        )?
                        .execute(params![&id[..], name, now])?;
                    }
                    Write::RemoveClient { id } => {
                        delete_client(tx, id)?;
                    }
                    Write::SetPublicKey { id, der } => {
                        tx.prepare_cached("UPDATE clients SET PublicKey=?2, LastSeen=?3 WHERE ID=?1")?
                            .execute(params![&id[..], der, now])?;
                    }
                    Write::Touch { id } => {
                        tx.prepare_cached("UPDATE clients SET LastSeen=?2 WHERE ID=?1")?
                            .execute(params![&id[..], now])?;
                    }
                    Write::FileVerified { id, name, path, size, cksum } => {
                        tx.prepare_cached(
                            "INSERT INTO files(ID, FileName, PathName, Verified, Size, Cksum, ReceivedAt)
                             VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6)
                             ON CONFLICT(ID, FileName) DO UPDATE SET PathName=excluded.PathName,
                             Verified=1, Size=excluded.Size, Cksum=excluded.Cksum, ReceivedAt=excluded.ReceivedAt",
                        )?
                        .execute(params![&id[..], name, path, *size as i64, *cksum as i64, now])?;
                    }
                    Write::ClearIntent { upload } => {
                        tx.prepare_cached("DELETE FROM publish_intents WHERE Upload=?1")?
                            .execute(params![*upload as i64])?;
                    }
                    Write::MarkUnsynced { path } => {
                        tx.prepare_cached("INSERT OR REPLACE INTO unsynced_files(PathName) VALUES (?1)")?
                            .execute(params![path])?;
                    }
                    Write::ClearUnsynced => {
                        tx.prepare_cached("DELETE FROM unsynced_files")?.execute([])?;
                    }
                    Write::DropFile { id, name, path } => {
                        tx.prepare_cached("DELETE FROM files WHERE ID=?1 AND FileName=?2 AND PathName=?3")?
                            .execute(params![&id[..], name, path])?;
                        #[cfg(feature = "s3")]
                        tx.prepare_cached("DELETE FROM s3_queue WHERE Path=?1 AND Op=0")?.execute(params![path])?;
                    }
                    #[cfg(feature = "s3")]
                    Write::Enqueue { id, path, delete } => {
                        // A row queued again goes to the end of the line (a new
                        // Seq: a report for the old one no longer removes it),
                        // keeping the time it was first queued.
                        tx.prepare_cached(
                            "INSERT OR REPLACE INTO s3_queue(ID, Path, Op, QueuedAt) VALUES (?1, ?2, ?3,
                             COALESCE((SELECT QueuedAt FROM s3_queue WHERE Path=?2 AND Op=?3), ?4))",
                        )?
                        .execute(params![&id[..], path, i64::from(*delete), unix_now()])?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Run `f` inside BEGIN IMMEDIATE ... COMMIT, retrying the whole
    /// transaction on BUSY/LOCKED until the busy timeout.
    fn transaction(
        &mut self,
        f: impl Fn(&rusqlite::Transaction) -> rusqlite::Result<()>,
    ) -> rusqlite::Result<()> {
        let deadline = Instant::now() + self.busy_timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let r = (|| {
                let tx =
                    rusqlite::Transaction::new(&mut self.conn, rusqlite::TransactionBehavior::Immediate)?;
                f(&tx)?;
                tx.commit()
            })();
            match r {
                Err(e) if is_retryable(&e) && Instant::now() < deadline => {
                    thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    #[cfg(feature = "s3")]
    /// The S3 queue's rows after `seq`, in order, at most `limit` of them.
    pub fn queue_after(&self, seq: i64, limit: usize) -> rusqlite::Result<Vec<QueueRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT q.Seq, q.ID, q.Path, q.Op, COALESCE(c.Name, ''), f.Size, f.Cksum FROM s3_queue q
             LEFT JOIN clients c ON c.ID = q.ID
             LEFT JOIN files f ON f.ID = q.ID AND f.PathName = q.Path AND f.Verified = 1
             WHERE q.Seq > ?1 ORDER BY q.Seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![seq, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            let size = r.get::<_, Option<i64>>(5)?.and_then(|s| u64::try_from(s).ok());
            let cksum = r.get::<_, Option<i64>>(6)?.and_then(|c| u32::try_from(c).ok());
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                size.zip(cksum),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, id, path, op, client, recorded) = row?;
            if let Some(id) = blob_id(&id) {
                out.push(QueueRow { seq, id, path, delete: op != 0, client, recorded });
            }
        }
        Ok(out)
    }

    #[cfg(feature = "s3")]
    /// The row that uploads `path`, if it is queued.
    pub fn queued_upload(&self, path: &str) -> rusqlite::Result<Option<i64>> {
        self.conn
            .query_row("SELECT Seq FROM s3_queue WHERE Path = ?1 AND Op = 0", params![path], |r| r.get(0))
            .optional()
    }

    #[cfg(feature = "s3")]
    /// Remove S3 queue rows (the store confirmed them).
    pub fn dequeue(&mut self, seqs: &[i64]) -> rusqlite::Result<()> {
        self.transaction(|tx| {
            let mut st = tx.prepare_cached("DELETE FROM s3_queue WHERE Seq = ?1")?;
            for s in seqs {
                st.execute(params![s])?;
            }
            Ok(())
        })
    }

    #[cfg(feature = "s3")]
    /// The S3 queue's length and its oldest row's time (seconds since the epoch).
    pub fn queue_stats(&self) -> rusqlite::Result<(u64, Option<u64>)> {
        self.conn.query_row("SELECT COUNT(*), MIN(QueuedAt) FROM s3_queue", [], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, Option<i64>>(1)?.map(|t| t.max(0) as u64)))
        })
    }

    pub fn integrity_ok(&self) -> rusqlite::Result<bool> {
        let s: String = self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        Ok(s == "ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_round_trips() {
        for secs in [0, 951_782_400, 1_700_000_000, 1_764_460_800, 4_102_444_799] {
            assert_eq!(parse_iso8601(&iso8601(secs)), Some(secs), "{}", iso8601(secs));
        }
        assert_eq!(parse_iso8601("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_iso8601("yesterday"), None);
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_795_629_393), "2026-11-25T17:56:33Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[cfg(feature = "s3")]
    #[test]
    fn s3_queue_rows_requeue_at_the_end_and_keep_their_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("t.db"), Duration::from_secs(1)).unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let put = |id, path: &str| Write::Enqueue { id, path: path.into(), delete: false };
        db.apply(&[put(a, "files/a/x"), put(a, "files/a/y"), put(b, "files/b/z")]).unwrap();
        let rows = db.queue_after(0, usize::MAX).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["files/a/x", "files/a/y", "files/b/z"]
        );
        let old_x = rows[0].seq;
        let (n, oldest) = db.queue_stats().unwrap();
        assert_eq!(n, 3);
        // The same file queued again (a newer upload): one row, at the end
        // of the line, so that a report for the old row leaves it queued.
        db.apply(&[put(a, "files/a/x")]).unwrap();
        let rows = db.queue_after(0, usize::MAX).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[2].path, "files/a/x");
        assert!(rows[2].seq > old_x);
        assert_eq!(db.queue_stats().unwrap(), (3, oldest), "the first queued time is kept");
        db.dequeue(&[old_x]).unwrap();
        assert_eq!(db.queue_stats().unwrap().0, 3, "the old row's report removes nothing");
        // A removal is a row of its own beside an upload of the same path.
        db.apply(&[Write::Enqueue { id: b, path: "files/b/z".into(), delete: true }]).unwrap();
        let after = db.queue_after(rows[2].seq, 10).unwrap();
        assert_eq!(after.len(), 1);
        assert!(after[0].delete);
        let per = queued_per_client(&db.conn).unwrap();
        assert_eq!((per[&a], per[&b]), (2, 2));
        db.dequeue(&rows.iter().map(|r| r.seq).collect::<Vec<_>>()).unwrap();
        assert_eq!(db.queue_stats().unwrap().0, 1);
        // A row brings its client's name and, for a current file, the size
        // and cksum of its verified row (the object's metadata).
        db.apply(&[
            Write::InsertClient { id: a, name: "alice".into() },
            Write::FileVerified { id: a, name: "x".into(), path: "files/a/x".into(), size: 5, cksum: 7 },
            put(a, "files/a/x"),
            put(a, "versions/a/x/1"),
        ])
        .unwrap();
        let rows = db.queue_after(after[0].seq, 10).unwrap();
        let got: Vec<_> = rows.iter().map(|r| (r.client.as_str(), r.recorded)).collect();
        assert_eq!(got, [("alice", Some((5, 7))), ("alice", None)]);
        // A database without the table (read by an admin command before any
        // server of this version ran): nothing pending.
        let bare = Connection::open(dir.path().join("bare.db")).unwrap();
        assert!(queued_per_client(&bare).unwrap().is_empty());
    }

    #[test]
    fn an_older_database_opens_and_keeps_the_order_clients_registered_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The field's schema, as an older server left it: no RegisteredAt, no Size.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE clients(ID BLOB(16) PRIMARY KEY, Name TEXT UNIQUE NOT NULL, PublicKey BLOB,
                     LastSeen TEXT, AESKey BLOB);
                 CREATE TABLE files(ID BLOB(16) NOT NULL, FileName TEXT NOT NULL, PathName TEXT NOT NULL,
                     Verified INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (ID, FileName));
                 INSERT INTO clients(ID, Name, LastSeen) VALUES (x'03030303030303030303030303030303', 'late',
                     '2026-03-01T00:00:00Z');
                 INSERT INTO clients(ID, Name, LastSeen) VALUES (x'04040404040404040404040404040404', 'early',
                     '2026-01-01T00:00:00Z');
                 INSERT INTO files(ID, FileName, PathName) VALUES (x'04040404040404040404040404040404', 'a',
                     'files/x/a');",
            )
            .unwrap();
        }
        let mut db = Db::open(&path, Duration::from_secs(1)).unwrap();
        db.apply(&[Write::InsertClient { id: [5; 16], name: "new".into() }]).unwrap();
        let names = |db: &Db| db.load_clients().unwrap().into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(&db), ["early", "late", "new"], "RegisteredAt taken from LastSeen");
        assert!(db.keyless_without_files(&[3; 16]).unwrap());
        assert!(!db.keyless_without_files(&[4; 16]).unwrap(), "a Verified=0 row is a file row");
        assert!(!db.keyless_without_files(&[9; 16]).unwrap(), "no such client");
        db.apply(&[Write::RemoveClient { id: [4; 16] }]).unwrap();
        assert_eq!(names(&db), ["late", "new"]);
        assert_eq!(read_file_rows(db.conn(), None).unwrap(), vec![], "its file rows went with it");
        drop(db);
        let db = Db::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(names(&db), ["late", "new"]);
        assert!(db.integrity_ok().unwrap());
    }

    #[test]
    fn schema_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut db = Db::open(&path, Duration::from_secs(1)).unwrap();
        let id = [1u8; 16];
        db.apply(&[
            Write::InsertClient { id, name: "alice".into() },
            Write::SetPublicKey { id, der: vec![1, 2, 3] },
            Write::FileVerified { id, name: "a".into(), path: "files/x/a".into(), size: 3, cksum: 7 },
        ])
        .unwrap();
        let clients = db.load_clients().unwrap();
        assert_eq!(clients, vec![ClientRecord { id, name: "alice".into(), public_key: Some(vec![1, 2, 3]) }]);
        assert!(db.is_verified(&id, "a").unwrap());
        assert!(!db.is_verified(&id, "b").unwrap());
        assert!(db.apply(&[Write::InsertClient { id: [2; 16], name: "alice".into() }]).is_err());
        drop(db);
        let db = Db::open(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(db.load_clients().unwrap().len(), 1);
        assert!(db.integrity_ok().unwrap());
    }

    #[test]
    fn a_database_is_checked_against_its_data_directory_by_each_opener() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        let path = dir.path().join("t.db");
        let db = Db::open(&path, Duration::from_secs(1)).unwrap();
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        let check = |id: Option<&str>, dir: &Path, opener| check_owner(db.conn(), &path, dir, id, opener);
        // Nothing recorded: readers and writers pass, the server records.
        assert!(check(Some(&b), &theirs, Opener::Writer).is_ok());
        assert!(check(Some(&b), &theirs, Opener::Reader).is_ok());
        assert_eq!(owner(db.conn()).unwrap(), None);
        check(Some(&a), &ours, Opener::Server).unwrap();
        assert_eq!(owner(db.conn()).unwrap().map(|o| o.id), Some(a.clone()));
        // Recorded: only that id, for every opener; a reader beside an
        // unmarked folder passes, a writer does not.
        for opener in [Opener::Server, Opener::Writer, Opener::Reader] {
            assert!(check(Some(&a), &ours, opener).is_ok());
            let msg = check(Some(&b), &theirs, opener).unwrap_err();
            assert!(msg.contains("ours") && msg.contains("theirs") && msg.contains("--data-dir"), "{msg}");
        }
        assert!(check(None, &theirs, Opener::Reader).is_ok());
        assert!(check(None, &theirs, Opener::Writer).is_err());
        // A database of an earlier version has no settings table at all.
        db.conn().execute_batch("DROP TABLE settings").unwrap();
        assert_eq!(owner(db.conn()).unwrap(), None);
    }
}
