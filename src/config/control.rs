//! `invalidation.control_urls`: the databases pgtier caches and how to reach
//! each with pgtier's own credentials. Parsed here, once, for every user of
//! them (the listeners, the admin console, `install-triggers`).

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::Config as PgConfig;

#[derive(Clone)]
pub struct ControlTarget {
    pub config: PgConfig,
    pub database: String,
    /// `user@host:port/db`, for logs and errors.
    pub display: String,
}

impl std::fmt::Debug for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// A control URL pgtier cannot use; names it by its index, never shows it
/// (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum ControlUrlError {
    #[error("invalidation.control_urls[{index}]: not a valid postgres:// URL ({source})")]
    Invalid {
        index: usize,
        source: tokio_postgres::Error,
    },
    #[error("invalidation.control_urls[{0}]: names no database")]
    NoDatabase(usize),
    #[error("invalidation.control_urls[{0}]: names no user")]
    NoUser(usize),
    #[error("invalidation.control_urls[{index}]: database '{database}' is listed twice")]
    Twice { index: usize, database: String },
}

/// Parse control URLs; `password` fills in URLs that carry none.
pub(super) fn parse(
    urls: &[String],
    password: Option<&str>,
) -> Result<Vec<ControlTarget>, ControlUrlError> {
    let mut out: Vec<ControlTarget> = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut config = PgConfig::from_str(url)
            .map_err(|source| ControlUrlError::Invalid { index: i, source })?;
        let database = config
            .get_dbname()
            .or(config.get_user())
            .ok_or(ControlUrlError::NoDatabase(i))?
            .to_string();
        if config.get_user().is_none() {
            return Err(ControlUrlError::NoUser(i));
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
            return Err(ControlUrlError::Twice { index: i, database });
        }
        out.push(ControlTarget {
            config,
            database,
            display,
        });
    }
    Ok(out)
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
