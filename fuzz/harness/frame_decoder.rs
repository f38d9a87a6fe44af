//! Target 1: the frame decoder (request headers, their checks, payload parses).

use backupd::protocol::{
    Code, HeaderError, PayloadError, Request, RequestHeader, NAME_FIELD_LEN, PACKET_HEADER_LEN,
    REQUEST_HEADER_LEN,
};

use super::payload_parsers::{check_name_field, check_public_key};
use super::MAX_PACKET;

/// The payload bounds of PROTOCOL.md, written out independently of
/// `Code::payload_bounds`: `None` for an unknown code.
pub(super) fn expected_bounds(code: u16, max_packet: u32) -> Option<(u32, u32)> {
    match code {
        1025 | 1027 | 1029 | 1030 | 1031 => Some((255, 255)),
        1026 => Some((255 + 160, 255 + 2048)),
        1028 => Some((267, max_packet)),
        _ => None,
    }
}

/// Check a header as the server does and compare with the protocol's rules.
fn check_header(h: &RequestHeader, max_packet: u32) -> Result<Code, HeaderError> {
    let checked = h.check(max_packet);
    let legal = h.version == 3
        && expected_bounds(h.code, max_packet).is_some_and(|(lo, hi)| (lo..=hi).contains(&h.payload_size));
    assert_eq!(checked.is_ok(), legal, "check({h:?}, {max_packet}) = {checked:?}");
    match &checked {
        Ok(code) => assert_eq!(code.as_u16(), h.code),
        Err(HeaderError::BadVersion(v)) => assert_eq!(*v, h.version),
        Err(HeaderError::UnknownCode(c)) => {
            assert_eq!(*c, h.code);
            assert_eq!(h.version, 3, "the version is checked first");
        }
        Err(HeaderError::PayloadTooSmall { code, size, min }) => {
            assert_eq!((*code, *size), (h.code, h.payload_size));
            assert!(size < min);
        }
        Err(HeaderError::PayloadTooLarge { code, size, max }) => {
            assert_eq!((*code, *size), (h.code, h.payload_size));
            assert!(size > max);
        }
    }
    checked
}

/// Parse a complete payload of a checked frame and check what came out.
/// Returns false when the server would close the connection (malformed field).
pub(super) fn parse_payload(code: Code, payload: &[u8]) -> bool {
    let name_at = if code == Code::FilePacket { 12 } else { 0 };
    let field = &payload[name_at..name_at + NAME_FIELD_LEN];
    let terminated = field.contains(&0);
    let parsed = Request::parse(code, payload);
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            // Sizes were checked from the header: only the name field can be bad.
            assert_eq!(e, PayloadError::UnterminatedName, "{code:?} payload of {}", payload.len());
            assert!(!terminated);
            return false;
        }
    };
    assert!(terminated, "{code:?}: a name field without NUL was accepted");
    let name = match &req {
        Request::Register { name }
        | Request::Reconnect { name }
        | Request::CrcOk { name }
        | Request::CrcRetry { name }
        | Request::CrcAbort { name } => {
            assert_eq!(payload.len(), NAME_FIELD_LEN);
            name.clone()
        }
        Request::PublicKey { name, key } => {
            assert_eq!(&key[..], &payload[NAME_FIELD_LEN..]);
            check_public_key(key);
            name.clone()
        }
        Request::FilePacket(ph) => {
            let mut again = Vec::new();
            ph.encode(&mut again);
            assert_eq!(&again[..], &payload[..PACKET_HEADER_LEN]);
            assert_eq!(ph.packet_number, u16::from_le_bytes([payload[8], payload[9]]));
            ph.file_name.clone()
        }
    };
    let expected_code = match &req {
        Request::Register { .. } => Code::Register,
        Request::PublicKey { .. } => Code::PublicKey,
        Request::Reconnect { .. } => Code::Reconnect,
        Request::FilePacket(_) => Code::FilePacket,
        Request::CrcOk { .. } => Code::CrcOk,
        Request::CrcRetry { .. } => Code::CrcRetry,
        Request::CrcAbort { .. } => Code::CrcAbort,
    };
    assert_eq!(expected_code, code);
    assert_eq!(&name.0[..], field);
    check_name_field(&name);
    true
}

/// Target 1: a byte stream read frame by frame exactly as a connection reads
/// it: 23 header bytes, the header check, exactly `payload_size` bytes, the
/// payload parse; a framing error ends the stream (the server closes).
pub fn frame_decoder(data: &[u8]) {
    let mut rest = data;
    while rest.len() >= REQUEST_HEADER_LEN {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        raw.copy_from_slice(&rest[..REQUEST_HEADER_LEN]);
        rest = &rest[REQUEST_HEADER_LEN..];
        let h = RequestHeader::decode(&raw);
        assert_eq!(h.encode(), raw, "header round trip");
        // A small configured bound must judge the same header consistently.
        let _ = check_header(&h, PACKET_HEADER_LEN as u32 + 64);
        let Ok(code) = check_header(&h, MAX_PACKET) else { return };
        let size = h.payload_size as usize;
        if rest.len() < size {
            // The server waits for the rest of the frame. For coverage, also
            // parse the rest as the payload of the same header with the size
            // corrected (when that size is legal for the code).
            let fixed = RequestHeader { payload_size: rest.len() as u32, ..h };
            if let Ok(c) = check_header(&fixed, MAX_PACKET) {
                parse_payload(c, rest);
            }
            return;
        }
        let (payload, tail) = rest.split_at(size);
        rest = tail;
        if !parse_payload(code, payload) {
            return;
        }
    }
}
