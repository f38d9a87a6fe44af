//! What can go wrong in a client call, and how it is told to the user.

use std::fmt;
use std::io;

use crate::protocol::{Response, ResponseCode};

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
    /// that does not fit its code, or larger than [`MAX_RESPONSE_PAYLOAD`](super::MAX_RESPONSE_PAYLOAD)).
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

    pub(super) fn local(kind: io::ErrorKind, msg: impl Into<String>) -> ClientError {
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
