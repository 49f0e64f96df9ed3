//! The client-facing side: accepting connections, relaying startup and
//! authentication, and running each session against its own upstream connection.

pub mod app;
pub mod caching;
pub mod conn;
pub mod replies;
pub mod session;
pub mod startup;
pub mod statements;
pub mod tls;
pub mod tracker;
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
use startup::{fatal, ClientStream, Opened, StartupError};
use upstream::Upstream;

/// State shared by all sessions of one pgtier process.
pub struct Proxy {
    pub config: Arc<Live>,
    pub cache: Arc<Cache>,
    pub invalidation: Arc<Invalidation>,
    pub upstream: Upstream,
    pub tls_acceptor: Option<TlsAcceptor>,
    sessions: AtomicUsize,
    next_id: AtomicU64,
    idle: Notify,
}

impl Proxy {
    pub fn new(config: Arc<Live>) -> anyhow::Result<Self> {
        let snap = config.load();
        let tls_acceptor = match (&snap.server.tls_cert, &snap.server.tls_key) {
            (Some(c), Some(k)) => Some(TlsAcceptor::from(tls::server_config(c, k)?)),
            _ => None,
        };
        let databases = crate::invalidation::control::parse(&snap.invalidation.control_urls, None)
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .map(|t| t.database);
        Ok(Proxy {
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

    /// Whether pgtier can serve: the upstream accepts connections.
    pub async fn readiness(&self) -> Result<(), String> {
        self.upstream.probe().await.map_err(|e| e.to_string())
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
    pub async fn serve(self: Arc<Self>, stream: ClientStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let span = tracing::info_span!("session", id, %peer);
        let _guard = SessionGuard::enter(&self);
        self.clone().serve_inner(id, stream).instrument(span).await;
    }

    async fn serve_inner(self: Arc<Self>, id: u64, stream: ClientStream) {
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
        if self.active_sessions() > cfg.server.max_client_connections {
            fatal(&mut client, "53300", "sorry, too many clients already").await;
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
        let hello = match tokio::time::timeout(auth_timeout, relay).await {
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
        tracing::debug!(
            user = startup.user(),
            database = startup.database(),
            "session started"
        );
        Session::new(id, self, client, cin, server, sin, startup, hello)
            .run()
            .await;
    }
}

/// Counts open sessions and wakes the drain waiter when the last one ends.
struct SessionGuard<'a>(&'a Proxy);

impl<'a> SessionGuard<'a> {
    fn enter(p: &'a Proxy) -> Self {
        p.sessions.fetch_add(1, Ordering::AcqRel);
        SessionGuard(p)
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        if self.0.sessions.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
