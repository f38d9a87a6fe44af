//! Blocking protocol-v3 client over `std::net`, used by the `backup-client`
//! binary, the end-to-end tests and the benchmarks.
//!
//! One [`Client`] is one TCP connection. Requests are written as whole frames
//! (a single `write_all` each); responses are read with a bounded payload
//! (64 KiB) so a hostile or broken server cannot make the client allocate
//! without limit.
//!
//! File uploads (`upload.rs`) are streamed: the plaintext is read in 256 KiB pieces,
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
mod retry;
mod run;
mod ui;
mod upload;
pub mod walk;

pub use error::{describe_response, ClientError};
pub use plan::{PacketPlan, PacketSpec};
pub use upload::{ContentSizeField, SendOutcome, UploadOptions, Uploaded};

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use rsa::pkcs8::EncodePublicKey;
use rsa::RsaPrivateKey;

use crate::crypto::{self, OaepHash, AES_KEY_LEN};
use crate::protocol::{
    encode_frame, ClientId, Code, NameField, Response, ResponseHeader, RESPONSE_HEADER_LEN, VERSION,
};

/// Largest response payload accepted. The largest legitimate one is a
/// 1602/1605 carrying an RSA-4096 ciphertext (16 + 512 bytes); anything far
/// beyond that is a broken or hostile server.
pub const MAX_RESPONSE_PAYLOAD: u32 = 64 * 1024;

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

// ---------------------------------------------------------------------------
// The connection (its uploads are in `upload.rs`)
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
