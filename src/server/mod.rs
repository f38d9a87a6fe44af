//! The event loop: one thread, one `mio::Poll`, every socket nonblocking.
//!
//! The loop ([`Server`]) owns the listener, the [`Slab`] of [`Connection`]s
//! and the timers; it does the I/O only. What requests and completions mean
//! is decided by [`Core`] (the in-memory client registry, the memory budget,
//! the job sink; its protocol logic is in `session.rs`) acting on each
//! connection's [`connection::Protocol`]. Neither touches a socket: the
//! fuzz target `session` runs them on bytes. The loop never touches a file or the
//! database and never sleeps: disk and database work goes to the worker as
//! [`Job`]s, and the worker's [`Completion`]s come back over a channel with a
//! `mio::Waker` wake-up. See docs/ARCHITECTURE.md for the whole lifecycle.
//!
//! Readiness is edge-triggered: each connection remembers whether its socket
//! may still hold unread bytes (`readable`), so a connection paused for the
//! memory budget, for a pending reply or for its pipeline depth is resumed
//! later without a new event. Slab keys are reused, so every job names its
//! connection by key *and* serial number.

pub mod connection;
mod session;

pub use session::{plan_packet, Flow, PacketStep};

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::Config;
use crate::protocol::ClientId;
use crate::worker::{Completion, ConnRef, Job, Worker};
use connection::{Connection, ReadOutcome, ReadState};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// File packets of one connection that may be at the worker at once: the
/// loop reads the next packet while the worker decrypts the last one.
pub const PIPELINE_DEPTH: usize = 2;
/// Frames handled for one connection before the loop turns to the others.
const FRAMES_PER_TURN: usize = 16;
/// How often timeouts are checked. A scan of every connection once per
/// second costs nothing next to a deadline heap at these connection counts.
const TICK: Duration = Duration::from_millis(500);
/// Slowest payload rate tolerated once a frame's header is in (bytes/s):
/// a frame must complete within header_timeout + size / this rate, so a
/// client cannot hold its reservation of the memory budget by trickling.
const MIN_PAYLOAD_RATE: u64 = 32 * 1024;
/// A closing connection gets this long to take its last reply.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Pending connections the kernel may queue (>= 128 by requirement).
const LISTEN_BACKLOG: i32 = 1024;
/// Recycled packet buffers kept for reuse.
const POOL_BUFFERS: usize = 8;
/// ... holding at most this many bytes (the pool is outside the memory budget).
const POOL_BYTES: usize = 4 << 20;

/// A registered client, in memory for the life of the process.
pub struct ClientEntry {
    pub name: String,
    pub key: Option<rsa::RsaPublicKey>,
    /// The registration is not yet durable (its 1600 has not been sent).
    pub pending: bool,
}

/// The clients known to the server, by id and by name.
#[derive(Default)]
pub struct Registry {
    pub by_id: HashMap<ClientId, ClientEntry>,
    pub by_name: HashMap<String, ClientId>,
}

/// Packet bytes in flight between the sockets and the worker.
pub struct Budget {
    pub limit: usize,
    pub used: usize,
}

/// Where the loop's jobs go: the worker's channel, or a plain `Vec` when the
/// state machine runs without a worker (the fuzz harness).
pub trait JobSink {
    /// Hand over a job; false when the worker is gone.
    fn send(&mut self, job: Job) -> bool;
}

impl JobSink for Sender<Job> {
    fn send(&mut self, job: Job) -> bool {
        Sender::send(self, job).is_ok()
    }
}

impl JobSink for Vec<Job> {
    fn send(&mut self, job: Job) -> bool {
        self.push(job);
        true
    }
}

/// What the protocol logic (`session.rs`) shares between connections, with
/// no socket, poll or timer in it: configuration, client registry, memory
/// budget and buffer pool, upload ids, and where jobs go.
pub struct Core<J: JobSink = Sender<Job>> {
    pub cfg: Arc<Config>,
    pub registry: Registry,
    pub budget: Budget,
    pool: Vec<Vec<u8>>,
    pub next_upload: u64,
    pub jobs: J,
}

impl<J: JobSink> Core<J> {
    /// `next_upload`: the first upload id (ids must not repeat across restarts).
    pub fn new(cfg: Arc<Config>, registry: Registry, jobs: J, next_upload: u64) -> Core<J> {
        let budget = Budget { limit: cfg.memory_budget as usize, used: 0 };
        Core { cfg, registry, budget, pool: Vec::new(), next_upload, jobs }
    }

    /// Reserve `len` bytes of the memory budget and take a buffer of exactly
    /// `len` bytes for a payload; None when the budget cannot hold it now.
    pub fn try_reserve(&mut self, len: usize) -> Option<Vec<u8>> {
        if self.budget.used + len > self.budget.limit {
            return None;
        }
        self.budget.used += len;
        Some(self.take_buffer(len))
    }

    /// Take a buffer of exactly `len` bytes, reusing a recycled one when possible.
    fn take_buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = match self.pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => self.pool.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        buf.resize(len, 0);
        buf
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        let pooled: usize = self.pool.iter().map(Vec::capacity).sum();
        if self.pool.len() < POOL_BUFFERS && pooled + buf.capacity() <= POOL_BYTES {
            self.pool.push(buf);
        }
    }

    /// Return a payload buffer and its budget.
    pub fn release(&mut self, buf: Vec<u8>) {
        self.budget.used -= buf.len();
        self.recycle(buf);
    }
}

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
    worker: Option<JoinHandle<()>>,
    /// Connections waiting for budget, in arrival order.
    budget_waiters: VecDeque<(usize, u64)>,
    /// Connections that stopped for fairness and must be driven again.
    ready: VecDeque<(usize, u64)>,
    shutdown: Option<Instant>,
    /// A descriptor held in reserve so that, out of descriptors, the loop can
    /// still accept and close a pending connection instead of spinning.
    spare_fd: Option<std::fs::File>,
    /// Out of descriptors, the backlog was left pending: the listener is
    /// edge-triggered and may not report it again, so the housekeeping tick
    /// tries once more (no busy loop, at most one tick of delay).
    accept_retry: bool,
    refused_since_log: u64,
    last_refusal_log: Option<Instant>,
    /// Loop rounds so far, and connections closed so far: see [`AcceptPause`].
    round: u64,
    closed_total: u64,
    accept_paused: Option<AcceptPause>,
}

/// At the connection limit, accepting stops for one loop round and the rest
/// of the backlog waits in the kernel: the slots may be held by peers that
/// have already gone (a connect-and-close flood) whose EOF the next round
/// reads. Only when a whole round frees no slot is the excess refused, so a
/// client queued behind a flood of dead connections is served, not refused.
#[derive(Clone, Copy)]
struct AcceptPause {
    round: u64,
    closed_total: u64,
}

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

impl Server {
    /// Open storage and database (reconciling them), bind the listener,
    /// register signals and start the worker.
    pub fn bind(cfg: Config, addr: SocketAddr) -> Result<Server, StartError> {
        // Every frame must fit the budget on its own, or it would wait for it forever:
        // a file packet (--max-packet) and a 1026 (name + padded key) alike.
        let largest_key_frame =
            (crate::protocol::NAME_FIELD_LEN + crate::protocol::header::MAX_PUBLIC_KEY_LEN) as u64;
        if cfg.memory_budget < cfg.max_packet.max(largest_key_frame) {
            return Err(StartError(format!(
                "--memory-budget ({}) must be at least --max-packet ({}) and {largest_key_frame} bytes",
                cfg.memory_budget, cfg.max_packet
            )));
        }
        if cfg.max_packet > u32::MAX as u64 || cfg.max_packet < crate::protocol::PACKET_HEADER_LEN as u64 {
            return Err(StartError("--max-packet must be between 267 bytes and 4 GiB".into()));
        }
        if cfg.max_file_size > u32::MAX as u64 {
            return Err(StartError("--max-file-size cannot exceed 4294967295 (a 32-bit field)".into()));
        }
        check_descriptor_limit(cfg.max_connections);
        let opened = Worker::open(&cfg).map_err(StartError)?;
        let poll = Poll::new().map_err(|e| StartError(format!("cannot create poll: {e}")))?;
        let mut listener =
            bind_listener(addr).map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?;
        let local_addr = listener.local_addr().map_err(|e| StartError(e.to_string()))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| StartError(e.to_string()))?;
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| StartError(format!("signals: {e}")))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| StartError(e.to_string()))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| StartError(e.to_string()))?);

        let mut registry = Registry::default();
        for c in opened.clients {
            let key = c.public_key.as_deref().and_then(|der| match crate::crypto::parse_public_key(der) {
                Ok((k, _)) => Some(k),
                Err(e) => {
                    log::warn!(
                        "client {} ({}) has an unusable stored key: {e}",
                        c.name,
                        crate::protocol::id_hex(&c.id)
                    );
                    None
                }
            });
            registry.by_name.insert(c.name.clone(), c.id);
            registry.by_id.insert(c.id, ClientEntry { name: c.name, key, pending: false });
        }
        log::info!("{} registered client(s) loaded", registry.by_id.len());

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Completion>();
        let worker = opened.worker;
        let wk: Arc<dyn crate::worker::Wake> = waker;
        let handle = std::thread::Builder::new()
            .name("backupd-worker".into())
            .spawn(move || worker.run(jobs_rx, done_tx, wk))
            .map_err(|e| StartError(format!("cannot start worker thread: {e}")))?;

        Ok(Server {
            poll,
            listener: Some(listener),
            local_addr,
            signals: Some(signals),
            conns: Slab::new(),
            next_serial: 1,
            core: Core::new(Arc::new(cfg), registry, jobs_tx, crate::worker::upload_id_seed()),
            done: done_rx,
            worker: Some(handle),
            budget_waiters: VecDeque::new(),
            ready: VecDeque::new(),
            shutdown: None,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            accept_retry: false,
            refused_since_log: 0,
            last_refusal_log: None,
            round: 0,
            closed_total: 0,
            accept_paused: None,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve until SIGINT/SIGTERM and a clean shutdown.
    pub fn run(mut self) -> io::Result<()> {
        log::info!("listening on {}", self.local_addr);
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + TICK;
        loop {
            let now = Instant::now();
            let timeout = if self.ready.is_empty() && self.accept_paused.is_none() {
                next_tick.saturating_duration_since(now)
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
                    LISTENER if self.accept_paused.is_none() => self.accept(),
                    LISTENER => {}
                    WAKER => {}
                    SIGNALS => self.on_signal(),
                    Token(key) => {
                        if let Some(c) = self.conns.get_mut(key) {
                            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                                c.readable = true;
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
            // Small frames release their budget as they are handled: waiters may now fit.
            self.wake_budget_waiters();
            if self.accept_paused.is_some_and(|p| p.round < self.round) {
                self.accept();
            }
            self.round += 1;
            let now = Instant::now();
            if now >= next_tick {
                self.housekeeping(now);
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
        if got.is_empty() {
            return;
        }
        if self.shutdown.is_some() {
            log::warn!("second signal: exiting at once");
            std::process::exit(130);
        }
        log::info!(
            "signal received: no new connections; finishing in-flight work (up to {:?})",
            self.core.cfg.shutdown_timeout
        );
        self.shutdown = Some(Instant::now() + self.core.cfg.shutdown_timeout);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let quiet: Vec<(usize, u64)> =
            self.conns.iter().filter(|(_, c)| c.is_quiet()).map(|(k, c)| (k, c.serial())).collect();
        for (k, s) in quiet {
            self.close(k, s, None);
        }
    }

    fn finish_shutdown(mut self) -> io::Result<()> {
        let keys: Vec<(usize, u64)> = self.conns.iter().map(|(k, c)| (k, c.serial())).collect();
        if !keys.is_empty() {
            log::warn!("shutdown timeout: closing {} connection(s) with unfinished work", keys.len());
        }
        for (k, s) in keys {
            self.close(k, s, None);
        }
        let _ = self.core.jobs.send(Job::Shutdown);
        if let Some(h) = self.worker.take() {
            if h.join().is_err() {
                log::error!("worker thread panicked");
                return Err(io::Error::other("worker thread panicked"));
            }
        }
        log::info!("shut down cleanly");
        Ok(())
    }

    fn accept(&mut self) {
        let paused = self.accept_paused.take();
        if self.listener.is_none() {
            return;
        }
        let mut refusing = false;
        loop {
            if !refusing && self.conns.len() >= self.core.cfg.max_connections {
                match paused {
                    Some(p) if p.closed_total == self.closed_total => refusing = true,
                    _ => {
                        self.accept_paused =
                            Some(AcceptPause { round: self.round, closed_total: self.closed_total });
                        return;
                    }
                }
            }
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((mut socket, peer)) => {
                    if self.conns.len() >= self.core.cfg.max_connections {
                        self.note_refusal(peer, "connection limit reached");
                        drop(socket);
                        continue;
                    }
                    let _ = socket.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut socket,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("{peer}: cannot register connection: {e}");
                        continue;
                    }
                    let serial = self.next_serial;
                    self.next_serial += 1;
                    entry.insert(Connection::new(socket, peer, ConnRef { key, serial }, Instant::now()));
                    log::debug!("{peer}: connected");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: free the spare, accept and close one
                    // pending connection, take the spare back. No busy loop:
                    // the next attempt waits for the next readiness event.
                    self.spare_fd = None;
                    if let Some(l) = self.listener.as_ref() {
                        if let Ok((s, peer)) = l.accept() {
                            drop(s);
                            self.note_refusal(peer, "out of file descriptors");
                        }
                    }
                    self.spare_fd = std::fs::File::open("/dev/null").ok();
                    self.accept_retry = true;
                    return;
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Log refused connections at most once per second, with a count.
    fn note_refusal(&mut self, peer: SocketAddr, why: &str) {
        self.refused_since_log += 1;
        let now = Instant::now();
        if self.last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            log::warn!("{peer}: refused ({why}); {} refused since last report", self.refused_since_log);
            self.refused_since_log = 0;
            self.last_refusal_log = Some(now);
        }
    }

    /// Close a connection: deregister it and drop its uploads at the worker.
    /// `why`, when given, is logged.
    fn close(&mut self, key: usize, serial: u64, why: Option<&str>) {
        if self.conns.get(key).is_none_or(|c| c.serial() != serial) {
            return;
        }
        let mut c = self.conns.remove(key);
        self.closed_total += 1;
        let _ = self.poll.registry().deregister(&mut c.socket);
        self.core.budget.used -= c.reserved;
        match why {
            Some(w) => log::info!("{}: closed: {w}", c.tag()),
            None => log::debug!("{}: closed", c.tag()),
        }
        self.core.closed(&c.proto);
        if self.core.budget.used < self.core.budget.limit {
            self.wake_budget_waiters();
        }
    }

    /// Read, parse and handle frames of one connection until it would block,
    /// must wait, or has had its turn.
    fn drive(&mut self, key: usize, serial: u64) {
        let now = Instant::now();
        let mut frames = 0;
        loop {
            let Some(c) = self.conns.get_mut(key) else { return };
            if c.serial() != serial {
                return;
            }
            if let Err(e) = c.flush(now) {
                let why = format!("write failed: {e}");
                self.close(key, serial, Some(&why));
                return;
            }
            if c.closing.is_some() {
                // Lingering close: the last reply goes out, then FIN; input is
                // read and dropped meanwhile so that the close does not turn
                // into a reset that could destroy the reply in flight.
                let peer_done = c.discard_input();
                if c.pending_output() == 0 && c.proto.awaiting == connection::Awaiting::Nothing {
                    c.shut_write();
                    if peer_done {
                        self.close(key, serial, None);
                    }
                }
                return;
            }
            if self.shutdown.is_some() && c.is_quiet() {
                self.close(key, serial, Some("server shutting down"));
                return;
            }
            if !c.readable || !c.proto.may_read() || c.pending_output() > connection::MAX_PENDING_OUTPUT {
                return;
            }
            if frames >= FRAMES_PER_TURN {
                self.ready.push_back((key, serial));
                return;
            }
            if let ReadState::AwaitBudget { header, code } = c.read {
                let size = header.payload_size as usize;
                let Some(payload) = self.core.try_reserve(size) else {
                    // Queued once: a waiter taken off the queue while it could not
                    // proceed (replies over the limit) must not be lost.
                    if !self.budget_waiters.contains(&(key, serial)) {
                        self.budget_waiters.push_back((key, serial));
                    }
                    return;
                };
                let Some(c) = self.conns.get_mut(key) else { return };
                c.reserved = size;
                // The payload deadline counts from now, not from a wait for budget.
                c.header_started = Some(now);
                c.read = ReadState::AwaitPayload(connection::Frame { header, code, payload, filled: 0 });
            }
            let Some(c) = self.conns.get_mut(key) else { return };
            match c.read_some(now) {
                Ok(ReadOutcome::WouldBlock) => {
                    c.readable = false;
                    return;
                }
                Ok(ReadOutcome::Closed) => {
                    let mid_frame = c.header_in_progress() || !matches!(c.read, ReadState::AwaitHeader);
                    if !mid_frame
                        && (c.proto.awaiting != connection::Awaiting::Nothing || c.pending_output() > 0)
                    {
                        // The peer half-closed after its last request: deliver the
                        // reply it is owed, then close.
                        c.closing = Some(now);
                        continue;
                    }
                    self.close(key, serial, mid_frame.then_some("peer closed mid-frame"));
                    return;
                }
                Err(e) => {
                    let why = format!("read failed: {e}");
                    self.close(key, serial, Some(&why));
                    return;
                }
                Ok(ReadOutcome::Header(h)) => match self.core.check_header(&mut c.proto, &h) {
                    None => {
                        c.closing = Some(now);
                        continue;
                    }
                    Some(code) => {
                        c.read = ReadState::AwaitBudget { header: h, code };
                        // First come, first served: a new frame does not overtake
                        // frames already waiting (a large packet would starve).
                        if !self.budget_waiters.is_empty()
                            || self.core.budget.used + h.payload_size as usize > self.core.budget.limit
                        {
                            log::debug!("{}: waiting for memory budget", c.tag());
                            self.budget_waiters.push_back((key, serial));
                            return;
                        }
                    }
                },
                Ok(ReadOutcome::Frame(f)) => {
                    frames += 1;
                    c.reserved = 0;
                    match self.core.handle_frame(&mut c.proto, f) {
                        Flow::Continue | Flow::Resume => {}
                        Flow::Close => c.closing = Some(now),
                    }
                }
            }
        }
    }

    /// Hand a worker completion to the state machine of its connection (if
    /// that connection is still open) and do what it asks.
    fn on_completion(&mut self, done: Completion) {
        let conn = completion_conn(&done);
        let proto = self.conns.get_mut(conn.key).filter(|c| c.serial() == conn.serial).map(|c| &mut c.proto);
        match self.core.on_completion(proto, done) {
            Flow::Continue => {}
            // A wait ended: flush the replies and read on.
            Flow::Resume => self.drive(conn.key, conn.serial),
            Flow::Close => {
                if let Some(c) = self.conns.get_mut(conn.key) {
                    c.closing = Some(Instant::now());
                }
                self.drive(conn.key, conn.serial);
            }
        }
    }

    fn wake_budget_waiters(&mut self) {
        while let Some(&(key, serial)) = self.budget_waiters.front() {
            let need = match self.conns.get(key) {
                Some(c) if c.serial() == serial => match c.read {
                    ReadState::AwaitBudget { header, .. } => header.payload_size as usize,
                    _ => 0,
                },
                _ => {
                    self.budget_waiters.pop_front();
                    continue;
                }
            };
            if self.core.budget.used + need > self.core.budget.limit {
                return;
            }
            self.budget_waiters.pop_front();
            self.drive(key, serial);
        }
    }

    fn drain_completions(&mut self) {
        while let Ok(c) = self.done.try_recv() {
            self.on_completion(c);
        }
        self.wake_budget_waiters();
    }

    /// Deadlines, checked every tick.
    fn housekeeping(&mut self, now: Instant) {
        if std::mem::take(&mut self.accept_retry) && self.accept_paused.is_none() {
            self.accept();
        }
        let cfg = self.core.cfg.clone();
        let mut to_close: Vec<(usize, u64, String)> = Vec::new();
        let mut stale: Vec<(usize, u64)> = Vec::new();
        for (key, c) in self.conns.iter() {
            if let Some(t) = c.closing {
                if now.duration_since(t) > CLOSE_GRACE {
                    to_close.push((key, c.serial(), "closing connection timed out".into()));
                }
                continue;
            }
            if let (Some(start), true) = (c.header_started, c.header_in_progress()) {
                if now.duration_since(start) > cfg.header_timeout {
                    to_close.push((
                        key,
                        c.serial(),
                        format!("header not complete within {:?}", cfg.header_timeout),
                    ));
                    continue;
                }
            }
            if let (Some(start), ReadState::AwaitPayload(f)) = (c.header_started, &c.read) {
                let allowed =
                    cfg.header_timeout + Duration::from_secs(f.payload.len() as u64 / MIN_PAYLOAD_RATE);
                if now.duration_since(start) > allowed {
                    to_close.push((key, c.serial(), format!("frame not complete within {allowed:?}")));
                    continue;
                }
            }
            let busy_here = c.proto.awaiting != connection::Awaiting::Nothing
                || c.proto.packets_in_flight > 0
                || matches!(c.read, ReadState::AwaitBudget { .. });
            if !busy_here && now.duration_since(c.last_activity) > cfg.idle_timeout {
                to_close.push((key, c.serial(), format!("idle for {:?}", cfg.idle_timeout)));
                continue;
            }
            let stale_upload = match &c.proto.upload {
                connection::Upload::Receiving(r) => now.duration_since(r.touched) > cfg.stale_upload_timeout,
                _ => false,
            };
            if stale_upload
                || c.proto.staged.iter().any(|s| now.duration_since(s.touched) > cfg.stale_upload_timeout)
            {
                stale.push((key, c.serial()));
            }
        }
        for (key, serial, why) in to_close {
            self.close(key, serial, Some(&why));
        }
        for (key, serial) in stale {
            if let Some(c) = self.conns.get_mut(key).filter(|c| c.serial() == serial) {
                self.core.purge_stale(&mut c.proto, now);
            }
        }
    }
}

/// The connection a worker completion is for.
pub fn completion_conn(done: &Completion) -> ConnRef {
    match done {
        Completion::Registered { conn, .. }
        | Completion::KeySaved { conn, .. }
        | Completion::Packet { conn, .. }
        | Completion::Committed { conn, .. } => *conn,
    }
}

/// Raise the soft descriptor limit to the hard one, and warn when even that
/// cannot hold `--max-connections` (each connection needs a socket; the worker
/// needs a few descriptors for files and the database).
fn check_descriptor_limit(max_connections: usize) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let needed = max_connections as u64 + 64;
    if lim.rlim_cur < needed {
        log::warn!(
            "the descriptor limit ({}) is below --max-connections + 64 ({needed}): connections beyond it are refused",
            lim.rlim_cur
        );
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use std::os::fd::AsRawFd;
    // std binds with SO_REUSEADDR and a backlog of 128; a second listen()
    // raises the backlog (Linux caps it at net.core.somaxconn) so that a burst
    // of connects is queued by the kernel rather than retried by clients.
    let l = std::net::TcpListener::bind(addr)?;
    // SAFETY: listen on a descriptor owned by `l` for the duration of the call.
    if unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    l.set_nonblocking(true)?;
    Ok(TcpListener::from_std(l))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

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

    /// A 1026 frame may carry 255 + 2048 bytes whatever --max-packet says: a
    /// budget below that would leave such a frame waiting for budget forever.
    #[test]
    fn memory_budget_must_hold_the_largest_public_key_frame() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.max_packet = 1024;
        cfg.memory_budget = 1024;
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        match Server::bind(cfg, addr) {
            Err(e) => assert!(e.0.contains("--memory-budget"), "{e}"),
            Ok(_) => panic!("a 1 KiB budget cannot hold a 2303-byte 1026 frame; start must fail"),
        }
    }

    /// A connection waiting for budget that is taken off `budget_waiters` but
    /// cannot proceed at that moment (its unsent replies are over the limit)
    /// must queue again when it next finds the budget short: nothing else
    /// would ever resume it (its bytes are already known to be readable, so
    /// no readiness event comes), and a connection in AwaitBudget is never
    /// closed as idle.
    #[test]
    fn a_connection_waiting_for_budget_is_never_dropped_from_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Server::bind(test_config(dir.path()), "127.0.0.1:0".parse().unwrap()).unwrap();
        let (key, serial, mut client) = add_connection(&mut server);
        let header = crate::protocol::RequestHeader {
            client_id: [1; 16],
            version: crate::protocol::VERSION,
            code: crate::protocol::Code::FilePacket.as_u16(),
            payload_size: 1000,
        };
        let unsent = 32 << 20; // more than the kernel buffers take: the flush leaves > 64 KiB
        {
            let c = &mut server.conns[key];
            c.read = ReadState::AwaitBudget { header, code: crate::protocol::Code::FilePacket };
            c.proto.out = vec![0; unsent];
        }
        server.budget_waiters.push_back((key, serial));
        server.wake_budget_waiters();
        assert!(server.conns[key].pending_output() > connection::MAX_PENDING_OUTPUT);
        assert!(matches!(server.conns[key].read, ReadState::AwaitBudget { .. }));

        // Another connection takes the budget; the client reads its replies.
        server.core.budget.used = server.core.budget.limit;
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (mut got, mut buf) = (0, vec![0u8; 1 << 16]);
            while got < unsent {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            (got, client)
        });
        for _ in 0..2000 {
            server.drive(key, serial); // what a writable event does
            if server.conns[key].pending_output() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (got, _client) = reader.join().unwrap();
        assert_eq!(got, unsent);
        assert!(matches!(server.conns[key].read, ReadState::AwaitBudget { .. }));

        // The budget is released (as by a completion): the connection must be served.
        server.core.budget.used = 0;
        server.wake_budget_waiters();
        assert!(
            matches!(server.conns[key].read, ReadState::AwaitPayload(_)),
            "the connection is stuck in AwaitBudget with no way to be resumed"
        );
    }
}
