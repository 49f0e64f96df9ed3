//! Control connections: pgtier's own connections to each cached database, made
//! with credentials from `--control-url`, used by the listener and by
//! `install-triggers`. Passwords never appear in logs.

use std::sync::Arc;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use crate::config::control::ControlTarget;
use crate::config::TlsMode;
use crate::tls::{self, TlsError};

/// TLS for control connections follows the upstream's TLS mode.
pub fn tls_for(
    mode: TlsMode,
    ca_file: Option<&std::path::Path>,
) -> Result<(MakeRustlsConnect, SslMode), TlsError> {
    let (cfg, ssl) = match tls::client_config(mode, ca_file)? {
        Some(cfg) => (
            cfg,
            if mode == TlsMode::Prefer {
                SslMode::Prefer
            } else {
                SslMode::Require
            },
        ),
        // A URL may still ask for TLS with its own sslmode.
        None => (tls::unverified_client_config()?, SslMode::Disable),
    };
    Ok((MakeRustlsConnect::new(Arc::unwrap_or_clone(cfg)), ssl))
}

/// What the listening connection hands on, in the order it happened.
// Unboxed: notifications are the common case, and the channel holds its
// messages in blocks of its own anyway.
#[allow(clippy::large_enum_variant)]
pub enum Incoming {
    /// A notification (or notice) the server sent.
    Message(tokio_postgres::AsyncMessage),
    /// A row of pgtier's change table (source "poll"), in the order read.
    Polled(String),
    /// Fences whose probe query completed after every message before this
    /// one was received (see `probe_fences`).
    Probed(Vec<tokio::sync::oneshot::Sender<()>>),
}

/// Connect, driving the connection on the current runtime. Notifications and
/// other asynchronous messages are handed to `on_message` by the driver task.
pub async fn connect(
    target: &ControlTarget,
    tls: &MakeRustlsConnect,
    ssl: SslMode,
    on_message: Option<tokio::sync::mpsc::UnboundedSender<Incoming>>,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let mut config = target.config.clone();
    if !url_sets_sslmode(&target.config) {
        config.ssl_mode(ssl);
    }
    let (client, mut conn) = config.connect(tls.clone()).await?;
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(m) = stream.next().await {
            match m {
                Ok(msg) => {
                    if let Some(tx) = &on_message {
                        if tx.send(Incoming::Message(msg)).is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "control connection closed");
                    break;
                }
            }
        }
    });
    Ok((client, driver))
}

/// tokio-postgres defaults sslmode to prefer; only an explicit choice wins over
/// the upstream's mode. (It cannot tell us, so prefer counts as "not set".)
fn url_sets_sslmode(c: &Config) -> bool {
    c.get_ssl_mode() != SslMode::Prefer
}
