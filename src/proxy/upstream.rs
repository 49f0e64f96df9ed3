//! Connections to the real Postgres: TCP with keepalive, then TLS per the mode.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::conn::{write_all, Conn, Transport};
use crate::config::{TlsMode, UpstreamConfig};
use crate::protocol::startup::{CancelRequest, SSL_REQUEST_CODE};
use crate::tls::{self, TlsError};

pub type ServerConn = Conn<Transport>;

/// Why the upstream could not be reached; shown to the client as it is.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to upstream {addr}: {reason}")]
pub struct UpstreamError {
    pub addr: String,
    pub reason: String,
}

/// An upstream setting pgtier cannot use.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("upstream.tls_server_name: '{name}': {source}")]
    ServerName {
        name: String,
        source: rustls::pki_types::InvalidDnsNameError,
    },
}

pub struct Upstream {
    addr: String,
    /// Set when the upstream host is a directory: connect to its Unix socket.
    unix_path: Option<std::path::PathBuf>,
    mode: TlsMode,
    connect_timeout: Duration,
    keepalive: Duration,
    tls: Option<TlsConnector>,
    server_name: ServerName<'static>,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamSetupError> {
        let tls = match cfg.unix_socket_dir() {
            Some(_) => None,
            None => {
                tls::client_config(cfg.tls, cfg.tls_ca_file.as_deref())?.map(TlsConnector::from)
            }
        };
        let name = match (&cfg.tls_server_name, cfg.unix_socket_dir()) {
            (Some(n), _) => n.clone(),
            (None, Some(_)) => "localhost".to_string(),
            (None, None) => cfg.host.clone(),
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|source| UpstreamSetupError::ServerName { name, source })?;
        let unix_path = cfg
            .unix_socket_dir()
            .map(|dir| dir.join(format!(".s.PGSQL.{}", cfg.port)));
        Ok(Upstream {
            addr: match &unix_path {
                Some(p) => p.display().to_string(),
                None => cfg.address(),
            },
            unix_path,
            mode: cfg.tls,
            connect_timeout: cfg.connect_timeout.0,
            keepalive: cfg.keepalive.0,
            tls,
            server_name,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn err(&self, reason: impl ToString) -> UpstreamError {
        UpstreamError {
            addr: self.addr.clone(),
            reason: reason.to_string(),
        }
    }

    /// Connect and negotiate TLS, all within the connect timeout.
    pub async fn connect(&self) -> Result<ServerConn, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(self.err(format!(
                "timed out after {}",
                humantime::format_duration(self.connect_timeout)
            ))),
        }
    }

    async fn connect_inner(&self) -> Result<ServerConn, UpstreamError> {
        if let Some(path) = &self.unix_path {
            // Postgres never offers TLS on Unix sockets; config validation makes
            // sure no TLS mode demands it.
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| self.err(e))?;
            return Ok(Conn::Plain(Transport::Unix(s)));
        }
        let mut tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| self.err(e))?;
        let _ = tcp.set_nodelay(true);
        if !self.keepalive.is_zero() {
            let ka = socket2::TcpKeepalive::new()
                .with_time(self.keepalive)
                .with_interval(Duration::from_secs(5))
                .with_retries(3);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
        }
        let Some(connector) = &self.tls else {
            return Ok(Conn::Plain(Transport::Tcp(tcp)));
        };
        let mut req = BytesMut::with_capacity(8);
        req.extend_from_slice(&8i32.to_be_bytes());
        req.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        write_all(&mut tcp, &req).await.map_err(|e| self.err(e))?;
        let answer = tcp.read_u8().await.map_err(|e| self.err(e))?;
        match answer {
            b'S' => {
                let tls = connector
                    .connect(self.server_name.clone(), Transport::Tcp(tcp))
                    .await
                    .map_err(|e| self.err(format!("TLS handshake failed: {e}")))?;
                Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
            }
            b'N' if self.mode == TlsMode::Prefer => Ok(Conn::Plain(Transport::Tcp(tcp))),
            b'N' => Err(self.err("server does not support TLS, but upstream.tls requires it")),
            other => Err(self.err(format!(
                "unexpected answer {other:#04x} to SSLRequest (is this a Postgres server?)"
            ))),
        }
    }

    /// Check that the upstream accepts connections (TCP or socket, plus TLS).
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        self.connect().await.map(|_| ())
    }

    /// Relay a client's cancel request. Postgres never answers one, so neither do we.
    pub async fn cancel(&self, req: CancelRequest) -> Result<(), UpstreamError> {
        let mut conn = self.connect().await?;
        let mut buf = BytesMut::with_capacity(16);
        req.encode(&mut buf);
        write_all(&mut conn, &buf).await.map_err(|e| self.err(e))?;
        // Wait for the server to close, so the cancel is processed before we return.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(self.connect_timeout, conn.read(&mut sink)).await;
        Ok(())
    }
}

pub type SharedUpstream = Arc<Upstream>;
