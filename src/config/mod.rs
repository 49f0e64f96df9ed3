//! Configuration: a TOML file, overridden by `PGTIER_*` environment variables and
//! command-line flags, validated once into an immutable [`Config`].
//!
//! Readers never hold a `&mut Config`: the running proxy reads a snapshot
//! ([`Snapshot`]) that a reload swaps atomically, so a request sees one consistent
//! configuration from start to end.

pub mod cli;
pub mod control;
pub mod units;
mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub use units::{ByteSize, Dur};

/// An invalid configuration: names the key and says why.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

/// A word that names none of a setting's choices.
#[derive(Debug, thiserror::Error)]
#[error("'{given}' is not a {what}; use {choices}")]
pub struct UnknownChoice {
    pub given: String,
    what: &'static str,
    choices: &'static str,
}

/// An address that is not `HOST:PORT` (`--upstream`).
#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    #[error("'{0}' is not HOST:PORT")]
    NoPort(String),
    #[error("'{0}' has no host")]
    NoHost(String),
    #[error("'{given}' has an invalid port '{port}'")]
    BadPort { given: String, port: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        reason: reason.into(),
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
    pub cache: CacheConfig,
    pub l1: L1Config,
    pub l2: L2Config,
    pub invalidation: InvalidationConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvalidationConfig {
    /// One postgres:// URL per cached database, with the credentials pgtier uses
    /// for its listener and for installing triggers. Databases not listed are
    /// proxied but never cached.
    pub control_urls: Vec<String>,
    /// Password for control URLs that carry none (else PGTIER_CONTROL_PASSWORD).
    pub password_file: Option<PathBuf>,
    /// Install triggers at start-up and on tables created later.
    pub auto_install: bool,
    /// Schemas whose tables get triggers; empty = every user schema.
    pub schemas: Vec<String>,
    /// Restrict triggers to these tables (`name` or `schema.name`).
    pub tables: Vec<String>,
    /// Notification channel.
    pub channel: String,
    /// Listener health-check period; a dead connection is noticed within ~2x this.
    pub check_interval: Dur,
    /// Catalog re-read period (new tables, DDL without event triggers).
    pub rescan_interval: Dur,
    /// Longest a client waits after committing a write for pgtier to have
    /// processed its invalidation (read-your-writes).
    pub fence_timeout: Dur,
    /// With `source = "poll"`: how often the change table is read.
    pub poll_interval: Dur,
    /// When to start announcing writes to a table: `lazy` when pgtier first
    /// wants to cache a read of it (writers of tables nobody caches pay almost
    /// nothing), `eager` for every table with a trigger as soon as the listener
    /// connects (no warm-up misses).
    pub watch: WatchMode,
    /// Stop announcing writes to a table whose announced writes earn fewer than
    /// `min_hits_per_write` cache hits each (each announced write pays
    /// Postgres's NOTIFY lock) until a read wants it cached again.
    pub unwatch_on_write: bool,
    /// The hits on its cached reads that each announced write of a table must
    /// earn for its writes to stay announced (see `unwatch_on_write`).
    pub min_hits_per_write: f64,
    /// Key-level invalidation of reads by key (see config/pgtier.toml).
    pub key_level: bool,
    /// Where writes are learnt of: `notify` (triggers + LISTEN/NOTIFY) or
    /// `logical` (a logical replication stream; nothing installed in the
    /// database but a publication).
    pub source: Source,
    /// The publication the logical source streams (created by `pgtier
    /// install-triggers`).
    pub publication: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Notify,
    Logical,
    /// Triggers as with `notify`, but they append to an unlogged table
    /// pgtier reads every `poll_interval`: writers never take Postgres's
    /// notification lock (see `invalidation::poll`).
    Poll,
}

impl std::str::FromStr for Source {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, UnknownChoice> {
        match s {
            "notify" => Ok(Source::Notify),
            "logical" => Ok(Source::Logical),
            "poll" => Ok(Source::Poll),
            _ => Err(UnknownChoice {
                given: s.to_string(),
                what: "invalidation source",
                choices: "notify, logical or poll",
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    #[default]
    Lazy,
    Eager,
}

impl std::str::FromStr for WatchMode {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, UnknownChoice> {
        match s {
            "lazy" => Ok(WatchMode::Lazy),
            "eager" => Ok(WatchMode::Eager),
            _ => Err(UnknownChoice {
                given: s.to_string(),
                what: "watch mode",
                choices: "lazy or eager",
            }),
        }
    }
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        InvalidationConfig {
            control_urls: Vec::new(),
            password_file: None,
            auto_install: false,
            schemas: Vec::new(),
            tables: Vec::new(),
            channel: "pgtier_invalidate".into(),
            check_interval: Dur(std::time::Duration::from_secs(2)),
            rescan_interval: Dur(std::time::Duration::from_secs(10)),
            fence_timeout: Dur(std::time::Duration::from_secs(1)),
            poll_interval: Dur(std::time::Duration::from_millis(2)),
            watch: WatchMode::Lazy,
            unwatch_on_write: true,
            min_hits_per_write: 5.0,
            key_level: false,
            source: Source::Notify,
            publication: "pgtier".into(),
        }
    }
}

impl InvalidationConfig {
    /// The password for URLs without one: the file, else the environment.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(path) = &self.password_file {
            let p = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "invalidation.password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            return Ok(Some(p.trim_end_matches(['\n', '\r']).to_string()));
        }
        Ok(std::env::var("PGTIER_CONTROL_PASSWORD").ok())
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Cache every read that is safe to cache, unless a rule says `cache = false`.
    #[default]
    Auto,
    /// Cache only what a rule lists with `cache = true` (like ReadySet's CREATE CACHE).
    Allowlist,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// TTL of a cached result when no rule says otherwise; 0 disables caching.
    pub default_ttl: Dur,
    pub mode: CacheMode,
    /// Results bigger than this are streamed to the client and not cached.
    pub max_entry_bytes: ByteSize,
    /// How long a miss waits for an identical miss already running in another
    /// session before going to Postgres itself.
    pub coalesce_wait: Dur,
    /// Allow caching reads of pg_catalog / information_schema.
    pub system_catalogs: bool,
    /// Refresh an entry that was hot right after a write invalidates it, on an
    /// idle session of its own context (see README, "Warming hot keys").
    pub warm_hot_keys: bool,
    /// Hits in its life that make an entry hot.
    pub warm_after_hits: u32,
    pub rules: Vec<RuleConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            default_ttl: Dur(std::time::Duration::from_secs(30)),
            mode: CacheMode::Auto,
            max_entry_bytes: ByteSize(1 << 20),
            coalesce_wait: Dur(std::time::Duration::from_millis(100)),
            system_catalogs: false,
            warm_hot_keys: false,
            warm_after_hits: 10,
            rules: Vec::new(),
        }
    }
}

/// One per-table or per-query rule. Exactly one of `table`, `query`, `fingerprint`.
#[derive(Clone, Debug, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `name` or `schema.name`.
    pub table: Option<String>,
    /// A regular expression matched against the statement text.
    pub query: Option<String>,
    /// A statement shape: pg_query fingerprint as 16 hex digits.
    pub fingerprint: Option<String>,
    pub ttl: Option<Dur>,
    /// Serve an expired entry for up to this long while one refresh runs.
    pub swr: Option<Dur>,
    /// false: never cache; true: cache (required in allowlist mode).
    pub cache: Option<bool>,
    /// Share entries for this table across users (no per-user key).
    pub public: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct L1Config {
    /// Memory bound of the in-process cache (payload plus per-entry overhead).
    pub max_bytes: ByteSize,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            max_bytes: ByteSize(256 << 20),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where clients connect (HOST:PORT).
    pub listen: String,
    /// Connections beyond this get "too many clients" (SQLSTATE 53300).
    pub max_client_connections: usize,
    /// Largest frontend message accepted; larger ones close the session.
    pub max_message_size: ByteSize,
    /// Worker threads for client sessions; 0 = one per CPU core.
    pub workers: usize,
    /// How long SIGTERM waits for open sessions before exiting.
    pub shutdown_grace: Dur,
    /// Time allowed for a client to complete startup and authentication.
    pub auth_timeout: Dur,
    /// PEM certificate chain and key for client-facing TLS; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that did not negotiate TLS (needs tls_cert/tls_key).
    /// Postgres sees pgtier's address, not the client's, so its `hostssl`
    /// rules cannot require this for clients of pgtier.
    pub require_tls: bool,
    /// Unix socket through which a new binary takes over the listener (SIGQUIT upgrade).
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:6432".into(),
            max_client_connections: 1000,
            max_message_size: ByteSize(64 << 20),
            workers: 0,
            shutdown_grace: Dur(std::time::Duration::from_secs(30)),
            auth_timeout: Dur(std::time::Duration::from_secs(60)),
            tls_cert: None,
            tls_key: None,
            require_tls: false,
            upgrade_sock: PathBuf::from("/tmp/pgtier_upgrade.sock"),
            pid_file: PathBuf::from("/tmp/pgtier.pid"),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS if the server offers it, without certificate checks (libpq's `prefer`).
    Prefer,
    /// TLS or fail, without certificate checks (libpq's `require`).
    Require,
    /// TLS with the certificate chain and host name verified.
    VerifyFull,
}

impl std::str::FromStr for TlsMode {
    type Err = UnknownChoice;
    fn from_str(s: &str) -> Result<Self, UnknownChoice> {
        match s {
            "disable" => Ok(TlsMode::Disable),
            "prefer" => Ok(TlsMode::Prefer),
            "require" => Ok(TlsMode::Require),
            "verify-full" => Ok(TlsMode::VerifyFull),
            _ => Err(UnknownChoice {
                given: s.to_string(),
                what: "TLS mode",
                choices: "disable, prefer, require or verify-full",
            }),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// CA bundle for `verify-full`; the system roots when unset.
    pub tls_ca_file: Option<PathBuf>,
    /// Name to verify in the server certificate; defaults to `host`.
    pub tls_server_name: Option<String>,
    pub connect_timeout: Dur,
    /// TCP keepalive idle time on upstream connections; 0 disables keepalive.
    pub keepalive: Dur,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            tls: TlsMode::Disable,
            tls_ca_file: None,
            tls_server_name: None,
            connect_timeout: Dur(std::time::Duration::from_secs(5)),
            keepalive: Dur(std::time::Duration::from_secs(30)),
        }
    }
}

impl UpstreamConfig {
    /// Like libpq, a host that is an absolute path names the directory holding
    /// the server's Unix socket.
    pub fn unix_socket_dir(&self) -> Option<&Path> {
        self.host.starts_with('/').then(|| Path::new(&self.host))
    }

    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// HTTP endpoint for /metrics, /health and /ready; empty disables it.
    pub listen: String,
    /// Statement shapes exported with per-shape metrics (the busiest ones).
    pub top_shapes: usize,
    /// Who may use the admin console (database `pgtier`); empty = console off.
    pub users: Vec<AdminUser>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9930".into(),
            top_shapes: 20,
            users: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminUser {
    pub name: String,
    /// A SCRAM-SHA-256 verifier (`pgtier hash-password` prints one), never the
    /// password itself.
    pub password: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct L2Config {
    /// Redis URL (redis:// or rediss://, with user:password for AUTH/ACL);
    /// unset means no L2.
    pub redis_url: Option<String>,
    /// Use Redis Cluster; `seeds` (or `redis_url`) name the starting nodes.
    pub cluster: bool,
    pub seeds: Vec<String>,
    /// Set to false to keep the URL but stop using L2.
    pub enabled: bool,
    /// Keys are `<prefix>:<format version>:<hash>`.
    pub prefix: String,
    /// Every Redis call gives up after this long; the request goes on without L2.
    pub timeout: Dur,
    pub connect_timeout: Dur,
    /// Consecutive failures that open the circuit breaker ...
    pub breaker_failures: u32,
    /// ... and how long it stays open before one probe is let through.
    pub breaker_cooldown: Dur,
    /// Results larger than this are kept in L1 only.
    pub max_value_size: ByteSize,
    /// PEM certificate(s) to trust for rediss:// instead of the system's roots
    /// (a private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for Redis servers that require mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// HMAC key (hex, or `base64:...`; at least 32 bytes) shared by every
    /// pgtier of the deployment: values in Redis and L2 epoch notifications are
    /// signed with it. Required when L2 is on.
    pub signing_key: Option<String>,
    /// The same, read from a file.
    pub signing_key_file: Option<PathBuf>,
}

impl Default for L2Config {
    fn default() -> Self {
        L2Config {
            redis_url: None,
            cluster: false,
            seeds: Vec::new(),
            enabled: true,
            prefix: "pgtier".into(),
            timeout: Dur(std::time::Duration::from_millis(5)),
            connect_timeout: Dur(std::time::Duration::from_secs(1)),
            breaker_failures: 5,
            breaker_cooldown: Dur(std::time::Duration::from_secs(1)),
            max_value_size: ByteSize(1 << 20),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            signing_key: None,
            signing_key_file: None,
        }
    }
}

impl L2Config {
    /// The node URLs to connect to, if L2 is on.
    pub fn nodes(&self) -> Vec<String> {
        if !self.enabled {
            return Vec::new();
        }
        let mut nodes = self.seeds.clone();
        if let Some(u) = &self.redis_url {
            if !nodes.contains(u) {
                nodes.insert(0, u.clone());
            }
        }
        nodes
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: "info", "pgtier=debug", ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Config {
    /// Parse a config file. Unknown keys are errors, so typos do not pass silently.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("--config", format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|e| ConfigError {
            key: format!("{} {}", path.display(), e.key),
            reason: e.reason,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let reason = e.message().to_string();
            let key = match e.span() {
                Some(span) => format!("(line {})", line_of(text, span.start)),
                None => String::new(),
            };
            ConfigError { key, reason }
        })
    }

    /// A copy safe to print: passwords in URLs replaced by `****`.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let hide = |u: &mut String| {
            if let Ok(re) = regex::Regex::new(r"://([^:/@]*):([^@]*)@") {
                *u = re.replace(u, "://$1:****@").into_owned();
            }
        };
        c.invalidation.control_urls.iter_mut().for_each(hide);
        c.l2.redis_url.iter_mut().for_each(hide);
        c.l2.seeds.iter_mut().for_each(hide);
        if c.l2.signing_key.is_some() {
            c.l2.signing_key = Some("****".into());
        }
        c
    }

    /// The cached databases' control connections, with the control password
    /// filled in where a URL carries none.
    pub fn control_targets(&self) -> Result<Vec<control::ControlTarget>, ConfigError> {
        let password = self.invalidation.password()?;
        control::parse(&self.invalidation.control_urls, password.as_deref())
            .map_err(|e| invalid("invalidation.control_urls", e.to_string()))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Split "host:port" (or "[v6]:port") as given to `--upstream`.
pub fn split_host_port(s: &str) -> Result<(String, u16), HostPortError> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| HostPortError::NoPort(s.to_string()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(HostPortError::NoHost(s.to_string()));
    }
    let port: u16 = port.parse().map_err(|_| HostPortError::BadPort {
        given: s.to_string(),
        port: port.to_string(),
    })?;
    Ok((host.to_string(), port))
}

/// The configuration the running proxy reads: one immutable snapshot, swapped whole.
pub type Snapshot = Arc<Config>;

/// Holder of the current snapshot; cheap to read from any task.
pub struct Live {
    current: ArcSwap<Config>,
}

impl Live {
    pub fn new(config: Config) -> Self {
        Live {
            current: ArcSwap::from_pointee(config),
        }
    }

    pub fn load(&self) -> Snapshot {
        self.current.load_full()
    }

    pub fn store(&self, config: Config) {
        self.current.store(Arc::new(config));
    }
}

#[cfg(test)]
mod tests;
