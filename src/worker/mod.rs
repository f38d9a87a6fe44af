//! The worker: the only code that touches the storage directory and the
//! SQLite database, in two threads.
//!
//! The event loop sends [`Job`]s (owning their buffers: packet bytes are
//! moved, never copied) through [`Jobs`], which routes them: file packets,
//! discards and the shutdown to the **packet thread** ([`Packets`], in
//! `packets.rs`), which decrypts, checksums and appends packets to their
//! temp files in `tmp/` as they come (past 8 MiB, a writer thread of its own
//! writes the chunks direct: `sink.rs`); everything else to the **committing
//! worker** ([`Worker`]), which alone owns the database and the published
//! tree. Each job gets at most one [`Completion`] on the loop's channel, and
//! the thread that sent it wakes the loop through its [`Wake`]. A received
//! upload passes from the packet thread to the committing worker on the
//! latter's own channel ([`Input::Staged`]) before the loop hears of it, so
//! the loop's 1029 always finds it staged. The committing worker takes its
//! input in batches: every commit, registration and key change queued is made
//! durable together: one intent transaction, renames, one sync, one database
//! transaction (group commit). Packets never wait for that sync: this split
//! is what keeps a small upload's 1603 and the next batch's files coming
//! while a batch is made durable (docs/PERFORMANCE.md, issue 14).
//!
//! Here: the jobs, the channels and completions, the batches and the
//! free-space measure. The group commit is in `commit.rs`, startup repair in
//! `reconcile.rs`; the directory layout in [`storage`], the database in
//! [`db`]; with the `s3` feature, the S3 tier's queue and the replicator's
//! reports in `replica.rs` (its reports come on the committing worker's
//! channel too, see [`Input`]).

mod commit;
pub mod db;
mod error;
mod fault;
mod packets;
mod reconcile;
#[cfg(feature = "s3")]
mod replica;
#[cfg(feature = "s3")]
pub mod s3;
mod sink;
pub mod storage;

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::budget::Piece;
use crate::config::SyncMode;
use crate::crypto::AES_KEY_LEN;
use crate::datadir::{self, DirLock, Kind};
use crate::metrics::Metrics;
use crate::protocol::ClientId;
use commit::Pending;
use db::{ClientRecord, Db, Write};
use error::IntentError;
pub use error::{OpenError, ReconcileError, UploadError};
use packets::{Packets, Staged};
use storage::Storage;

/// A connection as the worker names it: the slab key plus a serial number
/// unique for the life of the process, so that a completion for a closed
/// connection never reaches the next connection that reuses its slab key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub key: usize,
    pub serial: u64,
}

/// What one client stores: its current (verified) files plus the earlier
/// versions kept of them, in files and plaintext bytes. What `--quota` and
/// `--quota-files` are checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
}

impl Usage {
    fn add(&mut self, o: Usage) {
        self.bytes = self.bytes.saturating_add(o.bytes);
        self.files = self.files.saturating_add(o.files);
    }

    fn sub(&mut self, o: Usage) {
        self.bytes = self.bytes.saturating_sub(o.bytes);
        self.files = self.files.saturating_sub(o.files);
    }
}

/// Identifies one upload attempt (unique across restarts: seeded from the clock).
pub type UploadId = u64;

/// What the first packet of an upload brings: whose file it is and the
/// session key to decrypt it with (kept in memory only).
pub struct StartUpload {
    pub client: ClientId,
    pub key: [u8; AES_KEY_LEN],
}

/// A piece of one file packet's content (the loop checked the packet's
/// fixed fields; a packet's content comes in one or more pieces, in order).
pub struct PacketJob {
    pub conn: ConnRef,
    pub upload: UploadId,
    /// The content bytes, with the budget grant that pays for them (returned
    /// when the piece is dropped or recycled).
    pub content: Piece,
    /// Set on the first piece of packet 1.
    pub start: Option<StartUpload>,
    /// This piece begins a new CBC stream (packet 1, or a per-packet-encrypted packet).
    pub new_segment: bool,
    /// This piece ends a CBC stream whose plaintext must be exactly this long.
    pub end_segment: Option<u64>,
    /// The upload's last piece: report the cksum.
    pub last: bool,
}

pub enum Job {
    Register {
        conn: ConnRef,
        id: ClientId,
        name: String,
        /// At `--max-clients`: the keyless registration whose row goes
        /// first, in the same transaction, if it still stores nothing.
        reclaim: Option<ClientId>,
    },
    SetKey {
        conn: ConnRef,
        id: ClientId,
        der: Vec<u8>,
    },
    Touch {
        id: ClientId,
    },
    Packet(PacketJob),
    /// 1029: publish the staged file and record it as verified.
    Commit {
        conn: ConnRef,
        upload: UploadId,
        client: ClientId,
        name: String,
    },
    /// Drop a staged or in-progress upload; `failed` names an abort (1031),
    /// which writes nothing: an aborted upload leaves no `files` row.
    Discard {
        upload: UploadId,
        failed: Option<(ClientId, String)>,
    },
    Shutdown,
}

#[derive(Debug)]
pub enum PacketOutcome {
    /// Stored; more packets expected.
    Accepted,
    /// The last packet is in and the file is staged (fsynced).
    Received { cksum: u32, ciphertext_len: u64, plain_len: u64 },
    /// The upload failed (decryption, size, disk); its temp file is gone.
    /// Later packets of it are `Ignored`.
    Failed(UploadError),
    /// The upload was already failed or discarded.
    Ignored,
}

pub enum Completion {
    Registered {
        conn: ConnRef,
        id: ClientId,
        ok: bool,
        /// What became of the registration to reclaim, if one was named.
        reclaimed: Option<Reclaimed>,
    },
    KeySaved {
        conn: ConnRef,
        id: ClientId,
        ok: bool,
        /// The key saved (DER), for the registry when the connection is gone.
        der: Vec<u8>,
    },
    /// Every packet job gets exactly one; `buffer` comes back for reuse, and
    /// its grant to the memory budget when the loop recycles it.
    Packet { conn: ConnRef, upload: UploadId, buffer: Piece, last: bool, outcome: PacketOutcome },
    Committed {
        conn: ConnRef,
        upload: UploadId,
        ok: bool,
        /// The client's usage once this batch is published and pruned (its
        /// usage unchanged when the commit failed), for the registry.
        client: ClientId,
        usage: Usage,
    },
}

/// What became of the keyless registration a [`Job::Register`] named to reclaim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reclaimed {
    /// Its rows are gone, in the new registration's transaction (`ok`).
    Removed(ClientId),
    /// It has a key on file, a file row, or something under files/ or
    /// versions/: kept, and the new registration is not made (not `ok`).
    Kept(ClientId),
    /// The transaction failed: it is as it was (not `ok`).
    Unchanged(ClientId),
}

/// What the committing worker waits for, on one channel: the loop's jobs
/// other than packets, what the packet thread hands over (in the order it
/// took the loop's jobs) and, with the S3 tier, the replicator's reports.
pub(crate) enum Input {
    /// From the loop: registrations, keys, touches, commits.
    Job(Job),
    /// From the packet thread: an upload received, its temp file staged.
    Staged(Staged),
    /// From the packet thread: the loop discarded an upload that was no
    /// longer being received (staged, or failed).
    Discard(UploadId),
    /// From the packet thread: the loop shut down (or hung up).
    Stop,
    #[cfg(feature = "s3")]
    Replicated(crate::worker::s3::replicator::Report),
}

/// The loop's end of the worker's two channels: file packets, discards and
/// the shutdown go to the packet thread, everything else to the committing
/// worker (see [`Packets`] for why this keeps each upload's order).
pub struct Jobs {
    packets: Sender<Job>,
    commits: Sender<Input>,
}

impl Jobs {
    /// Hand over a job; false when the worker is gone.
    pub fn send(&self, job: Job) -> bool {
        match job {
            Job::Packet(_) | Job::Discard { .. } | Job::Shutdown => self.packets.send(job).is_ok(),
            other => self.commits.send(Input::Job(other)).is_ok(),
        }
    }
}

/// The worker threads' ends of the channels (see [`channel`]).
pub struct Queues {
    packets: Receiver<Job>,
    commits: Receiver<Input>,
    /// For the packet thread (and the replicator) to reach the committing worker.
    to_commit: Sender<Input>,
}

/// The channels between the loop and the worker threads.
pub fn channel() -> (Jobs, Queues) {
    let (ptx, prx) = std::sync::mpsc::channel();
    let (ctx, crx) = std::sync::mpsc::channel();
    (Jobs { packets: ptx, commits: ctx.clone() }, Queues { packets: prx, commits: crx, to_commit: ctx })
}

/// The running worker threads (the packet thread and the committing worker).
pub struct Threads {
    packets: std::thread::JoinHandle<()>,
    commits: std::thread::JoinHandle<()>,
}

impl Threads {
    /// Wait for both to end (after the loop's `Shutdown`); false if one panicked.
    pub fn join(self) -> bool {
        let p = self.packets.join().is_ok();
        self.commits.join().is_ok() && p
    }
}

impl Completion {
    /// The connection the completion is for.
    pub fn conn(&self) -> ConnRef {
        match self {
            Completion::Registered { conn, .. }
            | Completion::KeySaved { conn, .. }
            | Completion::Packet { conn, .. }
            | Completion::Committed { conn, .. } => *conn,
        }
    }
}

/// Anything the loop wakes on (the server implements it for its poll waker:
/// the worker does not know the loop's machinery).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// How often the worker measures the free space for `--min-free` (and
/// after every commit).
const FREE_SPACE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The worker's state. Built by [`Worker::open`] on the main thread (so a
/// startup failure can end the process with a clear message), then moved
/// into its thread by [`Worker::run`].
pub struct Worker {
    /// The data directory's lock, held as long as the worker owns the directory.
    _lock: DirLock,
    /// The database's lock (`<db>.lock`), held as long as the worker writes it.
    _db_lock: datadir::DbLock,
    storage: Storage,
    db: Db,
    keep_versions: u32,
    sync_mode: SyncMode,
    /// Received uploads waiting for their 1029 (handed over by the packet thread).
    staged: HashMap<UploadId, Staged>,
    /// The channels, once `run` has them.
    io: Option<WorkerIo>,
    metrics: Arc<Metrics>,
    /// Each client's usage (see [`Usage`]), kept up to date at every commit.
    usage: HashMap<ClientId, Usage>,
    /// When the free space was last measured (see `refresh_free_space`).
    free_checked: Option<std::time::Instant>,
    /// The last measure failed (and was logged).
    free_failed: bool,
    /// Marks of files recorded before their one sync may be left (see
    /// `commit.rs`, `record`).
    unsynced: bool,
    /// Batches of new files get one sync (syncfs, and the database on the
    /// data directory's filesystem).
    one_sync: bool,
    /// How many syncfs calls have failed (read by the packet thread when an
    /// upload starts; see [`packets::Staged`]).
    failed_syncs: Arc<std::sync::atomic::AtomicU64>,
    /// Verified files missing at start (their rows kept, see `reconcile`):
    /// stored path -> the size their row counts in its client's usage, until
    /// the name is stored again (a new file that replaces the row).
    missing: HashMap<String, u64>,
    /// The S3 tier, when `--s3-endpoint` is set.
    #[cfg(feature = "s3")]
    replica: Option<replica::Replica>,
}

struct WorkerIo {
    jobs: Receiver<Input>,
    done: Sender<Completion>,
    waker: Arc<dyn Wake>,
}

/// Startup report: what reconciliation fixed and the known clients.
pub struct Opened {
    pub worker: Worker,
    pub clients: Vec<ClientRecord>,
    /// Verified files on record (for the metrics).
    pub verified_files: usize,
    /// Each client's last verified file, seconds since the epoch (for the metrics).
    pub last_verified: Vec<(String, u64)>,
    /// Each client's usage (current files and kept versions).
    pub usage: HashMap<ClientId, Usage>,
    /// The data directory and its lock files as they were once locked.
    pub watch: DataDirWatch,
}

/// The data directory and both lock files (its own, and the database's)
/// as the worker found them once it held them ([`crate::datadir::Watch`]),
/// for the loop to check while it serves: one removed or replaced means the
/// server must stop.
#[derive(Debug)]
pub struct DataDirWatch(crate::datadir::Watch);

impl DataDirWatch {
    fn of(cfg: &crate::config::Config) -> DataDirWatch {
        let mut db_lock = cfg.db_path().into_os_string();
        db_lock.push(".lock");
        DataDirWatch(crate::datadir::Watch::new(&[
            cfg.data_dir.clone(),
            cfg.data_dir.join(crate::datadir::LOCK_FILE),
            std::path::PathBuf::from(db_lock),
        ]))
    }

    /// What became of the first one that is gone or another file now.
    pub fn changed(&self) -> Option<String> {
        self.0.changed()
    }
}

/// SQLite opens its files by path: none of them may be a link (or anything
/// but a file) where the database belongs in the data directory.
fn check_database_files(
    lock: &DirLock,
    data_dir: &std::path::Path,
    db_path: &std::path::Path,
) -> Result<(), OpenError> {
    if db_path.parent() != Some(data_dir) {
        return Ok(());
    }
    let Some(db_name) = db_path.file_name().and_then(|n| n.to_str()) else { return Ok(()) };
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let name = format!("{db_name}{suffix}");
        match lock.dir().stat(&name) {
            Ok(None) | Ok(Some(datadir::Meta { kind: Kind::File, .. })) => {}
            Ok(Some(m)) => {
                return Err(OpenError::DatabaseNotAFile { path: db_path.to_path_buf(), name, kind: m.kind })
            }
            Err(source) => return Err(OpenError::DatabaseFile { path: db_path.to_path_buf(), name, source }),
        }
    }
    Ok(())
}

/// A data directory that holds stored files (`files/` or `versions/` not
/// empty) but no database at `db_path` is refused, before anything is
/// created: a new, empty database would leave every stored file without a
/// row, and start-up would move them all to orphans/. The usual cause is a
/// start without the `--db` (or `BACKUPD_DB`) the server normally runs with.
/// A database file of 0 bytes (with no WAL beside it that holds pages) is
/// no database either: SQLite would take it as a new one (a failed copy, a
/// full disk, `> backupd.db`).
fn check_database_exists(
    lock: &DirLock,
    data_dir: &std::path::Path,
    db_path: &std::path::Path,
) -> Result<(), OpenError> {
    let what = match std::fs::symlink_metadata(db_path) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => {
            let mut wal = db_path.as_os_str().to_owned();
            wal.push("-wal");
            if std::fs::symlink_metadata(&wal).is_ok_and(|w| w.len() > 0) {
                return Ok(());
            }
            format!("the database {} is empty (0 bytes)", db_path.display())
        }
        Err(_) => format!("there is no database at {}", db_path.display()),
    };
    let mut stored = Vec::new();
    for sub in ["files", "versions"] {
        let found = match lock.dir().open_dir(sub) {
            Ok(d) => !d
                .entries()
                .map_err(|source| OpenError::Storage { dir: data_dir.join(sub), source })?
                .is_empty(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => return Err(OpenError::Storage { dir: data_dir.join(sub), source }),
        };
        if found {
            stored.push(format!("{sub}/"));
        }
    }
    if stored.is_empty() {
        return Ok(());
    }
    Err(OpenError::DataDir(format!(
        "data directory {} holds stored files ({}) but {what}: pass the --db (or BACKUPD_DB) this \
         data directory was used with, or put its database back (`backupd snapshot` makes copies). A \
         new database would leave every stored file without its row; to start over deliberately, \
         move the data directory away and start with a new one",
        data_dir.display(),
        stored.join(", "),
    )))
}

fn stamp() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A seed for upload ids that is unique across restarts.
pub fn upload_id_seed() -> UploadId {
    stamp()
}

impl Worker {
    /// Lock and check the data directory (see [`datadir`]), open storage
    /// and database, and reconcile them after a crash.
    pub fn open(cfg: &crate::config::Config) -> Result<Opened, OpenError> {
        let (data_dir, db_path) = (&cfg.data_dir, &cfg.db_path());
        let (keep_versions, sync_mode) = (cfg.keep_versions, cfg.sync_mode);
        #[cfg(not(feature = "s3"))]
        if std::env::var_os("BACKUPD_S3_ENDPOINT").is_some_and(|v| !v.is_empty()) {
            return Err(OpenError::NoS3);
        }
        // The S3 flags are checked (and the credentials read) before the data directory is touched.
        #[cfg(feature = "s3")]
        let s3 = cfg.s3.settings().map_err(OpenError::S3)?;
        #[cfg(feature = "s3")]
        if let Some(s) = &s3 {
            s3::client::Bucket::new(s).map_err(OpenError::S3)?;
        }
        let lock = datadir::acquire(data_dir).map_err(OpenError::DataDir)?;
        check_database_exists(&lock, data_dir, db_path)?;
        let id = datadir::prepare(&lock).map_err(OpenError::DataDir)?;
        check_database_files(&lock, data_dir, db_path)?;
        let db_lock = datadir::lock_database(db_path).map_err(OpenError::DataDir)?;
        let database = |source| OpenError::Database { path: db_path.clone(), source };
        let db = Db::open(db_path, cfg.db_busy_timeout).map_err(database)?;
        db::check_owner(db.conn(), db_path, data_dir, Some(&id), db::Opener::Server)
            .map_err(OpenError::DataDir)?;
        let storage =
            Storage::open(data_dir).map_err(|source| OpenError::Storage { dir: data_dir.clone(), source })?;
        // One sync per batch of new files needs the database (and its WAL,
        // beside it) on the data directory's filesystem: syncfs covers one.
        let same_fs =
            |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
        let one_sync = sync_mode == SyncMode::Syncfs && {
            let same = matches!((same_fs(data_dir), same_fs(db_path)), (Ok(a), Ok(b)) if a == b);
            if !same {
                log::info!("database not on the data directory's filesystem: each batch syncs both");
            }
            same
        };
        let mut w = Worker {
            _lock: lock,
            _db_lock: db_lock,
            storage,
            db,
            keep_versions,
            sync_mode,
            staged: HashMap::new(),
            io: None,
            metrics: Arc::new(Metrics::new()),
            usage: HashMap::new(),
            free_checked: None,
            free_failed: false,
            unsynced: false,
            one_sync,
            failed_syncs: Default::default(),
            missing: HashMap::new(),
            #[cfg(feature = "s3")]
            replica: s3.map(replica::Replica::new),
        };
        w.reconcile().map_err(|source| OpenError::Reconcile { dir: data_dir.clone(), source })?;
        let clients = w.db.load_clients().map_err(database)?;
        let verified_files = w.db.file_rows().map(|r| r.iter().filter(|r| r.verified).count()).unwrap_or(0);
        let last_verified = w.db.last_verified().unwrap_or_default();
        // Usage: the files' sizes from the database, the versions' from one
        // walk of versions/ (after reconciliation, which may have changed both).
        // The walk (about a second per 100,000 versions with a warm cache) is
        // made only when something reads the figures: a quota or the metrics.
        let mut usage = w.db.current_usage().map_err(database)?;
        if cfg.quota > 0 || cfg.quota_files > 0 || cfg.metrics_file.is_some() {
            let versions = w.storage.version_usage().map_err(OpenError::Versions)?;
            for (id, v) in versions {
                usage.entry(id).or_default().add(v);
            }
        }
        w.usage = usage.clone();
        Ok(Opened { worker: w, clients, verified_files, last_verified, usage, watch: DataDirWatch::of(cfg) })
    }

    /// Report to these metrics (shared with the loop).
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
        self.free_checked = None;
        self.refresh_free_space();
    }

    /// Measure the free space of the data directory's filesystem into the
    /// metrics' atomic, which the loop reads for `--min-free`: at most once a
    /// [`FREE_SPACE_EVERY`] (a commit clears `free_checked` to measure at
    /// once). A failed measure leaves it unknown (no refusal), logged once.
    fn refresh_free_space(&mut self) {
        let now = std::time::Instant::now();
        if self.free_checked.is_some_and(|t| now.duration_since(t) < FREE_SPACE_EVERY) {
            return;
        }
        self.free_checked = Some(now);
        let free = match self.storage.free_bytes() {
            Ok(b) => {
                self.free_failed = false;
                b
            }
            Err(e) => {
                if !self.free_failed {
                    log::warn!("worker: cannot measure the free space of the data directory: {e}");
                }
                self.free_failed = true;
                crate::metrics::FREE_UNKNOWN
            }
        };
        self.metrics.free_bytes.store(free, std::sync::atomic::Ordering::Relaxed);
    }

    /// Start the packet thread and the committing worker (this one), on the
    /// channels of [`channel`]. `spare_descriptors`: what the descriptor
    /// limit leaves beyond the connections and the worker's own (a bound on
    /// small uploads' temp files without a name, see [`storage::TempFiles`]).
    #[cfg_attr(not(feature = "s3"), allow(unused_mut))] // the replicator starts here
    pub fn spawn(
        mut self,
        queues: Queues,
        done: Sender<Completion>,
        waker: Arc<dyn Wake>,
        budget: crate::budget::Budget,
        spare_descriptors: usize,
    ) -> std::io::Result<Threads> {
        let Queues { packets, commits, to_commit } = queues;
        let unnamed_max = match self.sync_mode {
            // A file linked into place would need a sync of its own: the
            // directory's does not write the file's new link count.
            SyncMode::Fsync => {
                log::info!("--sync-mode fsync: small uploads use named temp files");
                0
            }
            SyncMode::Syncfs if spare_descriptors == 0 => {
                log::info!(
                    "the descriptor limit leaves none for temp files without a name: small uploads use named ones"
                );
                0
            }
            SyncMode::Syncfs => spare_descriptors.min(storage::UNNAMED_MAX),
        };
        let temps = self.storage.temp_files(unnamed_max)?;
        #[cfg(feature = "s3")]
        self.start_replica(&to_commit);
        let failed_syncs = self.failed_syncs.clone();
        let (metrics, done2) = (self.metrics.clone(), done.clone());
        let stage = Packets::new(temps, to_commit, done2, waker.clone(), metrics, failed_syncs, budget);
        let named = |n: &str| std::thread::Builder::new().name(n.into());
        let packets = named("backupd-packets").spawn(move || stage.run(packets))?;
        let commits = named("backupd-worker").spawn(move || self.run(commits, done, waker))?;
        Ok(Threads { packets, commits })
    }

    /// Serve the committing worker's input until the packet thread passes on
    /// the loop's `Shutdown` (or everyone hung up).
    fn run(mut self, jobs: Receiver<Input>, done: Sender<Completion>, waker: Arc<dyn Wake>) {
        self.io = Some(WorkerIo { jobs, done, waker });
        let mut batch: Vec<Job> = Vec::new();
        let mut stop = false;
        while !stop {
            // Out of `self` while inputs are taken (a report goes to `self`).
            let Some(io) = self.io.take() else { break };
            // Idle: wake once a FREE_SPACE_EVERY to measure the free space
            // (and, with the S3 tier, when a held 1604 must give up).
            use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
            let first = match io.jobs.try_recv() {
                Ok(i) => Ok(i),
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {
                    // Nothing queued: the marks of the last batch of new
                    // files (its 1604s are out) go now. Under load, the
                    // next batch's transaction clears them instead.
                    self.clear_unsynced();
                    io.jobs.recv_timeout(self.idle_wait())
                }
            };
            match first {
                Ok(i) => stop |= self.take(i, &mut batch),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            while !stop && batch.len() < 512 {
                match io.jobs.try_recv() {
                    Ok(i) => stop |= self.take(i, &mut batch),
                    Err(_) => break,
                }
            }
            self.io = Some(io);
            self.metrics.worker_queue.add(-(batch.len() as i64));
            if !batch.is_empty() {
                self.handle_batch(&mut batch);
            }
            self.after_reports();
            // Uploads fill the disk between commits too: measured at least once
            // a FREE_SPACE_EVERY while busy (and after each commit, see group_commit).
            self.refresh_free_space();
        }
        self.clear_unsynced();
        #[cfg(feature = "s3")]
        self.stop_replica();
        // Anything still staged was never confirmed: remove it.
        for (upload, s) in std::mem::take(&mut self.staged) {
            if s.unnamed.is_none() {
                let _ = self.storage.remove_temp(upload);
            }
        }
        log::debug!("worker: stopped");
    }

    /// One input: a job joins the batch, a staged upload waits for its
    /// commit, a discard removes it, a report waits for the batch's end.
    /// True at the stop.
    fn take(&mut self, i: Input, batch: &mut Vec<Job>) -> bool {
        match i {
            Input::Job(j) => batch.push(j),
            Input::Staged(s) => {
                self.staged.insert(s.upload, s);
            }
            Input::Discard(upload) => {
                // One without a name goes with its descriptor.
                if self.staged.remove(&upload).is_some_and(|s| s.unnamed.is_none()) {
                    if let Err(e) = self.storage.remove_temp(upload) {
                        log::warn!("worker: cannot remove {}: {e}", self.storage.temp_path(upload).display());
                    }
                }
            }
            Input::Stop => return true,
            #[cfg(feature = "s3")]
            Input::Replicated(r) => {
                if let Some(rep) = self.replica.as_mut() {
                    rep.reports.push(r);
                }
            }
        }
        false
    }

    /// How long to wait for input when idle.
    fn idle_wait(&self) -> std::time::Duration {
        #[cfg(feature = "s3")]
        if let Some(at) = self.replica.as_ref().and_then(|r| r.next_deadline()) {
            let d = at.saturating_duration_since(std::time::Instant::now());
            return d.clamp(std::time::Duration::from_millis(1), FREE_SPACE_EVERY);
        }
        FREE_SPACE_EVERY
    }

    /// Apply the replicator's reports (S3 tier): rows done, held 1604s
    /// released; rows queued by someone else (`backupd s3 resync`) sent on.
    fn after_reports(&mut self) {
        #[cfg(feature = "s3")]
        {
            self.dispatch_idle();
            let mut out = Vec::new();
            self.replicated(&mut out);
            if !out.is_empty() {
                self.send(out);
            }
        }
    }

    /// Send completions and wake the loop.
    fn send(&self, completions: impl IntoIterator<Item = Completion>) {
        if let Some(io) = &self.io {
            for c in completions {
                let _ = io.done.send(c);
            }
            io.waker.wake();
        }
    }

    /// May the keyless registration `id` be reclaimed? Only if nothing of it
    /// is stored: no key and no file row in the database, no usage counted,
    /// nothing under files/ or versions/. Why not is logged.
    fn stores_nothing(&self, id: &ClientId) -> bool {
        let hex = crate::protocol::id_hex(id);
        let db = self.db.keyless_without_files(id);
        let disk = self.storage.holds_client(id);
        let counted = self.usage.get(id).is_some_and(|u| *u != Usage::default());
        let why = match (db, disk) {
            (Err(e), _) => format!("cannot read the database: {e}"),
            (_, Err(e)) => format!("cannot look under files/ and versions/: {e}"),
            (Ok(false), _) => "it has a key or a file row on record".to_string(),
            (_, Ok(true)) => "files/ or versions/ hold something of it".to_string(),
            (Ok(true), Ok(false)) if counted => "it stores files".to_string(),
            (Ok(true), Ok(false)) => return true,
        };
        log::warn!("worker: client {hex} is not reclaimed: {why}");
        false
    }

    fn handle_batch(&mut self, batch: &mut Vec<Job>) {
        let mut writes: Vec<(Pending, Vec<Write>)> = Vec::new();
        let mut refused: Vec<Completion> = Vec::new();
        let mut commits: Vec<(ConnRef, UploadId, ClientId, String)> = Vec::new();
        for job in batch.drain(..) {
            match job {
                Job::Register { conn, id, name, reclaim: None } => writes.push((
                    Pending::Register { conn, id, reclaim: None },
                    vec![Write::InsertClient { id, name }],
                )),
                Job::Register { conn, id, name, reclaim: Some(old) } => {
                    if self.stores_nothing(&old) {
                        let w = vec![Write::RemoveClient { id: old }, Write::InsertClient { id, name }];
                        writes.push((Pending::Register { conn, id, reclaim: Some(old) }, w));
                    } else {
                        let reclaimed = Some(Reclaimed::Kept(old));
                        refused.push(Completion::Registered { conn, id, ok: false, reclaimed });
                    }
                }
                Job::SetKey { conn, id, der } => {
                    let pending = Pending::SetKey { conn, id, der: der.clone() };
                    writes.push((pending, vec![Write::SetPublicKey { id, der }]))
                }
                Job::Touch { id } => writes.push((Pending::Silent, vec![Write::Touch { id }])),
                Job::Commit { conn, upload, client, name } => commits.push((conn, upload, client, name)),
                // The packet thread's: `Jobs::send` never routes them here.
                Job::Packet(_) | Job::Discard { .. } | Job::Shutdown => {
                    log::error!("worker: internal error: a packet-thread job reached the committing worker")
                }
            }
        }
        if writes.is_empty() && commits.is_empty() {
            if !refused.is_empty() {
                self.send(refused);
            }
            return;
        }
        let mut out = refused;
        self.group_commit(commits, writes, &mut out);
        #[cfg(feature = "s3")]
        self.dispatch_and_hold(&mut out);
        self.send(out);
    }
}
