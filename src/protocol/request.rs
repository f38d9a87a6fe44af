//! Request payload parsers (server side) and encoders (client side).
//!
//! A payload is parsed only once its frame is complete and its size has
//! already been checked against the code's bound (see [`super::header`]).
//! Parsing validates the *framing* of fixed fields; the meaning of names
//! (is this a safe file name?) is judged by the caller.

use byteorder::{ByteOrder, LittleEndian};

use super::header::{Code, RequestHeader, REQUEST_HEADER_LEN};
use super::{ClientId, NAME_FIELD_LEN, VERSION};

/// Bytes of a file packet's fixed part: content_size u32, orig_file_size u32,
/// packet_number u16, total_packets u16, file_name[255].
pub const PACKET_HEADER_LEN: usize = 4 + 4 + 2 + 2 + NAME_FIELD_LEN;

/// A fixed 255-byte string field exactly as received. The meaningful part
/// runs up to the first NUL; what follows it is ignored (some clients do not
/// zero the rest). The raw field is kept because 1603 echoes it back.
#[derive(Clone, PartialEq, Eq)]
pub struct NameField(pub [u8; NAME_FIELD_LEN]);

impl NameField {
    /// Build a field from a string (client side). Names of 255 bytes or more
    /// cannot carry their terminating NUL and are refused.
    pub fn from_name(name: &[u8]) -> Option<NameField> {
        if name.len() >= NAME_FIELD_LEN || name.contains(&0) {
            return None;
        }
        let mut f = [0u8; NAME_FIELD_LEN];
        f[..name.len()].copy_from_slice(name);
        Some(NameField(f))
    }

    fn from_slice(b: &[u8]) -> Result<NameField, PayloadError> {
        let mut f = [0u8; NAME_FIELD_LEN];
        f.copy_from_slice(&b[..NAME_FIELD_LEN]);
        let field = NameField(f);
        if !field.0.contains(&0) {
            return Err(PayloadError::UnterminatedName);
        }
        Ok(field)
    }

    /// The bytes before the first NUL.
    pub fn bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(NAME_FIELD_LEN);
        &self.0[..end]
    }

    /// The name as UTF-8, if it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.bytes()).ok()
    }

    /// A printable form for log lines (escapes anything odd, bounded length).
    pub fn display(&self) -> String {
        let b = self.bytes();
        let mut s = crate::logging::escape_bytes(&b[..b.len().min(64)]);
        if b.len() > 64 {
            s.push_str("...");
        }
        s
    }
}

impl std::fmt::Debug for NameField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NameField({:?})", self.display())
    }
}

/// The fixed part of a 1028 file packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketHeader {
    /// Either this packet's content length or the whole file's ciphertext length, by client.
    pub content_size: u32,
    /// Plaintext size of the whole file (or, for per-packet-encrypting clients, of this packet).
    pub orig_file_size: u32,
    pub packet_number: u16,
    pub total_packets: u16,
    pub file_name: NameField,
}

impl PacketHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; 12];
        LittleEndian::write_u32(&mut b[0..4], self.content_size);
        LittleEndian::write_u32(&mut b[4..8], self.orig_file_size);
        LittleEndian::write_u16(&mut b[8..10], self.packet_number);
        LittleEndian::write_u16(&mut b[10..12], self.total_packets);
        out.extend_from_slice(&b);
        out.extend_from_slice(&self.file_name.0);
    }

    /// Decode the fixed part from the start of a 1028 payload.
    pub fn decode(payload: &[u8]) -> Result<PacketHeader, PayloadError> {
        if payload.len() < PACKET_HEADER_LEN {
            return Err(PayloadError::WrongSize);
        }
        Ok(PacketHeader {
            content_size: LittleEndian::read_u32(&payload[0..4]),
            orig_file_size: LittleEndian::read_u32(&payload[4..8]),
            packet_number: LittleEndian::read_u16(&payload[8..10]),
            total_packets: LittleEndian::read_u16(&payload[10..12]),
            file_name: NameField::from_slice(&payload[12..])?,
        })
    }
}

/// A parsed request. File packet content is not copied: it stays in the
/// payload buffer at offset [`PACKET_HEADER_LEN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Register { name: NameField },
    PublicKey { name: NameField, key: Vec<u8> },
    Reconnect { name: NameField },
    FilePacket(PacketHeader),
    CrcOk { name: NameField },
    CrcRetry { name: NameField },
    CrcAbort { name: NameField },
}

/// Malformed fixed fields: the framing is no longer trustworthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadError {
    WrongSize,
    UnterminatedName,
}

impl std::fmt::Display for PayloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PayloadError::WrongSize => write!(f, "payload size does not fit its fields"),
            PayloadError::UnterminatedName => write!(f, "255-byte name field has no NUL terminator"),
        }
    }
}

impl std::error::Error for PayloadError {}

impl Request {
    /// Parse a complete payload of a frame whose header passed `check`.
    pub fn parse(code: Code, payload: &[u8]) -> Result<Request, PayloadError> {
        let name = || -> Result<NameField, PayloadError> {
            if payload.len() < NAME_FIELD_LEN {
                return Err(PayloadError::WrongSize);
            }
            NameField::from_slice(payload)
        };
        Ok(match code {
            Code::Register => Request::Register { name: name()? },
            Code::PublicKey => Request::PublicKey { name: name()?, key: payload[NAME_FIELD_LEN..].to_vec() },
            Code::Reconnect => Request::Reconnect { name: name()? },
            Code::FilePacket => Request::FilePacket(PacketHeader::decode(payload)?),
            Code::CrcOk => Request::CrcOk { name: name()? },
            Code::CrcRetry => Request::CrcRetry { name: name()? },
            Code::CrcAbort => Request::CrcAbort { name: name()? },
        })
    }
}

/// Encode a whole request frame (client side): header followed by payload parts.
pub fn encode_frame(client_id: &ClientId, code: Code, parts: &[&[u8]], out: &mut Vec<u8>) {
    let size: usize = parts.iter().map(|p| p.len()).sum();
    let header = RequestHeader {
        client_id: *client_id,
        version: VERSION,
        code: code.as_u16(),
        payload_size: size as u32,
    };
    out.reserve(REQUEST_HEADER_LEN + size);
    out.extend_from_slice(&header.encode());
    for p in parts {
        out.extend_from_slice(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_field_rules() {
        let f = NameField::from_name(b"hello.txt").unwrap();
        assert_eq!(f.bytes(), b"hello.txt");
        assert_eq!(f.as_str(), Some("hello.txt"));
        assert!(NameField::from_name(&[b'a'; 255]).is_none());
        assert!(NameField::from_name(&[b'a'; 254]).is_some());
        assert_eq!(NameField::from_slice(&[b'a'; 255]), Err(PayloadError::UnterminatedName));
        let mut raw = [0u8; 255];
        raw[..3].copy_from_slice(b"a\0b");
        assert_eq!(NameField::from_slice(&raw).unwrap().bytes(), b"a");
    }

    #[test]
    fn packet_round_trip() {
        let p = PacketHeader {
            content_size: 32,
            orig_file_size: 17,
            packet_number: 1,
            total_packets: 2,
            file_name: NameField::from_name(b"f").unwrap(),
        };
        let mut buf = Vec::new();
        p.encode(&mut buf);
        assert_eq!(buf.len(), PACKET_HEADER_LEN);
        assert_eq!(Request::parse(Code::FilePacket, &buf), Ok(Request::FilePacket(p)));
    }
}
