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
//! each upload it writes direct (its two chunk buffers, see
//! `worker/sink.rs`). A take is one compare-and-swap, so the limit holds
//! whoever takes; everything else only returns bytes, which can only make
//! room.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Content bytes that may be held in memory at once (`--memory-budget`).
#[derive(Debug, Clone)]
pub struct Budget {
    limit: usize,
    used: Arc<AtomicUsize>,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget { limit, used: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn limit(&self) -> usize {
        self.limit
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
        let b = Budget::new(100);
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
}
