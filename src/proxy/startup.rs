//! Session start: the client's startup packets (SSL, GSSENC, cancel) and the
//! authentication exchange, relayed so that Postgres stays the only authority.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::conn::{write_all, Conn};
use super::state::Proxy;
use super::upstream::ServerConn;
use crate::protocol::backend::{
    self, Authentication, BackendKeyData, ErrorResponse, NegotiateProtocolVersion, ParameterStatus,
    ReadyForQuery, Severity,
};
use crate::protocol::codec::peek_header;
use crate::protocol::startup::{packet_len, StartupMessage, StartupPacket};
use crate::protocol::{ProtocolError, TxStatus};

pub type ClientStream = tokio::net::TcpStream;
pub type ClientConn = Conn<ClientStream>;

/// Why a session ended before it started. Variants that carry a message have
/// already been reported to the client as a FATAL error.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Refused(String),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
}

/// What the first packets of a connection asked for.
pub enum Opened {
    Session {
        client: Box<ClientConn>,
        startup: StartupMessage,
        /// Bytes the client sent after its startup packet.
        leftover: BytesMut,
        /// `_pq_.` options and minor version to report in NegotiateProtocolVersion.
        negotiate: Option<(u16, Vec<String>)>,
    },
    /// A cancel request, already relayed.
    Cancelled,
}

/// Read startup packets until a StartupMessage or CancelRequest arrives.
pub async fn accept(stream: ClientStream, proxy: &Proxy) -> Result<Opened, StartupError> {
    let mut client: ClientConn = Conn::Plain(stream);
    let mut buf = BytesMut::with_capacity(1024);
    let mut tls_done = false;
    loop {
        let packet = match read_packet(&mut client, &mut buf).await {
            Ok(p) => p,
            Err(StartupError::Protocol(e)) => {
                fatal(&mut client, "08P01", &e.to_string()).await;
                return Err(e.into());
            }
            Err(e) => return Err(e),
        };
        let decoded = match StartupPacket::decode(&packet) {
            Ok(d) => d,
            Err(e) => {
                fatal(&mut client, "08P01", &e.to_string()).await;
                return Err(e.into());
            }
        };
        match decoded {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest if !buf.is_empty() => {
                // Bytes sent before our answer would be read as if they were encrypted
                // (CVE-2021-23214 in Postgres): refuse rather than guess.
                let e =
                    ProtocolError::BadStartup("received unencrypted data after SSL request".into());
                fatal(&mut client, "08P01", &e.to_string()).await;
                return Err(e.into());
            }
            StartupPacket::SslRequest => {
                let acceptor = match (&proxy.tls_acceptor, tls_done, client) {
                    (Some(acc), false, Conn::Plain(s)) => {
                        let mut s = s;
                        write_all(&mut s, b"S").await?;
                        let tls = acc.accept(s).await?;
                        client = Conn::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
                        tls_done = true;
                        continue;
                    }
                    (_, _, c) => c,
                };
                client = acceptor;
                write_all(&mut client, b"N").await?;
            }
            StartupPacket::GssEncRequest => write_all(&mut client, b"N").await?,
            StartupPacket::Cancel(req) => {
                // Marked first: the session must know of it before the
                // server's 57014 reaches it.
                proxy.note_cancel(req.pid, req.secret);
                if let Err(e) = proxy.upstream.cancel(req).await {
                    tracing::warn!(error = %e, "could not relay cancel request");
                }
                return Ok(Opened::Cancelled);
            }
            StartupPacket::Startup(mut startup) => {
                if !matches!(client, Conn::Tls(_)) && proxy.config().server.require_tls {
                    let msg = "pgtier requires TLS for client connections (server.require_tls)";
                    fatal(&mut client, "28000", msg).await;
                    return Err(StartupError::Refused(msg.into()));
                }
                if startup.user().is_none() {
                    let msg = "no PostgreSQL user name specified in startup packet";
                    fatal(&mut client, "28000", msg).await;
                    return Err(StartupError::Refused(msg.into()));
                }
                let mut unrecognized = Vec::new();
                startup.params.retain(|(k, _)| {
                    let proto_opt = k.starts_with("_pq_.");
                    if proto_opt {
                        unrecognized.push(k.clone());
                    }
                    !proto_opt
                });
                let negotiate = (startup.minor_version > 0 || !unrecognized.is_empty())
                    .then_some((startup.minor_version, unrecognized));
                return Ok(Opened::Session {
                    client: Box::new(client),
                    startup,
                    leftover: buf,
                    negotiate,
                });
            }
        }
    }
}

async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Bytes, StartupError> {
    loop {
        if let Some(len) = packet_len(buf)? {
            if buf.len() >= len {
                return Ok(buf.split_to(len).freeze());
            }
        }
        if r.read_buf(buf).await? == 0 {
            return Err(StartupError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Read one tagged message (tag, whole message bytes) with a size limit.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, Bytes), StartupError> {
    loop {
        if let Some(h) = peek_header(buf, max)? {
            if buf.len() >= h.total_len {
                return Ok((h.tag, buf.split_to(h.total_len).freeze()));
            }
        }
        if r.read_buf(buf).await? == 0 {
            return Err(StartupError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// Send a FATAL error on a connection that is about to be closed; failures to
/// deliver it do not matter any more.
pub async fn fatal<W: AsyncWrite + Unpin>(w: &mut W, code: &str, message: &str) {
    let e = ErrorResponse {
        severity: Severity::Fatal,
        code,
        message,
    };
    let _ = write_all(w, &e.to_bytes()).await;
}

/// What the server told us while the session started.
#[derive(Debug, Default, Clone)]
pub struct ServerHello {
    pub params: Vec<(String, String)>,
    pub key: Option<BackendKeyData>,
    /// Digest of the session's non-default settings (see `defaults`), for
    /// sessions of cached databases; `None` if the server would not say.
    pub defaults: Option<String>,
}

/// Messages during authentication are small; a bigger one means a confused peer.
const AUTH_MESSAGE_LIMIT: usize = 1 << 20;

/// Relay authentication between client and server until the server's first
/// ReadyForQuery. pgtier sees the exchange but never needs the password.
pub async fn relay_auth(
    client: &mut ClientConn,
    client_buf: &mut BytesMut,
    server: &mut ServerConn,
    server_buf: &mut BytesMut,
    startup: &StartupMessage,
    negotiate: Option<&(u16, Vec<String>)>,
) -> Result<ServerHello, StartupError> {
    let mut out = BytesMut::with_capacity(512);
    startup.encode(&mut out);
    write_all(server, &out).await?;
    out.clear();
    if let Some((_, opts)) = negotiate {
        let names: Vec<&[u8]> = opts.iter().map(|s| s.as_bytes()).collect();
        NegotiateProtocolVersion {
            newest_minor: 0,
            unrecognized: &names,
        }
        .encode(&mut out);
    }
    let mut hello = ServerHello::default();
    loop {
        let (tag, msg) = read_message(server, server_buf, AUTH_MESSAGE_LIMIT).await?;
        let body = &msg[5..];
        match tag {
            backend::AUTHENTICATION => {
                let auth = Authentication::decode(body)?;
                match &auth {
                    Authentication::Sasl { mechanisms } => {
                        // Channel binding would bind to pgtier's TLS session, not the
                        // server's, so the -PLUS variants can never succeed through us.
                        let kept: Vec<&[u8]> = mechanisms
                            .iter()
                            .copied()
                            .filter(|m| !m.ends_with(b"-PLUS"))
                            .collect();
                        if kept.is_empty() {
                            let msg = "server offers only channel-binding SASL mechanisms, \
                                       which cannot work through a proxy";
                            fatal(client, "28000", msg).await;
                            return Err(StartupError::AuthFailed(msg.into()));
                        }
                        Authentication::Sasl { mechanisms: kept }.encode(&mut out);
                    }
                    _ => out.extend_from_slice(&msg),
                }
                write_all(client, &out).await?;
                out.clear();
                if auth.expects_response() {
                    let (ctag, cmsg) = read_message(client, client_buf, AUTH_MESSAGE_LIMIT).await?;
                    if ctag != crate::protocol::frontend::PASSWORD {
                        let e = ProtocolError::BadStartup(format!(
                            "expected a password response, got message type '{}'",
                            backend::describe_tag(ctag)
                        ));
                        fatal(client, "08P01", &e.to_string()).await;
                        return Err(e.into());
                    }
                    write_all(server, &cmsg).await?;
                }
            }
            backend::ERROR_RESPONSE => {
                write_all(client, &msg).await?;
                let fields = backend::ErrorFields::decode(tag, body)?;
                return Err(StartupError::AuthFailed(
                    String::from_utf8_lossy(fields.message).into_owned(),
                ));
            }
            backend::PARAMETER_STATUS => {
                let p = ParameterStatus::decode(body)?;
                hello.params.push((
                    String::from_utf8_lossy(p.name).into_owned(),
                    String::from_utf8_lossy(p.value).into_owned(),
                ));
                out.extend_from_slice(&msg);
            }
            backend::BACKEND_KEY_DATA => {
                hello.key = Some(BackendKeyData::decode(body)?);
                out.extend_from_slice(&msg);
            }
            backend::READY_FOR_QUERY => {
                let rfq = ReadyForQuery::decode(body)?;
                if rfq.status != TxStatus::Idle {
                    tracing::debug!(?rfq, "session starts inside a transaction");
                }
                out.extend_from_slice(&msg);
                write_all(client, &out).await?;
                return Ok(hello);
            }
            backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {
                out.extend_from_slice(&msg)
            }
            other => {
                let e = ProtocolError::UnknownBackend(backend::describe_tag(other));
                fatal(
                    client,
                    "08P01",
                    &format!("upstream sent {e} during startup"),
                )
                .await;
                return Err(e.into());
            }
        }
    }
}
