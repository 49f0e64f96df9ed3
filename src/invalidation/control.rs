//! Control connections: pgtier's own connections to each cached database, made
//! with credentials from `--control-url`, used by the listener and by
//! `install-triggers`. Passwords never appear in logs.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::TlsMode;
use crate::proxy::tls;

#[derive(Clone)]
pub struct ControlTarget {
    pub config: Config,
    pub database: String,
    /// `user@host:port/db`, for logs and errors.
    pub display: String,
}

impl std::fmt::Debug for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Parse control URLs; `password` fills in URLs that carry none.
pub fn parse(urls: &[String], password: Option<&str>) -> Result<Vec<ControlTarget>, String> {
    let mut out: Vec<ControlTarget> = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut config = Config::from_str(url).map_err(|e| {
            format!("invalidation.control_urls[{i}]: not a valid postgres:// URL ({e})")
        })?;
        let database = config
            .get_dbname()
            .or(config.get_user())
            .ok_or_else(|| format!("invalidation.control_urls[{i}]: names no database"))?
            .to_string();
        if config.get_user().is_none() {
            return Err(format!("invalidation.control_urls[{i}]: names no user"));
        }
        if config.get_password().is_none() {
            if let Some(p) = password {
                config.password(p);
            }
        }
        config
            .application_name("pgtier-control")
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3);
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let display = format!(
            "{}@{host}:{port}/{database}",
            config.get_user().unwrap_or_default()
        );
        if out.iter().any(|t| t.database == database) {
            return Err(format!(
                "invalidation.control_urls[{i}]: database '{database}' is listed twice"
            ));
        }
        out.push(ControlTarget {
            config,
            database,
            display,
        });
    }
    Ok(out)
}

/// TLS for control connections follows the upstream's TLS mode.
pub fn tls_for(
    mode: TlsMode,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<(MakeRustlsConnect, SslMode)> {
    let (cfg, ssl) = match tls::client_config(mode, ca_file)? {
        Some(cfg) => (
            cfg,
            if mode == TlsMode::Prefer {
                SslMode::Prefer
            } else {
                SslMode::Require
            },
        ),
        None => (
            tls::client_config(TlsMode::Require, None)?
                .ok_or_else(|| anyhow::anyhow!("no TLS configuration"))?,
            SslMode::Disable,
        ),
    };
    Ok((MakeRustlsConnect::new(Arc::unwrap_or_clone(cfg)), ssl))
}

/// Connect, driving the connection on the current runtime. Notifications and
/// other asynchronous messages are handed to `on_message` by the driver task.
pub async fn connect(
    target: &ControlTarget,
    tls: &MakeRustlsConnect,
    ssl: SslMode,
    on_message: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::AsyncMessage>>,
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
                        if tx.send(msg).is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_redacted() {
        let t = parse(
            &["postgres://app:secret@db.internal:6543/shop".to_string()],
            None,
        )
        .unwrap();
        assert_eq!(t[0].database, "shop");
        assert_eq!(t[0].display, "app@db.internal:6543/shop");
        assert!(!format!("{:?}", t[0]).contains("secret"));
        let t = parse(&["postgres://app@h/db".to_string()], Some("from-file")).unwrap();
        assert_eq!(t[0].config.get_password(), Some(&b"from-file"[..]));
        assert!(parse(&["nonsense://".to_string()], None).is_err());
        assert!(parse(
            &["postgres://u@h/a".into(), "postgres://u@h/a".into()],
            None
        )
        .is_err());
    }
}
