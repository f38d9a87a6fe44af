//! The memory budget for file content in flight between the sockets and the
//! disk, accounted by value.
//!
//! The event loop asks the [`Budget`] for a [`Grant`] before it reads a piece
//! of a file packet's content; the grant travels with the bytes (as a
//! [`Piece`]) to the worker and back in its completion, and gives its bytes
//! back to the budget when it is dropped, wherever that happens (the loop
//! recycling the buffer, a closed connection, a completion that never reaches
//! the loop at shutdown). No code adjusts the count by hand, so no path can
//! leak budget or return it twice.
//!
//! The loop takes grants for what it reads; the packet thread takes one for
//! each upload it writes direct (its chunk buffers, see `worker/sink.rs`).
//! A take is one compare-and-swap, so the limit holds whoever takes;
//! everything else only returns bytes, which can only make room.
//!
//! The budget is shared so that no set of connections can hold it without
//! sending. A connection holds at most one piece it has not filled (the ones
//! it filled go to the worker, which consumes them whatever the peer does).
//! Part of the budget is kept as a share for every connection of
//! `--max-connections` ([`share`]); the rest, the open part, is first come,
//! first served. A piece is granted whole (up to [`CONTENT_PIECE`]) while the
//! open part holds it, and otherwise cut to a share while the whole budget
//! holds that ([`Budget::try_grant_piece`]); other holders (the direct
//! writer's buffers) take only from the open part
//! ([`Budget::try_grant_open`]). So connections that do not send hold at
//! most the open part plus a share each, and at least one share always stays
//! for a connection that sends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// File content is read and handed to the worker in pieces of at most this
/// many bytes, each granted by the memory budget just before it is read: what
/// a connection can hold without sending the bytes. Fits L2 with the worker's
/// decrypt pass (see `worker::CACHE_PIECE`).
pub const CONTENT_PIECE: usize = 128 * 1024;

/// The smallest content piece, however tight the budget: below a page a
/// piece costs more in jobs and wake-ups than it holds, and the smallest
/// `--memory-budget` accepted is this (so it is always at least one piece).
pub const MIN_PIECE: usize = 4096;

/// Pieces are a whole number of AES blocks (not needed by the decryptor,
/// which carries partial blocks, but it keeps every decrypt pass whole).
const BLOCK: usize = 16;

/// The piece kept for each of `connections` connections out of a budget of
/// `limit` bytes: [`CONTENT_PIECE`], or half the budget split between the
/// connections if that is smaller (rounded down to a
/// multiple of 16, at least [`MIN_PIECE`], at most the whole budget). The
/// other half at least stays open, so that pieces are whole while the
/// budget is not contended. Only below `connections` x 4 KiB (the floor)
/// could fewer connections than the table holds take every share (the
/// server warns at start).
pub fn share(limit: usize, connections: usize) -> usize {
    let half = limit / 2 / connections.max(1);
    (half.min(CONTENT_PIECE) / BLOCK * BLOCK).max(MIN_PIECE).min(limit).max(1)
}

/// Content bytes that may be held in memory at once (`--memory-budget`).
#[derive(Debug, Clone)]
pub struct Budget {
    limit: usize,
    /// The piece kept for every connection ([`share`]).
    share: usize,
    /// The first-come, first-served part: the budget less a share per connection.
    open: usize,
    used: Arc<AtomicUsize>,
}

impl Budget {
    /// A budget of `limit` bytes shared by at most `connections` connections.
    pub fn new(limit: usize, connections: usize) -> Budget {
        let share = share(limit, connections);
        let open = limit.saturating_sub(share.saturating_mul(connections.max(1)));
        Budget { limit, share, open, used: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The piece kept for every connection.
    pub fn share(&self) -> usize {
        self.share
    }

    /// The first-come, first-served part of the budget.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Bytes granted and not yet returned.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Could a grant of `bytes` be taken now?
    pub fn fits(&self, bytes: usize) -> bool {
        self.used() + bytes <= self.limit
    }

    /// Take `bytes` from the budget, or None when it cannot hold them now.
    pub fn try_grant(&self, bytes: usize) -> Option<Grant> {
        self.try_grant_within(bytes, self.limit)
    }

    /// The grant for a content piece of up to `want` bytes: all of them while
    /// the open part holds them, else a share (or `want`, if less) while the
    /// whole budget does; None when neither.
    pub fn try_grant_piece(&self, want: usize) -> Option<Grant> {
        self.try_grant_within(want, self.open).or_else(|| self.try_grant(want.min(self.share)))
    }

    /// Take `bytes` only while the open part holds them (holders other than
    /// a connection's piece: they must not take the connections' shares).
    pub fn try_grant_open(&self, bytes: usize) -> Option<Grant> {
        self.try_grant_within(bytes, self.open)
    }

    /// Take `bytes` if the bytes in use stay within `cap`. One
    /// compare-and-swap: a take never overshoots, whichever threads take at once.
    fn try_grant_within(&self, bytes: usize, cap: usize) -> Option<Grant> {
        let fit = |used: usize| used.checked_add(bytes).filter(|&u| u <= cap);
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, fit).ok()?;
        Some(Grant { bytes, used: Some(self.used.clone()) })
    }
}

/// Bytes taken from a [`Budget`]; they go back when the grant is dropped.
#[derive(Debug)]
pub struct Grant {
    bytes: usize,
    used: Option<Arc<AtomicUsize>>,
}

impl Grant {
    /// A grant of nothing (an empty packet's content), tied to no budget.
    pub fn none() -> Grant {
        Grant { bytes: 0, used: None }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(used) = self.used.take() {
            used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// A piece of file content and the grant that pays for it.
#[derive(Debug)]
pub struct Piece {
    pub bytes: Vec<u8>,
    grant: Grant,
}

impl Piece {
    /// A buffer of `grant.bytes()` bytes (its contents are overwritten by the reader).
    pub fn new(mut bytes: Vec<u8>, grant: Grant) -> Piece {
        bytes.resize(grant.bytes(), 0);
        Piece { bytes, grant }
    }

    /// An empty piece (the content of an empty packet).
    pub fn empty() -> Piece {
        Piece { bytes: Vec::new(), grant: Grant::none() }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Give the bytes back to the budget and keep the buffer (for reuse).
    pub fn into_buffer(self) -> Vec<u8> {
        let Piece { bytes, grant } = self;
        drop(grant);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_return_their_bytes_when_dropped_wherever_they_are() {
        let b = Budget::new(100, 1);
        let g1 = b.try_grant(60).unwrap();
        assert!(b.try_grant(50).is_none());
        let p = Piece::new(Vec::new(), b.try_grant(40).unwrap());
        assert_eq!(p.len(), 40);
        assert_eq!(b.used(), 100);
        // A piece dropped on another thread returns its bytes too.
        std::thread::spawn(move || drop(p)).join().unwrap();
        assert_eq!(b.used(), 60);
        drop(g1);
        assert_eq!(b.used(), 0);
        let p = Piece::new(Vec::with_capacity(8), b.try_grant(8).unwrap());
        let buf = p.into_buffer();
        assert_eq!(buf.len(), 8);
        assert_eq!(b.used(), 0);
        assert_eq!(Piece::empty().len(), 0);
        assert_eq!(b.used(), 0);
    }

    /// The default (64 MiB, 256 connections) keeps a 128 KiB share and half
    /// the budget open; a tight budget's share is half of it split between
    /// the connections, in whole AES blocks, not below 4 KiB nor above the
    /// budget.
    #[test]
    fn shares_are_half_the_budget_split_when_it_is_tight() {
        const MIB: usize = 1 << 20;
        assert_eq!(share(64 * MIB, 256), CONTENT_PIECE);
        assert_eq!(share(MIB, 64), 8 * 1024);
        assert_eq!(share(64 * MIB, 2000), 16_768, "64 MiB / 4000, rounded down to 16");
        assert_eq!(share(MIB, 512), MIN_PIECE, "the floor");
        assert_eq!(share(MIB, 0), CONTENT_PIECE, "no connection limit: one share");
        assert_eq!(share(1000, 1), 1000, "never more than the budget");
        assert_eq!(share(0, 1), 1);
        let b = Budget::new(64 * MIB, 256);
        assert_eq!((b.share(), b.open()), (CONTENT_PIECE, 32 * MIB));
        let b = Budget::new(MIB, 64);
        assert_eq!((b.share(), b.open()), (8 * 1024, MIB / 2));
        assert_eq!(Budget::new(MIB, 512).open(), 0, "below the floor: nothing open");
    }

    /// Whatever the budget and the connection limit (the floor aside), all
    /// connections but one, each holding the piece it was granted, leave a
    /// share for the last; pieces are whole while the open part holds them;
    /// what is taken from the open part alone (direct buffers) never takes a share.
    #[test]
    fn all_connections_but_one_holding_pieces_leave_a_share_for_the_last() {
        const MIB: usize = 1 << 20;
        for (limit, conns) in
            [(64 * MIB, 256), (64 * MIB, 2000), (MIB, 64), (2 * MIB, 256), (3 * MIB + 7, 100)]
        {
            let b = Budget::new(limit, conns);
            let direct = b.try_grant_open(3 * MIB + 12 * 1024);
            let held: Vec<Grant> = (1..conns).filter_map(|_| b.try_grant_piece(CONTENT_PIECE)).collect();
            assert_eq!(held.len(), conns - 1, "{limit} {conns}: a connection got nothing");
            assert!(held.iter().all(|g| g.bytes() == CONTENT_PIECE || g.bytes() == b.share()));
            let last = b.try_grant_piece(CONTENT_PIECE).expect("a share for the last connection");
            assert!(
                last.bytes() >= b.share() && last.bytes().is_multiple_of(16),
                "{limit} {conns}: {}",
                last.bytes()
            );
            assert!(b.used() <= limit);
            drop((direct, held, last));
            assert_eq!(b.used(), 0);
        }
        let b = Budget::new(MIB, 64);
        let whole: Vec<Grant> = (0..4).map(|_| b.try_grant_piece(CONTENT_PIECE).unwrap()).collect();
        assert!(whole.iter().all(|g| g.bytes() == CONTENT_PIECE), "the open half in whole pieces");
        assert_eq!(b.try_grant_piece(CONTENT_PIECE).unwrap().bytes(), 8 * 1024, "then shares");
        assert_eq!(b.try_grant_piece(100).unwrap().bytes(), 100, "never more than wanted");
        assert!(b.try_grant_open(1).is_none(), "the open part is taken");
    }
}
