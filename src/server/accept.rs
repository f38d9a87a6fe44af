//! Accepting connections: draining the listener (and shedding one when out of
//! descriptors), admission within the per-address caps, eviction at
//! `--max-connections`, and the rate-limited log of refusals.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Interest, Token};

use super::admission::{eviction_rank, Steps};
use super::connection::Connection;
use super::{Server, ACCEPT_RETRY};
use crate::metrics::{Closed, Refused};
use crate::worker::ConnRef;

/// See [`Server::held`].
pub(super) struct Held {
    pub(super) socket: mio::net::TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) round: u64,
}

impl Server {
    /// Accept until the kernel's queue is empty (WouldBlock). Out of
    /// descriptors, one pending connection is shed with the spare descriptor
    /// (once per shortage: the clients queued behind it wait instead of being
    /// dropped one by one) and accepting is retried on a short timer (and as
    /// soon as a connection closes), so a queued client is served once
    /// descriptors free up even if no new connection arrives.
    pub(super) fn accept(&mut self) {
        self.accept_retry = None;
        while self.held.is_none() {
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((socket, peer)) => {
                    self.out_of_descriptors = false;
                    self.admit(socket, peer, false)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.out_of_descriptors = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    if !self.out_of_descriptors {
                        self.spare_fd = None;
                        if let Some(l) = self.listener.as_ref() {
                            if let Ok((s, peer)) = l.accept() {
                                drop(s);
                                self.out_of_descriptors = true;
                                self.note_refusal(peer, Refused::Descriptors, "out of file descriptors");
                            }
                        }
                        self.spare_fd = std::fs::File::open("/dev/null").ok();
                    }
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
    pub(super) fn admit(&mut self, mut socket: mio::net::TcpStream, peer: SocketAddr, final_try: bool) {
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
    pub(super) fn evict_one(&mut self) -> bool {
        let now = Instant::now();
        let grace = self.core.cfg.login_timeout;
        let victim = self
            .conns
            .iter()
            .min_by_key(|(_, c)| {
                let registering = c.proto.registered_id.is_some() && c.proto.session.is_none();
                let logging_in = c.proto.logged_in.is_some_and(|t| now.duration_since(t) < grace);
                let steps = Steps { authed: c.authed, registering, logging_in };
                (c.closing.is_none(), eviction_rank(c.proto.last_progress, steps, c.accepted))
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

    /// Refusals counted since the last line, once that is a second old
    /// (from housekeeping: they would otherwise wait for the next refusal).
    pub(super) fn report_refusals(&mut self, now: Instant) {
        let due = self.last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if self.refused_since_log > 0 && due {
            log::warn!(
                "{} more connection(s) refused at accept since the last report",
                self.refused_since_log
            );
            self.refused_since_log = 0;
            self.last_refusal_log = Some(now);
        }
    }

    /// Log refused connections at most once per second, with a count.
    pub(super) fn note_refusal(&mut self, peer: SocketAddr, kind: Refused, why: &str) {
        self.core.metrics.refused(kind);
        self.refused_since_log += 1;
        let now = Instant::now();
        if self.last_refusal_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            log::warn!("{peer}: refused ({why}); {} refused since last report", self.refused_since_log);
            self.refused_since_log = 0;
            self.last_refusal_log = Some(now);
        }
    }
}
