//! Protocol violations, as the client is told them.

use thiserror::Error;

/// A client or server broke the protocol. The message is sent to the client verbatim
/// in a FATAL ErrorResponse, so it must say what was wrong in terms a user can act on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: i64 },
    #[error("message of type '{tag}' is {len} bytes, larger than max_message_size ({max} bytes)")]
    TooLarge { tag: char, len: usize, max: usize },
    #[error("message '{tag}' is truncated: {what}")]
    Truncated { tag: char, what: &'static str },
    /// Postgres answers these "invalid message format": a message is read one
    /// way only, so bytes after its last field are refused, not ignored.
    #[error("invalid message format: {extra} unexpected bytes at the end of message '{tag}'")]
    TrailingBytes { tag: char, extra: usize },
    #[error("invalid frontend message type '{0}'")]
    UnknownFrontend(char),
    #[error("invalid backend message type '{0}'")]
    UnknownBackend(char),
    #[error("invalid startup packet: {0}")]
    BadStartup(String),
    #[error("unsupported frontend protocol {major}.{minor}: pgtier supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
}

pub fn tag_char(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        tag as char
    } else {
        '?'
    }
}
