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
mod error;
pub mod exclude;
pub mod identity;
mod plan;
pub mod record;
pub mod report;
pub mod walk;

pub use error::{describe_response, ClientError};
use plan::CipherSource;
pub use plan::{PacketPlan, PacketSpec};

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use rsa::pkcs8::EncodePublicKey;
use rsa::RsaPrivateKey;

use crate::crypto::{self, OaepHash, AES_KEY_LEN};
use crate::protocol::{
    encode_frame, ClientId, Code, NameField, PacketHeader, RequestHeader, Response, ResponseHeader,
    NAME_FIELD_LEN, PACKET_HEADER_LEN, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, VERSION,
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
mod tests;
