//! Driving one connection: flush its replies, read and hand its frames and
//! content pieces to the state machine, within its turn (fairness), its
//! pipeline and its budget; and the FIFO of connections waiting for budget.

use std::io;
use std::time::Instant;

use super::connection::{ContentRead, Frame, ReadOutcome, ReadState, MAX_PENDING_OUTPUT};
use super::deadlines::slowest;
use super::state::Incoming;
use super::{Flow, Server, FRAMES_PER_TURN};
use crate::budget::Piece;
use crate::metrics::Closed;

impl Server {
    /// Read, parse and handle frames of one connection until it would block,
    /// must wait, or has had its turn.
    pub(super) fn drive(&mut self, key: usize, serial: u64) {
        let now = Instant::now();
        let mut frames = 0;
        loop {
            if !self.may_read_now(key, serial, now, frames) {
                return;
            }
            let Some(c) = self.conns.get_mut(key) else { return };
            let outcome = c.read_some(now);
            if !self.on_read(key, serial, now, outcome, &mut frames) {
                return;
            }
        }
    }

    /// Before each read: the session noted, replies flushed, a lingering
    /// close or a shutdown carried on, and the read paused when the
    /// connection must wait (its pipeline, its replies, its turn, the memory
    /// budget for its next content piece). Whether to read now.
    fn may_read_now(&mut self, key: usize, serial: u64, now: Instant, frames: usize) -> bool {
        let Some(c) = self.conns.get_mut(key) else { return false };
        if c.serial() != serial {
            return false;
        }
        if !c.authed && c.proto.session.is_some() {
            c.authed = true;
            self.per_address.authenticated(c.proto.peer.ip());
        }
        if let Err(e) = c.flush(now) {
            let why = format!("write failed: {e}");
            self.close(key, serial, Closed::Error, Some(&why));
            return false;
        }
        if c.closing.is_some() {
            // Lingering close: the last reply goes out, then FIN; input is
            // read and dropped meanwhile so that the close does not turn
            // into a reset that could destroy the reply in flight.
            let peer_done = c.discard_input();
            if c.pending_output() == 0 && !c.proto.awaits_reply() {
                c.shut_write();
                if peer_done {
                    let kind = c.closing_kind;
                    self.close(key, serial, kind, None);
                }
            }
            return false;
        }
        if self.shutdown.is_some() && c.is_quiet() {
            self.close(key, serial, Closed::Shutdown, Some("server shutting down"));
            return false;
        }
        if !c.has_input() || !c.proto.may_read() || c.pending_output() > MAX_PENDING_OUTPUT {
            return false;
        }
        if frames >= FRAMES_PER_TURN {
            self.ready.push_back((key, serial));
            return false;
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
                return false;
            };
            self.install_piece(key, piece, now);
        }
        true
    }

    /// Act on what one read brought: a header checked, a frame or a content
    /// piece handed to the state machine, an end of input. Whether to go on.
    fn on_read(
        &mut self,
        key: usize,
        serial: u64,
        now: Instant,
        outcome: io::Result<ReadOutcome>,
        frames: &mut usize,
    ) -> bool {
        let Some(c) = self.conns.get_mut(key) else { return false };
        match outcome {
            Ok(ReadOutcome::WouldBlock) => {
                c.readable = false;
                return false;
            }
            Ok(ReadOutcome::Closed) => {
                let mid_frame = !c.between_frames();
                if !mid_frame && (c.proto.awaits_reply() || c.pending_output() > 0) {
                    // The peer half-closed after its last request: deliver the
                    // reply it is owed, then close.
                    c.closing = Some(now);
                    return true;
                }
                self.close(key, serial, Closed::Peer, mid_frame.then_some("peer closed mid-frame"));
                return false;
            }
            Err(e) => {
                let why = format!("read failed: {e}");
                self.close(key, serial, Closed::Error, Some(&why));
                return false;
            }
            Ok(ReadOutcome::Header(h)) => match self.core.check_header(&mut c.proto, &h) {
                None => c.close_protocol(now),
                Some(code) => return self.expect(key, serial, ReadState::AwaitPayload(Frame::new(h, code))),
            },
            Ok(ReadOutcome::Frame(f)) => {
                *frames += 1;
                match self.core.handle_frame(&mut c.proto, f) {
                    Flow::Continue | Flow::Resume => {}
                    Flow::Close => c.close_protocol(now),
                }
                let next = match c.proto.take_incoming() {
                    _ if c.closing.is_some() => return true,
                    None => return true,
                    Some(Incoming::Stream { len }) => ReadState::Content(ContentRead::new(len)),
                    Some(Incoming::Drain { len }) => {
                        let deadline = now + self.core.cfg.header_timeout + slowest(len);
                        ReadState::Drain { remaining: len, deadline }
                    }
                };
                return self.expect(key, serial, next);
            }
            Ok(ReadOutcome::Piece { piece, last }) => {
                *frames += 1;
                self.core.metrics.bytes_received.add(piece.len() as i64);
                self.core.content_piece(&mut c.proto, piece, last);
            }
            Ok(ReadOutcome::Drained) => {}
        }
        true
    }

    /// Set what a connection reads next after a header or a frame. A read
    /// state that does not expect it is a bug of the loop: the connection is
    /// closed with one log line, not reset.
    fn expect(&mut self, key: usize, serial: u64, next: ReadState) -> bool {
        let Some(c) = self.conns.get_mut(key) else { return false };
        match c.expect(next) {
            Ok(()) => true,
            Err(state) => {
                let why = format!("internal error: read state out of step ({state})");
                self.close(key, serial, Closed::Error, Some(&why));
                false
            }
        }
    }

    /// Give a connection waiting for it the content piece it asked for; it
    /// must be read by a deadline.
    pub(super) fn install_piece(&mut self, key: usize, piece: Piece, now: Instant) {
        let deadline = now + self.core.cfg.header_timeout + slowest(piece.len() as u64);
        if let Some(c) = self.conns.get_mut(key) {
            c.install_piece(piece, deadline);
        }
    }

    /// Grant waiting connections their pieces, in arrival order, while the
    /// budget holds them; each is then driven from the ready queue. A loop,
    /// never a recursion; a waiter that has gone (or no longer wants a piece)
    /// is dropped from the queue.
    pub(super) fn wake_budget_waiters(&mut self) {
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
}
