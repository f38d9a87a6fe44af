//! Response encoders (server side) and the decoded form (client side).

use byteorder::{ByteOrder, LittleEndian};

use super::header::{ResponseCode, ResponseHeader, RESPONSE_HEADER_LEN};
use super::{ClientId, CLIENT_ID_LEN, NAME_FIELD_LEN, VERSION};

/// A response to send. Encoding appends to the connection's write buffer.
/// (`FileReceived` carries the 255-byte name field inline: responses are
/// short-lived values, so the size difference between variants is harmless.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    RegistrationOk { id: ClientId },
    RegistrationFailed,
    KeyAccepted { id: ClientId, encrypted_key: Vec<u8> },
    FileReceived { id: ClientId, content_size: u32, file_name: [u8; NAME_FIELD_LEN], cksum: u32 },
    Ack { id: ClientId },
    ReconnectOk { id: ClientId, encrypted_key: Vec<u8> },
    ReconnectDenied { id: ClientId },
    GeneralError,
}

impl Response {
    pub fn code(&self) -> ResponseCode {
        match self {
            Response::RegistrationOk { .. } => ResponseCode::RegistrationOk,
            Response::RegistrationFailed => ResponseCode::RegistrationFailed,
            Response::KeyAccepted { .. } => ResponseCode::KeyAccepted,
            Response::FileReceived { .. } => ResponseCode::FileReceived,
            Response::Ack { .. } => ResponseCode::Ack,
            Response::ReconnectOk { .. } => ResponseCode::ReconnectOk,
            Response::ReconnectDenied { .. } => ResponseCode::ReconnectDenied,
            Response::GeneralError => ResponseCode::GeneralError,
        }
    }

    /// Append header and payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[VERSION, 0, 0, 0, 0, 0, 0]);
        match self {
            Response::RegistrationOk { id } | Response::Ack { id } | Response::ReconnectDenied { id } => {
                out.extend_from_slice(id)
            }
            Response::KeyAccepted { id, encrypted_key } | Response::ReconnectOk { id, encrypted_key } => {
                out.extend_from_slice(id);
                out.extend_from_slice(encrypted_key);
            }
            Response::FileReceived { id, content_size, file_name, cksum } => {
                out.extend_from_slice(id);
                out.extend_from_slice(&content_size.to_le_bytes());
                out.extend_from_slice(file_name);
                out.extend_from_slice(&cksum.to_le_bytes());
            }
            Response::RegistrationFailed | Response::GeneralError => {}
        }
        let size = (out.len() - start - RESPONSE_HEADER_LEN) as u32;
        LittleEndian::write_u16(&mut out[start + 1..start + 3], self.code() as u16);
        LittleEndian::write_u32(&mut out[start + 3..start + 7], size);
    }

    /// Every response in `bytes`, a stream of whole encoded replies (what
    /// the server queued for a connection). None if one is truncated or does
    /// not decode.
    pub fn decode_all(mut bytes: &[u8]) -> Option<Vec<Response>> {
        let mut all = Vec::new();
        while !bytes.is_empty() {
            let raw: [u8; RESPONSE_HEADER_LEN] = bytes.get(..RESPONSE_HEADER_LEN)?.try_into().ok()?;
            let header = ResponseHeader::decode(&raw);
            let end = RESPONSE_HEADER_LEN.checked_add(header.payload_size as usize)?;
            all.push(Response::decode(&header, bytes.get(RESPONSE_HEADER_LEN..end)?)?);
            bytes = &bytes[end..];
        }
        Some(all)
    }

    /// Decode a response from its header and payload (client side).
    /// Returns None when the payload does not fit the code.
    pub fn decode(header: &ResponseHeader, payload: &[u8]) -> Option<Response> {
        let id = |p: &[u8]| -> Option<ClientId> {
            let mut id = [0u8; CLIENT_ID_LEN];
            id.copy_from_slice(p.get(..CLIENT_ID_LEN)?);
            Some(id)
        };
        let code = ResponseCode::from_u16(header.code)?;
        Some(match code {
            ResponseCode::RegistrationOk if payload.len() == CLIENT_ID_LEN => {
                Response::RegistrationOk { id: id(payload)? }
            }
            ResponseCode::RegistrationFailed => Response::RegistrationFailed,
            ResponseCode::KeyAccepted if payload.len() > CLIENT_ID_LEN => {
                Response::KeyAccepted { id: id(payload)?, encrypted_key: payload[CLIENT_ID_LEN..].to_vec() }
            }
            ResponseCode::FileReceived if payload.len() == CLIENT_ID_LEN + 4 + NAME_FIELD_LEN + 4 => {
                let mut file_name = [0u8; NAME_FIELD_LEN];
                file_name.copy_from_slice(&payload[20..20 + NAME_FIELD_LEN]);
                Response::FileReceived {
                    id: id(payload)?,
                    content_size: LittleEndian::read_u32(&payload[16..20]),
                    file_name,
                    cksum: LittleEndian::read_u32(&payload[20 + NAME_FIELD_LEN..]),
                }
            }
            ResponseCode::Ack if payload.len() == CLIENT_ID_LEN => Response::Ack { id: id(payload)? },
            ResponseCode::ReconnectOk if payload.len() > CLIENT_ID_LEN => {
                Response::ReconnectOk { id: id(payload)?, encrypted_key: payload[CLIENT_ID_LEN..].to_vec() }
            }
            ResponseCode::ReconnectDenied if payload.len() == CLIENT_ID_LEN => {
                Response::ReconnectDenied { id: id(payload)? }
            }
            ResponseCode::GeneralError => Response::GeneralError,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let all = vec![
            Response::RegistrationOk { id: [1; 16] },
            Response::RegistrationFailed,
            Response::KeyAccepted { id: [2; 16], encrypted_key: vec![9; 128] },
            Response::FileReceived {
                id: [3; 16],
                content_size: 32,
                file_name: [b'x'; 255],
                cksum: 0xdead_beef,
            },
            Response::Ack { id: [4; 16] },
            Response::ReconnectOk { id: [5; 16], encrypted_key: vec![8; 256] },
            Response::ReconnectDenied { id: [6; 16] },
            Response::GeneralError,
        ];
        for r in all {
            let mut buf = Vec::new();
            r.encode(&mut buf);
            let mut h = [0u8; RESPONSE_HEADER_LEN];
            h.copy_from_slice(&buf[..RESPONSE_HEADER_LEN]);
            let header = ResponseHeader::decode(&h);
            assert_eq!(header.payload_size as usize, buf.len() - RESPONSE_HEADER_LEN);
            assert_eq!(Response::decode(&header, &buf[RESPONSE_HEADER_LEN..]), Some(r.clone()));
            assert_eq!(Response::decode_all(&buf), Some(vec![r]));
            assert_eq!(Response::decode_all(&buf[..buf.len() - 1]), None, "truncated");
        }
    }
}
