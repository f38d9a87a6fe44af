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
//! sending: a connection holds at most one piece it has not filled (the ones
//! it filled go to the worker, which consumes them whatever the peer does),
//! and pieces are sized so that every connection of `--max-connections` can
//! hold one at once ([`piece_size`]). What is left beside those pieces
//! ([`Budget::beside_pieces`]) is all that other holders (the direct
//! writer's buffers) may take, so they cannot starve the pieces either.

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

/// The size of the content pieces for a budget of `limit` bytes and at most
/// `connections` connections: [`CONTENT_PIECE`], or each connection's share
/// of the budget if that is smaller (rounded down to a multiple of 16, at
/// least [`MIN_PIECE`], at most the whole budget). So every connection can
/// hold a piece at once: connections that trickle hold at most their share
/// each, and the rest of the budget stays for those that send. Only below
/// `connections` x 4 KiB (the floor) can fewer connections than the table
/// holds fill the budget (the server warns at start).
pub fn piece_size(limit: usize, connections: usize) -> usize {
    let share = limit / connections.max(1);
    (share.min(CONTENT_PIECE) / BLOCK * BLOCK).max(MIN_PIECE).min(limit).max(1)
}

/// Content bytes that may be held in memory at once (`--memory-budget`).
#[derive(Debug, Clone)]
pub struct Budget {
    limit: usize,
    /// The size of a content piece ([`piece_size`]).
    piece: usize,
    /// What the pieces need for every connection to hold one at once.
    for_pieces: usize,
    used: Arc<AtomicUsize>,
}

impl Budget {
    /// A budget of `limit` bytes shared by at most `connections` connections.
    pub fn new(limit: usize, connections: usize) -> Budget {
        let piece = piece_size(limit, connections);
        let for_pieces = piece.saturating_mul(connections.max(1));
        Budget { limit, piece, for_pieces, used: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The size of the content pieces.
    pub fn piece(&self) -> usize {
        self.piece
    }

    /// What may be granted to holders other than the connections' pieces
    /// (the direct writer sizes its places by it) while every connection can
    /// still hold a piece: the budget less a piece per connection.
    pub fn beside_pieces(&self) -> usize {
        self.limit.saturating_sub(self.for_pieces)
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
    /// One compare-and-swap: a take never overshoots the limit, whichever
    /// threads take at once.
    pub fn try_grant(&self, bytes: usize) -> Option<Grant> {
        let fit = |used: usize| used.checked_add(bytes).filter(|&u| u <= self.limit);
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

    /// The default (64 MiB, 256 connections) keeps 128 KiB pieces; a tight
    /// budget shrinks them to each connection's share, in whole AES blocks,
    /// not below 4 KiB nor above the budget.
    #[test]
    fn pieces_are_each_connections_share_when_the_budget_is_tight() {
        const MIB: usize = 1 << 20;
        assert_eq!(piece_size(64 * MIB, 256), CONTENT_PIECE);
        assert_eq!(piece_size(32 * MIB, 256), CONTENT_PIECE);
        assert_eq!(piece_size(MIB, 64), 16 * 1024);
        assert_eq!(piece_size(2 * MIB, 256), 8 * 1024);
        assert_eq!(piece_size(MIB + 1000, 30), 34_976, "(MIB + 1000) / 30, rounded down to 16");
        assert_eq!(piece_size(MIB, 256), MIN_PIECE);
        assert_eq!(piece_size(512 * 1024, 256), MIN_PIECE, "the floor");
        assert_eq!(piece_size(MIB, 0), CONTENT_PIECE, "no connection limit: one share");
        assert_eq!(piece_size(1000, 1), 1000, "never more than the budget");
        assert_eq!(piece_size(0, 1), 1);
        for (limit, conns) in [(64 * MIB, 256), (MIB, 64), (3 * MIB + 7, 100), (4096, 1)] {
            let p = piece_size(limit, conns);
            assert!(p * conns <= limit && p.is_multiple_of(16), "{limit} {conns}: {p}");
        }
        let b = Budget::new(64 * MIB, 256);
        assert_eq!((b.piece(), b.beside_pieces()), (CONTENT_PIECE, 32 * MIB));
        let b = Budget::new(MIB, 64);
        assert_eq!((b.piece(), b.beside_pieces()), (16 * 1024, 0));
        assert_eq!(Budget::new(MIB, 512).beside_pieces(), 0, "below the floor: nothing beside");
    }
}
