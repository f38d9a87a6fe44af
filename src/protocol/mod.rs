//! The protocol-v3 codec: bytes in, typed values out, and back.
//!
//! This module owns the wire format and nothing else: no sockets, no mio, no
//! database, no files. Everything here works on plain byte slices so that it
//! can be unit-tested, property-tested and fuzzed in isolation.
//!
//! * [`header`]: the 23-byte request header, the 7-byte response header and the
//!   per-code payload bounds checked from the header alone.
//! * [`request`]: payload parsers for the seven request codes.
//! * [`response`]: encoders for the eight response codes.
//! * [`path`]: which file names and paths are accepted, and the relative path
//!   an accepted one stands for.
//!
//! All integers are little-endian. Strings live in fixed 255-byte fields,
//! terminated by the first NUL byte.

pub mod header;
pub mod path;
pub mod request;
pub mod response;

pub use header::{
    Code, HeaderError, RequestHeader, ResponseCode, ResponseHeader, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
};
pub use path::{normalize_path, validate_file_name, NameError, NormalizedPath, MAX_FILE_NAME, MAX_PATH_LEN};
pub use request::{encode_frame, NameField, PacketHeader, PayloadError, Request, PACKET_HEADER_LEN};
pub use response::Response;

/// The only protocol version spoken.
pub const VERSION: u8 = 3;
/// Size of every fixed string field (names).
pub const NAME_FIELD_LEN: usize = 255;

/// The `backup-client` command line that registers a client again (a 1025,
/// then its new key on the same connection), e.g. after `backupd
/// reset-key`: here, below both the client and the admin commands, so that
/// `reset-key`'s hint and the client's own hints give the same one (the
/// client's CLI tests hold it to the real command line).
pub const REGISTER_AGAIN: &str = "backup-client send PATH... --server HOST:PORT --name NAME --register";
/// The same in legacy mode (transfer.info in the current folder).
pub const REGISTER_AGAIN_LEGACY: &str = "backup-client --register";
/// Size of a client id.
pub const CLIENT_ID_LEN: usize = 16;

/// A client id: 16 opaque bytes chosen by the server at registration.
pub type ClientId = [u8; CLIENT_ID_LEN];

/// Lowercase hex of a client id (32 characters), as used in paths and logs.
pub fn id_hex(id: &ClientId) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for b in id {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parse 32 hex characters (either case) into a client id.
pub fn parse_id_hex(s: &str) -> Option<ClientId> {
    let s = s.trim();
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut id = [0u8; CLIENT_ID_LEN];
    for (i, out) in id.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}
