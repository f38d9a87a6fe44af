//! Driving one connection: flush its replies, read and hand its frames and
//! content pieces to the state machine, within its turn (fairness), its
//! pipeline and its budget; and the FIFO of connections waiting for budget.

use std::io;
use std::time::Instant;

use super::connection::{self, ContentRead, Incoming, ReadOutcome, ReadState};
use super::deadlines::slowest;
use super::{machine, Flow, Server, FRAMES_PER_TURN};
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
            if c.pending_output() == 0 && c.proto.awaiting == connection::Awaiting::Nothing {
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
        if !c.readable || !c.proto.may_read() || c.pending_output() > connection::MAX_PENDING_OUTPUT {
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
                let mid_frame = c.header_in_progress() || !matches!(c.read, ReadState::AwaitHeader);
                if !mid_frame && (c.proto.awaiting != connection::Awaiting::Nothing || c.pending_output() > 0)
                {
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
                Some(code) => {
                    let payload = vec![0; machine::frame_len(code, &h)];
                    c.read =
                        ReadState::AwaitPayload(connection::Frame { header: h, code, payload, filled: 0 });
                }
            },
            Ok(ReadOutcome::Frame(f)) => {
                *frames += 1;
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
                *frames += 1;
                self.core.metrics.bytes_received.add(piece.len() as i64);
                self.core.content_piece(&mut c.proto, piece, last);
            }
            Ok(ReadOutcome::Drained) => {}
        }
        true
    }

    /// Give a connection waiting for it the content piece it asked for; it
    /// must be read by a deadline.
    pub(super) fn install_piece(&mut self, key: usize, piece: Piece, now: Instant) {
        let header_timeout = self.core.cfg.header_timeout;
        if let Some(c) = self.conns.get_mut(key) {
            if let ReadState::Content(cr) = &mut c.read {
                cr.deadline = Some(now + header_timeout + slowest(piece.len() as u64));
                cr.filled = 0;
                cr.piece = Some(piece);
            }
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
