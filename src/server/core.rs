//! What the protocol logic shares between connections, with no socket, poll
//! or timer in it: [`Core`] (configuration, client registry, memory budget
//! and its buffer pool, upload ids, rate limiters, metrics) and where jobs go
//! ([`JobSink`]: the worker's channel, or a `Vec` in the fuzz harness).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::admission::{DecryptFailures, RateLimiter};
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
    /// The registration is not yet durable (its 1600 has not been sent), or
    /// the client is being reclaimed (its rows' removal is at the worker).
    pub(super) pending: bool,
    /// When it registered, as an order: lower registered earlier (set by
    /// [`Registry::insert`]; the database's order at start, see `load_clients`).
    order: u64,
    /// What the client stores (current files and kept versions): loaded at
    /// start, then as each commit reports it. `--quota` and `--quota-files`
    /// are checked against it. (Its versions part is counted only when a
    /// quota or the metrics need it, see `Worker::open`.)
    pub(super) usage: Usage,
}

impl ClientEntry {
    /// A client on record, durable, with no connection of it open.
    pub(super) fn new(name: &str, key: Option<rsa::RsaPublicKey>, usage: Usage) -> ClientEntry {
        let name = name.to_string();
        ClientEntry { name, key, key_owner: None, registrant: None, pending: false, usage, order: 0 }
    }

    /// No key on file or on its way, durable, no registration connection
    /// open: its name may be registered again (the registration resumes).
    pub(super) fn keyless_idle(&self) -> bool {
        !self.pending && self.key.is_none() && self.key_owner.is_none() && self.registrant.is_none()
    }
}

/// The clients known to the server, by id and by name; the keyless ones
/// also by registration order, oldest first, for `--max-clients` to reclaim.
/// Entries are added, removed and given keys through its methods, which keep
/// the three together.
#[derive(Default)]
pub struct Registry {
    pub(super) by_id: HashMap<ClientId, ClientEntry>,
    pub(super) by_name: HashMap<String, ClientId>,
    /// Clients without a key on file, by (order, id): the candidates for
    /// [`Registry::oldest_reclaimable`].
    keyless: BTreeSet<(u64, ClientId)>,
    next_order: u64,
}

impl Registry {
    /// Add a client (a new id), registered after every one already here.
    pub(super) fn insert(&mut self, id: ClientId, mut entry: ClientEntry) {
        entry.order = self.next_order;
        self.next_order += 1;
        if entry.key.is_none() {
            self.keyless.insert((entry.order, id));
        }
        self.by_name.insert(entry.name.clone(), id);
        if let Some(old) = self.by_id.insert(id, entry) {
            self.keyless.remove(&(old.order, id));
        }
    }

    pub(super) fn remove(&mut self, id: &ClientId) -> Option<ClientEntry> {
        let e = self.by_id.remove(id)?;
        self.by_name.remove(&e.name);
        self.keyless.remove(&(e.order, *id));
        Some(e)
    }

    /// Client `id`'s key is on file now.
    pub(super) fn key_saved(&mut self, id: &ClientId, key: rsa::RsaPublicKey) {
        if let Some(e) = self.by_id.get_mut(id) {
            e.key = Some(key);
            self.keyless.remove(&(e.order, *id));
        }
    }

    /// Client `id` is never to be reclaimed (it has a key on file that
    /// cannot be used, or stores something the registry does not count).
    pub(super) fn keep(&mut self, id: &ClientId) {
        if let Some(e) = self.by_id.get(id) {
            self.keyless.remove(&(e.order, *id));
        }
    }

    /// The earliest registered client that stores nothing and can never
    /// become usable without registering again: no key on file or on its
    /// way, no registration connection open, no files or bytes counted.
    /// (The worker checks the database and the data directory again.) The
    /// candidates it skips are the busy ones, a few: those that store
    /// something leave the candidates at start ([`Registry::keep`]).
    pub(super) fn oldest_reclaimable(&self) -> Option<ClientId> {
        self.keyless
            .iter()
            .map(|(_, id)| id)
            .copied()
            .find(|id| self.by_id.get(id).is_some_and(|e| e.keyless_idle() && e.usage == Usage::default()))
    }
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
    /// Decryption failures per client and proven address: a legitimate
    /// client never fails to decrypt, a forger (1027 then ciphertext it cannot
    /// make) fails 255 times in 256. Out of tokens, the client's reconnects
    /// from there are refused for a while.
    pub(super) decrypt_failures: DecryptFailures,
    pub(super) metrics: Arc<Metrics>,
}

impl<J: JobSink> Core<J> {
    /// `next_upload`: the first upload id (ids must not repeat across restarts).
    pub fn new(cfg: Arc<Config>, registry: Registry, jobs: J, next_upload: u64) -> Core<J> {
        let budget =
            Budget::new(usize::try_from(cfg.memory_budget).unwrap_or(usize::MAX), cfg.max_connections);
        let registrations = RateLimiter::new(cfg.registration_rate, cfg.registration_burst as f64);
        let session_keys = RateLimiter::new(cfg.session_rate, cfg.session_burst as f64);
        let metrics = Arc::new(Metrics::new());
        metrics.clients.set(registry.by_id.len() as i64);
        let decrypt_failures = DecryptFailures::default();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The candidates for `--max-clients`: keyless clients in registration
    /// order, skipping those busy or storing something, leaving once a key is
    /// on file or they are kept or removed.
    #[test]
    fn the_oldest_idle_keyless_client_storing_nothing_is_reclaimable() {
        let mut r = Registry::default();
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 512).unwrap().to_public_key();
        let stores = Usage { bytes: 1, files: 1 };
        r.insert([1; 16], ClientEntry::new("keyed", Some(key.clone()), Usage::default()));
        r.insert([2; 16], ClientEntry::new("stores", None, stores));
        r.insert([3; 16], ClientEntry::new("busy", None, Usage::default()));
        r.insert([4; 16], ClientEntry::new("idle", None, Usage::default()));
        r.insert([5; 16], ClientEntry::new("later", None, Usage::default()));
        r.by_id.get_mut(&[3; 16]).unwrap().registrant = Some(ConnRef { key: 0, serial: 1 });
        assert_eq!(r.oldest_reclaimable(), Some([4; 16]));
        r.key_saved(&[4; 16], key);
        assert_eq!(r.oldest_reclaimable(), Some([5; 16]));
        r.by_id.get_mut(&[3; 16]).unwrap().registrant = None;
        assert_eq!(r.oldest_reclaimable(), Some([3; 16]));
        r.keep(&[3; 16]);
        assert_eq!(r.oldest_reclaimable(), Some([5; 16]));
        assert_eq!(r.remove(&[5; 16]).map(|e| e.name), Some("later".to_string()));
        assert_eq!(r.oldest_reclaimable(), None);
        assert!(!r.by_name.contains_key("later"));
        assert_eq!(r.keyless.len(), 1, "only \"stores\" is left a candidate (skipped for its usage)");
    }
}
