//! The event loop: one thread, one `mio::Poll`, every socket nonblocking.
//!
//! The loop ([`Server`]) owns the listener, the [`Slab`] of [`Connection`]s
//! and the timers; it does the I/O only. What requests and completions mean
//! is decided by [`Core`] (the in-memory client registry, the memory budget,
//! the job sink; its protocol logic is in `machine.rs`) acting on each
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
//!
//! Admission (docs/ARCHITECTURE.md, "Admission"): file content is read in
//! pieces granted by the memory budget (first come, first served; waking the
//! waiters is a loop, never a recursion); control frames never wait for it;
//! connections without a session are closed after `--login-timeout`; a full
//! table evicts the connection with the oldest upload progress; per-address
//! caps apply at accept ([`admission`]).

pub mod admission;
pub mod connection;
mod machine;
mod notify;
pub mod sequence;

pub use machine::{frame_len, Flow};
pub use sequence::{plan_packet, wraps_to_one, Ended, EndedHow, PacketStep};

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::budget::{Budget, Piece};
use crate::config::Config;
use crate::metrics::{Closed, Metrics, Refused};
use crate::peer_log;
use crate::protocol::ClientId;
use crate::worker::{Completion, ConnRef, Job, Usage, Worker};
use admission::{eviction_rank, PerAddress, RateLimiter};
use connection::{Connection, ContentRead, Incoming, ReadOutcome, ReadState};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Content pieces of one connection that may be at the worker at once: the
/// loop reads the next piece while the worker decrypts the last ones.
pub const PIPELINE_DEPTH: usize = 4;
/// File content is read and handed to the worker in pieces of at most this
/// many bytes, each granted by the memory budget just before it is read: what
/// a connection can hold without sending the bytes. Fits L2 with the worker's
/// decrypt pass (see `worker::CACHE_PIECE`).
pub const CONTENT_PIECE: usize = 128 * 1024;
/// After a failed accept (out of descriptors), accepting is retried this soon
/// even if no new connection arrives.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Frames handled for one connection before the loop turns to the others.
const FRAMES_PER_TURN: usize = 16;
/// How often timeouts are checked. A scan of every connection once per
/// second costs nothing next to a deadline heap at these connection counts.
const TICK: Duration = Duration::from_millis(500);
/// Slowest payload rate tolerated once a frame's header is in (bytes/s): a
/// frame, a content piece or a refused packet's content must complete within
/// header_timeout + size / this rate, so a client cannot hold a grant of the
/// memory budget by trickling.
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
    /// The connection that sent the key (or whose 1026 is at the worker):
    /// only it may send another. None after a restart or a failed save.
    pub key_owner: Option<ConnRef>,
    /// The open connection that registered the client (got its 1600), if any.
    pub registrant: Option<ConnRef>,
    /// The registration is not yet durable (its 1600 has not been sent).
    pub pending: bool,
    /// What the client stores (current files and kept versions): loaded at
    /// start, then as each commit reports it. `--quota` and `--quota-files`
    /// are checked against it. (Its versions part is counted only when a
    /// quota or the metrics need it, see `Worker::open`.)
    pub usage: Usage,
}

/// The clients known to the server, by id and by name.
#[derive(Default)]
pub struct Registry {
    pub by_id: HashMap<ClientId, ClientEntry>,
    pub by_name: HashMap<String, ClientId>,
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

/// What the protocol logic (`machine.rs`) shares between connections, with
/// no socket, poll or timer in it: configuration, client registry, memory
/// budget and buffer pool, upload ids, the registration rate limiter, and
/// where jobs go.
pub struct Core<J: JobSink = Sender<Job>> {
    pub cfg: Arc<Config>,
    pub registry: Registry,
    pub budget: Budget,
    pool: Vec<Vec<u8>>,
    pub next_upload: u64,
    pub jobs: J,
    pub registrations: RateLimiter,
    /// Decryption failures per client: a legitimate client never fails to
    /// decrypt, a forger (1027 then ciphertext it cannot make) fails 255 times
    /// in 256. Out of tokens, the client's reconnects are refused for a while.
    pub decrypt_failures: RateLimiter<ClientId>,
    pub metrics: Arc<Metrics>,
}

/// Decryption failures a client may cause at once, and per second after that
/// (10 an hour): a forger needs ~256 tries per file it could replace.
const DECRYPT_FAILURE_BURST: f64 = 10.0;
const DECRYPT_FAILURES_PER_SEC: f64 = 10.0 / 3600.0;

impl<J: JobSink> Core<J> {
    /// `next_upload`: the first upload id (ids must not repeat across restarts).
    pub fn new(cfg: Arc<Config>, registry: Registry, jobs: J, next_upload: u64) -> Core<J> {
        let budget = Budget::new(cfg.memory_budget as usize);
        let registrations = RateLimiter::new(cfg.registration_rate, cfg.registration_burst as f64);
        let metrics = Arc::new(Metrics::new());
        metrics.clients.set(registry.by_id.len() as i64);
        let decrypt_failures = RateLimiter::new(DECRYPT_FAILURES_PER_SEC, DECRYPT_FAILURE_BURST);
        Core {
            cfg,
            registry,
            budget,
            pool: Vec::new(),
            next_upload,
            jobs,
            registrations,
            decrypt_failures,
            metrics,
        }
    }

    /// The size of the content pieces: [`CONTENT_PIECE`], or the whole budget if smaller.
    pub fn piece_size(&self) -> usize {
        CONTENT_PIECE.min(self.budget.limit()).max(1)
    }

    /// A buffer of `len` bytes paid for by the budget, or None when the budget
    /// cannot hold it now.
    pub fn grant_piece(&mut self, len: usize) -> Option<Piece> {
        let grant = self.budget.try_grant(len)?;
        let buf = self.take_buffer(len);
        Some(Piece::new(buf, grant))
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

    /// Keep a buffer that came back from the worker for the next piece.
    fn recycle(&mut self, buf: Vec<u8>) {
        let pooled: usize = self.pool.iter().map(Vec::capacity).sum();
        if self.pool.len() < POOL_BUFFERS && pooled + buf.capacity() <= POOL_BYTES {
            self.pool.push(buf);
        }
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
    /// Connections waiting for a content piece's grant, in arrival order.
    budget_waiters: VecDeque<(usize, u64)>,
    /// Connections per peer address.
    per_address: PerAddress,
    /// Accepting failed (out of descriptors): try again at this time.
    accept_retry: Option<Instant>,
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

/// See [`Server::held`].
struct Held {
    socket: mio::net::TcpStream,
    peer: SocketAddr,
    round: u64,
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
        // Content is read in pieces of at most CONTENT_PIECE bytes (or the whole
        // budget, if smaller) and control frames do not use the budget: any
        // budget of at least 4 KiB serves every frame.
        if cfg.memory_budget < 4096 {
            return Err(StartError(format!(
                "--memory-budget ({}) must be at least 4096 bytes",
                cfg.memory_budget
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
        let mut signals =
            Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| StartError(format!("signals: {e}")))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| StartError(e.to_string()))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| StartError(e.to_string()))?);

        let mut registry = Registry::default();
        let mut usage = opened.usage;
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
            registry.by_id.insert(
                c.id,
                ClientEntry {
                    name: c.name,
                    key,
                    key_owner: None,
                    registrant: None,
                    pending: false,
                    usage: usage.remove(&c.id).unwrap_or_default(),
                },
            );
        }
        log::info!("{} registered client(s) loaded", registry.by_id.len());

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Completion>();
        let cfg = Arc::new(cfg);
        let core = Core::new(cfg.clone(), registry, jobs_tx, crate::worker::upload_id_seed());
        core.metrics.files_stored.set(opened.verified_files as i64);
        for (name, secs) in &opened.last_verified {
            core.metrics.verified_at(name, *secs);
        }
        for e in core.registry.by_id.values() {
            core.metrics.client_usage(&e.name, e.usage.bytes, e.usage.files);
        }
        let metrics_writer = match &cfg.metrics_file {
            Some(path) => {
                let src = crate::metrics::Source {
                    metrics: core.metrics.clone(),
                    budget: core.budget.clone(),
                    data_dir: cfg.data_dir.clone(),
                    max_clients: cfg.metrics_max_clients,
                };
                Some(
                    crate::metrics::spawn_writer(path.clone(), cfg.metrics_interval, src)
                        .map_err(|e| StartError(format!("cannot start the metrics thread: {e}")))?,
                )
            }
            None => None,
        };
        let mut worker = opened.worker;
        worker.set_metrics(core.metrics.clone());
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
            core,
            metrics_writer,
            notifier: notify::Notifier::from_env(),
            done: done_rx,
            worker: Some(handle),
            budget_waiters: VecDeque::new(),
            per_address: PerAddress::default(),
            accept_retry: None,
            held: None,
            round: 0,
            ready: VecDeque::new(),
            shutdown: None,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            refused_since_log: 0,
            last_refusal_log: None,
        })
    }

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
        if got.contains(&SIGHUP) {
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
            if h.join().is_err() {
                log::error!("worker thread panicked");
                return Err(io::Error::other("worker thread panicked"));
            }
        }
        // The last figures, with the worker done.
        if let Some(mut w) = self.metrics_writer.take() {
            w.stop();
        }
        log::info!("shut down cleanly");
        Ok(())
    }

    /// Accept until the kernel's queue is empty (WouldBlock). Out of
    /// descriptors, one pending connection is shed with the spare descriptor
    /// and accepting is retried on a short timer (and as soon as a connection
    /// closes), so a queued client is served once descriptors free up even if
    /// no new connection arrives.
    fn accept(&mut self) {
        self.accept_retry = None;
        while self.held.is_none() {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((socket, peer)) => self.admit(socket, peer, false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    self.spare_fd = None;
                    if let Some(l) = self.listener.as_ref() {
                        if let Ok((s, peer)) = l.accept() {
                            drop(s);
                            self.note_refusal(peer, Refused::Descriptors, "out of file descriptors");
                        }
                    }
                    self.spare_fd = std::fs::File::open("/dev/null").ok();
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Give an accepted connection a slot: within the per-address caps, and
    /// at the connection limit in place of the connection with the oldest
    /// upload progress. Over a cap, a connection is first held for one round
    /// (see [`Server::held`]), then refused if `final_try`.
    fn admit(&mut self, mut socket: mio::net::TcpStream, peer: SocketAddr, final_try: bool) {
        let cfg = self.core.cfg.clone();
        if let Err(why) =
            self.per_address.check(peer.ip(), cfg.max_connections_per_ip, cfg.max_unauthenticated_per_ip)
        {
            if final_try || self.listener.is_none() {
                let kind = if why.contains("unauthenticated") {
                    Refused::Unauthenticated
                } else {
                    Refused::PerAddress
                };
                self.note_refusal(peer, kind, why);
            } else {
                self.held = Some(Held { socket, peer, round: self.round });
            }
            return;
        }
        if self.conns.len() >= cfg.max_connections && !self.evict_one() {
            self.note_refusal(peer, Refused::TableFull, "connection limit reached");
            return;
        }
        let _ = socket.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) =
            self.poll.registry().register(&mut socket, Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            log::warn!("{peer}: cannot register connection: {e}");
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        entry.insert(Connection::new(socket, peer, ConnRef { key, serial }, Instant::now()));
        self.per_address.opened(peer.ip());
        self.core.metrics.connections_accepted.inc();
        self.core.metrics.connections_open.inc();
        log::debug!("{peer}: connected");
    }

    /// Close the connection that made upload progress least recently (see
    /// [`admission::eviction_rank`]); connections already closing go first.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .conns
            .iter()
            .min_by_key(|(_, c)| {
                (c.closing.is_none(), eviction_rank(c.proto.last_progress, c.authed, c.accepted))
            })
            .map(|(k, c)| (k, c.serial()));
        let Some((key, serial)) = victim else { return false };
        self.close(
            key,
            serial,
            Closed::Evicted,
            Some("evicted: the connection table is full and this connection's last upload progress is the oldest"),
        );
        true
    }

    /// Log refused connections at most once per second, with a count.
    fn note_refusal(&mut self, peer: SocketAddr, kind: Refused, why: &str) {
        self.core.metrics.refused(kind);
        self.refused_since_log += 1;
        let now = Instant::now();
        if self.last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            log::warn!("{peer}: refused ({why}); {} refused since last report", self.refused_since_log);
            self.refused_since_log = 0;
            self.last_refusal_log = Some(now);
        }
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
            if !c.authed && c.proto.session.is_some() {
                c.authed = true;
                self.per_address.authenticated(c.proto.peer.ip());
            }
            if let Err(e) = c.flush(now) {
                let why = format!("write failed: {e}");
                self.close(key, serial, Closed::Error, Some(&why));
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
                        let kind = c.closing_kind;
                        self.close(key, serial, kind, None);
                    }
                }
                return;
            }
            if self.shutdown.is_some() && c.is_quiet() {
                self.close(key, serial, Closed::Shutdown, Some("server shutting down"));
                return;
            }
            if !c.readable || !c.proto.may_read() || c.pending_output() > connection::MAX_PENDING_OUTPUT {
                return;
            }
            if frames >= FRAMES_PER_TURN {
                self.ready.push_back((key, serial));
                return;
            }
            // A content piece is read only once the budget has granted it.
            if let Some(len) = c.wants_piece(self.core.piece_size()) {
                let granted = if self.budget_waiters.is_empty() { self.core.grant_piece(len) } else { None };
                let Some(piece) = granted else {
                    // First come, first served: a piece does not overtake pieces already waiting.
                    if !self.budget_waiters.contains(&(key, serial)) {
                        log::debug!("{}: waiting for memory budget", c.tag());
                        self.budget_waiters.push_back((key, serial));
                    }
                    return;
                };
                self.install_piece(key, piece, now);
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
                    self.close(key, serial, Closed::Peer, mid_frame.then_some("peer closed mid-frame"));
                    return;
                }
                Err(e) => {
                    let why = format!("read failed: {e}");
                    self.close(key, serial, Closed::Error, Some(&why));
                    return;
                }
                Ok(ReadOutcome::Header(h)) => match self.core.check_header(&mut c.proto, &h) {
                    None => c.close_protocol(now),
                    Some(code) => {
                        let payload = vec![0; machine::frame_len(code, &h)];
                        c.read = ReadState::AwaitPayload(connection::Frame {
                            header: h,
                            code,
                            payload,
                            filled: 0,
                        });
                    }
                },
                Ok(ReadOutcome::Frame(f)) => {
                    frames += 1;
                    match self.core.handle_frame(&mut c.proto, f) {
                        Flow::Continue | Flow::Resume => {}
                        Flow::Close => c.close_protocol(now),
                    }
                    match c.proto.incoming.take() {
                        _ if c.closing.is_some() => {}
                        None => {}
                        Some(Incoming::Stream { len }) => {
                            c.read = ReadState::Content(ContentRead {
                                remaining: len,
                                piece: None,
                                filled: 0,
                                deadline: None,
                            })
                        }
                        Some(Incoming::Drain { len }) => {
                            let deadline = now + self.core.cfg.header_timeout + slowest(len);
                            c.read = ReadState::Drain { remaining: len, deadline };
                        }
                    }
                }
                Ok(ReadOutcome::Piece { piece, last }) => {
                    frames += 1;
                    self.core.metrics.bytes_received.add(piece.len() as i64);
                    self.core.content_piece(&mut c.proto, piece, last);
                }
                Ok(ReadOutcome::Drained) => {}
            }
        }
    }

    /// Give a connection waiting for it the content piece it asked for; it
    /// must be read by a deadline.
    fn install_piece(&mut self, key: usize, piece: Piece, now: Instant) {
        let header_timeout = self.core.cfg.header_timeout;
        if let Some(c) = self.conns.get_mut(key) {
            if let ReadState::Content(cr) = &mut c.read {
                cr.deadline = Some(now + header_timeout + slowest(piece.len() as u64));
                cr.filled = 0;
                cr.piece = Some(piece);
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
                    c.close_protocol(Instant::now());
                }
                self.drive(conn.key, conn.serial);
            }
        }
    }

    /// Grant waiting connections their pieces, in arrival order, while the
    /// budget holds them; each is then driven from the ready queue. A loop,
    /// never a recursion; a waiter that has gone (or no longer wants a piece)
    /// is dropped from the queue.
    fn wake_budget_waiters(&mut self) {
        let now = Instant::now();
        let piece_size = self.core.piece_size();
        while let Some(&(key, serial)) = self.budget_waiters.front() {
            let need =
                self.conns.get(key).filter(|c| c.serial() == serial).and_then(|c| c.wants_piece(piece_size));
            let Some(need) = need else {
                self.budget_waiters.pop_front();
                continue;
            };
            let Some(piece) = self.core.grant_piece(need) else { return };
            self.budget_waiters.pop_front();
            self.install_piece(key, piece, now);
            self.ready.push_back((key, serial));
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
        crate::logging::report_suppressed();
        let cfg = self.core.cfg.clone();
        let mut to_close: Vec<(usize, u64, String)> = Vec::new();
        let mut stale: Vec<(usize, u64)> = Vec::new();
        for (key, c) in self.conns.iter() {
            if let Some(why) = overdue(c, &cfg, now) {
                to_close.push((key, c.serial(), why));
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
            self.close(key, serial, Closed::Timeout, Some(&why));
        }
        for (key, serial) in stale {
            if let Some(c) = self.conns.get_mut(key).filter(|c| c.serial() == serial) {
                self.core.purge_stale(&mut c.proto, now);
            }
        }
    }
}

/// Time allowed for `bytes` at the slowest rate tolerated.
fn slowest(bytes: u64) -> Duration {
    Duration::from_millis(bytes.saturating_mul(1000) / MIN_PAYLOAD_RATE)
}

/// Why a connection must be closed now, if it must: a deadline has passed.
fn overdue(c: &Connection, cfg: &Config, now: Instant) -> Option<String> {
    if let Some(t) = c.closing {
        return (now.duration_since(t) > CLOSE_GRACE).then(|| "closing connection timed out".into());
    }
    if let (Some(start), true) = (c.header_started, c.header_in_progress()) {
        if now.duration_since(start) > cfg.header_timeout {
            return Some(format!("header not complete within {:?}", cfg.header_timeout));
        }
    }
    match &c.read {
        ReadState::AwaitPayload(f) => {
            let allowed = cfg.header_timeout + slowest(f.payload.len() as u64);
            if c.header_started.is_some_and(|start| now.duration_since(start) > allowed) {
                return Some(format!("frame not complete within {allowed:?}"));
            }
        }
        ReadState::Content(cr) if cr.deadline.is_some_and(|d| now > d) => {
            return Some("file content arriving too slowly".into());
        }
        ReadState::Drain { deadline, .. } if now > *deadline => {
            return Some("refused packet's content arriving too slowly".into());
        }
        _ => {}
    }
    let at_worker = c.proto.awaiting != connection::Awaiting::Nothing || c.proto.packets_in_flight > 0;
    if !c.authed && !at_worker && now.duration_since(c.accepted) > cfg.login_timeout {
        return Some(format!("no session within --login-timeout ({:?})", cfg.login_timeout));
    }
    let waiting_for_budget = matches!(&c.read, ReadState::Content(cr) if cr.piece.is_none());
    if !at_worker && !waiting_for_budget && now.duration_since(c.last_activity) > cfg.idle_timeout {
        return Some(format!("idle for {:?}", cfg.idle_timeout));
    }
    None
}

/// The worker wakes the loop through its `mio::Waker`.
impl crate::worker::Wake for Waker {
    fn wake(&self) {
        if let Err(e) = Waker::wake(self) {
            log::error!("worker: cannot wake the event loop: {e}");
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
            server.conns[key].read = ReadState::Content(ContentRead {
                remaining: 1 << 20,
                piece: None,
                filled: 0,
                deadline: None,
            });
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
            assert!(matches!(&server.conns[*key].read, ReadState::Content(c) if c.piece.is_some()));
        }
        assert_eq!(server.core.budget.used(), 3 * CONTENT_PIECE);
        // A closed connection's piece goes back to the budget with it.
        let (key, serial, _) = conns[0];
        server.close(key, serial, Closed::Peer, None);
        assert_eq!(server.core.budget.used(), 2 * CONTENT_PIECE);
    }
}
