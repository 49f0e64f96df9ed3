//! What all sessions of one pgtier process share: the live configuration, the
//! cache, the invalidation state, the upstream, and the open sessions (for the
//! admin console and the drain on shutdown). Reloading the configuration and
//! the readiness probe live here too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use super::upstream::{Upstream, UpstreamError, UpstreamSetupError};
use crate::cache::Cache;
use crate::config::cli::Options;
use crate::config::{Config, ConfigError, Live};
use crate::invalidation::Invalidation;
use crate::logging::LogLevelError;
use crate::tls::TlsError;

/// Why pgtier cannot start serving with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
}

/// Why pgtier cannot serve yet (`/ready` answers 503 with it).
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("invalidation listener not connected for: {}", .0.join(", "))]
    Listeners(Vec<String>),
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    LogLevel(#[from] LogLevelError),
}

/// What the admin console shows about an open session.
pub struct SessionInfo {
    pub id: u64,
    pub peer: String,
    pub user: String,
    pub database: String,
    pub since: SystemTime,
    /// Transaction status byte of the last ReadyForQuery (I, T, E).
    pub state: AtomicU8,
    pub requests: AtomicU64,
    /// The server backend's key (pid, secret), which the client cancels with:
    /// pgtier relays BackendKeyData as is.
    pub backend: Option<(i32, i32)>,
    /// A cancel for this session arrived and the client's request it was
    /// meant for has not ended yet: if it stopped one of pgtier's own
    /// requests instead (a refresh ahead of the client's), the session sends
    /// it again.
    pub cancel_wanted: AtomicBool,
}

/// State shared by all sessions of one pgtier process.
pub struct Proxy {
    pub config: Arc<Live>,
    /// The command line, re-applied over the file on reload.
    pub options: Options,
    /// Open sessions, for the admin console.
    pub sessions_info: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    pub cache: Arc<Cache>,
    pub invalidation: Arc<Invalidation>,
    pub upstream: Upstream,
    pub tls_acceptor: Option<TlsAcceptor>,
    /// Open client connections (console ones included), for the drain.
    sessions: AtomicUsize,
    next_id: AtomicU64,
    idle: Notify,
}

impl Proxy {
    pub fn new(config: Arc<Live>, options: Options) -> Result<Self, StartError> {
        let snap = config.load();
        let tls_acceptor = match (&snap.server.tls_cert, &snap.server.tls_key) {
            (Some(c), Some(k)) => Some(TlsAcceptor::from(crate::tls::server_config(c, k)?)),
            _ => None,
        };
        let databases = snap.control_targets()?.into_iter().map(|t| t.database);
        Ok(Proxy {
            options,
            sessions_info: Mutex::new(HashMap::new()),
            cache: Arc::new(Cache::new(&snap)),
            invalidation: Arc::new(Invalidation::new(databases, &snap.invalidation.channel)),
            upstream: Upstream::new(&snap.upstream)?,
            config,
            tls_acceptor,
            sessions: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            idle: Notify::new(),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load()
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// The Prometheus exposition text (`/metrics`, the console's SHOW STATS).
    pub fn metrics_text(&self) -> String {
        let l1 = &self.cache.l1;
        l1.sync();
        let sample = crate::metrics::L1Sample {
            entries: l1.entry_count(),
            bytes: l1.weighted_bytes(),
        };
        crate::metrics::render(sample, self.config().admin.top_shapes)
    }

    /// Whether pgtier can serve: the upstream accepts connections and every
    /// invalidation listener is connected.
    pub async fn readiness(&self) -> Result<(), NotReady> {
        self.upstream.probe().await?;
        let down: Vec<String> = self
            .invalidation
            .databases()
            .filter(|d| !d.live())
            .map(|d| d.name.clone())
            .collect();
        if !down.is_empty() {
            return Err(NotReady::Listeners(down));
        }
        Ok(())
    }

    /// Re-read the configuration (SIGHUP, admin RELOAD). An invalid file
    /// changes nothing; settings that only take effect at start are kept and
    /// reported.
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let result = self.reload_inner();
        let label = if result.is_ok() { "ok" } else { "error" };
        ::metrics::counter!("pgtier_config_reloads_total", "result" => label).increment(1);
        match &result {
            Ok(notes) => tracing::info!(?notes, "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the running configuration")
            }
        }
        result
    }

    fn reload_inner(&self) -> Result<Vec<String>, ReloadError> {
        let old = self.config();
        let mut new = self.options.load()?;
        let mut notes = Vec::new();
        macro_rules! fixed {
            ($($f:tt).+, $key:expr) => {
                if serde_json::to_string(&new.$($f).+).ok() != serde_json::to_string(&old.$($f).+).ok() {
                    notes.push(format!("{} changed: takes effect after a restart", $key));
                    new.$($f).+ = old.$($f).+.clone();
                }
            };
        }
        fixed!(server.listen, "server.listen");
        fixed!(server.workers, "server.workers");
        fixed!(server.tls_cert, "server.tls_cert");
        fixed!(server.tls_key, "server.tls_key");
        fixed!(server.upgrade_sock, "server.upgrade_sock");
        fixed!(server.pid_file, "server.pid_file");
        fixed!(upstream, "upstream");
        fixed!(admin.listen, "admin.listen");
        fixed!(invalidation, "invalidation");
        // The listeners sign and check L2 epochs with the key they started with.
        fixed!(l2.signing_key, "l2.signing_key");
        fixed!(l2.signing_key_file, "l2.signing_key_file");
        fixed!(log.format, "log.format");
        crate::logging::set_level(&new.log.level)?;
        self.cache.reconfigure(&old, &new);
        self.config.store(new);
        Ok(notes)
    }

    /// A number for a new connection (logs, the console's SHOW CONNECTIONS).
    pub(super) fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A client's cancel request for the session with this backend key is
    /// about to be relayed.
    pub(super) fn note_cancel(&self, pid: i32, secret: i32) {
        if let Ok(m) = self.sessions_info.lock() {
            if let Some(info) = m.values().find(|i| i.backend == Some((pid, secret))) {
                info.cancel_wanted.store(true, Ordering::Release);
            }
        }
    }

    pub(super) fn register(&self, info: Arc<SessionInfo>) {
        if let Ok(mut m) = self.sessions_info.lock() {
            m.insert(info.id, info);
        }
    }

    pub(super) fn unregister(&self, id: u64) {
        if let Ok(mut m) = self.sessions_info.lock() {
            m.remove(&id);
        }
    }

    /// Wait until no session is open, or the deadline passes. Returns the number
    /// of sessions still open.
    pub async fn wait_idle(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.idle.notified();
            let n = self.active_sessions();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active_sessions();
            }
        }
    }
}

/// Counts open sessions and wakes the drain waiter when the last one ends.
pub(super) struct SessionGuard<'a>(&'a Proxy);

impl<'a> SessionGuard<'a> {
    pub(super) fn enter(p: &'a Proxy) -> Self {
        p.sessions.fetch_add(1, Ordering::AcqRel);
        crate::metrics::hot().client_connections.increment(1.0);
        SessionGuard(p)
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        crate::metrics::hot().client_connections.decrement(1.0);
        if self.0.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
