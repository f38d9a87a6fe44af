//! Server metrics in the Prometheus text format, for node_exporter's textfile
//! collector (`--metrics-file`).
//!
//! [`Metrics`] is a set of atomic counters and gauges shared by the event
//! loop and the worker (an increment is one relaxed atomic add; nothing here
//! locks on the data path except the per-client "last verified" map, touched
//! once per stored file). [`spawn_writer`] starts the thread that renders
//! them every `--metrics-interval` and at shutdown, and replaces the file
//! atomically (temp file + rename), so the loop never does that I/O.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::budget::Budget;

/// A counter (or, with `set`/`add` of negatives, a gauge).
#[derive(Debug, Default)]
pub struct Counter(AtomicI64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit (integer atomics).
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro.fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerAddress,
    Unauthenticated,
    TableFull,
    Descriptors,
}

/// Why a connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed (or reset) it.
    Peer,
    /// A deadline: header, frame, content, login, idle, closing grace.
    Timeout,
    /// Made room for a new connection at the limit.
    Evicted,
    /// A framing error (after its 1607).
    Protocol,
    /// A socket error.
    Error,
    /// Server shutdown.
    Shutdown,
}

/// Why an upload ended without being stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstored {
    /// A packet was refused by the rules (1607 from the loop).
    Refused,
    /// The worker failed it (decryption, disk).
    Failed,
    /// The client gave up (1031).
    Aborted,
    /// The commit failed (1607 to the 1029).
    CommitFailed,
}

/// [`Metrics::free_bytes`] before the first measure, or when it failed:
/// nothing is refused for `--min-free` then.
pub const FREE_UNKNOWN: u64 = u64::MAX;

const REQUEST_CODES: [u16; 7] = [1025, 1026, 1027, 1028, 1029, 1030, 1031];
const REQUEST_LABELS: [&str; 7] = ["1025", "1026", "1027", "1028", "1029", "1030", "1031"];

/// Every metric backupd exports.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    pub connections_open: Counter,
    pub connections_accepted: Counter,
    refused: [Counter; 4],
    closed: [Counter; 6],
    requests: [Counter; 7],
    pub uploads_verified: Counter,
    unstored: [Counter; 4],
    /// File content bytes read from sockets.
    pub bytes_received: Counter,
    /// Plaintext bytes of files stored (verified).
    pub bytes_stored: Counter,
    /// Current files stored (verified rows).
    pub files_stored: Counter,
    pub clients: Counter,
    /// Jobs sent to the worker and not yet taken.
    pub worker_queue: Counter,
    pub commit_batch_size: Histogram,
    pub commit_seconds: Histogram,
    /// Last verified backup per client name (seconds since the epoch).
    last_verified: Mutex<HashMap<String, u64>>,
    /// What each client stores (bytes, files; current plus versions), by name.
    client_usage: Mutex<HashMap<String, (u64, u64)>>,
    /// Free bytes on the data directory's filesystem as the worker last
    /// measured them ([`FREE_UNKNOWN`] until then): what the loop checks
    /// `--min-free` against, without a system call of its own.
    pub free_bytes: AtomicU64,
    /// The S3 tier's (feature `s3`).
    #[cfg(feature = "s3")]
    pub s3: S3Metrics,
}

/// The S3 tier's metrics, rendered only once it is on: queue rows, the
/// oldest row's time (seconds since the epoch, 0 when empty), uploads
/// confirmed, their bytes, failed tries.
#[cfg(feature = "s3")]
#[derive(Debug, Default)]
pub struct S3Metrics {
    pub on: std::sync::atomic::AtomicBool,
    pub queue_depth: Counter,
    pub oldest_queued: AtomicU64,
    pub uploaded: Counter,
    pub uploaded_bytes: Counter,
    pub failures: Counter,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            started: Instant::now(),
            connections_open: Counter::default(),
            connections_accepted: Counter::default(),
            refused: Default::default(),
            closed: Default::default(),
            requests: Default::default(),
            uploads_verified: Counter::default(),
            unstored: Default::default(),
            bytes_received: Counter::default(),
            bytes_stored: Counter::default(),
            files_stored: Counter::default(),
            clients: Counter::default(),
            worker_queue: Counter::default(),
            commit_batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
            commit_seconds: Histogram::new(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            last_verified: Mutex::new(HashMap::new()),
            client_usage: Mutex::new(HashMap::new()),
            free_bytes: AtomicU64::new(FREE_UNKNOWN),
            #[cfg(feature = "s3")]
            s3: S3Metrics::default(),
        }
    }

    pub fn refused(&self, why: Refused) {
        self.refused[why as usize].inc();
    }

    pub fn closed(&self, why: Closed) {
        self.closed[why as usize].inc();
    }

    pub fn request(&self, code: u16) {
        if let Some(i) = REQUEST_CODES.iter().position(|c| *c == code) {
            self.requests[i].inc();
        }
    }

    pub fn unstored(&self, why: Unstored) {
        self.unstored[why as usize].inc();
    }

    /// A client's file was verified at `secs` (seconds since the epoch).
    pub fn verified_at(&self, client: &str, secs: u64) {
        if let Ok(mut m) = self.last_verified.lock() {
            let e = m.entry(client.to_string()).or_insert(0);
            *e = (*e).max(secs);
        }
    }

    /// A client now stores `bytes` in `files` files (current plus versions).
    pub fn client_usage(&self, client: &str, bytes: u64, files: u64) {
        if let Ok(mut m) = self.client_usage.lock() {
            m.insert(client.to_string(), (bytes, files));
        }
    }

    /// A client is no longer on record: its series go.
    pub fn forget_client(&self, client: &str) {
        if let Ok(mut m) = self.client_usage.lock() {
            m.remove(client);
        }
        if let Ok(mut m) = self.last_verified.lock() {
            m.remove(client);
        }
    }

    /// The free space last measured, if known.
    pub fn free_bytes(&self) -> Option<u64> {
        Some(self.free_bytes.load(Ordering::Relaxed)).filter(|b| *b != FREE_UNKNOWN)
    }

    /// The S3 tier's metrics, when it is on (none otherwise).
    #[cfg(feature = "s3")]
    fn s3_lines(&self) -> Vec<(&'static str, &'static str, &'static str, Option<f64>)> {
        if !self.s3.on.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let oldest = self.s3.oldest_queued.load(Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let lag = if oldest == 0 { 0 } else { now.saturating_sub(oldest) };
        #[rustfmt::skip]
        let lines = vec![
            ("backupd_s3_queue_depth", "gauge", "Files and deletions queued for the bucket.", Some(self.s3.queue_depth.get().max(0) as f64)),
            ("backupd_s3_queue_lag_seconds", "gauge", "Age of the oldest queued item (0 when the queue is empty).", Some(lag as f64)),
            ("backupd_s3_uploaded_total", "counter", "Files the bucket confirmed.", Some(self.s3.uploaded.get() as f64)),
            ("backupd_s3_uploaded_bytes_total", "counter", "Bytes of the files the bucket confirmed.", Some(self.s3.uploaded_bytes.get() as f64)),
            ("backupd_s3_failures_total", "counter", "Requests to the bucket that failed (each is retried).", Some(self.s3.failures.get() as f64)),
        ];
        lines
    }

    /// Render everything in the Prometheus text format. `budget` and `data_dir`
    /// give the budget gauges and the free space; `max_clients` caps the
    /// per-client series; `log_dropped` is the logger's count.
    pub fn render(&self, budget: &Budget, data_dir: &Path, max_clients: usize, log_dropped: u64) -> String {
        let mut o = String::with_capacity(8192);
        let free = free_bytes(data_dir).map(|f| f as f64);
        // (name, type, help, value): a flat table, one line per metric.
        #[rustfmt::skip]
        let plain: [(&str, &str, &str, Option<f64>); 13] = [
            ("backupd_uptime_seconds", "gauge", "Seconds since the server started.", Some(self.started.elapsed().as_secs_f64())),
            ("backupd_connections_open", "gauge", "Client connections open now.", Some(self.connections_open.get() as f64)),
            ("backupd_connections_accepted_total", "counter", "Connections accepted.", Some(self.connections_accepted.get() as f64)),
            ("backupd_uploads_verified_total", "counter", "Files verified and stored (1604 to a 1029).", Some(self.uploads_verified.get() as f64)),
            ("backupd_bytes_received_total", "counter", "File content bytes received.", Some(self.bytes_received.get() as f64)),
            ("backupd_bytes_stored_total", "counter", "Plaintext bytes of files stored.", Some(self.bytes_stored.get() as f64)),
            ("backupd_files_stored", "gauge", "Verified files stored (current versions).", Some(self.files_stored.get() as f64)),
            ("backupd_clients", "gauge", "Registered clients.", Some(self.clients.get() as f64)),
            ("backupd_budget_bytes_in_use", "gauge", "Memory budget granted to file content in flight.", Some(budget.used() as f64)),
            ("backupd_budget_bytes_limit", "gauge", "The memory budget (--memory-budget).", Some(budget.limit() as f64)),
            ("backupd_worker_queue_depth", "gauge", "Jobs waiting for the worker threads.", Some(self.worker_queue.get().max(0) as f64)),
            ("backupd_log_records_dropped_total", "counter", "Log lines dropped because the log output was blocked.", Some(log_dropped as f64)),
            ("backupd_data_dir_free_bytes", "gauge", "Bytes available to backupd on the data directory's filesystem.", free),
        ];
        #[cfg(feature = "s3")]
        let s3 = self.s3_lines();
        #[cfg(not(feature = "s3"))]
        let s3 = Vec::new();
        for (name, kind, help, v) in plain.iter().chain(&s3) {
            if let Some(v) = v {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        self.render_labelled(&mut o);
        self.commit_batch_size.render(&mut o, "backupd_commit_batch_files", "Files per group commit.");
        self.commit_seconds.render(&mut o, "backupd_commit_seconds", "Time to make a group commit durable.");
        self.render_clients(&mut o, max_clients);
        o
    }

    /// The counters with one series per reason or code: a flat table.
    fn render_labelled(&self, o: &mut String) {
        // (name, help, label, its values, the counters): one series per value.
        type Labelled<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a [Counter]);
        let labelled: [Labelled; 4] = [
            (
                "backupd_connections_refused_total",
                "Connections closed at accept, by reason.",
                "reason",
                &["per_address", "unauthenticated_per_address", "table_full", "descriptors"],
                &self.refused,
            ),
            (
                "backupd_connections_closed_total",
                "Connections closed, by reason.",
                "reason",
                &["peer", "timeout", "evicted", "protocol_error", "socket_error", "shutdown"],
                &self.closed,
            ),
            (
                "backupd_requests_total",
                "Requests received, by code.",
                "code",
                &REQUEST_LABELS,
                &self.requests,
            ),
            (
                "backupd_uploads_unstored_total",
                "Uploads that ended without being stored, by reason.",
                "reason",
                &["refused", "failed", "aborted", "commit_failed"],
                &self.unstored,
            ),
        ];
        for (name, help, label, values, counters) in labelled {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
            for (v, c) in values.iter().zip(counters) {
                let _ = writeln!(o, "{name}{{{label}=\"{v}\"}} {}", c.get());
            }
        }
    }

    /// The per-client series, at most `max_clients` of each.
    fn render_clients(&self, o: &mut String, max_clients: usize) {
        let name = "backupd_client_last_verified_timestamp_seconds";
        let _ = writeln!(o, "# HELP {name} When each client last had a file verified.\n# TYPE {name} gauge");
        if let Ok(m) = self.last_verified.lock() {
            let mut v: Vec<(&String, &u64)> = m.iter().collect();
            // Over the cap, keep the clients silent the longest (those are the
            // ones an alert is for), then by name.
            v.sort_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)));
            for (client, t) in v.into_iter().take(max_clients) {
                let _ = writeln!(o, "{name}{{client=\"{}\"}} {t}", label(client));
            }
        }
        // Over the cap, keep the clients that store the most, then by name.
        let usage: Vec<(String, u64, u64)> = match self.client_usage.lock() {
            Ok(m) => {
                let mut v: Vec<(String, u64, u64)> = m.iter().map(|(n, (b, f))| (label(n), *b, *f)).collect();
                v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                v.truncate(max_clients);
                v
            }
            Err(_) => Vec::new(),
        };
        let _ = writeln!(
            o,
            "# HELP backupd_client_bytes_stored Bytes each client stores (current files plus kept versions), what --quota is checked against.\n# TYPE backupd_client_bytes_stored gauge"
        );
        for (l, bytes, _) in &usage {
            let _ = writeln!(o, "backupd_client_bytes_stored{{client=\"{l}\"}} {bytes}");
        }
        let _ = writeln!(
            o,
            "# HELP backupd_client_files_stored Files each client stores (current files plus kept versions), what --quota-files is checked against.\n# TYPE backupd_client_files_stored gauge"
        );
        for (l, _, files) in &usage {
            let _ = writeln!(o, "backupd_client_files_stored{{client=\"{l}\"}} {files}");
        }
    }
}

/// A label value: backslash, quote and newline escaped as the format requires.
fn label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a local struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Seconds since the epoch now.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Write `text` to `path` atomically: a temp file beside it, then rename.
/// The file is readable by all (0644, whatever the umask: the service's is
/// 0077), so that node_exporter, another user, can read it; the temp file
/// goes when something fails.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A new file, never through what is there: a link planted at PATH.tmp
    // would otherwise have its target rewritten and made readable by all.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let r = f
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| {
            drop(f);
            std::fs::rename(&tmp, path)
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The thread that writes the metrics file; dropping it (or `stop`) writes
/// the file one last time and ends the thread.
pub struct Writer {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Write once more and wait for the thread to end.
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the writer thread needs to render.
pub struct Source {
    pub metrics: Arc<Metrics>,
    pub budget: Budget,
    pub data_dir: PathBuf,
    pub max_clients: usize,
}

/// How often a metrics file that keeps failing is logged again.
const FAILURE_REMINDER: Duration = Duration::from_secs(3600);

/// Start the thread that writes `path` every `interval` and once more at stop.
pub fn spawn_writer(path: PathBuf, interval: Duration, src: Source) -> std::io::Result<Writer> {
    let (tx, rx) = mpsc::channel::<()>();
    // A file that cannot be written (its folder missing, a full disk) is
    // logged once, again when the error changes and once an hour while it
    // lasts, and when writing works again: not every interval.
    let mut failing: Option<(String, Instant, u64)> = None;
    let mut write = move |src: &Source| {
        let text =
            src.metrics.render(&src.budget, &src.data_dir, src.max_clients, crate::logging::dropped_total());
        match (write_atomically(&path, &text), &mut failing) {
            (Ok(()), None) => {}
            (Ok(()), Some((_, _, n))) => {
                log::info!("metrics written to {} again, after {n} failed attempt(s)", path.display());
                failing = None;
            }
            (Err(e), Some((last, at, n))) if *last == e.to_string() && at.elapsed() < FAILURE_REMINDER => {
                *n += 1;
            }
            (Err(e), f) => {
                let n = f.as_ref().map_or(0, |f| f.2) + 1;
                log::warn!(
                    "cannot write metrics to {}: {e} ({n} failed attempt(s); logged again when this changes, \
                     or in an hour)",
                    path.display()
                );
                *f = Some((e.to_string(), Instant::now(), n));
            }
        }
    };
    let handle = std::thread::Builder::new().name("backupd-metrics".into()).spawn(move || loop {
        write(&src);
        match rx.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                write(&src);
                return;
            }
        }
    })?;
    Ok(Writer { stop: Some(tx), handle: Some(handle) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_the_text_format() {
        let m = Metrics::new();
        m.connections_accepted.add(3);
        m.refused(Refused::TableFull);
        m.closed(Closed::Evicted);
        m.request(1028);
        m.request(9999);
        m.unstored(Unstored::Aborted);
        m.commit_seconds.observe(0.003);
        m.commit_batch_size.observe(5.0);
        m.verified_at("al\"ice\n", 1_700_000_000);
        m.client_usage("bob", 4096, 3);
        let dir = tempfile::tempdir().unwrap();
        let text = m.render(&Budget::new(1024, 1), dir.path(), 10, 7);
        for want in [
            "backupd_connections_accepted_total 3",
            "backupd_connections_refused_total{reason=\"table_full\"} 1",
            "backupd_connections_closed_total{reason=\"evicted\"} 1",
            "backupd_requests_total{code=\"1028\"} 1",
            "backupd_uploads_unstored_total{reason=\"aborted\"} 1",
            "backupd_commit_seconds_bucket{le=\"0.005\"} 1",
            "backupd_commit_seconds_bucket{le=\"0.002\"} 0",
            "backupd_commit_batch_files_count 1",
            "backupd_budget_bytes_limit 1024",
            "backupd_log_records_dropped_total 7",
            "backupd_client_last_verified_timestamp_seconds{client=\"al\\\"ice\\n\"} 1700000000",
            "backupd_client_bytes_stored{client=\"bob\"} 4096",
            "backupd_client_files_stored{client=\"bob\"} 3",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        assert!(text.contains("backupd_data_dir_free_bytes "));
        // Every sample line is "name{labels} value" with a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let v = line.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn the_per_client_series_are_capped_keeping_the_most_silent() {
        let m = Metrics::new();
        for i in 0..5u64 {
            m.verified_at(&format!("c{i}"), 100 + i);
        }
        let dir = tempfile::tempdir().unwrap();
        let text = m.render(&Budget::new(1, 1), dir.path(), 2, 0);
        assert!(text.contains("client=\"c0\"") && text.contains("client=\"c1\""));
        assert!(!text.contains("client=\"c4\""));
    }
}
