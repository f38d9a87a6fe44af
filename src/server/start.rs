//! Start-up: the flags checked against each other, storage opened (and
//! reconciled), the listener bound, signals registered, the registry loaded,
//! the metrics writer and the worker thread started.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::admission::PerAddress;
use super::{
    notify, ClientEntry, Core, LoopWaker, Registry, Server, LISTENER, LISTEN_BACKLOG, SIGNALS, WAKER,
};
use crate::budget::{Budget, CONTENT_PIECE, MIN_PIECE};
use crate::config::Config;
use crate::protocol::ClientId;
use crate::worker::db::ClientRecord;
use crate::worker::{Completion, OpenError, Usage, Worker};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or the database could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The flags, or what the loop needs from the system (poll, listener,
    /// signals, threads).
    #[error("{0}")]
    Setup(String),
}
impl StartError {
    /// What to do about it, when the cause is one an operator makes often:
    /// a permission refused (the data directory, or something in it, belongs
    /// to another user: typically after a run as root).
    pub fn hint(&self) -> Option<String> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            let denied = e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
                || e.to_string().contains("Permission denied");
            if denied {
                // SAFETY: getuid cannot fail.
                let uid = unsafe { libc::getuid() };
                return Some(format!(
                    "the server runs as uid {uid}: the data directory and everything in it (and the database) \
                     must belong to that user, e.g. `chown -R <user>: <data-dir>` after backupd was run as root there"
                ));
            }
            cause = e.source();
        }
        None
    }
}

impl Server {
    /// Open storage and database (reconciling them), bind the listener,
    /// register signals and start the worker.
    pub fn bind(cfg: Config, addr: SocketAddr) -> Result<Server, StartError> {
        check_flags(&cfg)?;
        let spare_descriptors = check_descriptor_limit(cfg.max_connections);
        let opened = Worker::open(&cfg)?;
        let poll = Poll::new().map_err(|e| StartError::Setup(format!("cannot create poll: {e}")))?;
        let mut listener =
            bind_listener(addr).map_err(|e| StartError::Setup(format!("cannot listen on {addr}: {e}")))?;
        let local_addr = listener.local_addr().map_err(|e| StartError::Setup(e.to_string()))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| StartError::Setup(e.to_string()))?;
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
            .map_err(|e| StartError::Setup(format!("signals: {e}")))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| StartError::Setup(e.to_string()))?;
        let waker = Arc::new(LoopWaker::new(
            Waker::new(poll.registry(), WAKER).map_err(|e| StartError::Setup(e.to_string()))?,
        ));

        let registry = load_registry(opened.clients, opened.usage);
        log::info!("{} registered client(s) loaded", registry.by_id.len());

        let (jobs_tx, queues) = crate::worker::channel();
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
        log_budget(&core.budget, cfg.max_connections);
        let metrics_writer = start_metrics_writer(&cfg, &core)?;
        let mut worker = opened.worker;
        worker.set_metrics(core.metrics.clone());
        warn_below_min_free(core.metrics.free_bytes(), cfg.min_free);
        let wk: Arc<dyn crate::worker::Wake> = waker.clone();
        let handle = worker
            .spawn(queues, done_tx, wk, core.budget.clone(), spare_descriptors)
            .map_err(|e| StartError::Setup(format!("cannot start the worker threads: {e}")))?;

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
            waker,
            worker: Some(handle),
            budget_waiters: VecDeque::new(),
            per_address: PerAddress::default(),
            accept_retry: None,
            out_of_descriptors: false,
            held: None,
            round: 0,
            ready: VecDeque::new(),
            shutdown: None,
            home: opened.watch,
            home_checked: std::time::Instant::now(),
            home_lost: None,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            refused_since_log: 0,
            last_refusal_log: None,
        })
    }
}

/// The flags that must hold together before anything starts.
fn check_flags(cfg: &Config) -> Result<(), StartError> {
    // Content is read in pieces of at most CONTENT_PIECE bytes and at least
    // MIN_PIECE (budget::share) and control frames do not use the
    // budget: any budget of at least one smallest piece serves every frame.
    if cfg.memory_budget < MIN_PIECE as u64 {
        return Err(StartError::Setup(format!(
            "--memory-budget ({}) must be at least {MIN_PIECE} bytes",
            cfg.memory_budget
        )));
    }
    if cfg.max_packet > u32::MAX as u64 || cfg.max_packet < crate::protocol::PACKET_HEADER_LEN as u64 {
        return Err(StartError::Setup("--max-packet must be between 267 bytes and 4 GiB".into()));
    }
    if cfg.metrics_file.is_some() && cfg.metrics_interval < std::time::Duration::from_millis(100) {
        return Err(StartError::Setup("--metrics-interval must be at least 100ms".into()));
    }
    if cfg.max_file_size > u32::MAX as u64 {
        return Err(StartError::Setup("--max-file-size cannot exceed 4294967295 (a 32-bit field)".into()));
    }
    Ok(())
}

/// A data directory's filesystem with less free space than `--min-free`
/// (a small SD card with the 64 MiB default): every upload would be refused,
/// so say so at start rather than only in each refusal.
fn warn_below_min_free(free: Option<u64>, min_free: u64) {
    if let Some(free) = free.filter(|&f| min_free > 0 && f < min_free) {
        log::warn!(
            "the data directory's filesystem has {free} bytes free, less than --min-free ({min_free}): every \
             upload is refused until space is freed (or --min-free is lowered; 0 turns it off)"
        );
    }
}

/// How the memory budget is shared, when it is tight: the share kept for
/// each connection when it is smaller than [`CONTENT_PIECE`], and a warning
/// when even the smallest shares for every connection do not fit (fewer
/// connections than the table holds could then hold all of it by trickling).
fn log_budget(budget: &Budget, connections: usize) {
    let (limit, share) = (budget.limit(), budget.share());
    let open = budget.open();
    if share < CONTENT_PIECE && open > 0 {
        log::info!(
            "file content is read in pieces of up to {CONTENT_PIECE} bytes from the first {open} bytes of \
             --memory-budget ({limit}), then in pieces of {share} bytes: a share kept for each of \
             --max-connections ({connections})"
        );
    } else if share < CONTENT_PIECE {
        log::info!(
            "file content is read in pieces of {share} bytes: --memory-budget ({limit}) is all kept as a \
             share for each of --max-connections ({connections})"
        );
    }
    if share.saturating_mul(connections) > limit {
        log::warn!(
            "--memory-budget ({limit}) is less than --max-connections ({connections}) x {MIN_PIECE} bytes: \
             {} connection(s) trickling file content could hold all of it; raise --memory-budget to at \
             least {} or lower --max-connections",
            limit / share,
            connections.saturating_mul(MIN_PIECE)
        );
    }
}

/// The registry of the clients on record (in the order they registered),
/// with their keys and usage.
fn load_registry(clients: Vec<ClientRecord>, mut usage: HashMap<ClientId, Usage>) -> Registry {
    let mut registry = Registry::default();
    for c in clients {
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
        // Unusable, the key still is on file; and a client that stores
        // something is never reclaimed, key or not.
        let keep = key.is_none() && c.public_key.is_some();
        let usage = usage.remove(&c.id).unwrap_or_default();
        registry.insert(c.id, ClientEntry::new(&c.name, key, usage));
        if keep || usage != Usage::default() {
            registry.keep(&c.id);
        }
    }
    registry
}

/// The thread writing `--metrics-file`, if asked for.
fn start_metrics_writer(cfg: &Config, core: &Core) -> Result<Option<crate::metrics::Writer>, StartError> {
    let writer = match &cfg.metrics_file {
        Some(path) => {
            let src = crate::metrics::Source {
                metrics: core.metrics.clone(),
                budget: core.budget.clone(),
                data_dir: cfg.data_dir.clone(),
                max_clients: cfg.metrics_max_clients,
            };
            Some(
                crate::metrics::spawn_writer(path.clone(), cfg.metrics_interval, src)
                    .map_err(|e| StartError::Setup(format!("cannot start the metrics thread: {e}")))?,
            )
        }
        None => None,
    };
    Ok(writer)
}

/// Raise the soft descriptor limit to the hard one, and warn when even that
/// cannot hold `--max-connections` (each connection needs a socket; the worker
/// needs a few descriptors for files and the database). Returns how many
/// descriptors the limit leaves beyond that (for small uploads' temp files
/// without a name, each held open until its commit).
fn check_descriptor_limit(max_connections: usize) -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
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
    usize::try_from(lim.rlim_cur.saturating_sub(needed)).unwrap_or(usize::MAX)
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
