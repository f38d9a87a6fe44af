//! Blocking protocol-v3 client over `std::net`, used by the `backup-client`
//! binary, the end-to-end tests and the benchmarks.
//!
//! One [`Client`] is one TCP connection. Requests are written as whole frames
//! (a single `write_all` each); responses are read with a bounded payload
//! (64 KiB) so a hostile or broken server cannot make the client allocate
//! without limit.
//!
//! File uploads are streamed: the plaintext is read in 256 KiB pieces,
//! encrypted (AES-256-CBC, zero IV, PKCS#7) and checksummed in the same pass,
//! and cut into packets as it is produced. Memory use is O(packet size), never
//! O(file size). How the ciphertext is cut into packets, and what goes in the
//! `content_size` / `orig_file_size` fields, is decided by a pure
//! [`PacketPlan`] for each of the three conventions clients in the field use
//! (see `PROTOCOL.md`, "What clients in the field actually send").
//!
//! Connection state: after any error that interrupts a request (a partially
//! sent upload, a failed write, an unreadable response) the framing can no
//! longer be trusted; [`Client::is_in_step`] then returns false and the
//! caller should open a new connection.

// `ClientError::Refused` carries the whole `Response` (a 1603 holds a 255-byte
// name field), so the error type is about 300 bytes. Errors are rare and every
// call here does network I/O, so the extra copy is immaterial; keeping the
// response unboxed makes matching on it in tests simple.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

pub mod cli;
pub mod exclude;
pub mod identity;
pub mod record;
pub mod report;
pub mod walk;

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use rsa::pkcs8::EncodePublicKey;
use rsa::RsaPrivateKey;

use crate::crypto::{self, Cksum, OaepHash, StreamEncryptor, AES_KEY_LEN};
use crate::protocol::{
    encode_frame, ClientId, Code, NameField, PacketHeader, RequestHeader, Response, ResponseCode,
    ResponseHeader, NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, VERSION,
};

/// Largest response payload accepted. The largest legitimate one is a
/// 1602/1605 carrying an RSA-4096 ciphertext (16 + 512 bytes); anything far
/// beyond that is a broken or hostile server.
pub const MAX_RESPONSE_PAYLOAD: u32 = 64 * 1024;

/// Plaintext read from the source per read call.
const READ_CHUNK: usize = 256 * 1024;

/// Largest piece of a packet's content held in memory at once. Packets up to
/// this size are written with one `write_all` of header + content; larger
/// ones (`--single-packet` on a big file) are streamed in pieces of this size.
pub const STREAM_CHUNK: usize = 4 * 1024 * 1024;

/// Attempts made by [`Client::send_file`] before giving up with 1031.
pub const MAX_ATTEMPTS: u32 = 3;

/// Default content bytes per file packet.
pub const DEFAULT_PACKET_SIZE: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Options and results
// ---------------------------------------------------------------------------

/// Connection-level options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Timeout of the TCP connect (per resolved address). Default 10 s.
    pub connect_timeout: Duration,
    /// Timeout of every read (and write) on the socket. Default 60 s.
    pub read_timeout: Duration,
    /// OAEP hash the server uses to encrypt the AES key. Default SHA-1. If
    /// decryption with it fails, the other hash is tried before giving up.
    pub oaep_hash: OaepHash,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            oaep_hash: OaepHash::Sha1,
        }
    }
}

/// What goes into the `content_size` field of file packets, and how the
/// ciphertext is cut (the three conventions of `PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentSizeField {
    /// Convention 1: the whole-file ciphertext cut into `packet_size` pieces;
    /// `content_size` is this packet's length.
    #[default]
    ThisPacket,
    /// Convention 2: the whole-file ciphertext cut into `packet_size` pieces;
    /// `content_size` is the whole ciphertext length in every packet;
    /// `total_packets = ciphertext / packet_size + 1`, so when the ciphertext
    /// is a multiple of `packet_size` the last packet is empty.
    WholeFile,
    /// Convention 3: each `packet_size`-byte plaintext chunk is encrypted
    /// separately (own zero IV, own padding); `content_size` is this packet's
    /// ciphertext length and `orig_file_size` the chunk's plaintext length.
    /// When the file size is a non-zero multiple of `packet_size` an extra
    /// packet of empty plaintext (16 bytes of ciphertext) follows; an empty
    /// file is one such packet.
    PerPacketEncrypted,
}

/// Options of one upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Content bytes per packet (plaintext bytes per chunk for
    /// [`ContentSizeField::PerPacketEncrypted`]). Default 1 MiB.
    pub packet_size: usize,
    /// Packet convention. Default [`ContentSizeField::ThisPacket`].
    pub content_size: ContentSizeField,
    /// The server answers 1030 with 1604 (wait for it before resending).
    /// When false, a 1604 arriving before the next 1603 is tolerated anyway.
    pub ack_retry: bool,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            packet_size: DEFAULT_PACKET_SIZE,
            content_size: ContentSizeField::ThisPacket,
            ack_retry: false,
        }
    }
}

/// What the server said after the last packet of an upload (its 1603), plus
/// the checksum computed locally over the same plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub server_cksum: u32,
    pub local_cksum: u32,
    /// The server's `content_size` (total ciphertext bytes it received).
    pub content_size: u32,
    /// The file name field echoed by the server.
    pub file_name_field: [u8; NAME_FIELD_LEN],
}

impl Uploaded {
    /// Whether the server's checksum matches ours.
    pub fn cksum_matches(&self) -> bool {
        self.server_cksum == self.local_cksum
    }
}

/// Result of [`Client::send_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The checksums matched and the server acknowledged 1029.
    Verified { cksum: u32, attempts: u32 },
    /// The checksums differed on every attempt; 1031 was sent and acknowledged.
    CksumMismatch { attempts: u32 },
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a client operation failed.
#[derive(Debug)]
pub enum ClientError {
    /// Network failure: connect, read or write on the socket failed or timed out,
    /// or the server closed the connection.
    Io(io::Error),
    /// The server answered with a refusal (1601, 1606, 1607) or with a
    /// response other than the one expected.
    Refused(Response),
    /// The server's reply was malformed (bad version, unknown code, payload
    /// that does not fit its code, or larger than [`MAX_RESPONSE_PAYLOAD`]).
    Protocol(String),
    /// The session key could not be decrypted, or no session key is set.
    Crypto(String),
    /// A local problem: the file could not be opened or read, the name or size
    /// cannot be expressed in protocol v3, an option is invalid.
    Local(io::Error),
    /// The source yielded a different number of bytes than announced: the
    /// file changed size while being read. `read` is the number of bytes
    /// actually read; `read > expected` means "at least that many".
    FileChanged { expected: u64, read: u64 },
}

impl ClientError {
    /// Whether this is a network failure (connection refused, reset, closed,
    /// timed out): worth retrying on a new connection.
    pub fn is_network(&self) -> bool {
        matches!(self, ClientError::Io(_))
    }

    /// Whether this is a network timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Io(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
    }

    /// The refusing response's code, if the server refused.
    pub fn refusal_code(&self) -> Option<ResponseCode> {
        match self {
            ClientError::Refused(r) => Some(r.code()),
            _ => None,
        }
    }

    fn local(kind: io::ErrorKind, msg: impl Into<String>) -> ClientError {
        ClientError::Local(io::Error::new(kind, msg.into()))
    }
}

/// A human description of a response code, for messages.
pub fn describe_response(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::RegistrationOk => "1600 registration ok",
        ResponseCode::RegistrationFailed => "1601 registration failed (name already taken)",
        ResponseCode::KeyAccepted => "1602 public key received",
        ResponseCode::FileReceived => "1603 file received",
        ResponseCode::Ack => "1604 acknowledged",
        ResponseCode::ReconnectOk => "1605 reconnect ok",
        ResponseCode::ReconnectDenied => "1606 reconnect denied (unknown id, wrong name or no key on file)",
        ResponseCode::GeneralError => "1607 general error",
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) if self.is_timeout() => write!(f, "network timeout: {e}"),
            ClientError::Io(e) => write!(f, "network error: {e}"),
            ClientError::Refused(r) => write!(f, "server answered {}", describe_response(r.code())),
            ClientError::Protocol(m) => write!(f, "malformed reply from server: {m}"),
            ClientError::Crypto(m) => write!(f, "crypto error: {m}"),
            ClientError::Local(e) => write!(f, "{e}"),
            ClientError::FileChanged { expected, read } if read > expected => {
                write!(f, "file changed while being read: expected {expected} bytes, found more")
            }
            ClientError::FileChanged { expected, read } => {
                write!(f, "file changed while being read: expected {expected} bytes, got only {read}")
            }
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) | ClientError::Local(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

// ---------------------------------------------------------------------------
// Packet planning (pure)
// ---------------------------------------------------------------------------

/// How an upload is cut into packets. Pure arithmetic, no I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketPlan {
    pub convention: ContentSizeField,
    /// Content bytes per packet (plaintext chunk size for convention 3).
    pub packet_size: u64,
    /// Plaintext size of the whole file.
    pub orig_size: u64,
    /// Total content bytes over all packets (the whole ciphertext for
    /// conventions 1 and 2, the sum of the chunk ciphertexts for 3).
    pub wire_bytes: u64,
    pub total_packets: u16,
}

/// One packet of a [`PacketPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketSpec {
    /// 1-based packet number.
    pub number: u16,
    /// Offset of this packet's content in the concatenation of all contents.
    pub offset: u64,
    /// Content bytes of this packet.
    pub content_len: u64,
    /// Value of the `content_size` field.
    pub content_size_field: u32,
    /// Value of the `orig_file_size` field.
    pub orig_file_size_field: u32,
    /// Convention 3: plaintext bytes encrypted into this packet; otherwise 0.
    pub chunk_plain_len: u64,
}

impl PacketPlan {
    /// Plan the upload of `orig_size` plaintext bytes.
    pub fn new(
        orig_size: u64,
        packet_size: usize,
        convention: ContentSizeField,
    ) -> Result<PacketPlan, String> {
        if convention != ContentSizeField::PerPacketEncrypted {
            // Conventions 1 and 2 cut the whole-file ciphertext.
            let ct = crypto::ciphertext_len(orig_size);
            return Self::for_ciphertext(ct, orig_size, packet_size, convention);
        }
        let p = packet_size as u64;
        if p == 0 {
            return Err("packet size must be at least 1 byte".into());
        }
        let full = orig_size / p;
        let chunk_ct = crypto::ciphertext_len(p);
        let wire = full.saturating_mul(chunk_ct).saturating_add(crypto::ciphertext_len(orig_size % p));
        let max_content = if full > 0 { chunk_ct } else { crypto::ciphertext_len(orig_size) };
        Self::checked(convention, p, orig_size, wire, full + 1, max_content)
    }

    /// Plan the upload of an already encrypted whole-file ciphertext of
    /// `ct_len` bytes (conventions 1 and 2 only).
    pub fn for_ciphertext(
        ct_len: u64,
        orig_size: u64,
        packet_size: usize,
        convention: ContentSizeField,
    ) -> Result<PacketPlan, String> {
        let p = packet_size as u64;
        if p == 0 {
            return Err("packet size must be at least 1 byte".into());
        }
        if ct_len == 0 {
            return Err("ciphertext is empty".into());
        }
        let total = match convention {
            ContentSizeField::ThisPacket => ct_len.div_ceil(p),
            ContentSizeField::WholeFile => ct_len / p + 1,
            ContentSizeField::PerPacketEncrypted => {
                return Err("per-packet encryption needs the plaintext, not a whole-file ciphertext".into())
            }
        };
        Self::checked(convention, p, orig_size, ct_len, total, ct_len.min(p))
    }

    fn checked(
        convention: ContentSizeField,
        packet_size: u64,
        orig_size: u64,
        wire_bytes: u64,
        total: u64,
        max_content: u64,
    ) -> Result<PacketPlan, String> {
        if orig_size > u64::from(u32::MAX) || wire_bytes > u64::from(u32::MAX) {
            return Err(format!(
                "a file of {orig_size} bytes is too large for protocol v3 (sizes are 32-bit: at most 4 GiB of ciphertext)"
            ));
        }
        if max_content + PACKET_HEADER_LEN as u64 > u64::from(u32::MAX) {
            return Err(format!("packet of {max_content} bytes does not fit a 32-bit frame size"));
        }
        let total_packets = u16::try_from(total).map_err(|_| {
            format!(
                "{total} packets of {packet_size} bytes would be needed, more than the protocol's 65535; \
                 use a larger packet size"
            )
        })?;
        Ok(PacketPlan { convention, packet_size, orig_size, wire_bytes, total_packets })
    }

    /// The packet numbered `number` (1..=total_packets).
    pub fn packet(&self, number: u16) -> PacketSpec {
        debug_assert!(number >= 1 && number <= self.total_packets);
        let i = u64::from(number - 1);
        let p = self.packet_size;
        match self.convention {
            ContentSizeField::ThisPacket | ContentSizeField::WholeFile => {
                let offset = (i * p).min(self.wire_bytes);
                let content_len = p.min(self.wire_bytes - offset);
                let content_size_field = if self.convention == ContentSizeField::ThisPacket {
                    content_len as u32
                } else {
                    self.wire_bytes as u32
                };
                PacketSpec {
                    number,
                    offset,
                    content_len,
                    content_size_field,
                    orig_file_size_field: self.orig_size as u32,
                    chunk_plain_len: 0,
                }
            }
            ContentSizeField::PerPacketEncrypted => {
                let full = self.orig_size / p;
                let chunk_plain_len = if i < full { p } else { self.orig_size % p };
                let content_len = crypto::ciphertext_len(chunk_plain_len);
                PacketSpec {
                    number,
                    offset: i * crypto::ciphertext_len(p),
                    content_len,
                    content_size_field: content_len as u32,
                    orig_file_size_field: chunk_plain_len as u32,
                    chunk_plain_len,
                }
            }
        }
    }

    /// All packets in order.
    pub fn packets(&self) -> impl Iterator<Item = PacketSpec> + '_ {
        (1..=self.total_packets).map(|n| self.packet(n))
    }
}

// ---------------------------------------------------------------------------
// Streaming encryption of a source
// ---------------------------------------------------------------------------

/// Reads plaintext from a source, checksums and encrypts it, and hands out
/// exactly as many ciphertext bytes as asked. A "segment" is one run of
/// plaintext encrypted with its own IV and padding: the whole file for
/// conventions 1 and 2, one chunk for convention 3.
struct CipherSource<'a> {
    src: &'a mut dyn Read,
    key: [u8; AES_KEY_LEN],
    enc: Option<StreamEncryptor>,
    /// Plaintext bytes of the current segment not yet read.
    seg_remaining: u64,
    /// Plaintext bytes of the whole source not yet read.
    total_remaining: u64,
    expected: u64,
    plain: Vec<u8>,
    /// Ciphertext produced beyond what the last `fill` asked for (< 32 bytes).
    carry: Vec<u8>,
    cksum: Cksum,
}

impl<'a> CipherSource<'a> {
    fn new(src: &'a mut dyn Read, key: [u8; AES_KEY_LEN], size: u64, plain: Vec<u8>) -> Self {
        CipherSource {
            src,
            key,
            enc: None,
            seg_remaining: 0,
            total_remaining: size,
            expected: size,
            plain,
            carry: Vec::with_capacity(2 * crypto::BLOCK),
            cksum: Cksum::new(),
        }
    }

    fn start_segment(&mut self, plain_len: u64) {
        debug_assert!(self.enc.is_none() && self.carry.is_empty() && self.seg_remaining == 0);
        self.enc = Some(StreamEncryptor::new(&self.key));
        self.seg_remaining = plain_len;
    }

    fn plain_read(&self) -> u64 {
        self.expected - self.total_remaining
    }

    /// Append exactly `n` ciphertext bytes to `out`.
    fn fill(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), ClientError> {
        let target = out.len() + n;
        let take = n.min(self.carry.len());
        out.extend_from_slice(&self.carry[..take]);
        self.carry.drain(..take);
        while out.len() < target {
            let need = target - out.len();
            if self.enc.is_none() {
                return Err(ClientError::local(
                    io::ErrorKind::Other,
                    "internal error: packet plan exceeds ciphertext",
                ));
            }
            if self.seg_remaining > 0 {
                // Read only about what is needed, so the overshoot stays below two blocks.
                let r = (self.seg_remaining.min(self.plain.len() as u64) as usize).min(need + crypto::BLOCK);
                self.read_plain(r)?;
                self.cksum.update(&self.plain[..r]);
                self.seg_remaining -= r as u64;
                self.total_remaining -= r as u64;
                if let Some(enc) = self.enc.as_mut() {
                    enc.update(&self.plain[..r], out);
                }
            } else {
                if self.total_remaining == 0 {
                    self.probe_eof()?;
                }
                if let Some(enc) = self.enc.take() {
                    enc.finish(out);
                }
            }
        }
        if out.len() > target {
            self.carry.extend_from_slice(&out[target..]);
            out.truncate(target);
        }
        Ok(())
    }

    /// Fill `self.plain[..r]` from the source; a short source is a changed file.
    fn read_plain(&mut self, r: usize) -> Result<(), ClientError> {
        let mut got = 0;
        while got < r {
            match self.src.read(&mut self.plain[got..r]) {
                Ok(0) => {
                    return Err(ClientError::FileChanged {
                        expected: self.expected,
                        read: self.plain_read() + got as u64,
                    })
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Local(e)),
            }
        }
        Ok(())
    }

    /// After the announced size: the source must be at its end.
    fn probe_eof(&mut self) -> Result<(), ClientError> {
        let mut b = [0u8; 1];
        loop {
            match self.src.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(ClientError::FileChanged { expected: self.expected, read: self.expected + 1 })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Local(e)),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// One connection to a protocol-v3 server.
pub struct Client {
    stream: TcpStream,
    id: ClientId,
    aes_key: Option<[u8; AES_KEY_LEN]>,
    oaep_hash: OaepHash,
    /// Reused frame buffer: header + packet content.
    buf: Vec<u8>,
    /// Reused plaintext read buffer.
    plain: Vec<u8>,
    /// False while a request is half sent or a response half read, or after
    /// an error did that: the framing is lost.
    in_step: bool,
    /// A 1030 was sent without waiting for 1604: one 1604 before the next
    /// 1603 is the known behaviour of some servers and is skipped.
    tolerate_ack: bool,
    last_upload: Option<Uploaded>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.stream.peer_addr().ok())
            .field("id", &crate::protocol::id_hex(&self.id))
            .field("has_key", &self.aes_key.is_some())
            .field("in_step", &self.in_step)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connect to `addr` (each resolved address in turn, each with the
    /// connect timeout) and set the read/write timeouts.
    pub fn connect(addr: impl ToSocketAddrs, opts: &ClientOptions) -> Result<Client, ClientError> {
        let mut last_err = None;
        let addrs = addr.to_socket_addrs()?;
        for a in addrs {
            match TcpStream::connect_timeout(&a, opts.connect_timeout) {
                Ok(stream) => return Client::from_stream(stream, opts),
                Err(e) => last_err = Some(e),
            }
        }
        Err(ClientError::Io(last_err.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "address resolved to no socket address")
        })))
    }

    /// Wrap an already connected stream (sets timeouts and TCP_NODELAY).
    pub fn from_stream(stream: TcpStream, opts: &ClientOptions) -> Result<Client, ClientError> {
        let t = (!opts.read_timeout.is_zero()).then_some(opts.read_timeout);
        stream.set_read_timeout(t)?;
        stream.set_write_timeout(t)?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            id: [0; 16],
            aes_key: None,
            oaep_hash: opts.oaep_hash,
            buf: Vec::new(),
            plain: Vec::new(),
            in_step: true,
            tolerate_ack: false,
            last_upload: None,
        })
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn set_id(&mut self, id: ClientId) {
        self.id = id;
    }

    /// The session AES key, once received (1602 or 1605).
    pub fn aes_key(&self) -> Option<&[u8; AES_KEY_LEN]> {
        self.aes_key.as_ref()
    }

    /// Set the session key by hand (tests against fake servers).
    pub fn set_aes_key(&mut self, key: Option<[u8; AES_KEY_LEN]>) {
        self.aes_key = key;
    }

    /// False after an error left a request half sent or a response half read:
    /// this connection cannot be used further; open a new one.
    pub fn is_in_step(&self) -> bool {
        self.in_step
    }

    /// The 1603 of the last upload on this connection (also after a cksum mismatch).
    pub fn last_upload(&self) -> Option<&Uploaded> {
        self.last_upload.as_ref()
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Whether the server has closed the connection (or sent bytes nobody
    /// asked for): checked without blocking, e.g. before retrying on this
    /// connection after a 1607.
    pub fn is_peer_closed(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut b = [0u8; 1];
        let closed = match self.stream.peek(&mut b) {
            Ok(_) => true, // 0: EOF; >0: an unexpected reply, the framing is lost
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        };
        closed || self.stream.set_nonblocking(false).is_err()
    }

    // -- raw access ---------------------------------------------------------

    /// Write raw bytes to the socket.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(|e| {
            self.in_step = false;
            ClientError::Io(e)
        })
    }

    /// Encode and send one request frame with the client's id in the header.
    pub fn send_frame(&mut self, code: Code, payload_parts: &[&[u8]]) -> Result<(), ClientError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        encode_frame(&self.id, code, payload_parts, &mut buf);
        let r = self.send_raw(&buf);
        self.buf = buf;
        r
    }

    /// Read one response frame. Refuses (without reading it) a payload larger
    /// than [`MAX_RESPONSE_PAYLOAD`]; a malformed reply is a `Protocol` error.
    pub fn read_response(&mut self) -> Result<Response, ClientError> {
        let r = self.read_response_inner();
        if r.is_err() {
            self.in_step = false;
        }
        r
    }

    fn read_response_inner(&mut self) -> Result<Response, ClientError> {
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        read_exact_net(&mut self.stream, &mut h)?;
        let header = ResponseHeader::decode(&h);
        if header.version != VERSION {
            return Err(ClientError::Protocol(format!(
                "response version {} (expected {VERSION}), code {}",
                header.version, header.code
            )));
        }
        if header.payload_size > MAX_RESPONSE_PAYLOAD {
            return Err(ClientError::Protocol(format!(
                "response code {} announces a {}-byte payload (limit {MAX_RESPONSE_PAYLOAD})",
                header.code, header.payload_size
            )));
        }
        let mut payload = vec![0u8; header.payload_size as usize];
        read_exact_net(&mut self.stream, &mut payload)?;
        Response::decode(&header, &payload).ok_or_else(|| {
            ClientError::Protocol(format!(
                "response code {} with a {}-byte payload does not fit any known response",
                header.code, header.payload_size
            ))
        })
    }

    /// Send a request whose payload is one name field, and read the response.
    fn name_request(&mut self, code: Code, name: &str) -> Result<Response, ClientError> {
        let field = name_field(name)?;
        self.in_step = false;
        self.send_frame(code, &[&field.0])?;
        let resp = self.read_response()?;
        self.in_step = true;
        Ok(resp)
    }

    // -- identity -----------------------------------------------------------

    /// 1025: register `name`. On 1600 the new id is stored and returned;
    /// 1601 (name taken) and anything else are `Refused`.
    pub fn register(&mut self, name: &str) -> Result<ClientId, ClientError> {
        // The header id is ignored for 1025; send zeros as the protocol says.
        self.id = [0; 16];
        match self.name_request(Code::Register, name)? {
            Response::RegistrationOk { id } => {
                self.id = id;
                Ok(id)
            }
            other => Err(ClientError::Refused(other)),
        }
    }

    /// 1026: send the public part of `key` (SPKI DER); on 1602 decrypt and
    /// store the session key.
    pub fn send_public_key(&mut self, name: &str, key: &RsaPrivateKey) -> Result<(), ClientError> {
        let field = name_field(name)?;
        let der = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| ClientError::Crypto(format!("cannot encode public key: {e}")))?;
        self.in_step = false;
        self.send_frame(Code::PublicKey, &[&field.0, der.as_bytes()])?;
        let resp = self.read_response()?;
        self.in_step = true;
        match resp {
            Response::KeyAccepted { encrypted_key, .. } => {
                self.aes_key = Some(self.decrypt_key(key, &encrypted_key)?);
                Ok(())
            }
            other => Err(ClientError::Refused(other)),
        }
    }

    /// 1027: reconnect as `id`/`name`; on 1605 decrypt and store the new
    /// session key. 1606 and anything else are `Refused`.
    pub fn reconnect(&mut self, id: ClientId, name: &str, key: &RsaPrivateKey) -> Result<(), ClientError> {
        self.id = id;
        match self.name_request(Code::Reconnect, name)? {
            Response::ReconnectOk { encrypted_key, .. } => {
                self.aes_key = Some(self.decrypt_key(key, &encrypted_key)?);
                Ok(())
            }
            other => Err(ClientError::Refused(other)),
        }
    }

    fn decrypt_key(&self, key: &RsaPrivateKey, ct: &[u8]) -> Result<[u8; AES_KEY_LEN], ClientError> {
        let first = self.oaep_hash;
        let other = match first {
            OaepHash::Sha1 => OaepHash::Sha256,
            OaepHash::Sha256 => OaepHash::Sha1,
        };
        // OAEP checks the label hash, so a wrong guess fails cleanly; trying the
        // other hash lets us talk to servers configured either way.
        crypto::decrypt_session_key(key, ct, first)
            .or_else(|_| crypto::decrypt_session_key(key, ct, other))
            .map_err(|e| {
                ClientError::Crypto(format!(
                    "cannot decrypt the {}-byte session key from the server with RSA-OAEP ({first} or {other}): {e}",
                    ct.len()
                ))
            })
    }

    // -- uploads ------------------------------------------------------------

    /// Encrypt (streaming, O(packet) memory) and send `size` bytes from `src`
    /// as packets; read the 1603; return what the server said plus the local
    /// cksum. `src` must yield exactly `size` bytes, otherwise
    /// [`ClientError::FileChanged`] is returned before the last packet is sent.
    pub fn upload(
        &mut self,
        file_name: &str,
        src: &mut dyn Read,
        size: u64,
        opts: &UploadOptions,
    ) -> Result<Uploaded, ClientError> {
        self.upload_with_progress(file_name, src, size, opts, &mut |_| {})
    }

    /// [`upload`](Self::upload) calling `progress` after each packet with the
    /// number of plaintext bytes read so far.
    pub fn upload_with_progress(
        &mut self,
        file_name: &str,
        src: &mut dyn Read,
        size: u64,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Uploaded, ClientError> {
        let key = *self.aes_key.as_ref().ok_or_else(no_key)?;
        let name = name_field(file_name)?;
        let plan = PacketPlan::new(size, opts.packet_size, opts.content_size)
            .map_err(|m| ClientError::local(io::ErrorKind::InvalidInput, m))?;

        let mut plain = std::mem::take(&mut self.plain);
        plain.resize(READ_CHUNK, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let mut source = CipherSource::new(src, key, size, plain);
        let result = self.send_packets(&plan, &name, &mut buf, &mut source, progress);
        let local_cksum = source.cksum.clone().finalize();
        self.plain = std::mem::take(&mut source.plain);
        self.buf = buf;
        result?;
        self.finish_upload(local_cksum)
    }

    fn send_packets(
        &mut self,
        plan: &PacketPlan,
        name: &NameField,
        buf: &mut Vec<u8>,
        source: &mut CipherSource<'_>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ClientError> {
        let per_packet = plan.convention == ContentSizeField::PerPacketEncrypted;
        if !per_packet {
            source.start_segment(plan.orig_size);
        }
        let cap = REQUEST_HEADER_LEN
            + PACKET_HEADER_LEN
            + (plan.wire_bytes.min(plan.packet_size) as usize).min(STREAM_CHUNK);
        buf.clear();
        buf.reserve(cap);
        for spec in plan.packets() {
            if per_packet {
                source.start_segment(spec.chunk_plain_len);
            }
            buf.clear();
            self.push_packet_header(buf, plan, &spec, name);
            let mut rem = spec.content_len as usize;
            loop {
                let take = rem.min(STREAM_CHUNK);
                source.fill(buf, take)?;
                rem -= take;
                if rem == 0 {
                    break;
                }
                self.in_step = false;
                self.send_raw(buf)?;
                buf.clear();
            }
            self.in_step = false;
            self.send_raw(buf)?;
            progress(source.plain_read());
        }
        // Every plaintext byte must have been consumed (the plan guarantees it).
        if source.total_remaining != 0 || source.enc.is_some() || !source.carry.is_empty() {
            return Err(ClientError::local(
                io::ErrorKind::Other,
                "internal error: packet plan does not cover the file",
            ));
        }
        Ok(())
    }

    fn push_packet_header(&self, buf: &mut Vec<u8>, plan: &PacketPlan, spec: &PacketSpec, name: &NameField) {
        let header = RequestHeader {
            client_id: self.id,
            version: VERSION,
            code: Code::FilePacket.as_u16(),
            payload_size: (PACKET_HEADER_LEN as u64 + spec.content_len) as u32,
        };
        buf.extend_from_slice(&header.encode());
        PacketHeader {
            content_size: spec.content_size_field,
            orig_file_size: spec.orig_file_size_field,
            packet_number: spec.number,
            total_packets: plan.total_packets,
            file_name: name.clone(),
        }
        .encode(buf);
    }

    /// Read the 1603 that ends an upload (skipping one 1604 after an
    /// unacknowledged 1030).
    fn finish_upload(&mut self, local_cksum: u32) -> Result<Uploaded, ClientError> {
        self.in_step = false;
        loop {
            let resp = self.read_response()?;
            match resp {
                Response::Ack { .. } if self.tolerate_ack => self.tolerate_ack = false,
                Response::FileReceived { content_size, file_name, cksum, .. } => {
                    self.in_step = true;
                    self.tolerate_ack = false;
                    let up = Uploaded {
                        server_cksum: cksum,
                        local_cksum,
                        content_size,
                        file_name_field: file_name,
                    };
                    self.last_upload = Some(up.clone());
                    return Ok(up);
                }
                other => {
                    self.in_step = true;
                    self.tolerate_ack = false;
                    return Err(ClientError::Refused(other));
                }
            }
        }
    }

    /// [`upload`](Self::upload) from memory.
    pub fn upload_bytes(
        &mut self,
        file_name: &str,
        data: &[u8],
        opts: &UploadOptions,
    ) -> Result<Uploaded, ClientError> {
        let mut src = data;
        self.upload(file_name, &mut src, data.len() as u64, opts)
    }

    /// Send an already-encrypted whole-file ciphertext (benchmarks: encrypt
    /// once, send many times). Conventions 1 and 2 only. `local_cksum` is
    /// returned as is in [`Uploaded::local_cksum`].
    pub fn upload_ciphertext(
        &mut self,
        file_name: &str,
        ciphertext: &[u8],
        orig_size: u64,
        local_cksum: u32,
        opts: &UploadOptions,
    ) -> Result<Uploaded, ClientError> {
        let name = name_field(file_name)?;
        let plan = PacketPlan::for_ciphertext(
            ciphertext.len() as u64,
            orig_size,
            opts.packet_size,
            opts.content_size,
        )
        .map_err(|m| ClientError::local(io::ErrorKind::InvalidInput, m))?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut result = Ok(());
        for spec in plan.packets() {
            buf.clear();
            self.push_packet_header(&mut buf, &plan, &spec, &name);
            let start = spec.offset as usize;
            buf.extend_from_slice(&ciphertext[start..start + spec.content_len as usize]);
            self.in_step = false;
            result = self.send_raw(&buf);
            if result.is_err() {
                break;
            }
        }
        self.buf = buf;
        result?;
        self.finish_upload(local_cksum)
    }

    /// 1029: the checksum matched; expects 1604.
    pub fn crc_ok(&mut self, file_name: &str) -> Result<(), ClientError> {
        ack_or_refused(self.name_request(Code::CrcOk, file_name)?)
    }

    /// 1030: the checksum did not match, the file follows again. Reads a 1604
    /// only if `expect_ack`; otherwise a 1604 arriving before the next 1603
    /// is skipped.
    pub fn crc_retry(&mut self, file_name: &str, expect_ack: bool) -> Result<(), ClientError> {
        if expect_ack {
            return ack_or_refused(self.name_request(Code::CrcRetry, file_name)?);
        }
        let field = name_field(file_name)?;
        self.send_frame(Code::CrcRetry, &[&field.0])?;
        self.tolerate_ack = true;
        Ok(())
    }

    /// 1031: give up on the file; expects 1604.
    pub fn crc_abort(&mut self, file_name: &str) -> Result<(), ClientError> {
        ack_or_refused(self.name_request(Code::CrcAbort, file_name)?)
    }

    /// The whole flow of one file: upload, compare checksums; on a mismatch
    /// send 1030 and upload again ([`MAX_ATTEMPTS`] attempts in all), then
    /// 1031. `progress` gets the plaintext bytes read so far in the current
    /// attempt.
    pub fn send_file(
        &mut self,
        file_name: &str,
        path: &Path,
        opts: &UploadOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<SendOutcome, ClientError> {
        let mut file = File::open(path)
            .map_err(|e| ClientError::local(e.kind(), format!("cannot open {}: {e}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(|e| ClientError::local(e.kind(), format!("cannot stat {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(ClientError::local(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        let size = meta.len();
        // Check the name and the plan before touching the connection.
        name_field(file_name)?;
        PacketPlan::new(size, opts.packet_size, opts.content_size)
            .map_err(|m| ClientError::local(io::ErrorKind::InvalidInput, m))?;
        for attempt in 1..=MAX_ATTEMPTS {
            if attempt > 1 {
                self.crc_retry(file_name, opts.ack_retry)?;
                file.seek(SeekFrom::Start(0)).map_err(ClientError::Local)?;
            }
            let up = self.upload_with_progress(file_name, &mut file, size, opts, progress)?;
            if up.cksum_matches() {
                self.crc_ok(file_name)?;
                return Ok(SendOutcome::Verified { cksum: up.local_cksum, attempts: attempt });
            }
        }
        self.crc_abort(file_name)?;
        Ok(SendOutcome::CksumMismatch { attempts: MAX_ATTEMPTS })
    }
}

fn ack_or_refused(resp: Response) -> Result<(), ClientError> {
    match resp {
        Response::Ack { .. } => Ok(()),
        other => Err(ClientError::Refused(other)),
    }
}

fn no_key() -> ClientError {
    ClientError::Crypto("no session key yet: send the public key (1026) or reconnect (1027) first".into())
}

/// A name as a 255-byte field, or a local error if it cannot be one.
pub fn name_field(name: &str) -> Result<NameField, ClientError> {
    NameField::from_name(name.as_bytes()).ok_or_else(|| {
        ClientError::local(
            io::ErrorKind::InvalidInput,
            format!("name {name:?} cannot be sent: at most 254 bytes and no NUL byte"),
        )
    })
}

/// `read_exact` on the socket, with a clear error when the server closes.
fn read_exact_net(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), ClientError> {
    stream.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ClientError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"))
        } else {
            ClientError::Io(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{ciphertext_len, encrypt_all, StreamDecryptor};
    use proptest::prelude::*;

    const MIB: usize = 1024 * 1024;

    fn lens(plan: &PacketPlan) -> Vec<u64> {
        plan.packets().map(|p| p.content_len).collect()
    }

    /// Invariants every plan must satisfy.
    fn check_plan(plan: &PacketPlan) {
        let mut offset = 0;
        let mut plain = 0;
        for (i, p) in plan.packets().enumerate() {
            assert_eq!(p.number as usize, i + 1);
            assert_eq!(p.offset, offset, "contiguous contents");
            offset += p.content_len;
            assert!(p.content_len + PACKET_HEADER_LEN as u64 <= u64::from(u32::MAX));
            match plan.convention {
                ContentSizeField::ThisPacket => {
                    assert!(p.content_len > 0 && p.content_len <= plan.packet_size);
                    assert_eq!(u64::from(p.content_size_field), p.content_len);
                    assert_eq!(u64::from(p.orig_file_size_field), plan.orig_size);
                }
                ContentSizeField::WholeFile => {
                    assert!(p.content_len <= plan.packet_size);
                    assert_eq!(u64::from(p.content_size_field), plan.wire_bytes);
                    assert_eq!(u64::from(p.orig_file_size_field), plan.orig_size);
                    if p.number < plan.total_packets {
                        assert_eq!(p.content_len, plan.packet_size);
                    }
                }
                ContentSizeField::PerPacketEncrypted => {
                    assert_eq!(p.content_len, ciphertext_len(p.chunk_plain_len));
                    assert_eq!(u64::from(p.orig_file_size_field), p.chunk_plain_len);
                    assert!(p.chunk_plain_len <= plan.packet_size);
                    plain += p.chunk_plain_len;
                }
            }
        }
        assert_eq!(offset, plan.wire_bytes, "contents add up to the wire bytes");
        if plan.convention == ContentSizeField::PerPacketEncrypted {
            assert_eq!(plain, plan.orig_size);
        } else {
            assert_eq!(plan.wire_bytes, ciphertext_len(plan.orig_size));
        }
    }

    #[test]
    fn convention_1_splits() {
        let p = PacketPlan::new(0, MIB, ContentSizeField::ThisPacket).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (1, vec![16]));
        let p = PacketPlan::new(MIB as u64, MIB, ContentSizeField::ThisPacket).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (2, vec![MIB as u64, 16]));
        let p = PacketPlan::new(MIB as u64 - 1, MIB, ContentSizeField::ThisPacket).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (1, vec![MIB as u64]));
        let p = PacketPlan::new(100, 1000, ContentSizeField::ThisPacket).unwrap();
        assert_eq!(lens(&p), vec![112]);
        // Boundaries need not fall on blocks.
        let p = PacketPlan::new(100, 50, ContentSizeField::ThisPacket).unwrap();
        assert_eq!(lens(&p), vec![50, 50, 12]);
        assert_eq!(p.packet(2).offset, 50);
        assert_eq!(p.packet(3).content_size_field, 12);
        assert_eq!(p.packet(3).orig_file_size_field, 100);
        check_plan(&p);
    }

    #[test]
    fn convention_2_splits() {
        // 2032 bytes of plaintext -> 2048 of ciphertext, a multiple of 1024: empty last packet.
        let p = PacketPlan::new(2032, 1024, ContentSizeField::WholeFile).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (3, vec![1024, 1024, 0]));
        assert!(p.packets().all(|s| s.content_size_field == 2048 && s.orig_file_size_field == 2032));
        let p = PacketPlan::new(2048, 1024, ContentSizeField::WholeFile).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (3, vec![1024, 1024, 16]));
        let p = PacketPlan::new(0, 1024, ContentSizeField::WholeFile).unwrap();
        assert_eq!(lens(&p), vec![16]);
        let p = PacketPlan::new(0, 16, ContentSizeField::WholeFile).unwrap();
        assert_eq!(lens(&p), vec![16, 0]);
        check_plan(&p);
    }

    #[test]
    fn convention_3_splits() {
        let p = PacketPlan::new(8000, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (3, vec![4016, 4016, 16]));
        let orig: Vec<u32> = p.packets().map(|s| s.orig_file_size_field).collect();
        assert_eq!(orig, vec![4000, 4000, 0]);
        let p = PacketPlan::new(8001, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!(lens(&p), vec![4016, 4016, 16]);
        assert_eq!(p.packet(3).orig_file_size_field, 1);
        let p = PacketPlan::new(0, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!((p.total_packets, lens(&p)), (1, vec![16]));
        let p = PacketPlan::new(3999, 4000, ContentSizeField::PerPacketEncrypted).unwrap();
        assert_eq!(lens(&p), vec![4000]);
        assert_eq!(p.wire_bytes, 4000);
        check_plan(&p);
    }

    #[test]
    fn refusals() {
        assert!(PacketPlan::new(10, 0, ContentSizeField::ThisPacket).is_err());
        // 65535 packets are fine, 65536 are not.
        assert_eq!(
            PacketPlan::new(65535 * 16 - 16, 16, ContentSizeField::ThisPacket).unwrap().total_packets,
            65535
        );
        let e = PacketPlan::new(65535 * 16, 16, ContentSizeField::ThisPacket).unwrap_err();
        assert!(e.contains("65535"), "{e}");
        assert!(PacketPlan::new(65535 * 16 - 32, 16, ContentSizeField::WholeFile).is_ok());
        assert!(PacketPlan::new(65535 * 16 - 16, 16, ContentSizeField::WholeFile).is_err());
        assert!(PacketPlan::new(1 << 32, usize::MAX, ContentSizeField::ThisPacket).is_err());
        assert!(
            PacketPlan::new(u64::from(u32::MAX) - 16, usize::MAX >> 1, ContentSizeField::ThisPacket).is_err()
        );
        assert!(PacketPlan::for_ciphertext(32, 16, 10, ContentSizeField::PerPacketEncrypted).is_err());
        assert!(PacketPlan::for_ciphertext(0, 0, 10, ContentSizeField::ThisPacket).is_err());
        let p = PacketPlan::for_ciphertext(48, 40, 20, ContentSizeField::ThisPacket).unwrap();
        assert_eq!(lens(&p), vec![20, 20, 8]);
    }

    /// Drive `CipherSource` along a plan, as `send_packets` does, and return the contents.
    fn contents(data: &[u8], key: &[u8; 32], plan: &PacketPlan) -> Result<(Vec<Vec<u8>>, u32), ClientError> {
        let mut src = data;
        let mut source = CipherSource::new(&mut src, *key, plan.orig_size, vec![0; 4096]);
        if plan.convention != ContentSizeField::PerPacketEncrypted {
            source.start_segment(plan.orig_size);
        }
        let mut out = Vec::new();
        for spec in plan.packets() {
            if plan.convention == ContentSizeField::PerPacketEncrypted {
                source.start_segment(spec.chunk_plain_len);
            }
            let mut buf = Vec::new();
            // Fill in uneven pieces, like big packets are.
            let mut rem = spec.content_len as usize;
            while rem > 0 {
                let take = rem.min(37);
                source.fill(&mut buf, take)?;
                rem -= take;
            }
            assert_eq!(buf.len() as u64, spec.content_len);
            out.push(buf);
        }
        assert!(source.enc.is_none() && source.carry.is_empty() && source.total_remaining == 0);
        Ok((out, source.cksum.finalize()))
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(9) as u8).collect()
    }

    #[test]
    fn streaming_matches_whole_file_encryption() {
        let key = [7u8; 32];
        for len in [0, 1, 15, 16, 17, 100, 1000, 4096, 10_000] {
            let data = sample(len);
            let ct = encrypt_all(&key, &data);
            for p in [1, 7, 16, 100, 1024, 100_000] {
                for conv in [ContentSizeField::ThisPacket, ContentSizeField::WholeFile] {
                    let Ok(plan) = PacketPlan::new(len as u64, p, conv) else { continue };
                    let (parts, ck) = contents(&data, &key, &plan).unwrap();
                    assert_eq!(parts.concat(), ct, "len {len} p {p} {conv:?}");
                    assert_eq!(ck, crypto::cksum(&data));
                }
                let plan = PacketPlan::new(len as u64, p, ContentSizeField::PerPacketEncrypted).unwrap();
                let (parts, ck) = contents(&data, &key, &plan).unwrap();
                assert_eq!(ck, crypto::cksum(&data));
                let chunks: Vec<&[u8]> = if data.is_empty() { vec![] } else { data.chunks(p).collect() };
                for (i, part) in parts.iter().enumerate() {
                    let chunk = chunks.get(i).copied().unwrap_or(&[]);
                    assert_eq!(part, &encrypt_all(&key, chunk), "len {len} p {p} chunk {i}");
                }
            }
        }
    }

    #[test]
    fn size_changes_are_detected() {
        let key = [1u8; 32];
        let data = sample(1000);
        let plan = PacketPlan::new(1001, 256, ContentSizeField::ThisPacket).unwrap();
        match contents(&data, &key, &plan) {
            Err(ClientError::FileChanged { expected: 1001, read: 1000 }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        let plan = PacketPlan::new(999, 256, ContentSizeField::ThisPacket).unwrap();
        match contents(&data, &key, &plan) {
            Err(ClientError::FileChanged { expected: 999, read: 1000 }) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        let plan = PacketPlan::new(999, 333, ContentSizeField::PerPacketEncrypted).unwrap();
        assert!(matches!(contents(&data, &key, &plan), Err(ClientError::FileChanged { .. })));
    }

    #[test]
    fn decrypts_back() {
        let key = [9u8; 32];
        let data = sample(5000);
        let plan = PacketPlan::new(5000, 333, ContentSizeField::ThisPacket).unwrap();
        let (parts, _) = contents(&data, &key, &plan).unwrap();
        let mut dec = StreamDecryptor::new(&key);
        let mut back = Vec::new();
        for mut part in parts {
            dec.update(&mut part, |b| back.extend_from_slice(b));
        }
        dec.finish(|b| back.extend_from_slice(b)).unwrap();
        assert_eq!(back, data);
    }

    /// A scripted server on a thread: registers, accepts a key, receives
    /// files (answering a wrong cksum `wrong` times first), acks 1029/1031.
    /// Returns the requests it saw (code, packet header if any) and the files.
    fn fake_server(wrong: u32, ack_retry: bool) -> (std::net::SocketAddr, std::thread::JoinHandle<Vec<u16>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let id = [0xab; 16];
            let mut aes = [0u8; 32];
            let mut seen = Vec::new();
            let mut wrong_left = wrong;
            let mut dec: Option<(StreamDecryptor, Cksum, u32)> = None;
            loop {
                let mut h = [0u8; REQUEST_HEADER_LEN];
                if s.read_exact(&mut h).is_err() {
                    return seen;
                }
                let hdr = RequestHeader::decode(&h);
                let mut payload = vec![0u8; hdr.payload_size as usize];
                s.read_exact(&mut payload).unwrap();
                seen.push(hdr.code);
                let mut out = Vec::new();
                match hdr.code {
                    1025 => Response::RegistrationOk { id }.encode(&mut out),
                    1026 => {
                        let (pk, _) = crypto::parse_public_key(&payload[NAME_FIELD_LEN..]).unwrap();
                        aes = crypto::random_aes_key();
                        let encrypted_key = crypto::encrypt_session_key(&pk, &aes, OaepHash::Sha256).unwrap();
                        Response::KeyAccepted { id, encrypted_key }.encode(&mut out)
                    }
                    1028 => {
                        assert_eq!(hdr.client_id, id);
                        let ph = PacketHeader::decode(&payload).unwrap();
                        let (d, ck, total) =
                            dec.get_or_insert_with(|| (StreamDecryptor::new(&aes), Cksum::new(), 0));
                        *total += (payload.len() - PACKET_HEADER_LEN) as u32;
                        d.update(&mut payload[PACKET_HEADER_LEN..], |b| ck.update(b));
                        if ph.packet_number == ph.total_packets {
                            let (d, mut ck, total) = dec.take().unwrap();
                            d.finish(|b| ck.update(b)).unwrap();
                            let mut cksum = ck.finalize();
                            if wrong_left > 0 && ph.file_name.bytes() == b"f.bin" {
                                wrong_left -= 1;
                                cksum ^= 1;
                            }
                            let file_name = ph.file_name.0;
                            Response::FileReceived { id, content_size: total, file_name, cksum }
                                .encode(&mut out)
                        }
                    }
                    1030 if ack_retry => Response::Ack { id }.encode(&mut out),
                    1030 => {}
                    1029 | 1031 => Response::Ack { id }.encode(&mut out),
                    _ => Response::GeneralError.encode(&mut out),
                }
                s.write_all(&out).unwrap();
            }
        });
        (addr, h)
    }

    fn test_key() -> RsaPrivateKey {
        RsaPrivateKey::new(&mut rand::rngs::OsRng, 1024).unwrap()
    }

    #[test]
    fn full_flow_against_fake_server() {
        let key = test_key();
        for (wrong, ack_retry, tell) in
            [(0, false, false), (1, false, false), (2, true, true), (1, true, false), (5, false, false)]
        {
            let (addr, h) = fake_server(wrong, ack_retry);
            let mut c = Client::connect(addr, &ClientOptions::default()).unwrap();
            assert_eq!(c.register("alice").unwrap(), [0xab; 16]);
            // The server encrypts with SHA-256: the client falls back from SHA-1.
            c.send_public_key("alice", &key).unwrap();
            assert!(c.aes_key().is_some());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.bin");
            let data = sample(300_000);
            std::fs::write(&path, &data).unwrap();
            let opts = UploadOptions { packet_size: 65536, ack_retry: tell, ..Default::default() };
            let mut last = 0;
            let out = c.send_file("f.bin", &path, &opts, &mut |n| last = n).unwrap();
            assert_eq!(last, 300_000);
            if wrong >= MAX_ATTEMPTS {
                assert_eq!(out, SendOutcome::CksumMismatch { attempts: 3 });
            } else {
                assert_eq!(out, SendOutcome::Verified { cksum: crypto::cksum(&data), attempts: wrong + 1 });
            }
            // The connection is still usable.
            let up = c.upload_bytes("g", b"hello", &UploadOptions::default()).unwrap();
            assert!(up.cksum_matches());
            assert_eq!(up.content_size, 16);
            c.crc_ok("g").unwrap();
            assert!(c.is_in_step());
            drop(c);
            let seen = h.join().unwrap();
            let n = 5; // 300_000 / 65536 -> 5 packets
            let mut expect = vec![1025, 1026];
            for a in 0..(wrong + 1).min(3) {
                if a > 0 {
                    expect.push(1030);
                }
                expect.extend(std::iter::repeat_n(1028, n));
            }
            expect.push(if wrong >= 3 { 1031 } else { 1029 });
            expect.extend([1028, 1029]);
            assert_eq!(seen, expect, "wrong={wrong}");
        }
    }

    #[test]
    fn refusals_and_bounds_from_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut b = vec![0u8; REQUEST_HEADER_LEN + NAME_FIELD_LEN];
            s.read_exact(&mut b).unwrap();
            let mut out = Vec::new();
            Response::RegistrationFailed.encode(&mut out);
            s.write_all(&out).unwrap();
            s.read_exact(&mut b).unwrap();
            // A response announcing a huge payload.
            s.write_all(&[3, 0x40, 0x06, 0, 0, 0, 1]).unwrap();
        });
        let mut c = Client::connect(addr, &ClientOptions::default()).unwrap();
        match c.register("bob") {
            Err(ClientError::Refused(Response::RegistrationFailed)) => {}
            other => panic!("{other:?}"),
        }
        assert!(c.is_in_step());
        match c.register("bob") {
            Err(ClientError::Protocol(m)) => assert!(m.contains("16777216"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(!c.is_in_step());
        h.join().unwrap();
        match c.read_response() {
            Err(e) => assert!(e.is_network(), "{e}"),
            Ok(r) => panic!("{r:?}"),
        }
        // Nobody listening.
        let e = Client::connect(addr, &ClientOptions::default()).unwrap_err();
        assert!(e.is_network());
    }

    proptest! {
        #[test]
        fn plans_are_consistent(size in 0u64..5_000_000, p in 1usize..3_000_000, conv in 0u8..3) {
            let conv = [ContentSizeField::ThisPacket, ContentSizeField::WholeFile,
                        ContentSizeField::PerPacketEncrypted][conv as usize];
            if let Ok(plan) = PacketPlan::new(size, p, conv) {
                check_plan(&plan);
                let ct = ciphertext_len(size);
                let p64 = p as u64;
                let expect = match conv {
                    ContentSizeField::ThisPacket => ct.div_ceil(p64),
                    ContentSizeField::WholeFile => ct / p64 + 1,
                    ContentSizeField::PerPacketEncrypted => size / p64 + 1,
                };
                prop_assert_eq!(u64::from(plan.total_packets), expect);
            } else {
                let n = match conv {
                    ContentSizeField::ThisPacket => ciphertext_len(size).div_ceil(p as u64),
                    ContentSizeField::WholeFile => ciphertext_len(size) / p as u64 + 1,
                    ContentSizeField::PerPacketEncrypted => size / p as u64 + 1,
                };
                prop_assert!(n > 65535);
            }
        }
    }
}
