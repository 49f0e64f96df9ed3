//! The command line. Every flag can also come from a `PGTIER_*` environment
//! variable; both override the config file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::{split_host_port, ByteSize, Config, ConfigError, Dur, Source, TlsMode, WatchMode};

#[derive(Debug, Parser)]
#[command(
    name = "pgtier",
    version,
    about = "A caching sidecar for PostgreSQL",
    long_about = "pgtier speaks the PostgreSQL wire protocol: point a client at it and it \
                  forwards to the real server, answering cacheable reads from its cache."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub opts: Options,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no sub-command is given).
    Run,
    /// Validate the configuration, print it as TOML and exit.
    CheckConfig,
    /// Install (or refresh) the invalidation triggers in every database named by
    /// --control-url. Idempotent.
    InstallTriggers {
        /// Only tables in this schema (repeatable); default: every user schema.
        #[arg(long = "schema")]
        schemas: Vec<String>,
        /// Only this table, `name` or `schema.name` (repeatable).
        #[arg(long = "table")]
        tables: Vec<String>,
    },
    /// Remove the triggers, event triggers and the pgtier schema.
    UninstallTriggers,
    /// Print a SCRAM-SHA-256 verifier for an admin console password (read from
    /// stdin unless given), for `admin.users[].password`.
    HashPassword {
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Debug, Args, Clone, Default)]
pub struct Options {
    /// TOML config file.
    #[arg(long, env = "PGTIER_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Client-facing HOST:PORT (server.listen).
    #[arg(long, env = "PGTIER_LISTEN", global = true)]
    pub listen: Option<String>,
    /// The real Postgres as HOST:PORT (upstream.host, upstream.port).
    #[arg(long, env = "PGTIER_UPSTREAM", global = true)]
    pub upstream: Option<String>,
    /// disable | prefer | require | verify-full (upstream.tls).
    #[arg(long, env = "PGTIER_UPSTREAM_TLS", global = true)]
    pub upstream_tls: Option<TlsMode>,
    /// CA bundle for verify-full (upstream.tls_ca_file).
    #[arg(long, env = "PGTIER_UPSTREAM_TLS_CA", global = true)]
    pub upstream_tls_ca: Option<PathBuf>,
    /// Upstream connect timeout, e.g. 5s (upstream.connect_timeout).
    #[arg(long, env = "PGTIER_CONNECT_TIMEOUT", global = true)]
    pub connect_timeout: Option<Dur>,
    /// HTTP HOST:PORT for /metrics, /health, /ready; "" disables (admin.listen).
    #[arg(long, env = "PGTIER_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// Redis URL for the shared L2 cache (l2.redis_url).
    #[arg(long, env = "PGTIER_REDIS", global = true)]
    pub redis: Option<String>,
    /// HMAC key for values in Redis, hex or base64:... (l2.signing_key).
    #[arg(
        long,
        env = "PGTIER_L2_SIGNING_KEY",
        global = true,
        hide_env_values = true
    )]
    pub l2_signing_key: Option<String>,
    /// Default cache TTL, e.g. 30s; 0 disables caching (cache.default_ttl).
    #[arg(long, env = "PGTIER_DEFAULT_TTL", global = true)]
    pub default_ttl: Option<Dur>,
    /// Memory bound of the L1 cache, e.g. 256MiB (l1.max_bytes).
    #[arg(long, env = "PGTIER_L1_MAX_BYTES", global = true)]
    pub l1_max_bytes: Option<ByteSize>,
    /// Control connection for a cached database, postgres://user:pass@host:port/db
    /// (repeatable; invalidation.control_urls). Only these databases are cached.
    #[arg(
        long = "control-url",
        env = "PGTIER_CONTROL_URL",
        value_delimiter = ',',
        global = true
    )]
    pub control_urls: Vec<String>,
    /// Install triggers at start-up and on new tables (invalidation.auto_install).
    #[arg(long, env = "PGTIER_AUTO_INSTALL_TRIGGERS", global = true)]
    pub auto_install_triggers: bool,
    /// lazy | eager: when writes to a table start being announced (invalidation.watch).
    #[arg(long, env = "PGTIER_WATCH", global = true)]
    pub watch: Option<WatchMode>,
    /// Invalidate reads by key instead of by table (invalidation.key_level).
    #[arg(long, env = "PGTIER_KEY_LEVEL", global = true)]
    pub key_level: bool,
    /// notify | logical: where writes are learnt of (invalidation.source).
    #[arg(long, env = "PGTIER_INVALIDATION_SOURCE", global = true)]
    pub invalidation_source: Option<Source>,
    /// Maximum client connections (server.max_client_connections).
    #[arg(long, env = "PGTIER_MAX_CLIENT_CONNECTIONS", global = true)]
    pub max_client_connections: Option<usize>,
    /// Largest accepted frontend message, e.g. 64MiB (server.max_message_size).
    #[arg(long, env = "PGTIER_MAX_MESSAGE_SIZE", global = true)]
    pub max_message_size: Option<ByteSize>,
    /// Session worker threads, 0 = one per core (server.workers).
    #[arg(long, env = "PGTIER_WORKERS", global = true)]
    pub workers: Option<usize>,
    /// Grace period for open sessions on SIGTERM (server.shutdown_grace).
    #[arg(long, env = "PGTIER_SHUTDOWN_GRACE", global = true)]
    pub shutdown_grace: Option<Dur>,
    /// Log filter, e.g. info or pgtier=debug (log.level).
    #[arg(long, env = "PGTIER_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Unix socket for graceful binary upgrade (server.upgrade_sock).
    #[arg(long, env = "PGTIER_UPGRADE_SOCK", global = true)]
    pub upgrade_sock: Option<PathBuf>,
    /// PID file written at start (server.pid_file).
    #[arg(long, env = "PGTIER_PID_FILE", global = true)]
    pub pid_file: Option<PathBuf>,
    /// Take over the listening socket of a running pgtier (graceful upgrade); send
    /// SIGQUIT to the old process after starting this one.
    #[arg(long, global = true)]
    pub upgrade: bool,
}

impl Options {
    /// Defaults, then the file, then environment and flags.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.apply(&mut c)?;
        c.validate()?;
        Ok(c)
    }

    fn apply(&self, c: &mut Config) -> Result<(), ConfigError> {
        if let Some(v) = &self.listen {
            c.server.listen = v.clone();
        }
        if let Some(v) = &self.upstream {
            let (host, port) = split_host_port(v).map_err(|e| ConfigError {
                key: "--upstream".into(),
                reason: e.to_string(),
            })?;
            c.upstream.host = host;
            c.upstream.port = port;
        }
        if let Some(v) = self.upstream_tls {
            c.upstream.tls = v;
        }
        if let Some(v) = &self.upstream_tls_ca {
            c.upstream.tls_ca_file = Some(v.clone());
        }
        if let Some(v) = self.connect_timeout {
            c.upstream.connect_timeout = v;
        }
        if let Some(v) = &self.admin_listen {
            c.admin.listen = v.clone();
        }
        if let Some(v) = &self.redis {
            c.l2.redis_url = (!v.is_empty()).then(|| v.clone());
        }
        if let Some(v) = &self.l2_signing_key {
            c.l2.signing_key = (!v.is_empty()).then(|| v.clone());
        }
        if let Some(v) = self.default_ttl {
            c.cache.default_ttl = v;
        }
        if let Some(v) = self.l1_max_bytes {
            c.l1.max_bytes = v;
        }
        if !self.control_urls.is_empty() {
            c.invalidation.control_urls = self.control_urls.clone();
        }
        if self.auto_install_triggers {
            c.invalidation.auto_install = true;
        }
        if let Some(v) = self.watch {
            c.invalidation.watch = v;
        }
        if self.key_level {
            c.invalidation.key_level = true;
        }
        if let Some(v) = self.invalidation_source {
            c.invalidation.source = v;
        }
        if let Some(v) = self.max_client_connections {
            c.server.max_client_connections = v;
        }
        if let Some(v) = self.max_message_size {
            c.server.max_message_size = v;
        }
        if let Some(v) = self.workers {
            c.server.workers = v;
        }
        if let Some(v) = self.shutdown_grace {
            c.server.shutdown_grace = v;
        }
        if let Some(v) = &self.log_level {
            c.log.level = v.clone();
        }
        if let Some(v) = &self.pid_file {
            c.server.pid_file = v.clone();
        }
        if let Some(v) = &self.upgrade_sock {
            c.server.upgrade_sock = v.clone();
        }
        Ok(())
    }
}
