//! The client-facing side: accepting connections, relaying startup and
//! authentication, and running each session against its own upstream connection.

pub mod app;
pub mod caching;
pub mod conn;
pub mod defaults;
pub mod replies;
pub mod session;
pub mod startup;
pub mod statements;
pub mod tracker;
pub mod two_phase;
pub mod upstream;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::cache::Cache;
use crate::config::{Config, Live};
use crate::invalidation::Invalidation;
use session::Session;
use startup::{fatal, ClientConn, ClientStream, Opened, StartupError};
use upstream::Upstream;

/// A service that takes over connections to one database name entirely (the
/// admin console, which lives above the proxy and is handed the connection
/// once its startup packet is read).
#[async_trait::async_trait]
pub trait Handover: Send + Sync {
    /// The database name clients use to reach it.
    fn database(&self) -> &str;

    /// Serve the connection from its startup packet on.
    async fn serve(self: Arc<Self>, proxy: Arc<Proxy>, client: ClientConn, opened: Handed);
}

/// A connection handed over after its startup packet.
pub struct Handed {
    pub startup: crate::protocol::startup::StartupMessage,
    /// Bytes the client sent after the startup packet.
    pub leftover: BytesMut,
    /// `_pq_.` options and minor version to report in NegotiateProtocolVersion.
    pub negotiate: Option<(u16, Vec<String>)>,
    pub peer: String,
    pub auth_timeout: Duration,
}

/// What the admin console shows about an open session.
pub struct SessionInfo {
    pub id: u64,
    pub peer: String,
    pub user: String,
    pub database: String,
    pub since: std::time::SystemTime,
    /// Transaction status byte of the last ReadyForQuery (I, T, E).
    pub state: std::sync::atomic::AtomicU8,
    pub requests: AtomicU64,
}

/// State shared by all sessions of one pgtier process.
pub struct Proxy {
    pub config: Arc<Live>,
    /// The command line, re-applied over the file on reload.
    pub options: crate::config::cli::Options,
    /// Open sessions, for the admin console.
    pub sessions_info: std::sync::Mutex<std::collections::HashMap<u64, Arc<SessionInfo>>>,
    pub cache: Arc<Cache>,
    pub invalidation: Arc<Invalidation>,
    pub upstream: Upstream,
    pub tls_acceptor: Option<TlsAcceptor>,
    /// Failed admin-console logins per client address.
    sessions: AtomicUsize,
    next_id: AtomicU64,
    idle: Notify,
}

impl Proxy {
    pub fn new(config: Arc<Live>, options: crate::config::cli::Options) -> anyhow::Result<Self> {
        let snap = config.load();
        let tls_acceptor = match (&snap.server.tls_cert, &snap.server.tls_key) {
            (Some(c), Some(k)) => Some(TlsAcceptor::from(crate::tls::server_config(c, k)?)),
            _ => None,
        };
        let databases = snap.control_targets()?.into_iter().map(|t| t.database);
        Ok(Proxy {
            options,
            sessions_info: std::sync::Mutex::new(std::collections::HashMap::new()),
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

    /// Whether pgtier can serve: the upstream accepts connections and every
    /// invalidation listener is connected.
    pub async fn readiness(&self) -> Result<(), String> {
        self.upstream.probe().await.map_err(|e| e.to_string())?;
        let down: Vec<&str> = self
            .invalidation
            .databases()
            .filter(|d| !d.live())
            .map(|d| d.name.as_str())
            .collect();
        if !down.is_empty() {
            return Err(format!(
                "invalidation listener not connected for: {}",
                down.join(", ")
            ));
        }
        Ok(())
    }

    /// Re-read the configuration (SIGHUP, admin RELOAD). An invalid file
    /// changes nothing; settings that only take effect at start are kept and
    /// reported.
    pub fn reload(&self) -> Result<Vec<String>, String> {
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

    fn reload_inner(&self) -> Result<Vec<String>, String> {
        let old = self.config();
        let mut new = self.options.load().map_err(|e| e.to_string())?;
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
        crate::logging::set_level(&new.log.level).map_err(|e| e.to_string())?;
        self.cache.reconfigure(&old, &new);
        self.config.store(new);
        Ok(notes)
    }

    fn register(&self, info: Arc<SessionInfo>) {
        if let Ok(mut m) = self.sessions_info.lock() {
            m.insert(info.id, info);
        }
    }

    fn unregister(&self, id: u64) {
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

    /// Serve one client connection from its first byte to its last.
    /// Serve one client connection from its first byte to its last; a
    /// connection to `handover`'s database is given to it instead.
    pub async fn serve(self: Arc<Self>, stream: ClientStream, handover: Option<Arc<dyn Handover>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let span = tracing::info_span!("session", id, %peer);
        let _guard = SessionGuard::enter(&self);
        self.clone()
            .serve_inner(id, peer, stream, handover)
            .instrument(span)
            .await;
    }

    async fn serve_inner(
        self: Arc<Self>,
        id: u64,
        peer: String,
        stream: ClientStream,
        handover: Option<Arc<dyn Handover>>,
    ) {
        let cfg = self.config();
        let auth_timeout = cfg.server.auth_timeout.0;
        let opened = match tokio::time::timeout(auth_timeout, startup::accept(stream, &self)).await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "startup failed");
                return;
            }
            Err(_) => {
                tracing::info!("startup timed out");
                return;
            }
        };
        let Opened::Session {
            client,
            startup,
            leftover: mut cin,
            negotiate,
        } = opened
        else {
            return;
        };
        let mut client = *client;
        // Console connections count towards the limit like any other client.
        if self.active_sessions() > cfg.server.max_client_connections {
            fatal(&mut client, "53300", "sorry, too many clients already").await;
            return;
        }
        if let Some(h) = handover.filter(|h| startup.database() == Some(h.database())) {
            let handed = Handed {
                startup,
                leftover: cin,
                negotiate,
                peer,
                auth_timeout,
            };
            h.serve(self, client, handed).await;
            return;
        }
        let mut server = match self.upstream.connect().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "upstream connect failed");
                fatal(&mut client, "08001", &format!("pgtier: {e}")).await;
                return;
            }
        };
        let mut sin = BytesMut::with_capacity(16 * 1024);
        let relay = startup::relay_auth(
            &mut client,
            &mut cin,
            &mut server,
            &mut sin,
            &startup,
            negotiate.as_ref(),
        );
        let mut hello = match tokio::time::timeout(auth_timeout, relay).await {
            Ok(Ok(h)) => h,
            Ok(Err(StartupError::AuthFailed(msg))) => {
                tracing::info!(user = startup.user(), %msg, "authentication failed");
                return;
            }
            Ok(Err(e)) => {
                tracing::info!(error = %e, "startup failed");
                return;
            }
            Err(_) => {
                fatal(&mut client, "08006", "pgtier: authentication timed out").await;
                return;
            }
        };
        let cached = startup
            .database()
            .is_some_and(|d| self.invalidation.db(d).is_some());
        if cached && startup.param("replication").is_none() {
            match tokio::time::timeout(auth_timeout, defaults::probe(&mut server, &mut sin)).await {
                Ok(Ok(d)) => hello.defaults = d,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "upstream failed while reading session settings");
                    return;
                }
                Err(_) => {
                    fatal(&mut client, "08006", "pgtier: upstream did not answer").await;
                    return;
                }
            }
        }
        tracing::debug!(
            user = startup.user(),
            database = startup.database(),
            "session started"
        );
        let info = Arc::new(SessionInfo {
            id,
            peer,
            user: startup.user().unwrap_or_default().to_string(),
            database: startup.database().unwrap_or_default().to_string(),
            since: std::time::SystemTime::now(),
            state: std::sync::atomic::AtomicU8::new(b'I'),
            requests: AtomicU64::new(0),
        });
        self.register(info.clone());
        let hot = crate::metrics::hot();
        hot.upstream_connections.increment(1.0);
        let proxy = self.clone();
        Session::new(id, self, client, cin, server, sin, startup, hello, info)
            .run()
            .await;
        hot.upstream_connections.decrement(1.0);
        proxy.unregister(id);
    }
}

/// Counts open sessions and wakes the drain waiter when the last one ends.
struct SessionGuard<'a>(&'a Proxy);

impl<'a> SessionGuard<'a> {
    fn enter(p: &'a Proxy) -> Self {
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
