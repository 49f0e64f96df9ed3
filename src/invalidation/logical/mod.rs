//! Invalidation from logical decoding (`invalidation.source = "logical"`):
//! instead of triggers and NOTIFY, a replication connection per cached
//! database streams the changes of a publication (`pgoutput`, decoded here)
//! from a temporary slot. Nothing is installed in the database but the
//! publication; writers pay only what WAL decoding costs the server.
//!
//! The listener keeps its other duties (catalog scans, role polling, health
//! checks, the up/down state and epochs): this module only replaces where
//! writes are learnt of. pgtier's own announcements travel as transactional
//! logical messages (`pg_logical_emit_message`) with the channel name as
//! prefix, so they are applied in commit order with the writes.

pub mod conn;
pub mod keys;
pub mod pgoutput;
pub mod publication;
pub mod register;
pub mod stream;

use std::sync::Arc;

use rustls::ClientConfig;
use tokio_postgres::config::SslMode;

use crate::config::TlsMode;
use crate::tls::{self, TlsError};

/// What the listener needs to run the logical source.
#[derive(Clone)]
pub struct Settings {
    pub publication: String,
    pub tls: Arc<ClientConfig>,
    /// The upstream's TLS mode as the control connections use it (a URL's
    /// own sslmode wins).
    pub ssl: SslMode,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "logical({})", self.publication)
    }
}

impl Settings {
    /// TLS as `control::tls_for` chooses it, as a rustls configuration.
    pub fn new(
        publication: &str,
        mode: TlsMode,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Settings, TlsError> {
        let (tls, ssl) = match tls::client_config(mode, ca_file)? {
            Some(cfg) => (
                cfg,
                if mode == TlsMode::Prefer {
                    SslMode::Prefer
                } else {
                    SslMode::Require
                },
            ),
            None => (tls::unverified_client_config()?, SslMode::Disable),
        };
        Ok(Settings {
            publication: publication.to_string(),
            tls,
            ssl,
        })
    }
}

/// The SQL a session (or the listener) sends to put one of pgtier's payloads
/// into the stream, after everything committed before it.
pub fn emit_sql(prefix: &str, payload: &str) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
    format!(
        "SELECT pg_catalog.pg_logical_emit_message(true, {}, {})",
        q(prefix),
        q(payload)
    )
}
