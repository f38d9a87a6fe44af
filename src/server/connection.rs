//! One client connection's I/O: its socket, its read and write buffers and
//! where its read side stands ([`Connection`], [`ReadState`]), around its
//! place in the protocol ([`Protocol`], `state.rs`, no I/O).
//!
//! Each frame is taken in the order its size is known: first exactly the 23
//! header bytes, then (once the header has been checked) the payload of a
//! control frame, or the 267 fixed bytes of a file packet. Those are small
//! (at most 2,303 bytes) and come from the connection's own allowance, never
//! from the memory budget, so a full budget cannot delay a registration, a
//! key exchange or a 1029. A file packet's content is then read one [`Piece`]
//! at a time, each paid for by a grant from the budget taken just before it
//! is read; the content of a refused packet is read and dropped. So an
//! announced size reserves nothing: a connection holds at most one piece
//! being filled plus what the worker has not yet consumed.
//!
//! Where the current frame needs fewer than [`READ_AHEAD`] bytes, the socket
//! is read [`READ_AHEAD`] bytes at a time into the connection's read-ahead
//! ([`ReadAhead`]), and the frame takes its bytes from there: a small file's
//! packet (header, fixed fields and content) or a 1029 is then one `recvfrom`
//! instead of three, and a read that comes back short tells that the socket
//! is empty, so the `recvfrom` that would only say so is not made (the next
//! edge-triggered event says when more has come; once the peer has closed,
//! reads go on until they return 0). The read-ahead is freed as soon as it
//! is taken, so it is held only by a connection paused in the middle of what
//! it read (its pipeline, its replies, the budget for its next piece): at
//! most [`READ_AHEAD`] bytes more per connection, bytes that the kernel would
//! otherwise hold. Larger reads (content pieces) go straight to their piece.
//!
//! The read state moves by value: a complete frame, piece or drained packet
//! leaves it and the next state comes back (`Connection::complete`); the
//! loop sets the state that follows a header or a frame only from
//! `AwaitHeader` (`Connection::expect`).

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::budget::Piece;
use crate::metrics::Closed;
use crate::protocol::{Code, RequestHeader, REQUEST_HEADER_LEN};
use crate::worker::ConnRef;

use super::machine::frame_len;
use super::state::{transition, Protocol};

/// Reads for a frame that needs fewer bytes than this go through the
/// connection's read-ahead, this many bytes at a time: a 4 KiB file's whole
/// packet (23 + 267 + 4,112 bytes) in one read.
pub(super) const READ_AHEAD: usize = 8 * 1024;

/// Bytes read from the socket ahead of the frame that takes them: empty (no
/// allocation) whenever all have been taken.
#[derive(Default)]
struct ReadAhead {
    buf: Vec<u8>,
    pos: usize,
}

impl ReadAhead {
    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Move as many bytes as fit into `dst`; 0 when empty.
    fn give(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.buf.len() - self.pos);
        dst[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.is_empty() {
            *self = ReadAhead::default();
        }
        n
    }

    /// One read of up to [`READ_AHEAD`] bytes (only when empty).
    fn refill(&mut self, socket: &mut impl Read) -> io::Result<usize> {
        self.buf.resize(READ_AHEAD, 0);
        self.pos = 0;
        let res = socket.read(&mut self.buf);
        self.buf.truncate(*res.as_ref().unwrap_or(&0));
        if self.buf.is_empty() {
            *self = ReadAhead::default();
        }
        res
    }
}

/// Read toward `dst`: from the read-ahead first; else, unless the socket is
/// known to be empty (`readable` false), from the socket (through the
/// read-ahead when `dst` is small). A short read into the read-ahead clears
/// `readable` unless the peer has closed (`hup`: then reads go on to the 0).
/// Ok(0): the peer closed.
fn fill(
    dst: &mut [u8],
    ahead: &mut ReadAhead,
    socket: &mut impl Read,
    readable: &mut bool,
    hup: bool,
) -> io::Result<usize> {
    if !ahead.is_empty() {
        return Ok(ahead.give(dst));
    }
    if !*readable {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    if dst.len() >= READ_AHEAD {
        return socket.read(dst);
    }
    let n = ahead.refill(socket)?;
    if n < READ_AHEAD && !hup {
        *readable = false;
    }
    Ok(ahead.give(dst))
}

/// Replies waiting to be sent beyond this many bytes pause reading from the
/// connection: a client that never reads cannot make the server buffer without end.
pub(super) const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// A frame whose header has been checked and whose payload is being read:
/// a control frame's whole payload, or a file packet's fixed fields.
pub struct Frame {
    pub(super) header: RequestHeader,
    pub(super) code: Code,
    pub(super) payload: Vec<u8>,
    pub(super) filled: usize,
}

impl Frame {
    /// The frame a checked header announces, its payload still to be read
    /// (see [`frame_len`]).
    pub fn new(header: RequestHeader, code: Code) -> Frame {
        let payload = vec![0; frame_len(code, &header)];
        Frame { header, code, payload, filled: 0 }
    }

    /// All of its payload has been read.
    pub fn is_complete(&self) -> bool {
        self.filled == self.payload.len()
    }
}

/// An admitted file packet's content, read one piece at a time.
pub(super) struct ContentRead {
    /// Content bytes of this packet not yet read.
    pub(super) remaining: u64,
    /// The piece being filled, once the budget granted it (None: waiting for budget).
    pub(super) piece: Option<Piece>,
    pub(super) filled: usize,
    /// The piece must be complete by then (set with the grant).
    pub(super) deadline: Option<Instant>,
}

impl ContentRead {
    pub(super) fn new(remaining: u64) -> ContentRead {
        ContentRead { remaining, piece: None, filled: 0, deadline: None }
    }

    /// The piece being filled is full.
    fn piece_full(&self) -> bool {
        self.piece.as_ref().is_some_and(|p| self.filled == p.len())
    }
}

/// Where the read side stands.
pub(super) enum ReadState {
    /// Collecting the 23 header bytes.
    AwaitHeader,
    /// Reading a control frame's payload, or a file packet's fixed fields.
    AwaitPayload(Frame),
    /// Reading an admitted file packet's content.
    Content(ContentRead),
    /// Reading and dropping a refused file packet's content, by `deadline`.
    Drain { remaining: u64, deadline: Instant },
}

impl ReadState {
    /// What a complete frame, piece or drained packet leaves behind: the
    /// next state and what was completed, or the state unchanged and None.
    fn complete(self) -> (ReadState, Option<ReadOutcome>) {
        match self {
            ReadState::AwaitPayload(f) if f.is_complete() => {
                (ReadState::AwaitHeader, Some(ReadOutcome::Frame(f)))
            }
            ReadState::Content(mut c) if c.piece_full() => {
                let Some(piece) = c.piece.take() else { return (ReadState::Content(c), None) };
                c.remaining -= piece.len() as u64;
                c.filled = 0;
                c.deadline = None;
                // The next piece waits for its own grant.
                let last = c.remaining == 0;
                let next = if last { ReadState::AwaitHeader } else { ReadState::Content(c) };
                (next, Some(ReadOutcome::Piece { piece, last }))
            }
            ReadState::Drain { remaining: 0, .. } => (ReadState::AwaitHeader, Some(ReadOutcome::Drained)),
            other => (other, None),
        }
    }
}

/// A client connection: the socket and its I/O state around a [`Protocol`].
pub(super) struct Connection {
    pub(super) socket: TcpStream,
    read: ReadState,
    header: [u8; REQUEST_HEADER_LEN],
    header_len: usize,
    /// When the first byte of the current header arrived.
    header_started: Option<Instant>,
    /// How much of `proto.out` has been written.
    out_pos: usize,
    /// The socket may have unread bytes (edge-triggered readiness).
    pub(super) readable: bool,
    /// The peer has closed or the socket failed (an event said so): reads go
    /// on until they return 0 or fail, whatever their length.
    pub(super) hup: bool,
    /// Bytes read ahead of the current frame.
    ahead: ReadAhead,
    pub(super) last_activity: Instant,
    /// Close once the output is flushed (and the peer has closed, or after a grace period).
    pub(super) closing: Option<Instant>,
    /// Why, for the metrics: a half-close by the peer, or a framing error.
    pub(super) closing_kind: Closed,
    write_shut: bool,
    /// When the connection was accepted (for the login timeout and eviction order).
    pub(super) accepted: Instant,
    /// The connection has had a session (1602 or 1605): it no longer counts
    /// against the per-address cap on connections without one.
    pub(super) authed: bool,
    pub(super) proto: Protocol,
}

/// Result of one read attempt.
pub(super) enum ReadOutcome {
    /// No more bytes now.
    WouldBlock,
    /// The peer closed (or reset) the connection.
    Closed,
    /// A header is complete and must be checked.
    Header(RequestHeader),
    /// A frame is complete.
    Frame(Frame),
    /// A piece of file content is complete; `last`: the packet's last.
    Piece { piece: Piece, last: bool },
    /// A refused packet's content has been read and dropped.
    Drained,
}

impl Connection {
    pub(super) fn new(socket: TcpStream, peer: SocketAddr, conn: ConnRef, now: Instant) -> Connection {
        Connection {
            socket,
            read: ReadState::AwaitHeader,
            header: [0; REQUEST_HEADER_LEN],
            header_len: 0,
            header_started: None,
            out_pos: 0,
            readable: true,
            hup: false,
            ahead: ReadAhead::default(),
            last_activity: now,
            closing: None,
            closing_kind: Closed::Peer,
            write_shut: false,
            accepted: now,
            authed: false,
            proto: Protocol::new(conn, peer),
        }
    }

    pub(super) fn serial(&self) -> u64 {
        self.proto.conn.serial
    }

    /// "peer name" or "peer" for log lines.
    pub(super) fn tag(&self) -> String {
        self.proto.tag()
    }

    /// The framing can no longer be trusted: close once the 1607 is out.
    pub(super) fn close_protocol(&mut self, now: Instant) {
        self.closing = Some(now);
        self.closing_kind = Closed::Protocol;
    }

    /// Some bytes of a header have arrived, but not all 23.
    pub(super) fn header_in_progress(&self) -> bool {
        self.header_len > 0
    }

    /// When the first byte of the current header arrived, if one is being read.
    pub(super) fn header_started(&self) -> Option<Instant> {
        self.header_started
    }

    /// Where the read side stands.
    pub(super) fn read_state(&self) -> &ReadState {
        &self.read
    }

    /// Between frames: no header byte read, no payload or content pending.
    pub(super) fn between_frames(&self) -> bool {
        matches!(self.read, ReadState::AwaitHeader) && self.header_len == 0
    }

    pub(super) fn pending_output(&self) -> usize {
        self.proto.out.len() - self.out_pos
    }

    /// Is the connection between frames with nothing outstanding?
    pub(super) fn is_quiet(&self) -> bool {
        self.between_frames() && self.pending_output() == 0 && self.proto.is_idle()
    }

    /// Write pending output until done or WouldBlock.
    pub(super) fn flush(&mut self, now: Instant) -> io::Result<()> {
        let out = &mut self.proto.out;
        while self.out_pos < out.len() {
            match self.socket.write(&out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    self.last_activity = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        out.clear();
        self.out_pos = 0;
        if out.capacity() > 4096 {
            out.shrink_to(4096);
        }
        Ok(())
    }

    /// What is read after a header or a frame: a frame's payload, or a file
    /// packet's content. Only from `AwaitHeader` (a header or a frame has
    /// just completed): the state in place is handed back otherwise, and the
    /// new one is not taken (which the loop logs and closes on).
    pub(super) fn expect(&mut self, next: ReadState) -> Result<(), &'static str> {
        transition(&mut self.read, ReadState::AwaitHeader, |r| match r {
            ReadState::AwaitHeader => (next, Ok(())),
            ReadState::AwaitPayload(f) => {
                (ReadState::AwaitPayload(f), Err("a frame's payload is being read"))
            }
            ReadState::Content(c) => (ReadState::Content(c), Err("a packet's content is being read")),
            d @ ReadState::Drain { .. } => (d, Err("a refused packet's content is being read")),
        })
    }

    /// There may be bytes to read: in the socket, or read ahead.
    pub(super) fn has_input(&self) -> bool {
        self.readable || !self.ahead.is_empty()
    }

    /// Read toward the current frame. Nothing is read while a content piece
    /// waits for its grant.
    pub(super) fn read_some(&mut self, now: Instant) -> io::Result<ReadOutcome> {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if let Some(done) = self.complete() {
                return Ok(done);
            }
            let dst: &mut [u8] = match &mut self.read {
                ReadState::AwaitHeader => &mut self.header[self.header_len..],
                ReadState::AwaitPayload(f) => &mut f.payload[f.filled..],
                ReadState::Content(c) => match &mut c.piece {
                    None => return Ok(ReadOutcome::WouldBlock),
                    Some(p) => &mut p.bytes[c.filled..],
                },
                ReadState::Drain { remaining, .. } => {
                    let n = scratch.len().min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    &mut scratch[..n]
                }
            };
            match fill(dst, &mut self.ahead, &mut self.socket, &mut self.readable, self.hup) {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => {
                    self.last_activity = now;
                    if let Some(h) = self.took(n, now) {
                        return Ok(ReadOutcome::Header(h));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadOutcome::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(ReadOutcome::Closed)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Count `n` bytes just read into the current state; a header, once all
    /// 23 bytes are in.
    fn took(&mut self, n: usize, now: Instant) -> Option<RequestHeader> {
        match &mut self.read {
            ReadState::AwaitHeader => {
                if self.header_len == 0 {
                    self.header_started = Some(now);
                }
                self.header_len += n;
                if self.header_len == REQUEST_HEADER_LEN {
                    self.header_len = 0;
                    return Some(RequestHeader::decode(&self.header));
                }
            }
            ReadState::AwaitPayload(f) => f.filled += n,
            ReadState::Content(c) => {
                c.filled += n;
                self.proto.last_progress = Some(now);
            }
            ReadState::Drain { remaining, .. } => *remaining -= n as u64,
        }
        None
    }

    /// A complete frame, piece or drained packet leaves the read state by
    /// value (see [`ReadState::complete`]).
    fn complete(&mut self) -> Option<ReadOutcome> {
        let done = transition(&mut self.read, ReadState::AwaitHeader, ReadState::complete);
        if matches!(done, Some(ReadOutcome::Frame(_))) {
            self.header_started = None;
        }
        done
    }

    /// Give the content being read the piece the budget granted, to be
    /// filled by `deadline`.
    pub(super) fn install_piece(&mut self, piece: Piece, deadline: Instant) {
        if let ReadState::Content(cr) = &mut self.read {
            cr.deadline = Some(deadline);
            cr.filled = 0;
            cr.piece = Some(piece);
        }
    }

    /// The size of the next content piece to ask the budget for, if the
    /// connection is reading content and has none granted.
    pub(super) fn wants_piece(&self, piece_size: usize) -> Option<usize> {
        match &self.read {
            ReadState::Content(c) if c.piece.is_none() => {
                Some(usize::try_from(c.remaining).unwrap_or(usize::MAX).min(piece_size))
            }
            _ => None,
        }
    }

    /// Read and drop whatever the peer sends (a connection being closed).
    /// Returns true once the peer has closed its side or the socket failed.
    pub(super) fn discard_input(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        for _ in 0..256 {
            match self.socket.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
        false
    }

    /// Send FIN after the last reply (once).
    pub(super) fn shut_write(&mut self) {
        if !self.write_shut {
            self.write_shut = true;
            let _ = self.socket.shutdown(std::net::Shutdown::Write);
        }
    }
}
