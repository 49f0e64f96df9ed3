//! Checking a configuration before it is used: every problem names its key.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::*;

impl Config {
    /// Check everything that can be checked without touching the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        resolve("server.listen", &self.server.listen)?;
        if self.server.max_client_connections == 0 {
            return Err(invalid(
                "server.max_client_connections",
                "must be at least 1",
            ));
        }
        if self.server.max_message_size.0 < 1024 {
            return Err(invalid("server.max_message_size", "must be at least 1kB"));
        }
        if self.server.max_message_size.0 > (1 << 30) {
            return Err(invalid(
                "server.max_message_size",
                "must be at most 1GiB (the protocol's own limit)",
            ));
        }
        match (&self.server.tls_cert, &self.server.tls_key) {
            (Some(c), Some(k)) => {
                readable("server.tls_cert", c)?;
                readable("server.tls_key", k)?;
            }
            (None, None) if self.server.require_tls => {
                return Err(invalid(
                    "server.require_tls",
                    "needs server.tls_cert and server.tls_key",
                ))
            }
            (None, None) => {}
            _ => {
                return Err(invalid(
                    "server.tls_cert",
                    "tls_cert and tls_key must be set together",
                ))
            }
        }
        if self.upstream.host.trim().is_empty() {
            return Err(invalid("upstream.host", "must not be empty"));
        }
        if self.upstream.port == 0 {
            return Err(invalid("upstream.port", "must be 1-65535"));
        }
        if self.upstream.connect_timeout.0.is_zero() {
            return Err(invalid(
                "upstream.connect_timeout",
                "must be greater than 0",
            ));
        }
        if self.upstream.unix_socket_dir().is_some()
            && matches!(self.upstream.tls, TlsMode::Require | TlsMode::VerifyFull)
        {
            return Err(invalid(
                "upstream.tls",
                "Postgres does not offer TLS on Unix sockets; use disable or prefer",
            ));
        }
        if let Some(ca) = &self.upstream.tls_ca_file {
            readable("upstream.tls_ca_file", ca)?;
        }
        if !self.admin.listen.is_empty() {
            resolve("admin.listen", &self.admin.listen)?;
        }
        for url in self.l2.redis_url.iter().chain(self.l2.seeds.iter()) {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                return Err(invalid(
                    "l2.redis_url",
                    format!("'{url}' is not a redis:// or rediss:// URL"),
                ));
            }
        }
        for (key, file) in [
            ("l2.tls_ca_file", &self.l2.tls_ca_file),
            ("l2.tls_cert_file", &self.l2.tls_cert_file),
            ("l2.tls_key_file", &self.l2.tls_key_file),
        ] {
            if let Some(f) = file {
                readable(key, f)?;
            }
        }
        if self.l2.tls_cert_file.is_some() != self.l2.tls_key_file.is_some() {
            return Err(invalid(
                "l2.tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            ));
        }
        let key = crate::signing::load_key(
            self.l2.signing_key.as_deref(),
            self.l2.signing_key_file.as_deref(),
        )
        .map_err(|e| invalid("l2.signing_key", e.to_string()))?;
        if key.is_none() && !self.l2.nodes().is_empty() {
            return Err(invalid(
                "l2.signing_key",
                "required when L2 is on: pgtier does not trust what it reads from Redis without it \
                 (make one with `openssl rand -hex 32`; the same key on every pgtier sharing the Redis)",
            ));
        }
        if self.l2.timeout.0.is_zero() {
            return Err(invalid("l2.timeout", "must be greater than 0"));
        }
        if self.l2.breaker_failures == 0 {
            return Err(invalid("l2.breaker_failures", "must be at least 1"));
        }
        if self.l2.prefix.is_empty() || self.l2.prefix.contains(char::is_whitespace) {
            return Err(invalid("l2.prefix", "must be non-empty, without spaces"));
        }
        for (i, r) in self.cache.rules.iter().enumerate() {
            let key = format!("cache.rules[{i}]");
            let targets = [
                r.table.is_some(),
                r.query.is_some(),
                r.fingerprint.is_some(),
            ];
            if targets.iter().filter(|&&t| t).count() != 1 {
                return Err(invalid(
                    &key,
                    "needs exactly one of table, query, fingerprint",
                ));
            }
            if let Some(q) = &r.query {
                regex::Regex::new(q)
                    .map_err(|e| invalid(&format!("{key}.query"), e.to_string()))?;
            }
            if let Some(f) = &r.fingerprint {
                u64::from_str_radix(f, 16).map_err(|_| {
                    invalid(
                        &format!("{key}.fingerprint"),
                        format!("'{f}' is not 16 hex digits"),
                    )
                })?;
            }
            if let Some(t) = &r.table {
                if t.is_empty() || t.split('.').count() > 2 {
                    return Err(invalid(
                        &format!("{key}.table"),
                        format!("'{t}' is not name or schema.name"),
                    ));
                }
            }
        }
        for (i, u) in self.admin.users.iter().enumerate() {
            if crate::scram::Verifier::parse(&u.password).is_none() {
                return Err(invalid(
                    &format!("admin.users[{i}].password"),
                    "must be a SCRAM-SHA-256 verifier (run `pgtier hash-password`), not a plain password",
                ));
            }
            if u.name.is_empty() {
                return Err(invalid(
                    &format!("admin.users[{i}].name"),
                    "must not be empty",
                ));
            }
        }
        self.control_targets()?;
        if self.invalidation.channel.is_empty() || self.invalidation.channel.len() > 63 {
            return Err(invalid(
                "invalidation.channel",
                "must be 1 to 63 characters",
            ));
        }
        let m = self.invalidation.min_hits_per_write;
        if !m.is_finite() || m < 0.0 {
            return Err(invalid(
                "invalidation.min_hits_per_write",
                "must be a number of at least 0",
            ));
        }
        self.validate_source()?;
        for (key, d) in [
            (
                "invalidation.check_interval",
                self.invalidation.check_interval,
            ),
            (
                "invalidation.rescan_interval",
                self.invalidation.rescan_interval,
            ),
            (
                "invalidation.fence_timeout",
                self.invalidation.fence_timeout,
            ),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.cache.warm_after_hits == 0 {
            return Err(invalid("cache.warm_after_hits", "must be at least 1"));
        }
        if self.cache.max_entry_bytes.0 == 0 {
            return Err(invalid("cache.max_entry_bytes", "must be greater than 0"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("'{}': {e}", self.log.level)))?;
        Ok(())
    }

    /// The logical source's own settings. (Key-level invalidation with the
    /// L2 is fine on it: column sets are registered through the stream.)
    fn validate_source(&self) -> Result<(), ConfigError> {
        let poll = &self.invalidation.poll_interval.0;
        if *poll < std::time::Duration::from_micros(100)
            || *poll > std::time::Duration::from_secs(1)
        {
            return Err(invalid(
                "invalidation.poll_interval",
                "must be between 100us and 1s",
            ));
        }
        let l2 = self.l2.enabled && (self.l2.redis_url.is_some() || !self.l2.seeds.is_empty());
        if self.invalidation.source == Source::Poll && l2 {
            // Each instance reads the change table at moments of its own, so
            // instances could not derive the same L2 versions.
            return Err(invalid(
                "invalidation.source",
                "\"poll\" works without an L2 (instances could not agree on versions): \
                 unset l2.redis_url, or use \"notify\" or \"logical\"",
            ));
        }
        if self.invalidation.source != Source::Logical {
            return Ok(());
        }
        let p = &self.invalidation.publication;
        if p.is_empty() || p.len() > 63 {
            return Err(invalid(
                "invalidation.publication",
                "must be 1 to 63 characters",
            ));
        }
        Ok(())
    }

    /// The address clients connect to (`server.listen`), resolved.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        resolve("server.listen", &self.server.listen)
    }
}

fn resolve(key: &str, addr: &str) -> Result<SocketAddr, ConfigError> {
    addr.to_socket_addrs()
        .map_err(|e| invalid(key, format!("'{addr}' is not a HOST:PORT address ({e})")))?
        .next()
        .ok_or_else(|| invalid(key, format!("'{addr}' resolves to no address")))
}

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))
}
