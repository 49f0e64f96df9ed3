//! The PostgreSQL v3 wire protocol: framing and one typed view per message.
//!
//! Everything that reads or writes protocol bytes lives here, so the proxy and the
//! cache never touch raw offsets. Decoders borrow from the receive buffer (no copies);
//! encoders append to a `BytesMut`.

pub mod backend;
pub mod batch;
pub mod codec;
pub mod error;
pub mod frontend;
pub mod startup;

pub use error::ProtocolError;

/// Transaction status carried by ReadyForQuery: caching depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': inside a transaction block.
    InTransaction,
    /// 'E': inside a failed transaction block (queries are rejected until ROLLBACK).
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}
