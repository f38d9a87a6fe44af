//! The worker's side of the S3 tier (cargo feature `s3`): the queue table
//! it owns, the rows handed to the replicator thread
//! ([`crate::worker::s3::replicator`]), its reports, and in primary mode the 1604s
//! held until the bucket confirmed their file.
//!
//! The worker owns the database, so the replicator never touches it: the
//! worker queues a row in the same transaction as the file's verified row
//! (a crash between the publish and the upload loses nothing: the row is
//! there at the next start), sends the new rows to the replicator after
//! each commit, and deletes a row when the replicator reports it done.
//! Reports come back on the worker's own input channel (see
//! [`super::Input`]), so the worker waits on one channel for both.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{self, Sender};
use std::time::Instant;

use super::db::Write;
use super::{Completion, Input, UploadId, Worker};
use crate::config::s3::{Mode, Settings};
use crate::protocol::ClientId;
use crate::worker::s3::client::Bucket;
use crate::worker::s3::replicator::{self, Item, Op, Order, Report};

/// The S3 tier as the worker runs it.
pub(super) struct Replica {
    pub(super) settings: Settings,
    /// The replicator's order channel, once started.
    orders: Option<Sender<Order>>,
    /// The last queue row handed to the replicator.
    high_water: i64,
    /// Rows handed to the replicator and not yet reported done or gone.
    outstanding: usize,
    /// Reports received during a batch, handled after it.
    pub(super) reports: Vec<Report>,
    /// Primary mode: the files committed in this batch, by upload.
    published: HashMap<UploadId, String>,
    /// Primary mode: the paths of the rows handed to the replicator, by row.
    in_flight: HashMap<i64, String>,
    /// Primary mode: 1604s held until their row is done, by row, with the
    /// time they get 1607 instead.
    waiting: Vec<Held>,
    /// When the queue was last read outside a commit.
    last_look: Option<Instant>,
    /// Primary mode: bytes of stored copies on the local disk (the cache).
    local_bytes: u64,
    /// Primary mode: copies the bucket confirmed, oldest first (those found
    /// at start first): what the cache may evict.
    evictable: VecDeque<String>,
}

impl Replica {
    pub(super) fn new(settings: Settings) -> Replica {
        Replica {
            settings,
            orders: None,
            high_water: 0,
            outstanding: 0,
            reports: Vec::new(),
            published: HashMap::new(),
            waiting: Vec::new(),
            in_flight: HashMap::new(),
            last_look: None,
            local_bytes: 0,
            evictable: VecDeque::new(),
        }
    }

    /// The next time a held 1604 must give up.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.iter().filter_map(|h| h.deadline).min()
    }
}

/// Rows the replicator holds at most (the rest wait in the table).
const LINE: usize = 1024;

/// A 1604 held until the bucket confirms its file (primary mode): the queue
/// row it waits for, and until when it waits for the replicator to start on
/// it (None once the upload is in progress: its requests have their own
/// `--s3-timeout`, so a large file on a slow link is not cut short).
struct Held {
    seq: i64,
    completion: Completion,
    deadline: Option<Instant>,
}

impl Replica {
    /// Take out the completions held for `seq`.
    fn release(&mut self, seq: i64) -> Vec<Completion> {
        let (out, keep) = std::mem::take(&mut self.waiting).into_iter().partition(|h| h.seq == seq);
        self.waiting = keep;
        out.into_iter().map(|h: Held| h.completion).collect()
    }
}

/// A commit's completion turned into a failure (1607), same upload and usage.
fn failed(c: Completion) -> Completion {
    match c {
        Completion::Committed { conn, upload, client, usage, .. } => {
            Completion::Committed { conn, upload, ok: false, client, usage }
        }
        other => other,
    }
}

impl Worker {
    /// Start the replicator (when the tier is on), its reports going to
    /// `input` (the worker's own input channel), and hand it the rows
    /// already queued (what the last run left). If it cannot start, nothing
    /// is replicated (logged) and primary mode's 1029s get 1607.
    pub(super) fn start_replica(&mut self, input: &Sender<Input>) {
        let Some(r) = self.replica.as_mut() else { return };
        let bucket = match Bucket::new(&r.settings) {
            Ok(b) => b,
            Err(e) => {
                log::error!("s3: {e}; nothing will be replicated");
                return;
            }
        };
        let root = match self.storage.root_dir() {
            Ok(d) => d,
            Err(e) => {
                log::error!("s3: cannot open the data directory for the replicator: {e}");
                return;
            }
        };
        let (tx, rx) = mpsc::channel();
        let back = input.clone();
        let report = Box::new(move |rep: Report| {
            let _ = back.send(Input::Replicated(rep));
        });
        match replicator::start(bucket, root, rx, report, self.metrics.clone()) {
            Ok(_) => r.orders = Some(tx),
            Err(e) => {
                log::error!("s3: cannot start the replicator thread: {e}");
                return;
            }
        }
        self.metrics.s3.on.store(true, std::sync::atomic::Ordering::Relaxed);
        let s = &r.settings;
        log::info!("s3: {:?} mode, bucket {} at {}, prefix {:?}", s.mode, s.bucket, s.endpoint, s.prefix);
        self.init_cache();
        self.dispatch();
    }

    /// Primary mode: the cache as found at start (every local copy not
    /// queued is in the bucket, and may be evicted).
    fn init_cache(&mut self) {
        if !self.replica.as_ref().is_some_and(|r| r.settings.mode == Mode::Primary) {
            return;
        }
        let queued = self.queued_paths();
        let stored = self.storage.list_stored();
        let Some(r) = self.replica.as_mut() else { return };
        match stored {
            Ok(stored) => {
                for (rel, size) in stored {
                    r.local_bytes += size;
                    if !queued.contains(&rel) {
                        r.evictable.push_back(rel);
                    }
                }
            }
            Err(e) => log::warn!("s3: cannot measure the local cache: {e}"),
        }
        self.evict();
    }

    /// The queue rows a commit of these files adds (in its transaction).
    pub(super) fn queue_writes(&self, client: &ClientId, target: &str, saved: Option<&str>) -> Vec<Write> {
        if self.replica.is_none() {
            return Vec::new();
        }
        let mut w = vec![Write::Enqueue { id: *client, path: target.to_string(), delete: false }];
        if let Some(prev) = saved {
            w.push(Write::Enqueue { id: *client, path: prev.to_string(), delete: false });
        }
        w
    }

    /// Primary mode: remember a committed file so that its 1604 waits for
    /// the bucket, and count it (less what pruning freed) in the cache.
    pub(super) fn note_published(&mut self, upload: UploadId, target: &str, size: u64, freed: u64) {
        if let Some(r) = self.replica.as_mut().filter(|r| r.settings.mode == Mode::Primary) {
            r.published.insert(upload, target.to_string());
            r.local_bytes = (r.local_bytes + size).saturating_sub(freed);
        }
    }

    /// The paths with a queue row (not yet in the bucket).
    fn queued_paths(&self) -> HashSet<String> {
        self.db
            .queue_after(0, usize::MAX)
            .map(|rows| rows.into_iter().map(|q| q.path).collect())
            .unwrap_or_default()
    }

    /// Primary mode: evict the oldest copies the bucket confirmed until the
    /// cache is back under 90% of `--cache-size`. A copy still queued (a
    /// newer upload of the same name) is never evicted.
    fn evict(&mut self) {
        let over = self.replica.as_ref().is_some_and(|r| r.local_bytes > r.settings.cache_size);
        if !over {
            return;
        }
        let queued = self.queued_paths();
        let Some(r) = self.replica.as_mut() else { return };
        let target = r.settings.cache_size / 10 * 9;
        let (mut files, mut bytes) = (0u64, 0u64);
        while r.local_bytes > target {
            let Some(rel) = r.evictable.pop_front() else { break };
            if queued.contains(&rel) {
                continue;
            }
            match self.storage.evict(&rel) {
                Ok(n) => {
                    r.local_bytes = r.local_bytes.saturating_sub(n);
                    files += 1;
                    bytes += n;
                }
                Err(e) => log::warn!("s3: cannot evict {rel} from the local cache: {e}"),
            }
        }
        if files > 0 {
            log::debug!("s3: evicted {files} file(s), {bytes} bytes, from the local cache");
        }
    }

    /// Queue the removal of pruned versions from the bucket.
    pub(super) fn queue_deletes(&mut self, client: &ClientId, name: &str, removed: &[u64]) {
        if self.replica.is_none() || removed.is_empty() {
            return;
        }
        let w: Vec<Write> = removed
            .iter()
            .map(|n| Write::Enqueue {
                id: *client,
                path: super::storage::Storage::relative_version_path(client, name, *n),
                delete: true,
            })
            .collect();
        if let Err(e) = self.db.apply(&w) {
            log::warn!("s3: cannot queue the removal of pruned versions of {name:?}: {e}");
        }
    }

    /// Hand the rows queued since the last call to the replicator, and in
    /// primary mode hold the 1604s of this batch's files until their row is done.
    pub(super) fn dispatch_and_hold(&mut self, out: &mut Vec<Completion>) {
        self.dispatch();
        let Some(r) = self.replica.as_mut() else { return };
        if r.published.is_empty() {
            return;
        }
        let deadline = Some(Instant::now() + r.settings.timeout);
        let published = std::mem::take(&mut r.published);
        let mut kept = Vec::with_capacity(out.len());
        for c in out.drain(..) {
            let target = match &c {
                Completion::Committed { upload, ok: true, .. } => published.get(upload),
                _ => None,
            };
            let Some(target) = target else {
                kept.push(c);
                continue;
            };
            // The row went in with the file: without it (a database error)
            // the bucket cannot confirm the file, so no 1604.
            match (self.db.queued_upload(target), self.replica.as_mut()) {
                (Ok(Some(seq)), Some(r)) => r.waiting.push(Held { seq, completion: c, deadline }),
                (e, _) => {
                    log::error!("s3: no queue row for {target} ({e:?}); its 1029 gets 1607");
                    kept.push(failed(c));
                }
            }
        }
        *out = kept;
    }

    /// Rows queued outside a commit (`backupd s3 resync` while the server
    /// runs): looked for at most once a second.
    pub(super) fn dispatch_idle(&mut self) {
        let due = self
            .replica
            .as_ref()
            .is_some_and(|r| r.last_look.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)));
        if due {
            if let Some(r) = self.replica.as_mut() {
                r.last_look = Some(Instant::now());
            }
            self.dispatch();
        }
    }

    /// Send the new queue rows to the replicator; returns them.
    fn dispatch(&mut self) -> Vec<Item> {
        let Some(r) = self.replica.as_mut() else { return Vec::new() };
        let Some(orders) = &r.orders else { return Vec::new() };
        // The replicator's line is bounded (a large queue stays in the table).
        let room = LINE.saturating_sub(r.outstanding);
        if room < LINE / 2 {
            return Vec::new();
        }
        let rows = match self.db.queue_after(r.high_water, room) {
            Ok(rows) => rows,
            Err(e) => {
                log::warn!("s3: cannot read the queue: {e}");
                return Vec::new();
            }
        };
        let items: Vec<Item> = rows
            .into_iter()
            .map(|q| Item {
                seq: q.seq,
                rel: q.path,
                op: if q.delete { Op::Delete } else { Op::Put },
                client: q.client,
                recorded: q.recorded,
            })
            .collect();
        if r.settings.mode == Mode::Primary {
            r.in_flight.extend(items.iter().filter(|i| i.op == Op::Put).map(|i| (i.seq, i.rel.clone())));
        }
        if let Some(last) = items.last() {
            r.high_water = last.seq;
            r.outstanding += items.len();
            let _ = orders.send(Order::Work(items.clone()));
        }
        self.queue_metrics();
        items
    }

    /// The queue's depth and age into the metrics.
    fn queue_metrics(&self) {
        if let Ok((n, oldest)) = self.db.queue_stats() {
            self.metrics.s3.queue_depth.set(n as i64);
            self.metrics.s3.oldest_queued.store(oldest.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Apply the replicator's reports: rows done go, held 1604s go out
    /// (1607 for a failed try or an expired wait).
    pub(super) fn replicated(&mut self, out: &mut Vec<Completion>) {
        let Some(r) = self.replica.as_mut() else { return };
        let reports = std::mem::take(&mut r.reports);
        let mut done = Vec::new();
        for rep in reports {
            match rep {
                Report::Done { seq } | Report::Gone { seq } => {
                    done.push(seq);
                    r.outstanding = r.outstanding.saturating_sub(1);
                    if let Some(rel) = r.in_flight.remove(&seq) {
                        if matches!(rep, Report::Done { .. }) {
                            r.evictable.push_back(rel);
                        }
                    }
                    let ok = matches!(rep, Report::Done { .. });
                    out.extend(r.release(seq).into_iter().map(|c| if ok { c } else { failed(c) }));
                }
                Report::Failed { seq } => out.extend(r.release(seq).into_iter().map(failed)),
                Report::Started { seq } => {
                    for h in r.waiting.iter_mut().filter(|h| h.seq == seq) {
                        h.deadline = None;
                    }
                }
            }
        }
        let now = Instant::now();
        let (expired, keep): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut r.waiting).into_iter().partition(|h| h.deadline.is_some_and(|at| at <= now));
        r.waiting = keep;
        for h in expired {
            log::warn!("s3: the bucket did not take a file within --s3-timeout; its 1029 gets 1607");
            out.push(failed(h.completion));
        }
        if !done.is_empty() {
            if let Err(e) = self.db.dequeue(&done) {
                log::warn!("s3: cannot remove {} confirmed row(s) from the queue: {e}", done.len());
            }
            self.queue_metrics();
            self.evict();
            self.dispatch();
        }
    }

    /// At shutdown: the held 1604s become 1607s (their rows stay queued) and
    /// the replicator is told to stop (an upload in progress is abandoned
    /// and made again at the next start).
    pub(super) fn stop_replica(&mut self) {
        let Some(r) = self.replica.as_mut() else { return };
        let held: Vec<Completion> = r.waiting.drain(..).map(|h| failed(h.completion)).collect();
        if let Some(o) = r.orders.take() {
            let _ = o.send(Order::Stop);
        }
        if !held.is_empty() {
            self.send(held);
        }
    }
}
