//! The worker thread: the only code that touches the storage directory and
//! the SQLite database.
//!
//! The event loop sends [`Job`]s (owning their buffers: packet bytes are
//! moved, never copied) over a channel; the worker answers each with at most
//! one [`Completion`] on another channel and wakes the loop through its
//! [`Wake`]. Jobs are taken in batches: packets are decrypted,
//! checksummed and appended to temp files as they come, and every commit,
//! registration and key change queued in the batch is made durable together:
//! one intent transaction, renames, one fsync per touched directory, one
//! database transaction (group commit).

pub mod db;
mod fault;
pub mod storage;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write as _};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::budget::Piece;
use crate::config::SyncMode;
use crate::crypto::{Cksum, StreamDecryptor, AES_KEY_LEN};
use crate::datadir::{self, DirLock, Kind};
use crate::metrics::Metrics;
use crate::protocol::{id_hex, ClientId};
use db::{ClientRecord, Db, Intent, Write};
use fault::Point;
use storage::{Dirty, Publish, Storage};

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacketOutcome {
    /// Stored; more packets expected.
    Accepted,
    /// The last packet is in and the file is staged (fsynced).
    Received { cksum: u32, ciphertext_len: u64, plain_len: u64 },
    /// The upload failed (decryption, size, disk); its temp file is gone.
    /// Later packets of it are `Ignored`.
    Failed(String),
    /// The upload was already failed or discarded.
    Ignored,
}

pub enum Completion {
    Registered {
        conn: ConnRef,
        id: ClientId,
        ok: bool,
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
    Packet {
        conn: ConnRef,
        upload: UploadId,
        buffer: Piece,
        last: bool,
        outcome: PacketOutcome,
    },
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

/// Anything the loop wakes on (the server implements it for its poll waker:
/// the worker does not know the loop's machinery).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// An upload at the worker: its temp file (`tmp/<n>.part`), the decryptor
/// and cksum of its stream, until it is published or discarded.
struct PartFile {
    client: ClientId,
    key: SessionKey,
    /// Open while packets arrive; closed once the upload is received, so that
    /// staged files awaiting their 1029 hold no file descriptor.
    file: Option<File>,
    dec: Option<StreamDecryptor>,
    cksum: Cksum,
    ciphertext: u64,
    segment_start: u64,
    /// Bytes of the temp file before this offset have been handed to writeback,
    writeback_from: u64,
    /// ... and before this one written out and dropped from the page cache.
    dropped_to: u64,
    received: Option<(u32, u64)>,
}

/// How often the worker measures the free space for `--min-free` (and
/// after every commit).
const FREE_SPACE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of a packet processed at a time (decrypt, cksum, write): fits L2.
const CACHE_PIECE: usize = 128 * 1024;

/// How much an upload writes between two writeback kicks.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Write-behind for a large upload, every WRITEBACK_STEP bytes: start
/// writeback of the range just written, then wait for the range before it
/// and drop it from the page cache. Dirty pages stay bounded (two steps),
/// their pages are recycled instead of the page cache growing into new
/// memory (costly in a VM, scarce on a small box), and the sync at commit
/// time has at most two steps left to flush. A writeback error is reported
/// here (and consumed: a later fsync may not see it again), so it fails the
/// upload; only "not supported" is ignored.
fn write_behind(f: &File, dropped_to: u64, kicked_from: u64, written: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    fault::check(Point::WriteBehind, "")?;
    let unsupported = |e: &io::Error| {
        matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL | libc::ESPIPE | libc::EOPNOTSUPP))
    };
    let range = |from: u64, len: u64, flags| {
        // SAFETY: a plain syscall on a descriptor owned by `f`.
        if unsafe { libc::sync_file_range(fd, from as i64, len as i64, flags) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if unsupported(&e) {
            log::debug!("worker: sync_file_range: {e}");
            return Ok(false);
        }
        Err(e)
    };
    if !range(kicked_from, written - kicked_from, libc::SYNC_FILE_RANGE_WRITE)? {
        return Ok(());
    }
    if kicked_from > dropped_to {
        let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let len = kicked_from - dropped_to;
        if range(dropped_to, len, all)? {
            // SAFETY: advice only, on a descriptor owned by `f`.
            unsafe { libc::posix_fadvise(fd, dropped_to as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        }
    }
    Ok(())
}

/// A session key held by the worker; zeroed when dropped so that it does
/// not linger in freed memory.
struct SessionKey([u8; AES_KEY_LEN]);

impl Drop for SessionKey {
    fn drop(&mut self) {
        self.0 = [0; AES_KEY_LEN];
    }
}

/// The worker's state. Built by [`Worker::open`] on the main thread (so a
/// startup failure can end the process with a clear message), then moved
/// into its thread by [`Worker::run`].
pub struct Worker {
    /// The data directory's lock, held as long as the worker owns the directory.
    _lock: DirLock,
    storage: Storage,
    db: Db,
    keep_versions: u32,
    sync_mode: SyncMode,
    uploads: HashMap<UploadId, PartFile>,
    /// The channels, once `run` has them (see `stage_arrivals`).
    io: Option<WorkerIo>,
    /// Jobs taken off the channel during a group commit that must wait for
    /// the next batch (everything but file packets), in arrival order.
    carry: Vec<Job>,
    metrics: Arc<Metrics>,
    /// Each client's usage (see [`Usage`]), kept up to date at every commit.
    usage: HashMap<ClientId, Usage>,
    /// When the free space was last measured (see `refresh_free_space`).
    free_checked: Option<std::time::Instant>,
    /// The last measure failed (and was logged).
    free_failed: bool,
}

struct WorkerIo {
    jobs: Receiver<Job>,
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
}

fn stamp() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A seed for upload ids that is unique across restarts.
pub fn upload_id_seed() -> UploadId {
    stamp()
}

/// A batch item whose database writes succeed or fail together, and what to
/// report for it.
enum Pending {
    Register { conn: ConnRef, id: ClientId },
    SetKey { conn: ConnRef, id: ClientId, der: Vec<u8> },
    Silent,
}

/// A received upload on its way into `files/` in a group commit.
struct Publishing {
    conn: ConnRef,
    upload: UploadId,
    client: ClientId,
    name: String,
    size: u64,
    cksum: u32,
    publish: Publish,
}

impl Worker {
    /// Lock and check the data directory (see [`datadir`]), open storage
    /// and database, and reconcile them after a crash.
    pub fn open(cfg: &crate::config::Config) -> Result<Opened, String> {
        let (data_dir, db_path) = (&cfg.data_dir, &cfg.db_path());
        let (keep_versions, sync_mode) = (cfg.keep_versions, cfg.sync_mode);
        let lock = datadir::acquire(data_dir)?;
        datadir::prepare(&lock)?;
        // SQLite opens its files by path: check that none of them is a link
        // (or anything but a file) where the database belongs.
        if db_path.parent() == Some(data_dir.as_path()) {
            if let Some(db_name) = db_path.file_name().and_then(|n| n.to_str()) {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let name = format!("{db_name}{suffix}");
                    match lock.dir().stat(&name) {
                        Ok(None) | Ok(Some(datadir::Meta { kind: Kind::File, .. })) => {}
                        Ok(Some(m)) => {
                            return Err(format!(
                                "database {}: {name} is a {:?}, not a file; backupd follows no link \
                                 inside its data directory (move it away, keep the real file there)",
                                db_path.display(),
                                m.kind
                            ))
                        }
                        Err(e) => return Err(format!("database {}: {name}: {e}", db_path.display())),
                    }
                }
            }
        }
        let storage =
            Storage::open(data_dir).map_err(|e| format!("data directory {}: {e}", data_dir.display()))?;
        let db = Db::open(db_path, cfg.db_busy_timeout)
            .map_err(|e| format!("database {}: {e}", db_path.display()))?;
        let mut w = Worker {
            _lock: lock,
            storage,
            db,
            keep_versions,
            sync_mode,
            uploads: HashMap::new(),
            io: None,
            carry: Vec::new(),
            metrics: Arc::new(Metrics::new()),
            usage: HashMap::new(),
            free_checked: None,
            free_failed: false,
        };
        w.reconcile().map_err(|e| format!("reconciling {}: {e}", data_dir.display()))?;
        let clients = w.db.load_clients().map_err(|e| format!("database {}: {e}", db_path.display()))?;
        let verified_files = w.db.file_rows().map(|r| r.iter().filter(|r| r.verified).count()).unwrap_or(0);
        let last_verified = w.db.last_verified().unwrap_or_default();
        // Usage: the files' sizes from the database, the versions' from one
        // walk of versions/ (after reconciliation, which may have changed both).
        // The walk (about a second per 100,000 versions with a warm cache) is
        // made only when something reads the figures: a quota or the metrics.
        let mut usage = w.db.current_usage().map_err(|e| format!("database {}: {e}", db_path.display()))?;
        if cfg.quota > 0 || cfg.quota_files > 0 || cfg.metrics_file.is_some() {
            let versions = w.storage.version_usage().map_err(|e| format!("versions/: {e}"))?;
            for (id, v) in versions {
                usage.entry(id).or_default().add(v);
            }
        }
        w.usage = usage.clone();
        Ok(Opened { worker: w, clients, verified_files, last_verified, usage })
    }

    /// Repair what a crash can leave behind. Each fix is logged.
    fn reconcile(&mut self) -> Result<(), String> {
        let (removed, moved) = self.storage.clear_tmp().map_err(|e| format!("tmp/: {e}"))?;
        if removed > 0 {
            log::info!("startup: removed {removed} unfinished upload(s) left in tmp/");
        }
        if moved > 0 {
            log::error!("startup: moved {moved} unexpected entr(ies) out of tmp/ into orphans/");
        }
        // Publishes interrupted between their renames and their database commit.
        let intents = self.db.intents().map_err(|e| e.to_string())?;
        for i in &intents {
            let p = Publish { target: i.target.clone(), saved_previous: i.saved_previous.clone() };
            let verified_elsewhere = p.saved_previous.is_none() && self.verified_path(&i.target);
            if !verified_elsewhere {
                match self.storage.undo(&p) {
                    Ok(()) => log::warn!("startup: undid unacknowledged publish of {}", i.target),
                    Err(e) => log::error!("startup: cannot undo publish of {}: {e}", i.target),
                }
            }
        }
        if !intents.is_empty() {
            // The undo must be durable before its intents go.
            self.storage.sync_filesystem().map_err(|e| format!("syncfs: {e}"))?;
            let clear: Vec<Write> = intents.iter().map(|i| Write::ClearIntent { upload: i.upload }).collect();
            self.db.apply(&clear).map_err(|e| e.to_string())?;
        }
        // Files must have a verified row (one walk of files/, one stat per entry) ...
        let rows = self.db.file_rows().map_err(|e| e.to_string())?;
        let verified: HashSet<&str> = rows.iter().filter(|r| r.verified).map(|r| r.path.as_str()).collect();
        let mut found: HashMap<String, u64> = HashMap::new();
        self.storage
            .scan_files(|path, size| {
                let keep = verified.contains(path);
                if keep {
                    found.insert(path.to_string(), size);
                }
                keep
            })
            .map_err(|e| format!("files/: {e}"))?;
        // ... and verified rows their file, of the size recorded.
        let mut torn = 0;
        for r in rows.iter().filter(|r| r.verified) {
            match (found.get(&r.path), r.size) {
                (None, _) => {
                    log::error!(
                        "startup: verified file {} of client {} is missing; marked unverified",
                        r.path,
                        id_hex(&r.id)
                    );
                    self.db.mark_unverified(&r.id, &r.name).map_err(|e| e.to_string())?;
                }
                (Some(&on_disk), Some(size)) if on_disk != size => {
                    log::error!(
                        "startup: verified file {} of client {} is {on_disk} bytes on disk but {size} \
                         in its database row; left in place for the operator",
                        r.path,
                        id_hex(&r.id)
                    );
                    torn += 1;
                }
                _ => {}
            }
        }
        if torn > 0 {
            log::error!("startup: {torn} verified file(s) differ in size from their database rows");
        }
        Ok(())
    }

    /// A client's usage as the worker knows it now.
    fn usage_of(&self, id: &ClientId) -> Usage {
        self.usage.get(id).copied().unwrap_or_default()
    }

    fn verified_path(&self, rel: &str) -> bool {
        self.db.file_rows().map(|rows| rows.iter().any(|r| r.verified && r.path == rel)).unwrap_or(false)
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

    /// Serve jobs until `Shutdown` or until the loop hangs up.
    pub fn run(mut self, jobs: Receiver<Job>, done: Sender<Completion>, waker: Arc<dyn Wake>) {
        self.io = Some(WorkerIo { jobs, done, waker });
        let mut batch: Vec<Job> = Vec::new();
        loop {
            batch.append(&mut self.carry);
            let Some(io) = self.io.as_ref() else { break };
            if batch.is_empty() {
                // Idle: wake once a FREE_SPACE_EVERY to measure the free space.
                match io.jobs.recv_timeout(FREE_SPACE_EVERY) {
                    Ok(j) => batch.push(j),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.refresh_free_space();
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            while batch.len() < 512 {
                match io.jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.metrics.worker_queue.add(-(batch.len() as i64));
            let stop = self.handle_batch(&mut batch);
            // Uploads fill the disk between commits too: measured at least once
            // a FREE_SPACE_EVERY while busy (and after each commit, see group_commit).
            self.refresh_free_space();
            if stop {
                break;
            }
        }
        // Anything still staged was never confirmed: remove it.
        for (upload, _) in std::mem::take(&mut self.uploads) {
            let _ = self.storage.remove_temp(upload);
        }
        log::debug!("worker: stopped");
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

    /// Called while a group commit waits for the disk: stage the file packets
    /// that arrived meanwhile, so that a small upload's 1603 does not wait for
    /// another batch's sync. Every other job is kept, in order, for the next
    /// batch. (Reordering packets ahead of those is safe: the loop sends no job
    /// for an upload after its Commit or Discard, and a connection sends
    /// nothing after a Commit, Register or SetKey until that job's reply.)
    fn stage_arrivals(&mut self) {
        let mut staged = Vec::new();
        while let Some(j) = self.io.as_ref().and_then(|io| io.jobs.try_recv().ok()) {
            self.metrics.worker_queue.add(-1);
            match j {
                Job::Packet(p) => staged.push(self.packet(p)),
                other => self.carry.push(other),
            }
        }
        if !staged.is_empty() {
            self.send(staged);
        }
    }

    fn handle_batch(&mut self, batch: &mut Vec<Job>) -> bool {
        let mut stop = false;
        let mut writes: Vec<(Pending, Vec<Write>)> = Vec::new();
        let mut commits: Vec<(ConnRef, UploadId, ClientId, String)> = Vec::new();
        let mut staged = Vec::new();
        for job in batch.drain(..) {
            match job {
                Job::Packet(p) => staged.push(self.packet(p)),
                Job::Register { conn, id, name } => {
                    writes.push((Pending::Register { conn, id }, vec![Write::InsertClient { id, name }]))
                }
                Job::SetKey { conn, id, der } => {
                    let pending = Pending::SetKey { conn, id, der: der.clone() };
                    writes.push((pending, vec![Write::SetPublicKey { id, der }]))
                }
                Job::Touch { id } => writes.push((Pending::Silent, vec![Write::Touch { id }])),
                Job::Commit { conn, upload, client, name } => commits.push((conn, upload, client, name)),
                Job::Discard { upload, failed } => {
                    if self.uploads.remove(&upload).is_some() {
                        if let Err(e) = self.storage.remove_temp(upload) {
                            log::warn!(
                                "worker: cannot remove {}: {e}",
                                self.storage.temp_path(upload).display()
                            );
                        }
                    }
                    if let Some((id, _)) = failed {
                        log::debug!(
                            "worker: upload {upload} of client {} aborted; nothing recorded",
                            id_hex(&id)
                        );
                    }
                }
                Job::Shutdown => stop = true,
            }
        }
        if !staged.is_empty() {
            self.send(staged);
        }
        if writes.is_empty() && commits.is_empty() {
            return stop;
        }
        let mut out = Vec::new();
        self.group_commit(commits, writes, &mut out);
        self.send(out);
        stop
    }

    /// Decrypt, checksum and append one packet.
    fn packet(&mut self, mut p: PacketJob) -> Completion {
        let (conn, upload, last) = (p.conn, p.upload, p.last);
        let outcome = match self.packet_inner(&mut p) {
            Ok(o) => o,
            Err(reason) => {
                if self.uploads.remove(&upload).is_some() {
                    let _ = self.storage.remove_temp(upload);
                }
                PacketOutcome::Failed(reason)
            }
        };
        Completion::Packet { conn, upload, buffer: p.content, last, outcome }
    }

    fn packet_inner(&mut self, p: &mut PacketJob) -> Result<PacketOutcome, String> {
        if let Some(start) = p.start.take() {
            let file =
                self.storage.create_temp(p.upload).map_err(|e| format!("cannot create temp file: {e}"))?;
            self.uploads.insert(
                p.upload,
                PartFile {
                    client: start.client,
                    key: SessionKey(start.key),
                    file: Some(file),
                    dec: None,
                    cksum: Cksum::new(),
                    ciphertext: 0,
                    segment_start: 0,
                    writeback_from: 0,
                    dropped_to: 0,
                    received: None,
                },
            );
        }
        let Some(u) = self.uploads.get_mut(&p.upload) else {
            return Ok(PacketOutcome::Ignored);
        };
        if u.received.is_some() {
            return Err("packet after the last one".into());
        }
        if p.new_segment {
            u.dec = Some(StreamDecryptor::new(&u.key.0));
            u.segment_start = u.cksum.len();
        }
        let content = &mut p.content.bytes[..];
        u.ciphertext += content.len() as u64;
        let PartFile { file: Some(file), cksum, dec, .. } = u else {
            return Err("packet after the last one".into());
        };
        let mut err: Option<io::Error> = None;
        let mut sink = |pt: &[u8]| {
            if err.is_none() {
                cksum.update(pt);
                if let Err(e) = fault::check(Point::Write, "").and_then(|_| file.write_all(pt)) {
                    err = Some(e);
                }
            }
        };
        match dec.as_mut() {
            // In cache-sized pieces: each is decrypted, checksummed and copied
            // to the page cache while it is still in L2, instead of three
            // passes over a whole packet through main memory.
            Some(dec) => {
                for piece in content.chunks_mut(CACHE_PIECE) {
                    dec.update(piece, &mut sink);
                }
            }
            // The empty last packet of convention 2 follows the completed stream.
            None if content.is_empty() => {}
            None => return Err("packet outside a CBC stream".into()),
        }
        if let Some(expected) = p.end_segment {
            let d = u.dec.take().ok_or("no CBC stream to finish")?;
            let PartFile { file: Some(file), cksum, .. } = u else {
                return Err("packet after the last one".into());
            };
            let mut sink = |pt: &[u8]| {
                if err.is_none() {
                    cksum.update(pt);
                    if let Err(e) = fault::check(Point::Write, "").and_then(|_| file.write_all(pt)) {
                        err = Some(e);
                    }
                }
            };
            d.finish(&mut sink).map_err(|_| "decryption failed".to_string())?;
            if u.cksum.len() - u.segment_start != expected {
                return Err("decryption failed".into());
            }
        }
        if let Some(e) = err {
            return Err(format!("cannot write temp file: {e}"));
        }
        // Write-behind (see `write_behind`).
        let written = u.cksum.len();
        if written - u.writeback_from >= WRITEBACK_STEP {
            if let Some(f) = &u.file {
                write_behind(f, u.dropped_to, u.writeback_from, written)
                    .map_err(|e| format!("cannot write temp file (writeback): {e}"))?;
            }
            u.dropped_to = u.writeback_from;
            u.writeback_from = written;
        }
        if !p.last {
            return Ok(PacketOutcome::Accepted);
        }
        if u.dec.is_some() {
            return Err("upload ended inside a CBC stream".into());
        }
        // The temp file is made durable at commit time, together with the
        // rest of its batch: 1603 promises nothing about durability, 1604 does.
        let plain_len = u.cksum.len();
        let sum = std::mem::take(&mut u.cksum).finalize();
        u.received = Some((sum, plain_len));
        u.file = None;
        Ok(PacketOutcome::Received { cksum: sum, ciphertext_len: u.ciphertext, plain_len })
    }

    /// Make a batch durable: publish intents, renames, syncs, one database
    /// transaction; then report each item (see docs/ARCHITECTURE.md). Any
    /// error of a write, sync or rename fails the files it concerns (1607) and
    /// leaves their previous versions in place.
    fn group_commit(
        &mut self,
        commits: Vec<(ConnRef, UploadId, ClientId, String)>,
        mut writes: Vec<(Pending, Vec<Write>)>,
        out: &mut Vec<Completion>,
    ) {
        let started = std::time::Instant::now();
        let mut staged: Vec<Publishing> = Vec::new();
        let mut deferred = Vec::new();
        let base = stamp();
        for (i, (conn, upload, client, name)) in commits.into_iter().enumerate() {
            // Two commits of the same file in one batch: publish the later one in the next round.
            if staged.iter().any(|s| s.client == client && s.name == name) {
                deferred.push((conn, upload, client, name));
                continue;
            }
            let ready = matches!(self.uploads.get(&upload), Some(u) if u.client == client);
            let Some(PartFile { received: Some((cksum, size)), .. }) =
                self.uploads.remove(&upload).filter(|_| ready)
            else {
                // Refused (e.g. another client's upload): the loop no longer
                // tracks it, so its temp file goes now.
                let _ = self.storage.remove_temp(upload);
                log::warn!("worker: commit of {name:?} for an upload that is not staged");
                let usage = self.usage_of(&client);
                out.push(Completion::Committed { conn, upload, ok: false, client, usage });
                continue;
            };
            match self.storage.plan_publish(&client, &name, base + i as u64) {
                Ok(publish) => staged.push(Publishing { conn, upload, client, name, size, cksum, publish }),
                Err(e) => {
                    log::error!("worker: cannot publish {name:?} of client {}: {e}", id_hex(&client));
                    let _ = self.storage.remove_temp(upload);
                    let usage = self.usage_of(&client);
                    out.push(Completion::Committed { conn, upload, ok: false, client, usage });
                }
            }
        }

        // 1. File contents (per-file mode; syncfs covers them below).
        if self.sync_mode == SyncMode::Fsync {
            let mut synced = Vec::with_capacity(staged.len());
            for s in staged.drain(..) {
                let r = self.storage.open_temp(s.upload).and_then(|f| {
                    fault::check(Point::Fdatasync, &s.name)?;
                    f.sync_data()
                });
                match r {
                    Ok(()) => synced.push(s),
                    Err(e) => {
                        log::error!("worker: cannot fsync staged {:?}: {e}", s.name);
                        fail(&self.storage, &self.usage, s, out);
                    }
                }
            }
            staged = synced;
        }

        // 2. Intents, durable before anything is renamed, for the publishes
        // that replace a verified file. A new file needs none: after a crash
        // before step 6 it has no verified row, and startup moves it out of
        // files/ (see `reconcile`); a replaced one must get its previous
        // version back, which only the intent can tell.
        let intents: Vec<Intent> = staged
            .iter()
            .filter_map(|s| {
                Some(Intent {
                    upload: s.upload,
                    target: s.publish.target.clone(),
                    saved_previous: Some(s.publish.saved_previous.clone()?),
                })
            })
            .collect();
        if !intents.is_empty() {
            let names = staged.iter().filter(|s| s.publish.saved_previous.is_some()).map(|s| s.name.as_str());
            let r = self.db.add_intents(&intents).map_err(|e| e.to_string());
            if let Err(e) = r.and_then(|_| fault::check_all(Point::Intent, names).map_err(|e| e.to_string()))
            {
                log::error!("worker: database error recording {} publish(es): {e}", staged.len());
                let clear = intents.iter().map(|i| Write::ClearIntent { upload: i.upload }).collect();
                writes.push((Pending::Silent, clear));
                for s in staged.drain(..) {
                    fail(&self.storage, &self.usage, s, out);
                }
            }
        }

        // 3. Keep previous versions, durably, then 4. rename into place.
        let mut dirty = Dirty::default();
        let mut published = Vec::new();
        let mut ok = true;
        let mut linked = Vec::new();
        for s in staged {
            match self.storage.save_previous(&s.publish, &s.name, &mut dirty) {
                Ok(()) => linked.push(s),
                Err(e) => {
                    log::error!("worker: cannot keep the previous version of {}: {e}", s.publish.target);
                    if let Err(e) = self.storage.undo(&s.publish) {
                        log::error!("worker: cannot undo publish of {}: {e}", s.publish.target);
                    }
                    writes.push((Pending::Silent, vec![Write::ClearIntent { upload: s.upload }]));
                    fail(&self.storage, &self.usage, s, out);
                }
            }
        }
        if !dirty.is_empty() {
            let names: Vec<&str> = linked.iter().map(|s| s.name.as_str()).collect();
            ok &= self.sync_dirs(&mut dirty, Point::SyncPrevious, &names);
        }
        for s in linked {
            if !ok {
                published.push(s);
                continue;
            }
            match self.storage.install(s.upload, &s.publish, &s.name, &mut dirty) {
                Ok(()) => published.push(s),
                Err(e) => {
                    log::error!("worker: cannot publish {:?} of client {}: {e}", s.name, id_hex(&s.client));
                    if let Err(e) = self.storage.undo(&s.publish) {
                        log::error!("worker: cannot undo publish of {}: {e}", s.publish.target);
                    }
                    writes.push((Pending::Silent, vec![Write::ClearIntent { upload: s.upload }]));
                    fail(&self.storage, &self.usage, s, out);
                }
            }
        }
        // 5. Directory entries (and, with syncfs, file contents) durable.
        let names: Vec<&str> = published.iter().map(|s| s.name.as_str()).collect();
        if ok && !published.is_empty() {
            ok &= self.sync_dirs(&mut dirty, Point::SyncPublish, &names);
        }
        if ok && !published.is_empty() {
            ok = fault::check_all(Point::AfterRename, names.iter().copied()).is_ok();
        }

        // Packets that arrived during the syncs are staged now, not after the commit.
        self.stage_arrivals();

        // 6. One transaction records the files; the rest of the batch follows.
        let mut all: Vec<Write> = Vec::new();
        for s in &published {
            all.push(Write::FileVerified {
                id: s.client,
                name: s.name.clone(),
                path: s.publish.target.clone(),
                size: s.size,
                cksum: s.cksum,
            });
            if s.publish.saved_previous.is_some() {
                all.push(Write::ClearIntent { upload: s.upload });
            }
        }
        let files_ok = ok
            && (published.is_empty()
                || self
                    .db
                    .apply(&all)
                    .map_err(|e| log::error!("worker: database commit failed: {e}"))
                    .is_ok());
        if files_ok && !published.is_empty() {
            // Committed: from here only a crash (for the tests) can interrupt.
            let _ = fault::check_all(Point::Commit, published.iter().map(|s| s.name.as_str()));
        }
        let others_ok = files_ok && {
            let rest: Vec<Write> = writes.iter().flat_map(|(_, w)| w.iter().cloned()).collect();
            self.db.apply(&rest).is_ok()
        };
        if !files_ok && !published.is_empty() {
            self.unpublish(&published);
        }
        if files_ok && !published.is_empty() {
            self.metrics.commit_batch_size.observe(published.len() as f64);
            self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        }
        // The space just used (and freed by pruning) counts for the next
        // packet 1: measured before the 1604s go out.
        let measure = files_ok && !published.is_empty();
        for s in published {
            if files_ok {
                if s.publish.saved_previous.is_none() {
                    self.metrics.files_stored.inc();
                }
                self.metrics.bytes_stored.add(s.size as i64);
                log::debug!(
                    "stored {} for client {} ({} bytes, cksum {})",
                    s.name,
                    id_hex(&s.client),
                    s.size,
                    s.cksum
                );
                // The new file counts in full; a replaced one stays, as a
                // version, until pruned (what pruning removes is freed).
                let mut freed = Usage::default();
                let keep = self.keep_versions as usize;
                if let Err(e) = self.storage.prune_versions(&s.client, &s.name, keep, &mut freed) {
                    log::warn!("worker: cannot prune old versions of {}: {e}", s.name);
                }
                let u = self.usage.entry(s.client).or_default();
                u.add(Usage { bytes: s.size, files: 1 });
                u.sub(freed);
                let usage = *u;
                out.push(Completion::Committed {
                    conn: s.conn,
                    upload: s.upload,
                    ok: true,
                    client: s.client,
                    usage,
                });
            } else {
                fail(&self.storage, &self.usage, s, out);
            }
        }
        if measure {
            self.free_checked = None;
            self.refresh_free_space();
        }
        // Items whose writes did not go in with the batch get one transaction each,
        // so one bad item cannot fail the others.
        for (pending, w) in writes.drain(..) {
            let ok = others_ok
                || self.db.apply(&w).map_err(|e| log::error!("worker: database write failed: {e}")).is_ok();
            match pending {
                Pending::Register { conn, id } => out.push(Completion::Registered { conn, id, ok }),
                Pending::SetKey { conn, id, der } => out.push(Completion::KeySaved { conn, id, ok, der }),
                Pending::Silent => {}
            }
        }
        if !deferred.is_empty() {
            self.group_commit(deferred, Vec::new(), out);
        }
    }

    /// Make the listed directories durable (and clear the list): one fsync
    /// each, or one syncfs for everything in `SyncMode::Syncfs`. `point`
    /// and `names` are the step and the files it is for (fault injection).
    fn sync_dirs(&self, dirty: &mut Dirty, point: Point, names: &[&str]) -> bool {
        let mut ok = true;
        match self.sync_mode {
            SyncMode::Syncfs => {
                let r = fault::check_all(point, names.iter().copied())
                    .and_then(|_| self.storage.sync_filesystem());
                if let Err(e) = r {
                    log::error!("worker: syncfs failed: {e}");
                    ok = false;
                }
            }
            SyncMode::Fsync => {
                for (rel, d) in dirty.iter() {
                    if let Err(e) = fault::check_all(point, names.iter().copied()).and_then(|_| d.sync()) {
                        log::error!("worker: cannot fsync {rel}: {e}");
                        ok = false;
                    }
                }
            }
        }
        dirty.clear();
        ok
    }

    /// A batch of publishes could not be made durable or recorded: put every
    /// target back as it was.
    fn unpublish(&mut self, published: &[Publishing]) {
        log::error!("worker: undoing {} publish(es)", published.len());
        for s in published.iter().rev() {
            if let Err(e) = self.storage.undo(&s.publish) {
                log::error!("worker: cannot undo publish of {}: {e}", s.publish.target);
            }
        }
        let mut dirty = self.storage.parent_dirs(published.iter().map(|s| s.publish.target.as_str()));
        let _ = self.sync_dirs(&mut dirty, Point::SyncPublish, &[]);
        let clear: Vec<Write> = published.iter().map(|s| Write::ClearIntent { upload: s.upload }).collect();
        if let Err(e) = self.db.apply(&clear) {
            log::warn!("worker: cannot clear publish intents ({e}); the next start will check them");
        }
    }
}

/// A staged file that will not be published: its temp file goes, its 1029 gets 1607.
fn fail(storage: &Storage, usage: &HashMap<ClientId, Usage>, s: Publishing, out: &mut Vec<Completion>) {
    let _ = storage.remove_temp(s.upload);
    let usage = usage.get(&s.client).copied().unwrap_or_default();
    out.push(Completion::Committed { conn: s.conn, upload: s.upload, ok: false, client: s.client, usage });
}
