//! Target 2: every payload parser, the packet header, public key, file name
//! and response decoders, on payloads of any size.

use std::path::{Component, Path};

use backupd::crypto::parse_public_key;
use backupd::protocol::{
    validate_file_name, Code, NameField, PacketHeader, PayloadError, Request, Response, ResponseHeader,
    MAX_FILE_NAME, NAME_FIELD_LEN, PACKET_HEADER_LEN, RESPONSE_HEADER_LEN,
};

use super::frame_decoder::{expected_bounds, parse_payload};
use super::{Input, MAX_PACKET};

pub(super) const ALL_CODES: [Code; 7] = [
    Code::Register,
    Code::PublicKey,
    Code::Reconnect,
    Code::FilePacket,
    Code::CrcOk,
    Code::CrcRetry,
    Code::CrcAbort,
];

/// The name rules every stored file name must satisfy.
fn check_file_name(raw: &[u8]) {
    match validate_file_name(raw) {
        Ok(s) => {
            assert_eq!(s.as_bytes(), raw);
            assert!(!s.is_empty() && s.len() <= MAX_FILE_NAME);
            assert!(!s.contains(['/', '\\', '\0']));
            assert!(!s.chars().any(char::is_control));
            // Joined to a directory, the name is exactly one ordinary component.
            let comps: Vec<Component<'_>> = Path::new(s).components().collect();
            assert_eq!(comps, vec![Component::Normal(s.as_ref())], "{s:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

pub(super) fn check_name_field(name: &NameField) {
    let b = name.bytes();
    assert!(b.len() < NAME_FIELD_LEN && !b.contains(&0));
    assert_eq!(name.0[b.len()], 0);
    if let Some(s) = name.as_str() {
        assert_eq!(s.as_bytes(), b);
    }
    let shown = name.display();
    assert!(shown.len() <= 64 * 10 + 3, "display is bounded");
    assert!(!shown.chars().any(char::is_control), "display escapes control characters: {shown:?}");
    check_file_name(b);
}

/// A public key field: never panics; an accepted key is well formed.
pub(super) fn check_public_key(field: &[u8]) {
    if let Ok((key, der)) = parse_public_key(field) {
        assert!(!der.is_empty() && der.len() <= field.len());
        assert_eq!(&field[..der.len()], &der[..]);
        assert!(field[der.len()..].iter().all(|&b| b == 0), "only zero padding may follow the key");
        let bits = rsa::traits::PublicKeyParts::n(&key).bits();
        assert!((1024..=4096).contains(&bits), "{bits}-bit key accepted");
        let (again, der2) = parse_public_key(&der).expect("the exact DER parses again");
        assert_eq!((again, der2), (key, der));
    }
}

/// Target 2: every payload parser on payloads of any size (no header check
/// first), plus the packet header, public key, file name and response decoders.
pub fn payload_parsers(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8();
    let payload = input.rest();
    match which % 12 {
        n @ 0..=6 => {
            let code = ALL_CODES[n as usize];
            let min = code.payload_bounds(MAX_PACKET).0 as usize;
            let min_fields = if code == Code::FilePacket { PACKET_HEADER_LEN } else { NAME_FIELD_LEN };
            assert!(min >= min_fields, "{code:?}: bound {min} below its fixed fields");
            match Request::parse(code, payload) {
                Err(PayloadError::WrongSize) => assert!(payload.len() < min_fields),
                Err(PayloadError::UnterminatedName) => assert!(payload.len() >= min_fields),
                Ok(_) => {
                    assert!(payload.len() >= min_fields);
                    // Within the header's bounds the full frame checks apply.
                    let (lo, hi) = expected_bounds(code.as_u16(), MAX_PACKET).unwrap_or((0, 0));
                    if (lo as usize..=hi as usize).contains(&payload.len()) {
                        assert!(parse_payload(code, payload));
                    }
                }
            }
        }
        7 => match PacketHeader::decode(payload) {
            Ok(ph) => {
                let mut again = Vec::new();
                ph.encode(&mut again);
                assert_eq!(&again[..], &payload[..PACKET_HEADER_LEN]);
                check_name_field(&ph.file_name);
            }
            Err(e) => {
                assert!(payload.len() < PACKET_HEADER_LEN || (e == PayloadError::UnterminatedName), "{e:?}")
            }
        },
        8 => check_public_key(payload),
        9 => check_file_name(payload),
        10 => {
            if let Some(f) = NameField::from_name(payload) {
                assert_eq!(f.bytes(), payload);
                check_name_field(&f);
            } else {
                assert!(payload.len() >= NAME_FIELD_LEN || payload.contains(&0));
            }
        }
        _ => {
            let mut raw = [0u8; RESPONSE_HEADER_LEN];
            let head = &payload[..payload.len().min(RESPONSE_HEADER_LEN)];
            raw[..head.len()].copy_from_slice(head);
            let body = &payload[head.len()..];
            let h = ResponseHeader::decode(&raw);
            if let Some(r) = Response::decode(&h, body) {
                assert_eq!(r.code() as u16, h.code);
                let mut enc = Vec::new();
                r.encode(&mut enc);
                let mut eh = [0u8; RESPONSE_HEADER_LEN];
                eh.copy_from_slice(&enc[..RESPONSE_HEADER_LEN]);
                let again = Response::decode(&ResponseHeader::decode(&eh), &enc[RESPONSE_HEADER_LEN..]);
                assert_eq!(again.as_ref(), Some(&r));
            }
        }
    }
}
