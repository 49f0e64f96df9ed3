//! A replication connection (`replication=database`), which tokio-postgres
//! cannot open: TCP or a Unix socket, TLS as the control connections use it,
//! the startup packet, password authentication (cleartext, md5,
//! SCRAM-SHA-256), simple queries for replication commands, then the COPY BOTH
//! stream. Credentials and target come from the control URL.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{Host, SslMode};

use crate::config::control::ControlTarget;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The largest message accepted from the server: the protocol's own limit. A
/// pgoutput message carries one row, which may be that large; it is held in
/// memory while it is decoded (only its relation, and key columns, are used).
const MAX_MESSAGE: usize = 1 << 30;

pub struct ReplConn {
    io: Box<dyn Io>,
    buf: BytesMut,
    out: BytesMut,
}

/// One server message: its tag and body.
struct Msg {
    tag: u8,
    body: Bytes,
}

/// The `M` (and `C`) field of an ErrorResponse body.
fn error_text(body: &[u8]) -> String {
    let mut msg = String::new();
    let mut code = String::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
        let text = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'M' => msg = text,
            b'C' => code = text,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    format!("{msg} ({code})")
}

impl ReplConn {
    /// Connect to `target` as a replication connection of its database.
    pub async fn connect(
        target: &ControlTarget,
        tls: &Arc<ClientConfig>,
        default_ssl: SslMode,
    ) -> anyhow::Result<ReplConn> {
        let c = &target.config;
        let timeout = c
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let fut = Self::open(target, tls, default_ssl);
        let mut conn = tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow!("connecting for replication timed out"))??;
        let user = c.get_user().unwrap_or_default();
        let mut params = vec![
            ("user", user),
            ("database", target.database.as_str()),
            ("replication", "database"),
            ("application_name", "pgtier-logical"),
            ("client_encoding", "UTF8"),
        ];
        let opts = c.get_options();
        if let Some(o) = opts {
            params.push(("options", o));
        }
        frontend::startup_message(params.iter().copied(), &mut conn.out)?;
        conn.flush().await?;
        let auth = conn.authenticate(user, c.get_password());
        tokio::time::timeout(timeout, auth)
            .await
            .map_err(|_| anyhow!("replication connection: authentication timed out"))??;
        Ok(conn)
    }

    async fn open(
        target: &ControlTarget,
        tls: &Arc<ClientConfig>,
        default_ssl: SslMode,
    ) -> anyhow::Result<ReplConn> {
        let c = &target.config;
        let port = c.get_ports().first().copied().unwrap_or(5432);
        let new = |io: Box<dyn Io>| ReplConn {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            out: BytesMut::new(),
        };
        let host = match c.get_hosts().first() {
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .with_context(|| format!("connecting to {}", path.display()))?;
                return Ok(new(Box::new(s)));
            }
            Some(Host::Tcp(h)) => h.clone(),
            None => "localhost".to_string(),
        };
        let mut tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let _ = tcp.set_nodelay(true);
        // A dead peer must end the stream within seconds: the walsender is
        // quiet for up to half its timeout when nothing is written.
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(2))
            .with_retries(3);
        let sock = socket2::SockRef::from(&tcp);
        let _ = sock.set_tcp_keepalive(&ka);
        // Keepalives stop while our own status updates go unacknowledged: a
        // peer gone with data in flight must fail the stream as soon.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(15)));
        // As tokio-postgres decides for the control connections: the URL's
        // own sslmode wins over the upstream's mode.
        let ssl = match c.get_ssl_mode() {
            SslMode::Prefer => default_ssl,
            m => m,
        };
        if ssl == SslMode::Disable {
            return Ok(new(Box::new(tcp)));
        }
        let mut req = BytesMut::new();
        frontend::ssl_request(&mut req);
        tcp.write_all(&req).await?;
        match tcp.read_u8().await? {
            b'S' => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| anyhow!("TLS server name {host}: {e}"))?;
                let s = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?;
                Ok(new(Box::new(s)))
            }
            b'N' if ssl == SslMode::Prefer => Ok(new(Box::new(tcp))),
            b'N' => bail!("the server does not support TLS, which is required"),
            other => bail!("unexpected answer {other:#04x} to SSLRequest"),
        }
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> anyhow::Result<()> {
        let need = || {
            password
                .ok_or_else(|| anyhow!("the server asks for a password; the control URL has none"))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'R' => {
                    let mut body = m.body;
                    if body.len() < 4 {
                        bail!("short authentication message");
                    }
                    match body.get_i32() {
                        0 => {}
                        3 => {
                            frontend::password_message(need()?, &mut self.out)?;
                            self.flush().await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                bail!("short md5 salt");
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                need()?,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.out)?;
                            self.flush().await?;
                        }
                        10 => {
                            let offers_scram =
                                body.split(|b| *b == 0).any(|mech| mech == b"SCRAM-SHA-256");
                            if !offers_scram {
                                bail!("the server offers no SASL mechanism pgtier supports");
                            }
                            let s = ScramSha256::new(need()?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut self.out,
                            )?;
                            scram = Some(s);
                            self.flush().await?;
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| anyhow!("SASL out of order"))?;
                            s.update(&body)?;
                            frontend::sasl_response(s.message(), &mut self.out)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| anyhow!("SASL out of order"))?;
                            s.finish(&body)?;
                        }
                        n => bail!("unsupported authentication method {n}"),
                    }
                }
                b'E' => bail!("{}", error_text(&m.body)),
                b'Z' => return Ok(()),
                // Parameter status, backend key data, notices.
                _ => {}
            }
        }
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// The next whole message. Cancel-safe: bytes read stay in the buffer.
    async fn read(&mut self) -> anyhow::Result<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    bail!("invalid message length {len}");
                }
                if self.buf.len() > len {
                    let mut m = self.buf.split_to(len + 1);
                    let tag = m[0];
                    m.advance(5);
                    return Ok(Msg {
                        tag,
                        body: m.freeze(),
                    });
                }
                self.buf.reserve(len + 1 - self.buf.len());
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the replication connection");
            }
        }
    }

    /// Run a replication command; its rows, as text.
    pub async fn query(&mut self, sql: &str) -> anyhow::Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'D' => rows.push(data_row(&m.body)?),
                b'E' => failed = Some(error_text(&m.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match failed {
            Some(e) => bail!("{e}"),
            None => Ok(rows),
        }
    }

    /// Send START_REPLICATION and wait for the stream to begin.
    pub async fn start(&mut self, sql: &str) -> anyhow::Result<()> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'W' => return Ok(()),
                b'E' => bail!("{}", error_text(&m.body)),
                _ => {}
            }
        }
    }

    /// The next CopyData payload of the stream. Cancel-safe.
    pub async fn recv(&mut self) -> anyhow::Result<Bytes> {
        loop {
            let m = self.read().await?;
            match m.tag {
                b'd' => return Ok(m.body),
                b'E' => bail!("{}", error_text(&m.body)),
                b'c' => bail!("the server ended the replication stream"),
                _ => {}
            }
        }
    }

    /// Send one CopyData payload.
    pub async fn send(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        frontend::CopyData::new(payload)?.write(&mut self.out);
        self.flush().await
    }
}

/// The text values of a DataRow body.
fn data_row(body: &[u8]) -> anyhow::Result<Vec<Option<String>>> {
    let mut b = body;
    if b.len() < 2 {
        bail!("short data row");
    }
    let n = b.get_i16();
    let mut out = Vec::new();
    for _ in 0..n {
        if b.len() < 4 {
            bail!("short data row");
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            bail!("short data row");
        }
        out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b.advance(len);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_errors_decode() {
        let mut row = vec![0, 2];
        row.extend(2i32.to_be_bytes());
        row.extend(b"ab");
        row.extend((-1i32).to_be_bytes());
        assert_eq!(data_row(&row).unwrap(), vec![Some("ab".to_string()), None]);
        assert!(data_row(&row[..5]).is_err());
        assert_eq!(
            error_text(b"SERROR\0C42704\0Mno such slot\0\0"),
            "no such slot (42704)"
        );
    }
}
