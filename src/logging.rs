//! Logging that never blocks the event loop, and log lines no peer can forge.
//!
//! * [`init`] installs a `simplelog` logger whose output is a bounded queue
//!   ([`QUEUE_LINES`] lines) drained by a writer thread that owns the sink
//!   (standard error or `--log-file`). When the sink is stuck (a pipe nobody
//!   reads, a full disk) the queue fills, further lines are dropped and
//!   counted, and the count is logged once the sink moves again. The loop only
//!   ever does a `try_send`.
//! * [`peer_allows`] rate-limits what one peer address can make the server
//!   log: a burst of [`PEER_LINES_BURST`] lines, then [`PEER_LINES_PER_SEC`]
//!   per second, and one "N similar lines suppressed" line a second
//!   ([`report_suppressed`], called every loop tick).
//! * [`Esc`] prints peer-supplied text (names) with control characters,
//!   bidirectional overrides and other invisible format characters escaped,
//!   so a name can neither start a new log line nor hide or reorder one (the
//!   admin commands print names in their human output through it too).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use simplelog::{ConfigBuilder, WriteLogger};

use crate::ratelimit::TokenBucket;

/// Lines the queue holds before new ones are dropped.
pub const QUEUE_LINES: usize = 4096;
/// Longest line kept (a longer record is cut; records are single lines).
const MAX_LINE: usize = 16 * 1024;
/// Log lines one peer address may cause per second, on average ...
pub const PEER_LINES_PER_SEC: f64 = 5.0;
/// ... and at once: a client that makes a few mistakes in a row has each one
/// explained; a flood of refusals costs a few lines a second.
pub const PEER_LINES_BURST: f64 = 64.0;

/// Where log lines go.
#[derive(Debug, Clone)]
pub enum Sink {
    Stderr,
    File(PathBuf),
}

enum Msg {
    Line(Vec<u8>),
    /// Write out everything queued before this, then answer.
    Flush(SyncSender<()>),
    /// Reopen the log file (after logrotate moved it), then answer.
    Reopen(SyncSender<io::Result<()>>),
}

static QUEUE: OnceLock<SyncSender<Msg>> = OnceLock::new();
/// Lines dropped since the last report, and in all.
static DROPPED_PENDING: AtomicU64 = AtomicU64::new(0);
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Log records dropped because the sink was stuck, since start.
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

/// The logger's output: whole lines into the queue, never blocking.
struct QueueWriter {
    line: Vec<u8>,
    tx: SyncSender<Msg>,
}

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for part in buf.split_inclusive(|&b| b == b'\n') {
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&part[..part.len().min(room)]);
            if part.ends_with(b"\n") {
                if !self.line.ends_with(b"\n") {
                    self.line.push(b'\n');
                }
                let line = std::mem::take(&mut self.line);
                if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
                    DROPPED_PENDING.fetch_add(1, Ordering::Relaxed);
                    DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Output {
    Stderr(io::Stderr),
    File(PathBuf, File),
}

impl Output {
    fn open(sink: &Sink) -> io::Result<Output> {
        Ok(match sink {
            Sink::Stderr => Output::Stderr(io::stderr()),
            Sink::File(p) => Output::File(p.clone(), open_append(p)?),
        })
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Output::Stderr(s) => s.write_all(b),
            Output::File(_, f) => f.write_all(b),
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Output::File(p, f) = self {
            *f = open_append(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }
}

fn open_append(p: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

/// Install the logger: lines at `level` and above go through the queue to `sink`.
pub fn init(level: log::LevelFilter, sink: Sink) -> Result<(), String> {
    let mut out = Output::open(&sink).map_err(|e| match &sink {
        Sink::File(p) => format!("cannot open log file {}: {e}", p.display()),
        Sink::Stderr => format!("cannot write to standard error: {e}"),
    })?;
    let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE_LINES);
    let cfg = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .build();
    WriteLogger::init(level, cfg, QueueWriter { line: Vec::new(), tx: tx.clone() })
        .map_err(|e| e.to_string())?;
    let _ = QUEUE.set(tx);
    std::thread::Builder::new()
        .name("backupd-log".into())
        .spawn(move || write_lines(rx, &mut out))
        .map_err(|e| format!("cannot start the log writer thread: {e}"))?;
    Ok(())
}

/// How long the writer lets lines gather while they keep coming (see `write_lines`).
const GATHER: Duration = Duration::from_millis(10);

/// Bytes of lines written at once, at most.
const WRITE_CHUNK: usize = 64 * 1024;

/// The writer thread. Idle, it blocks on the queue and the first line wakes
/// it; while lines keep coming it sleeps GATHER between rounds and writes
/// everything queued meanwhile at once. So a busy server's log costs one
/// write(2) per round instead of one per line, and the threads that log never
/// wake the writer (a `try_send` to a writer that is not waiting is a plain
/// memory operation): measured, the two `info` lines of each small file cost
/// about 10% of the small-file throughput when each woke the writer
/// (docs/PERFORMANCE.md, issue 14). A line waits at most GATHER; a flush or
/// reopen is answered in order, after the lines queued before it.
fn write_lines(rx: Receiver<Msg>, out: &mut Output) {
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
    while let Ok(first) = rx.recv() {
        let (mut next, mut busy) = (Some(first), false);
        loop {
            let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) else {
                write_out(out, &mut buf);
                if !busy {
                    break; // nothing came this round: block again
                }
                busy = false;
                std::thread::sleep(GATHER);
                continue;
            };
            busy = true;
            match msg {
                Msg::Line(l) => {
                    buf.extend_from_slice(&l);
                    if buf.len() >= WRITE_CHUNK {
                        write_out(out, &mut buf);
                    }
                }
                Msg::Flush(ack) => {
                    write_out(out, &mut buf);
                    let _ = ack.send(());
                }
                Msg::Reopen(ack) => {
                    write_out(out, &mut buf);
                    let _ = ack.send(out.reopen());
                }
            }
        }
    }
    write_out(out, &mut buf);
}

/// Write the gathered lines (a failed write, the sink gone, is not retried:
/// the lines are lost) and report lines dropped while the sink was stuck.
fn write_out(out: &mut Output, buf: &mut Vec<u8>) {
    if buf.is_empty() {
        return;
    }
    let ok = out.write_all(buf).is_ok();
    buf.clear();
    if ok {
        // Written here, not logged: a line logged now would go into a queue
        // that may still be full, be dropped itself and count as the only one.
        let dropped = DROPPED_PENDING.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let line = format!(
                "{} [WARN] {dropped} log line(s) were dropped while the log output was blocked\n",
                crate::units::now_iso8601()
            );
            if out.write_all(line.as_bytes()).is_err() {
                DROPPED_PENDING.fetch_add(dropped, Ordering::Relaxed);
            }
        }
    }
}

/// Ask the writer thread for something and wait for its answer, at most `timeout`
/// (a stuck sink must not keep the process from exiting).
fn ask<T>(timeout: Duration, make: impl FnOnce(SyncSender<T>) -> Msg) -> Option<T> {
    let q = QUEUE.get()?;
    let (ack_tx, ack_rx) = mpsc::sync_channel(1);
    let deadline = Instant::now() + timeout;
    let mut msg = make(ack_tx);
    loop {
        match q.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
    ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
}

/// Write out what is queued (before the process exits), waiting at most `timeout`.
pub fn flush(timeout: Duration) {
    ask(timeout, Msg::Flush);
}

/// Reopen `--log-file` (SIGHUP after a rotation). Ok when logging to standard error.
pub fn reopen() -> io::Result<()> {
    ask(Duration::from_secs(5), Msg::Reopen)
        .unwrap_or_else(|| Err(io::Error::other("the log writer is not answering")))
}

/// One peer address's log lines: its allowance and what it lost.
struct PeerLines {
    bucket: TokenBucket,
    suppressed: u64,
    reported: Instant,
}

/// Lines are limited per peer address and per kind of line (the format
/// string of the `peer_log!` call): a flood of one kind cannot hide another.
type PeerKey = (IpAddr, &'static str);

fn peers() -> &'static Mutex<HashMap<PeerKey, PeerLines>> {
    static PEERS: OnceLock<Mutex<HashMap<PeerKey, PeerLines>>> = OnceLock::new();
    PEERS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// May a line of kind `what` caused by `ip` be logged now?
/// [`PEER_LINES_BURST`] lines at once, then [`PEER_LINES_PER_SEC`] per
/// second, per address and kind; the rest are counted and reported by
/// [`report_suppressed`], at most once a second.
pub fn peer_allows(ip: IpAddr, what: &'static str) -> bool {
    let now = Instant::now();
    let Ok(mut map) = peers().lock() else { return true };
    let p = map.entry((ip, what)).or_insert(PeerLines {
        bucket: TokenBucket::full(PEER_LINES_BURST, now),
        suppressed: 0,
        reported: now,
    });
    if p.bucket.take(now, PEER_LINES_PER_SEC, PEER_LINES_BURST) {
        true
    } else {
        p.suppressed += 1;
        false
    }
}

/// Report the lines suppressed per address (one line each, at most once a
/// second), and forget addresses that have been quiet long enough.
pub fn report_suppressed() {
    let now = Instant::now();
    let mut reports = Vec::new();
    if let Ok(mut map) = peers().lock() {
        map.retain(|(ip, what), p| {
            if p.suppressed > 0 && now.duration_since(p.reported) >= Duration::from_secs(1) {
                reports.push((*ip, *what, std::mem::take(&mut p.suppressed)));
                p.reported = now;
            }
            p.suppressed > 0 || !p.bucket.is_full(now, PEER_LINES_PER_SEC, PEER_LINES_BURST)
        });
    }
    for (ip, what, n) in reports {
        log::warn!("{ip}: {n} similar line(s) suppressed, like \"{}\"", Esc(&shape(what)));
    }
}

/// A line's format string as its shape: each `{...}` placeholder shown as
/// `…` ("{}: closed: {w}" -> "…: closed: …").
fn shape(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        match rest[i..].find('}') {
            Some(j) => {
                out.push('…');
                rest = &rest[i + j + 1..];
            }
            None => {
                rest = &rest[i..];
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Log a line caused by a peer, rate-limited per address (see [`peer_allows`]).
#[macro_export]
macro_rules! peer_log {
    ($lvl:expr, $ip:expr, $fmt:literal $($arg:tt)*) => {
        if log::log_enabled!($lvl) && $crate::logging::peer_allows($ip, $fmt) {
            log::log!($lvl, $fmt $($arg)*);
        }
    };
}

/// Peer-supplied text for a log line: control characters, bidirectional
/// overrides and isolates, zero-width and other invisible format characters,
/// quotes and backslashes are written as escapes (`\u{202e}`, `\n`, `\"`).
pub struct Esc<'a>(pub &'a str);

/// Characters that reorder or hide text without being control characters:
/// Unicode's default-ignorable code points (shown as nothing: soft hyphen,
/// zero-width characters, joiners, fillers, variation selectors, tags), the
/// other format characters (bidi marks, overrides and isolates, prefixed
/// number signs, interlinear annotation), and the line and paragraph
/// separators.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{034f}' | '\u{0600}'..='\u{0605}' | '\u{061c}' | '\u{06dd}' | '\u{070f}'
        | '\u{0890}'..='\u{0891}' | '\u{08e2}' | '\u{115f}'..='\u{1160}' | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{feff}' | '\u{ffa0}'
        | '\u{fff0}'..='\u{fffb}' | '\u{110bd}' | '\u{110cd}' | '\u{13430}'..='\u{1343f}'
        | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e0fff}')
}

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() || is_invisible_format(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Peer-supplied bytes (possibly not UTF-8) for a log line, escaped as by [`Esc`].
pub fn escape_bytes(b: &[u8]) -> String {
    Esc(&String::from_utf8_lossy(b)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_cannot_break_or_reorder_a_line() {
        let s = Esc("evil\n2026-01-01 [INFO] forged\u{202e}txt.exe\u{2066}\"\\\u{7}ok").to_string();
        assert!(!s.contains('\n'));
        assert!(!s.chars().any(|c| c.is_control() || is_invisible_format(c)), "{s}");
        assert_eq!(s, "evil\\n2026-01-01 [INFO] forged\\u{202e}txt.exe\\u{2066}\\\"\\\\\\u{7}ok");
        assert_eq!(Esc("été.txt").to_string(), "été.txt");
        // Invisible in a terminal: soft hyphen, combining grapheme joiner,
        // Hangul filler, a variation selector, a tag character.
        let hidden = Esc("al\u{ad}i\u{34f}c\u{3164}e\u{fe0f}\u{e0041}").to_string();
        assert_eq!(hidden, "al\\u{ad}i\\u{34f}c\\u{3164}e\\u{fe0f}\\u{e0041}");
        assert_eq!(escape_bytes(b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn a_suppressed_line_is_shown_by_its_shape() {
        assert_eq!(shape("{}: closed: {w}"), "…: closed: …");
        assert_eq!(shape("{}: register: refused, {:?} taken"), "…: register: refused, … taken");
        assert_eq!(shape("no placeholder"), "no placeholder");
        assert_eq!(shape("unclosed {x"), "unclosed {x");
    }

    #[test]
    fn a_peer_gets_a_few_lines_per_second() {
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        let allowed = (0..1000).filter(|_| peer_allows(ip, "a")).count();
        assert!((64..=70).contains(&allowed), "{allowed}");
        let other: IpAddr = "192.0.2.78".parse().unwrap();
        assert!(peer_allows(other, "a"), "another address has its own allowance");
        assert!(peer_allows(ip, "b"), "another kind of line has its own allowance");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, _rx) = mpsc::sync_channel::<Msg>(2);
        let mut w = QueueWriter { line: Vec::new(), tx };
        let before = dropped_total();
        for _ in 0..5 {
            w.write_all(b"a line\n").unwrap();
        }
        assert!(dropped_total() - before >= 3);
    }

    #[test]
    fn the_writer_gathers_lines_and_keeps_their_order_around_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut out = Output::open(&Sink::File(path.clone())).unwrap();
        let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE_LINES);
        let writer = std::thread::spawn(move || write_lines(rx, &mut out));
        let mut w = QueueWriter { line: Vec::new(), tx: tx.clone() };
        // Lines split across writes, in bursts with pauses between them.
        for burst in 0..5 {
            for i in 0..300 {
                write!(w, "line {}", burst * 300 + i).unwrap();
                w.write_all(b"\n").unwrap();
            }
            std::thread::sleep(GATHER / 2);
        }
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(ack_tx)).unwrap();
        ack_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // Everything queued before the flush is written when it is answered.
        let text = std::fs::read_to_string(&path).unwrap();
        let want: Vec<String> = (0..1500).map(|i| format!("line {i}")).collect();
        // (The process-wide count of dropped lines, which another test may
        // have raised, is reported by whichever writer writes next.)
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("log line(s) were dropped")).collect();
        assert_eq!(lines, want);
        drop((tx, w));
        writer.join().unwrap();
    }
}
