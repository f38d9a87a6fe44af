//! The worker thread: the only code that touches the storage directory and
//! the SQLite database.
//!
//! The event loop sends [`Job`]s (owning their buffers: packet bytes are
//! moved, never copied) over a channel; the worker answers each with at most
//! one [`Completion`] on another channel and wakes the loop through a
//! `mio::Waker`. Jobs are taken in batches: packets are decrypted,
//! checksummed and appended to temp files as they come, and every commit,
//! registration and key change queued in the batch is made durable together:
//! one intent transaction, renames, one fsync per touched directory, one
//! database transaction (group commit).

pub mod db;
pub mod storage;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::budget::Piece;
use crate::crypto::{Cksum, StreamDecryptor, AES_KEY_LEN};
use crate::metrics::Metrics;
use crate::protocol::{id_hex, ClientId};
use db::{ClientRecord, Db, Intent, Write};
use storage::{Publish, Storage};

/// How the worker makes a batch durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// fdatasync every staged file and fsync every touched directory.
    Fsync,
    /// One syncfs(2) of the data directory's filesystem per step: the cost of
    /// a batch no longer grows with its number of files and directories.
    Syncfs,
}

/// A connection as the worker names it: the slab key plus a serial number
/// unique for the life of the process, so that a completion for a closed
/// connection never reaches the next connection that reuses its slab key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub key: usize,
    pub serial: u64,
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
    /// Drop a staged or in-progress upload; with `failed`, record the abort (1031).
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
    },
}

/// Anything the loop wakes on; implemented by `mio::Waker`.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

impl Wake for mio::Waker {
    fn wake(&self) {
        if let Err(e) = mio::Waker::wake(self) {
            log::error!("worker: cannot wake the event loop: {e}");
        }
    }
}

struct Upload {
    client: ClientId,
    key: SessionKey,
    /// Open while packets arrive; closed once the upload is received, so that
    /// staged files awaiting their 1029 hold no file descriptor.
    file: Option<File>,
    temp: PathBuf,
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

/// Bytes of a packet processed at a time (decrypt, cksum, write): fits L2.
const CACHE_PIECE: usize = 128 * 1024;

/// How much an upload writes between two writeback kicks.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Write-behind for a large upload, every WRITEBACK_STEP bytes: start
/// writeback of the range just written, then wait for the range before it
/// and drop it from the page cache. Dirty pages stay bounded (two steps),
/// their pages are recycled instead of the page cache growing into new
/// memory (costly in a VM, scarce on a small box), and the sync at commit
/// time has at most two steps left to flush.
fn write_behind(f: &File, dropped_to: u64, kicked_from: u64, written: u64) {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: plain syscalls on a descriptor owned by `f`; a failure only costs speed.
    unsafe {
        if libc::sync_file_range(
            fd,
            kicked_from as i64,
            (written - kicked_from) as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        ) != 0
        {
            log::debug!("worker: sync_file_range: {}", std::io::Error::last_os_error());
            return;
        }
        if kicked_from > dropped_to {
            let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            let len = (kicked_from - dropped_to) as i64;
            if libc::sync_file_range(fd, dropped_to as i64, len, all) == 0 {
                libc::posix_fadvise(fd, dropped_to as i64, len, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
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
    storage: Storage,
    db: Db,
    keep_versions: u32,
    sync_mode: SyncMode,
    uploads: HashMap<UploadId, Upload>,
    /// The channels, once `run` has them (see `stage_arrivals`).
    io: Option<WorkerIo>,
    /// Jobs taken off the channel during a group commit that must wait for
    /// the next batch (everything but file packets), in arrival order.
    carry: Vec<Job>,
    metrics: Arc<Metrics>,
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

struct Staged {
    conn: ConnRef,
    upload: UploadId,
    client: ClientId,
    name: String,
    temp: PathBuf,
    size: u64,
    cksum: u32,
    publish: Publish,
}

impl Worker {
    /// Open storage and database, and reconcile them after a crash.
    pub fn open(cfg: &crate::config::Config) -> Result<Opened, String> {
        let (data_dir, db_path) = (&cfg.data_dir, &cfg.db_path());
        let (keep_versions, sync_mode) = (cfg.keep_versions, cfg.sync_mode);
        let storage =
            Storage::open(data_dir).map_err(|e| format!("data directory {}: {e}", data_dir.display()))?;
        let db = Db::open(db_path, cfg.db_busy_timeout)
            .map_err(|e| format!("database {}: {e}", db_path.display()))?;
        let mut w = Worker {
            storage,
            db,
            keep_versions,
            sync_mode,
            uploads: HashMap::new(),
            io: None,
            carry: Vec::new(),
            metrics: Arc::new(Metrics::new()),
        };
        w.reconcile().map_err(|e| format!("reconciling {}: {e}", data_dir.display()))?;
        let clients = w.db.load_clients().map_err(|e| format!("database {}: {e}", db_path.display()))?;
        let verified_files = w.db.file_rows().map(|r| r.iter().filter(|r| r.verified).count()).unwrap_or(0);
        let last_verified = w.db.last_verified().unwrap_or_default();
        Ok(Opened { worker: w, clients, verified_files, last_verified })
    }

    /// Repair what a crash can leave behind. Each fix is logged.
    fn reconcile(&mut self) -> Result<(), String> {
        let n = self.storage.clear_tmp().map_err(|e| e.to_string())?;
        if n > 0 {
            log::info!("startup: removed {n} unfinished upload(s) left in tmp/");
        }
        let root = self.storage.root().to_path_buf();
        // Publishes interrupted between their renames and their database commit.
        let intents = self.db.intents().map_err(|e| e.to_string())?;
        for i in &intents {
            let p = Publish {
                target: root.join(&i.target),
                saved_previous: i.saved_previous.as_ref().map(|s| root.join(s)),
            };
            let verified_elsewhere = p.saved_previous.is_none() && self.verified_path(&i.target);
            if !verified_elsewhere {
                match p.undo() {
                    Ok(()) => log::warn!("startup: undid unacknowledged publish of {}", i.target),
                    Err(e) => log::error!("startup: cannot undo publish of {}: {e}", i.target),
                }
            }
        }
        if !intents.is_empty() {
            let clear: Vec<Write> = intents.iter().map(|i| Write::ClearIntent { upload: i.upload }).collect();
            self.db.apply(&clear).map_err(|e| e.to_string())?;
        }
        // Verified rows must have their file.
        let rows = self.db.file_rows().map_err(|e| e.to_string())?;
        for r in rows.iter().filter(|r| r.verified) {
            if !root.join(&r.path).is_file() {
                log::error!(
                    "startup: verified file {} of client {} is missing; marked unverified",
                    r.path,
                    id_hex(&r.id)
                );
                self.db.mark_unverified(&r.id, &r.name).map_err(|e| e.to_string())?;
            }
        }
        // Files must have a verified row.
        let verified: std::collections::HashSet<&str> =
            rows.iter().filter(|r| r.verified).map(|r| r.path.as_str()).collect();
        let files_dir = self.storage.files_dir();
        for client in std::fs::read_dir(&files_dir).map_err(|e| e.to_string())? {
            let client = client.map_err(|e| e.to_string())?;
            if !client.file_type().map_err(|e| e.to_string())?.is_dir() {
                let dest =
                    self.storage.move_to_orphans(&client.path(), stamp()).map_err(|e| e.to_string())?;
                log::warn!("startup: moved stray {} to {}", client.path().display(), dest.display());
                continue;
            }
            let rel = format!("files/{}", client.file_name().to_string_lossy());
            self.orphan_unverified(&client.path(), &rel, &verified)?;
        }
        Ok(())
    }

    /// Move every file below `dir` (`rel`: its path from the data directory)
    /// without a verified database row to orphans/. Folders are walked, not
    /// followed: file names are paths (issue 10), so verified files live
    /// nested; a symlink is an entry like a file, moved aside itself.
    fn orphan_unverified(
        &self,
        dir: &std::path::Path,
        rel: &str,
        verified: &std::collections::HashSet<&str>,
    ) -> Result<(), String> {
        for f in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
            let f = f.map_err(|e| e.to_string())?;
            let rel = format!("{rel}/{}", f.file_name().to_string_lossy());
            if f.file_type().map_err(|e| e.to_string())?.is_dir() {
                self.orphan_unverified(&f.path(), &rel, verified)?;
            } else if !verified.contains(rel.as_str()) {
                let dest = self.storage.move_to_orphans(&f.path(), stamp()).map_err(|e| e.to_string())?;
                log::warn!("startup: {rel} has no verified database row; moved to {}", dest.display());
            }
        }
        Ok(())
    }

    fn verified_path(&self, rel: &str) -> bool {
        self.db.file_rows().map(|rows| rows.iter().any(|r| r.verified && r.path == rel)).unwrap_or(false)
    }

    /// Report to these metrics (shared with the loop).
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = metrics;
    }

    /// Serve jobs until `Shutdown` or until the loop hangs up.
    pub fn run(mut self, jobs: Receiver<Job>, done: Sender<Completion>, waker: Arc<dyn Wake>) {
        self.io = Some(WorkerIo { jobs, done, waker });
        let mut batch: Vec<Job> = Vec::new();
        loop {
            batch.append(&mut self.carry);
            let Some(io) = self.io.as_ref() else { break };
            if batch.is_empty() {
                match io.jobs.recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            while batch.len() < 512 {
                match io.jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.metrics.worker_queue.add(-(batch.len() as i64));
            if self.handle_batch(&mut batch) {
                break;
            }
        }
        // Anything still staged was never confirmed: remove it.
        for (_, u) in self.uploads.drain() {
            let _ = std::fs::remove_file(&u.temp);
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
                    if let Some(u) = self.uploads.remove(&upload) {
                        if let Err(e) = std::fs::remove_file(&u.temp) {
                            log::warn!("worker: cannot remove {}: {e}", u.temp.display());
                        }
                    }
                    if let Some((id, name)) = failed {
                        let path = Storage::relative_path(&id, &name);
                        writes.push((Pending::Silent, vec![Write::FileFailed { id, name, path }]));
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
                if let Some(u) = self.uploads.remove(&upload) {
                    let _ = std::fs::remove_file(&u.temp);
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
            let temp = self.storage.temp_path(p.upload);
            self.uploads.insert(
                p.upload,
                Upload {
                    client: start.client,
                    key: SessionKey(start.key),
                    file: Some(file),
                    temp,
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
        let Upload { file: Some(file), cksum, dec, .. } = u else {
            return Err("packet after the last one".into());
        };
        let mut err: Option<io::Error> = None;
        let mut sink = |pt: &[u8]| {
            if err.is_none() {
                cksum.update(pt);
                if let Err(e) = file.write_all(pt) {
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
            let Upload { file: Some(file), cksum, .. } = u else {
                return Err("packet after the last one".into());
            };
            let mut sink = |pt: &[u8]| {
                if err.is_none() {
                    cksum.update(pt);
                    if let Err(e) = file.write_all(pt) {
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
                write_behind(f, u.dropped_to, u.writeback_from, written);
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
    /// transaction; then report each item (see docs/ARCHITECTURE.md).
    fn group_commit(
        &mut self,
        commits: Vec<(ConnRef, UploadId, ClientId, String)>,
        mut writes: Vec<(Pending, Vec<Write>)>,
        out: &mut Vec<Completion>,
    ) {
        let started = std::time::Instant::now();
        let mut staged: Vec<Staged> = Vec::new();
        let mut deferred = Vec::new();
        let base = stamp();
        for (i, (conn, upload, client, name)) in commits.into_iter().enumerate() {
            // Two commits of the same file in one batch: publish the later one in the next round.
            if staged.iter().any(|s| s.client == client && s.name == name) {
                deferred.push((conn, upload, client, name));
                continue;
            }
            let ready = matches!(self.uploads.get(&upload), Some(u) if u.client == client);
            let Some(Upload { temp, received: Some((cksum, size)), .. }) =
                self.uploads.remove(&upload).filter(|_| ready)
            else {
                // Refused (e.g. another client's upload): the loop no longer
                // tracks it, so its temp file goes now.
                let _ = std::fs::remove_file(self.storage.temp_path(upload));
                log::warn!("worker: commit of {name:?} for an upload that is not staged");
                out.push(Completion::Committed { conn, upload, ok: false });
                continue;
            };
            let publish = self.storage.plan_publish(&client, &name, base + i as u64);
            staged.push(Staged { conn, upload, client, name, temp, size, cksum, publish });
        }
        let fail = |s: Staged, out: &mut Vec<Completion>| {
            let _ = std::fs::remove_file(&s.temp);
            out.push(Completion::Committed { conn: s.conn, upload: s.upload, ok: false });
        };

        // 1. File contents (per-file mode; syncfs covers them below).
        if self.sync_mode == SyncMode::Fsync {
            let mut synced = Vec::with_capacity(staged.len());
            for s in staged.drain(..) {
                match File::open(&s.temp).and_then(|f| f.sync_data()) {
                    Ok(()) => synced.push(s),
                    Err(e) => {
                        log::error!("worker: cannot fsync staged {:?}: {e}", s.name);
                        fail(s, out);
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
        let root = self.storage.root().to_path_buf();
        let rel = |p: &PathBuf| p.strip_prefix(&root).unwrap_or(p).to_string_lossy().into_owned();
        let intents: Vec<Intent> = staged
            .iter()
            .filter_map(|s| {
                let prev = s.publish.saved_previous.as_ref()?;
                Some(Intent {
                    upload: s.upload,
                    target: rel(&s.publish.target),
                    saved_previous: Some(rel(prev)),
                })
            })
            .collect();
        if !intents.is_empty() {
            if let Err(e) = self.db.add_intents(&intents) {
                log::error!("worker: database error recording {} publish(es): {e}", staged.len());
                for s in staged.drain(..) {
                    fail(s, out);
                }
            }
        }

        // 3. Keep previous versions, durably, then 4. rename into place.
        let mut dirty = Vec::new();
        let mut published = Vec::new();
        let mut ok = true;
        let mut linked = Vec::new();
        for s in staged {
            match self.storage.save_previous(&s.publish, &mut dirty) {
                Ok(()) => linked.push(s),
                Err(e) => {
                    log::error!(
                        "worker: cannot keep the previous version of {}: {e}",
                        s.publish.target.display()
                    );
                    writes.push((Pending::Silent, vec![Write::ClearIntent { upload: s.upload }]));
                    fail(s, out);
                }
            }
        }
        if !dirty.is_empty() {
            ok &= self.sync_dirs(&mut dirty);
        }
        for s in linked {
            if !ok {
                published.push(s);
                continue;
            }
            match self.storage.install(&s.temp, &s.publish, &mut dirty) {
                Ok(()) => published.push(s),
                Err(e) => {
                    log::error!("worker: cannot publish {} of client {}: {e}", s.name, id_hex(&s.client));
                    if let Err(e) = s.publish.undo() {
                        log::error!("worker: cannot undo publish of {}: {e}", s.publish.target.display());
                    }
                    writes.push((Pending::Silent, vec![Write::ClearIntent { upload: s.upload }]));
                    fail(s, out);
                }
            }
        }
        // 5. Directory entries (and, with syncfs, file contents) durable.
        if ok && !published.is_empty() {
            ok &= self.sync_dirs(&mut dirty);
        }

        // Packets that arrived during the syncs are staged now, not after the commit.
        self.stage_arrivals();

        // 6. One transaction records the files; the rest of the batch follows.
        let mut all: Vec<Write> = Vec::new();
        for s in &published {
            all.push(Write::FileVerified {
                id: s.client,
                name: s.name.clone(),
                path: Storage::relative_path(&s.client, &s.name),
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
                let keep = self.keep_versions as usize;
                if let Err(e) = self.storage.prune_versions(&s.client, &s.name, keep) {
                    log::warn!("worker: cannot prune old versions of {}: {e}", s.name);
                }
                out.push(Completion::Committed { conn: s.conn, upload: s.upload, ok: true });
            } else {
                fail(s, out);
            }
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
    /// each, or one syncfs for everything in `SyncMode::Syncfs`.
    fn sync_dirs(&self, dirty: &mut Vec<PathBuf>) -> bool {
        let mut ok = true;
        match self.sync_mode {
            SyncMode::Syncfs => {
                if let Err(e) = self.storage.sync_filesystem() {
                    log::error!("worker: syncfs failed: {e}");
                    ok = false;
                }
            }
            SyncMode::Fsync => {
                for d in dirty.iter() {
                    if let Err(e) = storage::sync_dir(d) {
                        log::error!("worker: cannot fsync {}: {e}", d.display());
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
    fn unpublish(&mut self, published: &[Staged]) {
        log::error!("worker: undoing {} publish(es)", published.len());
        for s in published.iter().rev() {
            if let Err(e) = s.publish.undo() {
                log::error!("worker: cannot undo publish of {}: {e}", s.publish.target.display());
            }
        }
        let mut dirty: Vec<PathBuf> =
            published.iter().filter_map(|s| s.publish.target.parent().map(Into::into)).collect();
        dirty.dedup();
        let _ = self.sync_dirs(&mut dirty);
        let clear: Vec<Write> = published.iter().map(|s| Write::ClearIntent { upload: s.upload }).collect();
        if let Err(e) = self.db.apply(&clear) {
            log::warn!("worker: cannot clear publish intents ({e}); the next start will check them");
        }
    }
}
