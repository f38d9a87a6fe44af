//! The event loop: one thread, one `mio::Poll`, every socket nonblocking.
//!
//! The loop ([`Server`]) owns the listener, the [`Slab`] of `Connection`s
//! and the timers; it does the I/O only. What requests and completions mean
//! is decided by `Core` (the in-memory client registry, the memory budget,
//! the job sink; its protocol logic is in `machine.rs`) acting on each
//! connection's `Protocol` (`state.rs`). Neither touches a socket: the
//! fuzz target `session` runs them on bytes. The loop never touches a file or the
//! database and never sleeps: disk and database work goes to the worker as
//! [`Job`]s, and the worker's [`Completion`]s come back over a channel with a
//! `mio::Waker` wake-up. See docs/ARCHITECTURE.md for the whole lifecycle.
//!
//! Readiness is edge-triggered: each connection remembers whether its socket
//! may still hold unread bytes (`readable`, cleared by a read that would
//! block or, before the peer has closed, by a short read; see
//! `connection.rs`) or holds bytes read ahead, so a connection paused for the
//! memory budget, for a pending reply or for its pipeline depth is resumed
//! later without a new event. Slab keys are reused, so every job names its
//! connection by key *and* serial number.
//!
//! Admission (docs/ARCHITECTURE.md, "Admission"): file content is read in
//! pieces granted by the memory budget (first come, first served; waking the
//! waiters is a loop, never a recursion); control frames never wait for it;
//! connections without a session are closed after `--login-timeout`; a full
//! table evicts the connection with the oldest upload progress; per-address
//! caps apply at accept ([`admission`]).
//!
//! Here: the loop itself (poll, signals, close, completions, shutdown). Start-up
//! is in `start.rs`, accepting in `accept.rs`, driving a connection in
//! `drive.rs`, the housekeeping deadlines in `deadlines.rs`, `Core` in
//! `core.rs`; a connection's I/O in `connection.rs` and its protocol states
//! in `state.rs` (enums moved by value, see docs/ARCHITECTURE.md, "The
//! connection's states"); the state machine in `machine.rs`, with its packet
//! path in `upload.rs` and its completions in `completion.rs`. Every field
//! is private to this module; the fuzz harness drives `Core` and `Protocol`
//! through `fuzzing.rs` (cargo feature `fuzzing`).

mod accept;
pub mod admission;
mod completion;
mod connection;
mod core;
mod deadlines;
mod drive;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod machine;
mod notify;
mod sequence;
mod start;
mod state;
mod upload;

pub use start::StartError;

use self::core::{ClientEntry, Core, JobSink, Registry};
use machine::Flow;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::metrics::Closed;
use crate::peer_log;
use crate::worker::{Completion, Job};
use accept::Held;
use admission::PerAddress;
use connection::Connection;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Content pieces of one connection that may be at the worker at once: the
/// loop reads the next piece while the worker decrypts the last ones.
pub const PIPELINE_DEPTH: usize = 4;
/// The largest content piece (a share of the budget is smaller when it is
/// tight, see [`crate::budget::Budget::try_grant_piece`]).
pub use crate::budget::CONTENT_PIECE;
/// After a failed accept (out of descriptors), accepting is retried this soon
/// even if no new connection arrives.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Frames handled for one connection before the loop turns to the others.
const FRAMES_PER_TURN: usize = 16;
/// How often timeouts are checked. A scan of every connection once per
/// second costs nothing next to a deadline heap at these connection counts.
const TICK: Duration = Duration::from_millis(500);

/// How often the data directory and its lock files are checked to be the
/// ones the server started with.
const HOME_EVERY: Duration = Duration::from_secs(2);
/// Slowest payload rate tolerated once a frame's header is in (bytes/s): a
/// frame, a content piece or a refused packet's content must complete within
/// header_timeout + size / this rate, so a client cannot hold a grant of the
/// memory budget by trickling.
const MIN_PAYLOAD_RATE: u64 = 32 * 1024;
/// A closing connection gets this long to take its last reply.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Pending connections the kernel may queue (>= 128 by requirement).
const LISTEN_BACKLOG: i32 = 1024;

/// A running server: bound, storage open, worker started. Built by
/// [`Server::bind`], then [`Server::run`] serves until shutdown.
pub struct Server {
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Option<Signals>,
    conns: Slab<Connection>,
    next_serial: u64,
    core: Core,
    done: Receiver<Completion>,
    /// What the worker threads wake the loop with (see [`LoopWaker`]).
    waker: Arc<LoopWaker>,
    worker: Option<crate::worker::Threads>,
    /// Connections waiting for a content piece's grant, in arrival order.
    budget_waiters: VecDeque<(usize, u64)>,
    /// Connections per peer address.
    per_address: PerAddress,
    /// Accepting failed (out of descriptors): try again at this time.
    accept_retry: Option<Instant>,
    /// Accept has hit EMFILE/ENFILE since it last succeeded (one pending
    /// connection has been shed for this shortage already).
    out_of_descriptors: bool,
    /// A connection over its address's cap, held (with accepting paused) for
    /// one loop round: the connections that fill the cap may be dead ones
    /// whose EOF that round reads (a connect-and-close flood queued in the
    /// backlog). Refused only if the cap still holds after the round.
    held: Option<Held>,
    /// Loop rounds so far.
    round: u64,
    /// Connections that stopped for fairness and must be driven again.
    ready: VecDeque<(usize, u64)>,
    shutdown: Option<Instant>,
    /// The data directory and its lock files as at start, checked every
    /// [`HOME_EVERY`]; set when one was removed or replaced (the server
    /// then stops and exits with an error).
    home: crate::worker::DataDirWatch,
    home_checked: Instant,
    home_lost: Option<String>,
    /// The thread writing `--metrics-file`, if any.
    metrics_writer: Option<crate::metrics::Writer>,
    /// sd_notify readiness and watchdog.
    notifier: notify::Notifier,
    /// A descriptor held in reserve so that, out of descriptors, the loop can
    /// still accept and close a pending connection instead of spinning.
    spare_fd: Option<std::fs::File>,
    refused_since_log: u64,
    last_refusal_log: Option<Instant>,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until SIGINT/SIGTERM and a clean shutdown.
    pub fn run(mut self) -> io::Result<()> {
        log::info!("listening on {}", self.local_addr);
        self.notifier.ready(Instant::now());
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + TICK;
        loop {
            let now = Instant::now();
            let mut due = next_tick;
            if let Some(t) = self.accept_retry {
                due = due.min(t);
            }
            if let Some(t) = self.notifier.due() {
                due = due.min(t);
            }
            let timeout = if self.ready.is_empty() && self.held.is_none() {
                due.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    SIGNALS => self.on_signal(),
                    Token(key) => {
                        if let Some(c) = self.conns.get_mut(key) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                c.readable = true;
                            }
                            if ev.is_read_closed() || ev.is_error() {
                                c.hup = true;
                            }
                            let serial = c.serial();
                            self.drive(key, serial);
                        }
                    }
                }
            }
            self.drain_completions();
            for _ in 0..self.ready.len() {
                if let Some((key, serial)) = self.ready.pop_front() {
                    self.drive(key, serial);
                }
            }
            // Pieces handed back by the worker or dropped with closed connections
            // returned their grants: waiters may now fit.
            self.wake_budget_waiters();
            if self.held.as_ref().is_some_and(|h| h.round < self.round) {
                if let Some(h) = self.held.take() {
                    self.admit(h.socket, h.peer, true);
                }
                self.accept();
            }
            self.round += 1;
            let now = Instant::now();
            self.notifier.ping(now);
            if self.accept_retry.is_some_and(|t| now >= t) {
                self.accept();
            }
            if now >= next_tick {
                self.housekeeping(now);
                self.check_home(now);
                next_tick = now + TICK;
            }
            if let Some(deadline) = self.shutdown {
                if self.conns.is_empty() || now >= deadline {
                    return self.finish_shutdown();
                }
            }
        }
    }

    fn on_signal(&mut self) {
        let Some(signals) = self.signals.as_mut() else { return };
        let got: Vec<i32> = signals.pending().collect();
        if got.contains(&SIGHUP) && self.core.cfg.log_file.is_none() {
            log::info!("SIGHUP: the log goes to standard error: nothing to reopen");
        } else if got.contains(&SIGHUP) {
            match crate::logging::reopen() {
                Ok(()) => log::info!("SIGHUP: log file reopened"),
                Err(e) => log::error!("SIGHUP: cannot reopen the log file: {e}"),
            }
        }
        if !got.iter().any(|&s| s == SIGINT || s == SIGTERM) {
            return;
        }
        if self.shutdown.is_some() {
            log::warn!("second signal: exiting at once");
            crate::logging::flush(Duration::from_secs(1));
            std::process::exit(130);
        }
        log::info!(
            "signal received: no new connections; finishing in-flight work (up to {:?})",
            self.core.cfg.shutdown_timeout
        );
        self.begin_shutdown();
    }

    /// Is the data directory still the one the server started with? If it
    /// was removed or replaced (or a lock file was), stop: one error line,
    /// then the same shutdown as on SIGTERM, and an exit with an error.
    pub(super) fn check_home(&mut self, now: Instant) {
        if self.home_lost.is_some() || now.duration_since(self.home_checked) < HOME_EVERY {
            return;
        }
        self.home_checked = now;
        let Some(what) = self.home.changed() else { return };
        log::error!(
            "{what} while the server ran: stopping (uploads acknowledged from now on could be lost, \
             and another server could share the data directory); start it again on the data directory \
             it is to serve"
        );
        self.home_lost = Some(what);
        if self.shutdown.is_none() {
            self.begin_shutdown();
        }
    }

    /// No new connections; quiet ones closed; the rest finish their work
    /// (up to `--shutdown-timeout`).
    fn begin_shutdown(&mut self) {
        self.shutdown = Some(Instant::now() + self.core.cfg.shutdown_timeout);
        self.notifier.stopping();
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.held = None;
        let quiet: Vec<(usize, u64)> =
            self.conns.iter().filter(|(_, c)| c.is_quiet()).map(|(k, c)| (k, c.serial())).collect();
        for (k, s) in quiet {
            self.close(k, s, Closed::Shutdown, None);
        }
    }

    fn finish_shutdown(mut self) -> io::Result<()> {
        let keys: Vec<(usize, u64)> = self.conns.iter().map(|(k, c)| (k, c.serial())).collect();
        if !keys.is_empty() {
            log::warn!("shutdown timeout: closing {} connection(s) with unfinished work", keys.len());
        }
        for (k, s) in keys {
            self.close(k, s, Closed::Shutdown, None);
        }
        let _ = self.core.jobs.send(Job::Shutdown);
        if let Some(h) = self.worker.take() {
            if !h.join() {
                log::error!("worker thread panicked");
                return Err(io::Error::other("worker thread panicked"));
            }
        }
        // The last figures, with the worker done.
        if let Some(mut w) = self.metrics_writer.take() {
            w.stop();
        }
        if let Some(what) = self.home_lost.take() {
            return Err(io::Error::other(format!("stopped: {what}")));
        }
        log::info!("shut down cleanly");
        Ok(())
    }

    /// Close a connection: deregister it and drop its uploads at the worker.
    /// `why`, when given, is logged (rate-limited per peer address). Its
    /// grants go back to the budget with it; waiters are woken by the loop,
    /// not from here (no recursion through `drive`).
    fn close(&mut self, key: usize, serial: u64, kind: Closed, why: Option<&str>) {
        if self.conns.get(key).is_none_or(|c| c.serial() != serial) {
            return;
        }
        let mut c = self.conns.remove(key);
        self.core.metrics.closed(kind);
        self.core.metrics.connections_open.add(-1);
        let _ = self.poll.registry().deregister(&mut c.socket);
        self.per_address.closed(c.proto.peer.ip(), c.authed);
        match why {
            Some(w) => peer_log!(log::Level::Info, c.proto.peer.ip(), "{}: closed: {w}", c.tag()),
            None => log::debug!("{}: closed", c.tag()),
        }
        self.core.closed(&c.proto);
        // A descriptor is free: a connection queued while they ran out is served now.
        if self.accept_retry.is_some() {
            self.accept_retry = Some(Instant::now());
        }
    }

    /// Hand a worker completion to the state machine of its connection (if
    /// that connection is still open) and do what it asks.
    fn on_completion(&mut self, done: Completion) {
        let conn = done.conn();
        let proto = self.conns.get_mut(conn.key).filter(|c| c.serial() == conn.serial).map(|c| &mut c.proto);
        match self.core.on_completion(proto, done) {
            Flow::Continue => {}
            // A wait ended: flush the replies and read on.
            Flow::Resume => self.drive(conn.key, conn.serial),
            Flow::Close => {
                if let Some(c) = self.conns.get_mut(conn.key) {
                    c.close_protocol(Instant::now());
                }
                self.drive(conn.key, conn.serial);
            }
        }
    }

    fn drain_completions(&mut self) {
        self.waker.draining();
        while let Ok(c) = self.done.try_recv() {
            self.on_completion(c);
        }
        self.wake_budget_waiters();
    }
}

/// The worker threads wake the loop through its `mio::Waker`, once per
/// batch of completions: a wake still pending (the loop has not drained the
/// completions since) is not repeated. Under load this spares the worker
/// threads an eventfd write, and the loop a return from poll, per file.
pub(super) struct LoopWaker {
    waker: Waker,
    pending: AtomicBool,
}

impl LoopWaker {
    pub(super) fn new(waker: Waker) -> LoopWaker {
        LoopWaker { waker, pending: AtomicBool::new(false) }
    }

    /// The loop is about to drain the completions: what is sent from now on
    /// wakes it again. (AcqRel: a completion sent before a wake that was
    /// skipped is seen by the drain that follows.)
    fn draining(&self) {
        self.pending.swap(false, Ordering::AcqRel);
    }
}

impl crate::worker::Wake for LoopWaker {
    fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.waker.wake() {
            self.pending.store(false, Ordering::Release);
            log::error!("worker: cannot wake the event loop: {e}");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::connection::{ContentRead, ReadState};
    use super::*;
    use crate::config::Config;
    use crate::worker::ConnRef;

    /// A wake is skipped only while an earlier one is pending: once the
    /// loop starts draining, the next wake reaches poll again.
    #[test]
    fn a_wake_after_the_drain_always_reaches_the_loop() {
        use crate::worker::Wake;
        let mut poll = Poll::new().unwrap();
        let waker = LoopWaker::new(Waker::new(poll.registry(), WAKER).unwrap());
        let mut events = Events::with_capacity(8);
        let mut woken = |poll: &mut Poll| {
            poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
            events.iter().filter(|e| e.token() == WAKER).count()
        };
        waker.wake();
        waker.wake();
        assert_eq!(woken(&mut poll), 1, "the first wake reaches the loop");
        waker.wake();
        assert_eq!(woken(&mut poll), 0, "pending: the loop has not drained yet");
        for _ in 0..3 {
            waker.draining();
            waker.wake();
            assert_eq!(woken(&mut poll), 1, "a wake after the drain began");
        }
    }

    /// The defaults with a data directory under `dir`.
    pub(in crate::server) fn test_config(dir: &std::path::Path) -> Config {
        let mut cfg = Config::defaults();
        cfg.data_dir = dir.join("data");
        cfg
    }

    /// A connection inserted in the server's slab, and the client's end of it.
    pub(in crate::server) fn add_connection(server: &mut Server) -> (usize, u64, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (sock, peer) = listener.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let serial = server.next_serial;
        server.next_serial += 1;
        let socket = mio::net::TcpStream::from_std(sock);
        let entry = server.conns.vacant_entry();
        let key = entry.key();
        entry.insert(Connection::new(socket, peer, ConnRef { key, serial }, Instant::now()));
        (key, serial, client)
    }

    /// Control frames do not use the budget and content comes in pieces no
    /// larger than the budget: a small budget serves every frame.
    #[test]
    fn a_small_memory_budget_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.memory_budget = 4096;
        let server = Server::bind(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(server.core.piece_size(), 4096);
        let mut cfg = test_config(&dir.path().join("b"));
        cfg.memory_budget = 100;
        assert!(Server::bind(cfg, "127.0.0.1:0".parse().unwrap()).is_err());
    }

    /// A connection that must wait for its piece's grant keeps its place in
    /// the queue however long it waits, and is handed its piece (in arrival
    /// order) as soon as grants come back, wherever they were dropped.
    #[test]
    fn waiters_get_their_pieces_in_order_when_grants_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::bind(test_config(dir.path()), "127.0.0.1:0".parse().unwrap()).unwrap();
        let held = server.core.budget.try_grant(server.core.budget.limit()).unwrap();
        let mut conns = Vec::new();
        for _ in 0..3 {
            let (key, serial, client) = add_connection(&mut server);
            server.conns[key].expect(ReadState::Content(ContentRead::new(1 << 20))).unwrap();
            server.drive(key, serial);
            conns.push((key, serial, client));
        }
        let queued: Vec<(usize, u64)> = conns.iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(server.budget_waiters.iter().copied().collect::<Vec<_>>(), queued);
        server.wake_budget_waiters();
        assert_eq!(server.budget_waiters.len(), 3, "nothing is granted while the budget is full");
        // The grant comes back from another thread (as from the worker).
        std::thread::spawn(move || drop(held)).join().unwrap();
        server.wake_budget_waiters();
        assert!(server.budget_waiters.is_empty());
        for (key, _, _) in &conns {
            assert!(matches!(server.conns[*key].read_state(), ReadState::Content(c) if c.piece.is_some()));
        }
        assert_eq!(server.core.budget.used(), 3 * CONTENT_PIECE);
        // A closed connection's piece goes back to the budget with it.
        let (key, serial, _) = conns[0];
        server.close(key, serial, Closed::Peer, None);
        assert_eq!(server.core.budget.used(), 2 * CONTENT_PIECE);
    }
}
