//! The replicator thread: copies queued files to the bucket, one at a time
//! in queue order, and reports each outcome to the worker.
//!
//! It owns no state that must survive: the queue is a table that only the
//! worker (the owner of the database) writes. The worker sends it the rows
//! it queued ([`Item`]s, over a channel); the replicator uploads (or
//! deletes) each and sends back a [`Report`]. A failure keeps the item at
//! the head of the line and waits ([`super::backoff`]: 1 s doubling to
//! [`MAX_BACKOFF`]) before the next try; the items behind it wait too, so
//! a store that is down costs one request per backoff, not one per item.
//! One log line per kind of failure, when the kind changes and at most
//! once a minute while it lasts; one line when the store answers again.
//!
//! Files are read from the data directory through its descriptors, without
//! following links (the replicator only reads: what it finds missing was
//! replaced or pruned since it was queued, and is reported [`Report::Gone`]).

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{Bucket, Error, Kind, Meta};
use crate::datadir::Dir;
use crate::metrics::Metrics;
use crate::worker::storage::tier::Local;

/// The longest wait between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How often a failure that goes on is logged again.
const LOG_AGAIN: Duration = Duration::from_secs(60);

/// What a queue row asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Upload the local file to its key.
    Put,
    /// Delete the key (a pruned version).
    Delete,
}

/// One queue row, as the worker hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub seq: i64,
    /// Path relative to the data directory (`files/<id>/<path>`, ...).
    pub rel: String,
    pub op: Op,
    /// The client's name (written into the object's metadata).
    pub client: String,
    /// The size and cksum the database records (a current file): the
    /// object's metadata, without reading the file for them.
    pub recorded: Option<(u64, u32)>,
}

/// What the worker sends.
pub enum Order {
    Work(Vec<Item>),
    Stop,
}

/// What the replicator sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The store confirmed it: the row can go.
    Done { seq: i64 },
    /// The local file is gone (replaced or pruned since): the row can go.
    Gone { seq: i64 },
    /// A try failed; the item stays first in line and is tried again.
    Failed { seq: i64 },
    /// An upload began (primary mode stops counting its wait).
    Started { seq: i64 },
}

/// Start the replicator thread. `report` carries each outcome to the worker.
pub fn start(
    bucket: Bucket,
    root: Dir,
    orders: Receiver<Order>,
    report: Box<dyn Fn(Report) + Send>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut r = Replicator {
        bucket,
        root: Local::new(root),
        report,
        metrics,
        line: VecDeque::new(),
        failures: 0,
        retry_at: None,
        logged: None,
    };
    std::thread::Builder::new().name("backupd-s3".into()).spawn(move || r.run(orders))
}

struct Replicator {
    bucket: Bucket,
    root: Local,
    report: Box<dyn Fn(Report) + Send>,
    metrics: Arc<Metrics>,
    line: VecDeque<Item>,
    /// Consecutive failures of the head of the line.
    failures: u32,
    /// When the next try may be made, after a failure.
    retry_at: Option<Instant>,
    /// The kind of failure last logged, and when.
    logged: Option<(Kind, Instant)>,
}

impl Replicator {
    fn run(&mut self, orders: Receiver<Order>) {
        loop {
            // Wait for work, or for the end of a backoff.
            let order = match (self.line.is_empty(), self.retry_at) {
                (true, _) => orders.recv().map_err(|_| RecvTimeoutError::Disconnected),
                (false, Some(at)) => orders.recv_timeout(at.saturating_duration_since(Instant::now())),
                (false, None) => orders.try_recv().map_err(|e| match e {
                    std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    std::sync::mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                }),
            };
            match order {
                Ok(Order::Work(items)) => {
                    // Each row is sent once (the worker keeps a high-water mark).
                    self.line.extend(items);
                    continue;
                }
                Ok(Order::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                continue;
            }
            self.retry_at = None;
            if let Some(item) = self.line.front().cloned() {
                self.serve(item);
            }
        }
    }

    /// Try the head of the line once.
    fn serve(&mut self, item: Item) {
        let outcome = match item.op {
            Op::Put => {
                (self.report)(Report::Started { seq: item.seq });
                self.put(&item)
            }
            Op::Delete => self.bucket.delete(&item.rel).map(|_| true),
        };
        match outcome {
            Ok(found) => {
                self.line.pop_front();
                if self.failures > 0 {
                    log::info!("s3: the store answers again; replication resumed");
                }
                self.failures = 0;
                self.logged = None;
                (self.report)(if found {
                    Report::Done { seq: item.seq }
                } else {
                    Report::Gone { seq: item.seq }
                });
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.metrics.s3.failures.inc();
                let wait = super::backoff(self.failures, MAX_BACKOFF);
                self.retry_at = Some(Instant::now() + wait);
                let again = match self.logged {
                    Some((k, at)) => k != e.kind || at.elapsed() >= LOG_AGAIN,
                    None => true,
                };
                if again {
                    log::warn!(
                        "s3: cannot replicate {} ({e}); {} item(s) queued, retrying in {}s",
                        item.rel,
                        self.line.len(),
                        wait.as_secs()
                    );
                    self.logged = Some((e.kind, Instant::now()));
                }
                (self.report)(Report::Failed { seq: item.seq });
            }
        }
    }

    /// Upload a local file with its metadata; Ok(false) when it is gone.
    fn put(&self, item: &Item) -> Result<bool, Error> {
        let rel = item.rel.as_str();
        let local = |e: std::io::Error| Error { kind: Kind::Local, detail: format!("{rel}: {e}") };
        let Some(mut f) = self.root.open_file(rel).map_err(local)? else { return Ok(false) };
        let meta = meta_of(&mut f, &item.client, item.recorded).map_err(local)?;
        let bytes = self.bucket.put_file(rel, &mut f, Some(&meta))?;
        self.metrics.s3.uploaded.inc();
        self.metrics.s3.uploaded_bytes.add(bytes as i64);
        Ok(true)
    }
}

/// The metadata of a stored file (the object is checked against it later,
/// by `backupd verify` with the bucket alone): its size and cksum, those the
/// database records for a current file of that size (a file replaced since
/// its row was read is queued again, and sent again with its own), else
/// read from it (a version: the database keeps no cksum of it); and its
/// modification time (when its upload was written).
fn meta_of(f: &mut std::fs::File, client: &str, recorded: Option<(u64, u32)>) -> std::io::Result<Meta> {
    let m = f.metadata()?;
    let stored = m.modified()?.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    if let Some((size, cksum)) = recorded.filter(|r| r.0 == m.len()) {
        return Ok(Meta { client: client.to_string(), size, cksum, stored });
    }
    let (size, cksum) = crate::crypto::copy_with_cksum(f, &mut std::io::sink())?;
    Ok(Meta { client: client.to_string(), size, cksum, stored })
}
