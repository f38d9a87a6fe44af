//! Admission control: who gets a connection slot and who may register.
//!
//! * [`PerAddress`] counts each peer address's connections, and those of them
//!   without a session yet, against `--max-connections-per-ip` and
//!   `--max-unauthenticated-per-ip` (like nginx's limit_conn and sshd's
//!   MaxStartups): over a cap, a new connection is closed at accept.
//! * [`eviction_rank`] orders connections for eviction when the table is
//!   full: the one whose last upload progress is oldest goes first, those that
//!   never made any (only cheap requests: registering, reconnecting) before all
//!   others, and among those the ones without a session first, oldest first,
//!   and a client that registered or set its key within the login timeout
//!   last.
//! * [`RateLimiter`] is a token bucket per address for registrations.
//! * [`DecryptFailures`] counts each client's uploads that failed to decrypt
//!   (forged ciphertext), per address the client has proven itself from.
//!
//! Pure bookkeeping: no sockets, no clock of its own (callers pass `now`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::protocol::ClientId;
use crate::ratelimit::TokenBucket;

/// Connections of one address.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    total: usize,
    unauthenticated: usize,
}

/// Connections per peer address.
#[derive(Debug, Default)]
pub struct PerAddress {
    counts: HashMap<IpAddr, Counts>,
}

impl PerAddress {
    /// May a new connection from `ip` be accepted? `Err` names the cap it
    /// would cross. A cap of 0 is off.
    pub fn check(
        &self,
        ip: IpAddr,
        max_total: usize,
        max_unauthenticated: usize,
    ) -> Result<(), &'static str> {
        let c = self.counts.get(&ip).copied().unwrap_or_default();
        if max_total > 0 && c.total >= max_total {
            return Err("--max-connections-per-ip reached");
        }
        if max_unauthenticated > 0 && c.unauthenticated >= max_unauthenticated {
            return Err("--max-unauthenticated-per-ip reached");
        }
        Ok(())
    }

    /// A connection from `ip` was accepted (it has no session yet).
    pub fn opened(&mut self, ip: IpAddr) {
        let c = self.counts.entry(ip).or_default();
        c.total += 1;
        c.unauthenticated += 1;
    }

    /// A connection from `ip` established its first session.
    pub fn authenticated(&mut self, ip: IpAddr) {
        if let Some(c) = self.counts.get_mut(&ip) {
            c.unauthenticated = c.unauthenticated.saturating_sub(1);
        }
    }

    /// A connection from `ip` closed; `authed`: it had had a session.
    pub fn closed(&mut self, ip: IpAddr, authed: bool) {
        if let Some(c) = self.counts.get_mut(&ip) {
            c.total = c.total.saturating_sub(1);
            if !authed {
                c.unauthenticated = c.unauthenticated.saturating_sub(1);
            }
            if c.total == 0 {
                self.counts.remove(&ip);
            }
        }
    }

    /// (total, without a session) for `ip`.
    pub fn get(&self, ip: IpAddr) -> (usize, usize) {
        let c = self.counts.get(&ip).copied().unwrap_or_default();
        (c.total, c.unauthenticated)
    }
}

/// How far a connection that made no upload progress has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Steps {
    /// It registered (a 1025 past the rate limit, at the worker or
    /// answered) or had its key saved (1602) within the login timeout: a
    /// client on its way to its first upload. Both are steps a client takes
    /// once and registrations are rate-limited per address, so a flood
    /// of reconnects (1027, which costs nothing) cannot make its own and
    /// evict it, however fast it churns.
    pub logging_in: bool,
    /// Has had a session.
    pub authed: bool,
    /// Got a 1600 and has no session yet.
    pub registering: bool,
}

/// The order in which connections are evicted when the table is full: the
/// smallest rank goes first. `last_progress`: the last upload progress (None:
/// never); `steps`: how far one without any got; `accepted`: when it
/// connected (the oldest of a kind goes first).
pub fn eviction_rank(
    last_progress: Option<Instant>,
    steps: Steps,
    accepted: Instant,
) -> (bool, Option<Instant>, Steps, Instant) {
    (last_progress.is_some(), last_progress, steps, accepted)
}

/// A token bucket per key (an address, a client id): `rate` per second, up
/// to `burst` at once.
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, TokenBucket>,
}

/// Addresses remembered before full buckets are forgotten.
const MAX_TRACKED: usize = 4096;

impl<K: std::hash::Hash + Eq + Copy> RateLimiter<K> {
    /// `rate` 0 turns the limit off.
    pub fn new(rate: f64, burst: f64) -> RateLimiter<K> {
        RateLimiter { rate, burst: burst.max(1.0), buckets: HashMap::new() }
    }

    /// Take one token for `key`, if it has one.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(&key) {
            // Full buckets are the same as new ones.
            self.buckets.retain(|_, b| !b.is_full(now, rate, burst));
        }
        self.buckets.entry(key).or_insert(TokenBucket::full(burst, now)).take(now, rate, burst)
    }

    /// Has `key` a token left (without taking it)?
    pub fn has_token(&self, key: K, now: Instant) -> bool {
        self.rate <= 0.0
            || self.buckets.get(&key).is_none_or(|b| {
                let mut b = *b;
                b.take(now, self.rate, self.burst)
            })
    }
}

/// Decryption failures a client may cause at once, and per second after that
/// (10 an hour): a forger needs ~256 tries per file it could replace.
const DECRYPT_FAILURE_BURST: f64 = 10.0;
const DECRYPT_FAILURES_PER_SEC: f64 = 10.0 / 3600.0;
/// Successful uploads in one session, without a failure, that make its
/// address one the client has proven itself from. A forger's upload
/// decrypts about once in 256 tries, so two in a row: once in 65,536.
pub const TRUST_AFTER_UPLOADS: u32 = 2;
/// Proven addresses kept per client (the most recent).
const TRUSTED_PER_CLIENT: usize = 8;

/// Uploads that failed to decrypt, per client. A legitimate client never
/// sends one; one who only knows a client's id and name (both cross the wire
/// in clear) can reconnect and send ciphertext it cannot make, which decrypts
/// to a valid padding about once in 256 tries and would replace a file. So
/// each failure takes a token, and a client out of tokens is refused new
/// sessions for a while (the forger's tries are bounded).
///
/// Tokens are kept apart per address the client has proven itself from (the
/// address of the connection that set its key, or of a session whose uploads
/// decrypted [`TRUST_AFTER_UPLOADS`] times without a failure); all other
/// addresses share one bucket. A forger elsewhere spends the shared bucket
/// only, so the client keeps its sessions from the addresses it uses. What is
/// proven is kept in memory (a restart forgets it, as it forgets the tokens).
#[derive(Debug)]
pub struct DecryptFailures {
    buckets: RateLimiter<(ClientId, Option<IpAddr>)>,
    trusted: HashMap<ClientId, Vec<IpAddr>>,
}

impl Default for DecryptFailures {
    fn default() -> DecryptFailures {
        DecryptFailures {
            buckets: RateLimiter::new(DECRYPT_FAILURES_PER_SEC, DECRYPT_FAILURE_BURST),
            trusted: HashMap::new(),
        }
    }
}

impl DecryptFailures {
    /// The bucket that `ip`'s failures for `id` take from.
    fn bucket(&self, id: ClientId, ip: IpAddr) -> (ClientId, Option<IpAddr>) {
        let proven = self.trusted.get(&id).is_some_and(|v| v.contains(&ip));
        (id, proven.then_some(ip))
    }

    /// May client `id` open a session from `ip` (its bucket has a token)?
    pub fn may_open_session(&self, id: ClientId, ip: IpAddr, now: Instant) -> bool {
        self.buckets.has_token(self.bucket(id, ip), now)
    }

    /// An upload of `id` from `ip` failed to decrypt: take a token. False
    /// when there was none (the session must end).
    pub fn failed(&mut self, id: ClientId, ip: IpAddr, now: Instant) -> bool {
        let bucket = self.bucket(id, ip);
        self.buckets.allow(bucket, now)
    }

    /// `id` proved itself from `ip`: its failures there get their own bucket.
    pub fn trust(&mut self, id: ClientId, ip: IpAddr) {
        let v = self.trusted.entry(id).or_default();
        v.retain(|a| *a != ip);
        if v.len() >= TRUSTED_PER_CLIENT {
            v.remove(0);
        }
        v.push(ip);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn caps_per_address_count_sessions_apart() {
        let mut p = PerAddress::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            assert!(p.check(a, 3, 2).is_ok());
            p.opened(a);
        }
        assert_eq!(p.check(a, 3, 2), Err("--max-unauthenticated-per-ip reached"));
        assert!(p.check(b, 3, 2).is_ok(), "another address is not affected");
        assert!(p.check(a, 0, 0).is_ok(), "0 turns both caps off");
        p.authenticated(a);
        assert!(p.check(a, 3, 2).is_ok());
        p.opened(a);
        assert_eq!(p.check(a, 3, 2), Err("--max-connections-per-ip reached"));
        p.closed(a, true);
        p.closed(a, false);
        p.closed(a, false);
        assert_eq!(p.get(a), (0, 0));
    }

    #[test]
    fn never_uploaded_connections_are_evicted_first() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let steps = |authed, registering, logging_in| Steps { authed, registering, logging_in };
        let uploader = eviction_rank(Some(t0), steps(true, false, false), t0);
        let reconnecting = eviction_rank(None, steps(true, false, false), t1);
        let fresh = eviction_rank(None, steps(false, false, false), t1);
        let old_fresh = eviction_rank(None, steps(false, false, false), t0);
        // Registered on this connection (1600), key not sent yet: after the
        // connections that have not got that far, however old.
        let registering = eviction_rank(None, steps(false, true, false), t0);
        assert!(fresh < registering && registering < reconnecting);
        let mut v = vec![uploader, reconnecting, fresh, old_fresh];
        v.sort();
        assert_eq!(v, vec![old_fresh, fresh, reconnecting, uploader]);
        assert!(
            eviction_rank(Some(t0), steps(true, false, false), t1)
                < eviction_rank(Some(t1), steps(true, false, false), t0)
        );
        // A client that registered or set its key within the login timeout
        // outlasts every reconnect, however much newer, and no uploader.
        let t9 = t0 + Duration::from_secs(9);
        let between = eviction_rank(None, steps(false, true, true), t0);
        let keyed = eviction_rank(None, steps(true, false, true), t0);
        let churn = eviction_rank(None, steps(true, false, false), t9);
        assert!(churn < between && churn < keyed);
        assert!(between < uploader && keyed < uploader);
    }

    #[test]
    fn registrations_are_rate_limited_per_address() {
        let mut r = RateLimiter::new(10.0, 100.0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        assert_eq!((0..150).filter(|_| r.allow(a, t)).count(), 100);
        assert!(r.allow("10.0.0.2".parse().unwrap(), t));
        assert_eq!((0..20).filter(|_| r.allow(a, t + Duration::from_secs(1))).count(), 10);
        let mut off = RateLimiter::new(0.0, 0.0);
        assert!((0..1000).all(|_| off.allow(a, t)));
    }

    #[test]
    fn decryption_failures_elsewhere_do_not_lock_a_client_out_of_its_proven_addresses() {
        let mut d = DecryptFailures::default();
        let (id, other) = ([7u8; 16], [8u8; 16]);
        let home: IpAddr = "10.0.0.1".parse().unwrap();
        let forger: IpAddr = "10.0.0.9".parse().unwrap();
        let t = Instant::now();
        d.trust(id, home);
        assert_eq!((0..20).filter(|_| d.failed(id, forger, t)).count(), 10);
        assert!(!d.may_open_session(id, forger, t));
        assert!(
            !d.may_open_session(id, "10.0.0.2".parse().unwrap(), t),
            "unproven addresses share the bucket"
        );
        assert!(d.may_open_session(id, home, t));
        assert!(d.may_open_session(other, forger, t), "another client is not affected");
        // Failures from the proven address take its own bucket.
        assert_eq!((0..20).filter(|_| d.failed(id, home, t)).count(), 10);
        assert!(!d.may_open_session(id, home, t));
        // A bounded list: the oldest proven address goes first.
        for i in 0..TRUSTED_PER_CLIENT as u8 {
            d.trust(other, IpAddr::from([10, 1, 0, i]));
        }
        d.trust(other, IpAddr::from([10, 1, 0, 0]));
        d.trust(other, IpAddr::from([10, 2, 0, 0]));
        let kept = &d.trusted[&other];
        assert_eq!(kept.len(), TRUSTED_PER_CLIENT);
        assert!(kept.contains(&IpAddr::from([10, 1, 0, 0])) && !kept.contains(&IpAddr::from([10, 1, 0, 1])));
    }
}
