//! One client connection: its socket, its read and write buffers
//! ([`Connection`]), and where it stands in the protocol ([`Protocol`], no I/O).
//!
//! Reads never take more bytes than the current frame needs: first exactly
//! the 23 header bytes, then (once the header has been checked) the payload
//! of a control frame, or the 267 fixed bytes of a file packet. Those are
//! small (at most 2,303 bytes) and come from the connection's own allowance,
//! never from the memory budget, so a full budget cannot delay a
//! registration, a key exchange or a 1029. A file packet's content is then
//! read one [`Piece`] at a time, each paid for by a grant from the budget
//! taken just before it is read; the content of a refused packet is read and
//! dropped. So an announced size reserves nothing: a connection holds at most
//! one piece being filled plus what the worker has not yet consumed.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::budget::Piece;
use crate::metrics::Closed;
use crate::protocol::{ClientId, Code, NameField, RequestHeader, REQUEST_HEADER_LEN};
use crate::worker::{ConnRef, UploadId};

use super::sequence::Ended;

/// Replies waiting to be sent beyond this many bytes pause reading from the
/// connection: a client that never reads cannot make the server buffer without end.
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// The session a 1602/1605 opened: it belongs to this connection only.
pub struct Session {
    pub id: ClientId,
    pub name: String,
    pub key: [u8; 32],
}

impl Drop for Session {
    fn drop(&mut self) {
        self.key = [0; 32];
    }
}

/// A frame whose header has been checked and whose payload is being read:
/// a control frame's whole payload, or a file packet's fixed fields.
pub struct Frame {
    pub header: RequestHeader,
    pub code: Code,
    pub payload: Vec<u8>,
    pub filled: usize,
}

/// An admitted file packet's content, read one piece at a time.
pub struct ContentRead {
    /// Content bytes of this packet not yet read.
    pub remaining: u64,
    /// The piece being filled, once the budget granted it (None: waiting for budget).
    pub piece: Option<Piece>,
    pub filled: usize,
    /// The piece must be complete by then (set with the grant).
    pub deadline: Option<Instant>,
}

/// Where the read side stands.
pub enum ReadState {
    /// Collecting the 23 header bytes.
    AwaitHeader,
    /// Reading a control frame's payload, or a file packet's fixed fields.
    AwaitPayload(Frame),
    /// Reading an admitted file packet's content.
    Content(ContentRead),
    /// Reading and dropping a refused file packet's content, by `deadline`.
    Drain { remaining: u64, deadline: Instant },
}

/// What the protocol logic decided about a file packet's content (see
/// [`Protocol::incoming`]); the loop reads it accordingly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// Read it and hand it to the worker, piece by piece.
    Stream { len: u64 },
    /// Read it and drop it (the packet was refused).
    Drain { len: u64 },
}

/// How a CBC stream is being received (see docs/PROTOCOL.md, "file packets").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receiving {
    pub upload: UploadId,
    /// The normalized path the file is stored under.
    pub name: String,
    pub name_field: NameField,
    pub total: u16,
    /// The number the next packet must carry (wraps past 65,535).
    pub next: u16,
    /// Packets accepted so far.
    pub packets: u64,
    /// Content of it went to the worker (which then has its temp file).
    pub started: bool,
    /// The open CBC stream, if any: its orig_file_size, its whole ciphertext
    /// length and the ciphertext bytes it still expects.
    pub segment: Option<Segment>,
    /// The ciphertext length of the last completed stream (for the empty
    /// trailing packet of clients that put the whole length in content_size).
    pub last_stream_len: u64,
    /// Plaintext bytes of all streams begun so far.
    pub plain_total: u64,
    /// Ciphertext bytes of all streams begun so far (whole stream lengths):
    /// the 1603 reports it in 32 bits, so it may not exceed u32::MAX.
    pub ciphertext_total: u64,
    /// Some stream spanned more than one packet: per-packet encryption is then ruled out.
    pub multi_packet_stream: bool,
    pub touched: Instant,
}

impl Receiving {
    /// The state of a new upload, at its packet 1.
    pub fn new(upload: UploadId, name: String, name_field: NameField, total: u16, now: Instant) -> Receiving {
        Receiving {
            upload,
            name,
            name_field,
            total,
            next: 1,
            packets: 0,
            started: false,
            segment: None,
            last_stream_len: 0,
            plain_total: 0,
            ciphertext_total: 0,
            multi_packet_stream: false,
            touched: now,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub orig: u32,
    pub whole: u64,
    pub remaining: u64,
}

/// The upload side of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upload {
    Idle,
    Receiving(Receiving),
    /// The last packet went to the worker; its outcome is awaited.
    Finishing {
        upload: UploadId,
        /// The normalized path the file is stored under.
        name: String,
        name_field: NameField,
        total: u16,
        /// The number a packet after the last would carry.
        next: u16,
    },
    /// An upload ended (refused, or received): later packets of it are
    /// swallowed silently (see [`Ended::swallow`]), so that a client sending
    /// them back to back gets exactly one 1607, or none after its 1603.
    Ended(Ended),
}

/// A file that reached 1603 (or was then retried), keyed by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    pub name: String,
    pub upload: UploadId,
    /// 1030 was received: the staged copy is gone, a resend is expected.
    pub retried: bool,
    pub touched: Instant,
}

/// At most this many staged files per connection; the oldest is dropped beyond it.
pub const MAX_STAGED: usize = 16;

/// A reply-bearing job is at the worker; its completion sends the reply.
/// (No `Debug`: a variant holds a session key, which must never be logged.)
#[derive(Clone, PartialEq, Eq)]
pub enum Awaiting {
    Nothing,
    Register,
    Key {
        encrypted_key: Vec<u8>,
        key: [u8; 32],
        name: String,
        public: rsa::RsaPublicKey,
    },
    Commit {
        name: String,
    },
    /// Waiting for the outcome of the upload's last packet.
    LastPacket,
}

/// One connection's place in the protocol: everything the state machine of
/// `machine.rs` reads and changes, and nothing about sockets, so that it can
/// run without one (the fuzz target `session` drives it with bytes).
pub struct Protocol {
    /// Names the connection in jobs and completions (slab key + unique serial).
    pub conn: ConnRef,
    pub peer: SocketAddr,
    /// Encoded replies not yet written (the loop writes from `Connection`'s position).
    pub out: Vec<u8>,
    pub session: Option<Session>,
    /// The id this connection registered (1600), which may send its first key.
    pub registered_id: Option<ClientId>,
    /// The client named by the last request that carried a known id (for log lines).
    pub client_label: Option<String>,
    pub upload: Upload,
    pub staged: VecDeque<StagedFile>,
    pub awaiting: Awaiting,
    /// Content pieces handed to the worker and not yet completed.
    pub packets_in_flight: usize,
    /// Set by a file packet's fixed fields: what to do with its content.
    pub incoming: Option<Incoming>,
    /// The packet whose content is streaming: the worker flags of its pieces.
    pub streaming: Option<PacketStream>,
    /// When this connection last made upload progress: content received, or
    /// a 1603/1604 sent. Requests that cost nothing (register, reconnect) do
    /// not count: this decides who is evicted when the table is full.
    pub last_progress: Option<Instant>,
}

/// The content of one admitted file packet on its way to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketStream {
    pub upload: UploadId,
    /// No piece has gone yet (the first carries `new_segment`, and `start` on packet 1).
    pub first: bool,
    /// The first piece is the upload's first (packet 1): it opens the temp file.
    pub opens_upload: bool,
    pub new_segment: bool,
    pub end_segment: Option<u64>,
    /// The upload's last packet.
    pub last_packet: bool,
}

impl Protocol {
    pub fn new(conn: ConnRef, peer: SocketAddr) -> Protocol {
        Protocol {
            conn,
            peer,
            out: Vec::new(),
            session: None,
            registered_id: None,
            client_label: None,
            upload: Upload::Idle,
            staged: VecDeque::new(),
            awaiting: Awaiting::Nothing,
            packets_in_flight: 0,
            incoming: None,
            streaming: None,
            last_progress: None,
        }
    }

    /// "peer name" or "peer" for log lines.
    pub fn tag(&self) -> String {
        match &self.client_label {
            Some(l) => format!("{} {}", self.peer, crate::logging::Esc(l)),
            None => self.peer.to_string(),
        }
    }

    /// May the loop parse this connection's next request? Not while a reply
    /// is owed by the worker (replies leave in request order) nor with
    /// `PIPELINE_DEPTH` packets at the worker.
    pub fn may_read(&self) -> bool {
        self.awaiting == Awaiting::Nothing && self.packets_in_flight < super::PIPELINE_DEPTH
    }

    /// Nothing at the worker and no transfer that a close would lose.
    pub fn is_idle(&self) -> bool {
        self.awaiting == Awaiting::Nothing
            && self.packets_in_flight == 0
            && matches!(self.upload, Upload::Idle | Upload::Ended(_))
            && self.staged.iter().all(|s| s.retried)
    }

    /// Find a staged file by name.
    pub fn staged_index(&self, name: &str) -> Option<usize> {
        self.staged.iter().position(|s| s.name == name)
    }
}

/// A client connection: the socket and its I/O state around a [`Protocol`].
pub struct Connection {
    pub socket: TcpStream,
    pub read: ReadState,
    header: [u8; REQUEST_HEADER_LEN],
    header_len: usize,
    /// When the first byte of the current header arrived.
    pub header_started: Option<Instant>,
    /// How much of `proto.out` has been written.
    out_pos: usize,
    /// The socket may have unread bytes (edge-triggered readiness).
    pub readable: bool,
    pub last_activity: Instant,
    /// Close once the output is flushed (and the peer has closed, or after a grace period).
    pub closing: Option<Instant>,
    /// Why, for the metrics: a half-close by the peer, or a framing error.
    pub closing_kind: Closed,
    write_shut: bool,
    /// When the connection was accepted (for the login timeout and eviction order).
    pub accepted: Instant,
    /// The connection has had a session (1602 or 1605): it no longer counts
    /// against the per-address cap on connections without one.
    pub authed: bool,
    pub proto: Protocol,
}

/// Result of one read attempt.
pub enum ReadOutcome {
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
    pub fn new(socket: TcpStream, peer: SocketAddr, conn: ConnRef, now: Instant) -> Connection {
        Connection {
            socket,
            read: ReadState::AwaitHeader,
            header: [0; REQUEST_HEADER_LEN],
            header_len: 0,
            header_started: None,
            out_pos: 0,
            readable: true,
            last_activity: now,
            closing: None,
            closing_kind: Closed::Peer,
            write_shut: false,
            accepted: now,
            authed: false,
            proto: Protocol::new(conn, peer),
        }
    }

    pub fn serial(&self) -> u64 {
        self.proto.conn.serial
    }

    /// "peer name" or "peer" for log lines.
    pub fn tag(&self) -> String {
        self.proto.tag()
    }

    /// The framing can no longer be trusted: close once the 1607 is out.
    pub fn close_protocol(&mut self, now: Instant) {
        self.closing = Some(now);
        self.closing_kind = Closed::Protocol;
    }

    /// Some bytes of a header have arrived, but not all 23.
    pub fn header_in_progress(&self) -> bool {
        self.header_len > 0
    }

    pub fn pending_output(&self) -> usize {
        self.proto.out.len() - self.out_pos
    }

    /// Is the connection between frames with nothing outstanding?
    pub fn is_quiet(&self) -> bool {
        matches!(self.read, ReadState::AwaitHeader)
            && self.header_len == 0
            && self.pending_output() == 0
            && self.proto.is_idle()
    }

    /// Write pending output until done or WouldBlock.
    pub fn flush(&mut self, now: Instant) -> io::Result<()> {
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

    /// Read toward the current frame. Nothing is read while a content piece
    /// waits for its grant.
    pub fn read_some(&mut self, now: Instant) -> io::Result<ReadOutcome> {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let res = match &mut self.read {
                ReadState::AwaitHeader => self.socket.read(&mut self.header[self.header_len..]),
                ReadState::AwaitPayload(f) => {
                    if f.filled == f.payload.len() {
                        return Ok(self.take_frame());
                    }
                    self.socket.read(&mut f.payload[f.filled..])
                }
                ReadState::Content(c) => match &mut c.piece {
                    None => return Ok(ReadOutcome::WouldBlock),
                    Some(p) if c.filled == p.len() => return Ok(self.take_piece()),
                    Some(p) => self.socket.read(&mut p.bytes[c.filled..]),
                },
                ReadState::Drain { remaining: 0, .. } => {
                    self.read = ReadState::AwaitHeader;
                    return Ok(ReadOutcome::Drained);
                }
                ReadState::Drain { remaining, .. } => {
                    let n = scratch.len().min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    self.socket.read(&mut scratch[..n])
                }
            };
            match res {
                Ok(0) => return Ok(ReadOutcome::Closed),
                Ok(n) => {
                    self.last_activity = now;
                    match &mut self.read {
                        ReadState::AwaitHeader => {
                            if self.header_len == 0 {
                                self.header_started = Some(now);
                            }
                            self.header_len += n;
                            if self.header_len == REQUEST_HEADER_LEN {
                                self.header_len = 0;
                                return Ok(ReadOutcome::Header(RequestHeader::decode(&self.header)));
                            }
                        }
                        ReadState::AwaitPayload(f) => {
                            f.filled += n;
                            if f.filled == f.payload.len() {
                                return Ok(self.take_frame());
                            }
                        }
                        ReadState::Content(c) => {
                            c.filled += n;
                            self.proto.last_progress = Some(now);
                            if c.piece.as_ref().is_some_and(|p| c.filled == p.len()) {
                                return Ok(self.take_piece());
                            }
                        }
                        ReadState::Drain { remaining, .. } => *remaining -= n as u64,
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

    fn take_frame(&mut self) -> ReadOutcome {
        match std::mem::replace(&mut self.read, ReadState::AwaitHeader) {
            ReadState::AwaitPayload(f) => {
                self.header_started = None;
                ReadOutcome::Frame(f)
            }
            other => {
                self.read = other;
                ReadOutcome::WouldBlock
            }
        }
    }

    /// A full piece leaves the read state; the next piece waits for its own grant.
    fn take_piece(&mut self) -> ReadOutcome {
        let ReadState::Content(c) = &mut self.read else { return ReadOutcome::WouldBlock };
        let Some(piece) = c.piece.take() else { return ReadOutcome::WouldBlock };
        c.remaining -= piece.len() as u64;
        c.filled = 0;
        c.deadline = None;
        let last = c.remaining == 0;
        if last {
            self.read = ReadState::AwaitHeader;
        }
        ReadOutcome::Piece { piece, last }
    }

    /// The size of the next content piece to ask the budget for, if the
    /// connection is reading content and has none granted.
    pub fn wants_piece(&self, piece_size: usize) -> Option<usize> {
        match &self.read {
            ReadState::Content(c) if c.piece.is_none() => {
                Some(usize::try_from(c.remaining).unwrap_or(usize::MAX).min(piece_size))
            }
            _ => None,
        }
    }

    /// Read and drop whatever the peer sends (a connection being closed).
    /// Returns true once the peer has closed its side or the socket failed.
    pub fn discard_input(&mut self) -> bool {
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
    pub fn shut_write(&mut self) {
        if !self.write_shut {
            self.write_shut = true;
            let _ = self.socket.shutdown(std::net::Shutdown::Write);
        }
    }
}
