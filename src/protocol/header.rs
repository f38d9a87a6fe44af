//! Request and response headers, request codes, and the size bound of each
//! code's payload, so that a frame can be checked (and refused) before a
//! single payload byte is buffered.

use byteorder::{ByteOrder, LittleEndian};

use super::{ClientId, CLIENT_ID_LEN, NAME_FIELD_LEN, VERSION};

/// Bytes in a request header: client_id[16], version u8, code u16, payload_size u32.
pub const REQUEST_HEADER_LEN: usize = 23;
/// Bytes in a response header: version u8, code u16, payload_size u32.
pub const RESPONSE_HEADER_LEN: usize = 7;

/// Smallest public-key field we could ever accept: a 1024-bit SPKI DER with e=17 is 160 bytes.
pub const MIN_PUBLIC_KEY_LEN: usize = 160;
/// Largest public-key field accepted: a 4096-bit SPKI DER is about 550 bytes; clients may pad
/// the field with zeros, so allow generous padding while keeping the frame small.
pub const MAX_PUBLIC_KEY_LEN: usize = 2048;

/// Request codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Register,
    PublicKey,
    Reconnect,
    FilePacket,
    CrcOk,
    CrcRetry,
    CrcAbort,
}

impl Code {
    pub fn from_u16(v: u16) -> Option<Code> {
        Some(match v {
            1025 => Code::Register,
            1026 => Code::PublicKey,
            1027 => Code::Reconnect,
            1028 => Code::FilePacket,
            1029 => Code::CrcOk,
            1030 => Code::CrcRetry,
            1031 => Code::CrcAbort,
            _ => return None,
        })
    }

    pub fn as_u16(self) -> u16 {
        match self {
            Code::Register => 1025,
            Code::PublicKey => 1026,
            Code::Reconnect => 1027,
            Code::FilePacket => 1028,
            Code::CrcOk => 1029,
            Code::CrcRetry => 1030,
            Code::CrcAbort => 1031,
        }
    }

    /// Inclusive payload size bounds for this code. `max_packet` is the
    /// configured largest frame accepted for file packets.
    pub fn payload_bounds(self, max_packet: u32) -> (u32, u32) {
        let name = NAME_FIELD_LEN as u32;
        match self {
            Code::PublicKey => (name + MIN_PUBLIC_KEY_LEN as u32, name + MAX_PUBLIC_KEY_LEN as u32),
            Code::FilePacket => (super::PACKET_HEADER_LEN as u32, max_packet),
            _ => (name, name),
        }
    }
}

/// Response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ResponseCode {
    RegistrationOk = 1600,
    RegistrationFailed = 1601,
    KeyAccepted = 1602,
    FileReceived = 1603,
    Ack = 1604,
    ReconnectOk = 1605,
    ReconnectDenied = 1606,
    GeneralError = 1607,
}

impl ResponseCode {
    pub fn from_u16(v: u16) -> Option<ResponseCode> {
        Some(match v {
            1600 => ResponseCode::RegistrationOk,
            1601 => ResponseCode::RegistrationFailed,
            1602 => ResponseCode::KeyAccepted,
            1603 => ResponseCode::FileReceived,
            1604 => ResponseCode::Ack,
            1605 => ResponseCode::ReconnectOk,
            1606 => ResponseCode::ReconnectDenied,
            1607 => ResponseCode::GeneralError,
            _ => return None,
        })
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub client_id: ClientId,
    pub version: u8,
    pub code: u16,
    pub payload_size: u32,
}

/// Why a header was refused. Every variant means the framing can no longer
/// be trusted: the connection is answered 1607 and closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    BadVersion(u8),
    UnknownCode(u16),
    PayloadTooSmall { code: u16, size: u32, min: u32 },
    PayloadTooLarge { code: u16, size: u32, max: u32 },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::BadVersion(v) => write!(f, "unsupported protocol version {v}"),
            HeaderError::UnknownCode(c) => write!(f, "unknown request code {c}"),
            HeaderError::PayloadTooSmall { code, size, min } => {
                write!(f, "payload of {size} bytes for code {code} is below its minimum {min}")
            }
            HeaderError::PayloadTooLarge { code, size, max } => {
                write!(f, "payload of {size} bytes for code {code} exceeds its bound {max}")
            }
        }
    }
}

impl std::error::Error for HeaderError {}

impl RequestHeader {
    /// Decode the 23 header bytes (never fails: checking is separate).
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> RequestHeader {
        let mut client_id = [0u8; CLIENT_ID_LEN];
        client_id.copy_from_slice(&b[..CLIENT_ID_LEN]);
        RequestHeader {
            client_id,
            version: b[16],
            code: LittleEndian::read_u16(&b[17..19]),
            payload_size: LittleEndian::read_u32(&b[19..23]),
        }
    }

    /// Check version, code and the payload size bound of the code.
    pub fn check(&self, max_packet: u32) -> Result<Code, HeaderError> {
        if self.version != VERSION {
            return Err(HeaderError::BadVersion(self.version));
        }
        let code = Code::from_u16(self.code).ok_or(HeaderError::UnknownCode(self.code))?;
        let (min, max) = code.payload_bounds(max_packet);
        if self.payload_size < min {
            return Err(HeaderError::PayloadTooSmall { code: self.code, size: self.payload_size, min });
        }
        if self.payload_size > max {
            return Err(HeaderError::PayloadTooLarge { code: self.code, size: self.payload_size, max });
        }
        Ok(code)
    }

    /// Encode (client side).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..CLIENT_ID_LEN].copy_from_slice(&self.client_id);
        b[16] = self.version;
        LittleEndian::write_u16(&mut b[17..19], self.code);
        LittleEndian::write_u32(&mut b[19..23], self.payload_size);
        b
    }
}

/// A decoded response header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    pub version: u8,
    pub code: u16,
    pub payload_size: u32,
}

impl ResponseHeader {
    pub fn decode(b: &[u8; RESPONSE_HEADER_LEN]) -> ResponseHeader {
        ResponseHeader {
            version: b[0],
            code: LittleEndian::read_u16(&b[1..3]),
            payload_size: LittleEndian::read_u32(&b[3..7]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(version: u8, code: u16, size: u32) -> RequestHeader {
        RequestHeader { client_id: [7; 16], version, code, payload_size: size }
    }

    #[test]
    fn round_trip_and_checks() {
        let h = hdr(3, 1028, 300);
        assert_eq!(RequestHeader::decode(&h.encode()), h);
        assert_eq!(h.check(1 << 20), Ok(Code::FilePacket));
        assert_eq!(hdr(2, 1025, 255).check(1 << 20), Err(HeaderError::BadVersion(2)));
        assert_eq!(hdr(3, 1099, 255).check(1 << 20), Err(HeaderError::UnknownCode(1099)));
        assert!(matches!(hdr(3, 1025, 254).check(1 << 20), Err(HeaderError::PayloadTooSmall { .. })));
        assert!(matches!(hdr(3, 1025, 256).check(1 << 20), Err(HeaderError::PayloadTooLarge { .. })));
        assert!(matches!(
            hdr(3, 1028, (1 << 20) + 1).check(1 << 20),
            Err(HeaderError::PayloadTooLarge { .. })
        ));
        assert!(matches!(hdr(3, 1028, 266).check(1 << 20), Err(HeaderError::PayloadTooSmall { .. })));
        assert_eq!(hdr(3, 1026, 255 + 160).check(1 << 20), Ok(Code::PublicKey));
    }
}
