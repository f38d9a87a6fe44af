//! What the protocol logic shares between connections, with no socket, poll
//! or timer in it: [`Core`] (configuration, client registry, memory budget
//! and its buffer pool, upload ids, rate limiters, metrics) and where jobs go
//! ([`JobSink`]: the worker's channel, or a `Vec` in the fuzz harness).

use std::collections::HashMap;
use std::sync::Arc;

use super::admission::RateLimiter;
use crate::budget::{Budget, Piece, CONTENT_PIECE};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::ClientId;
use crate::worker::{ConnRef, Job, Jobs, Usage};

/// Recycled content-piece buffers kept for reuse: enough for eight
/// connections with their `PIPELINE_DEPTH` pieces at the worker, so that a
/// steady upload does not allocate a buffer per piece.
const POOL_BUFFERS: usize = 32;
/// ... holding at most this many bytes (the pool is outside the memory budget).
const POOL_BYTES: usize = 4 << 20;

/// A registered client, in memory for the life of the process.
pub(super) struct ClientEntry {
    pub(super) name: String,
    pub(super) key: Option<rsa::RsaPublicKey>,
    /// The connection that sent the key (or whose 1026 is at the worker):
    /// only it may send another. None after a restart or a failed save.
    pub(super) key_owner: Option<ConnRef>,
    /// The open connection that registered the client (got its 1600), if any.
    pub(super) registrant: Option<ConnRef>,
    /// The registration is not yet durable (its 1600 has not been sent).
    pub(super) pending: bool,
    /// What the client stores (current files and kept versions): loaded at
    /// start, then as each commit reports it. `--quota` and `--quota-files`
    /// are checked against it. (Its versions part is counted only when a
    /// quota or the metrics need it, see `Worker::open`.)
    pub(super) usage: Usage,
}

/// The clients known to the server, by id and by name.
#[derive(Default)]
pub struct Registry {
    pub(super) by_id: HashMap<ClientId, ClientEntry>,
    pub(super) by_name: HashMap<String, ClientId>,
}

/// Where the loop's jobs go: the worker's channel, or a plain `Vec` when the
/// state machine runs without a worker (the fuzz harness).
pub trait JobSink {
    /// Hand over a job; false when the worker is gone.
    fn send(&mut self, job: Job) -> bool;
}

impl JobSink for Jobs {
    fn send(&mut self, job: Job) -> bool {
        Jobs::send(self, job)
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
pub struct Core<J: JobSink = Jobs> {
    pub(super) cfg: Arc<Config>,
    pub(super) registry: Registry,
    pub(super) budget: Budget,
    pool: Vec<Vec<u8>>,
    pub(super) next_upload: u64,
    pub(super) jobs: J,
    pub(super) registrations: RateLimiter,
    /// Session keys per address: each 1602 and 1605 costs the loop an RSA
    /// encryption (tens to hundreds of microseconds), so a flood of 1027s
    /// from a few addresses could otherwise stall every other client.
    pub(super) session_keys: RateLimiter,
    /// Decryption failures per client: a legitimate client never fails to
    /// decrypt, a forger (1027 then ciphertext it cannot make) fails 255 times
    /// in 256. Out of tokens, the client's reconnects are refused for a while.
    pub(super) decrypt_failures: RateLimiter<ClientId>,
    pub(super) metrics: Arc<Metrics>,
}

/// Decryption failures a client may cause at once, and per second after that
/// (10 an hour): a forger needs ~256 tries per file it could replace.
const DECRYPT_FAILURE_BURST: f64 = 10.0;
const DECRYPT_FAILURES_PER_SEC: f64 = 10.0 / 3600.0;

impl<J: JobSink> Core<J> {
    /// `next_upload`: the first upload id (ids must not repeat across restarts).
    pub fn new(cfg: Arc<Config>, registry: Registry, jobs: J, next_upload: u64) -> Core<J> {
        let budget =
            Budget::new(usize::try_from(cfg.memory_budget).unwrap_or(usize::MAX), cfg.max_connections);
        let registrations = RateLimiter::new(cfg.registration_rate, cfg.registration_burst as f64);
        let session_keys = RateLimiter::new(cfg.session_rate, cfg.session_burst as f64);
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
            session_keys,
            decrypt_failures,
            metrics,
        }
    }

    /// The size of the content pieces asked for: [`CONTENT_PIECE`], or the
    /// whole budget if smaller (the budget may grant less, see `grant_piece`).
    pub fn piece_size(&self) -> usize {
        CONTENT_PIECE.min(self.budget.limit()).max(1)
    }

    /// A buffer of up to `len` bytes paid for by the budget: all of them while
    /// the budget's open part holds them, else a connection's share
    /// (`Budget::try_grant_piece`); None when the budget cannot hold that now.
    pub fn grant_piece(&mut self, len: usize) -> Option<Piece> {
        let grant = self.budget.try_grant_piece(len)?;
        let buf = self.take_buffer(grant.bytes());
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
    pub(super) fn recycle(&mut self, buf: Vec<u8>) {
        let pooled: usize = self.pool.iter().map(Vec::capacity).sum();
        if self.pool.len() < POOL_BUFFERS && pooled + buf.capacity() <= POOL_BYTES {
            self.pool.push(buf);
        }
    }
}
