//! One client connection from its first byte to its last: the startup
//! packets, then routing: a connection to the database of a [`Handover`] (the
//! admin console) is given to it, any other is authenticated against the
//! upstream and run as a proxied [`Session`].

use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tracing::Instrument;

use super::defaults;
use super::session::Session;
use super::startup::{self, fatal, ClientConn, ClientStream, Opened, StartupError};
use super::state::{Proxy, SessionGuard, SessionInfo};
use crate::protocol::startup::StartupMessage;

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
    pub startup: StartupMessage,
    /// Bytes the client sent after the startup packet.
    pub leftover: BytesMut,
    /// `_pq_.` options and minor version to report in NegotiateProtocolVersion.
    pub negotiate: Option<(u16, Vec<String>)>,
    pub peer: String,
    pub auth_timeout: Duration,
}

/// Serve one client connection from its first byte to its last; a
/// connection to `handover`'s database is given to it instead.
pub async fn serve(proxy: Arc<Proxy>, stream: ClientStream, handover: Option<Arc<dyn Handover>>) {
    let id = proxy.next_session_id();
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span = tracing::info_span!("session", id, %peer);
    let _guard = SessionGuard::enter(&proxy);
    serve_inner(proxy.clone(), id, peer, stream, handover)
        .instrument(span)
        .await;
}

async fn serve_inner(
    proxy: Arc<Proxy>,
    id: u64,
    peer: String,
    stream: ClientStream,
    handover: Option<Arc<dyn Handover>>,
) {
    let cfg = proxy.config();
    let auth_timeout = cfg.server.auth_timeout.0;
    let opened = match tokio::time::timeout(auth_timeout, startup::accept(stream, &proxy)).await {
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
    if proxy.active_sessions() > cfg.server.max_client_connections {
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
        h.serve(proxy, client, handed).await;
        return;
    }
    let mut server = match proxy.upstream.connect().await {
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
        .is_some_and(|d| proxy.invalidation.db(d).is_some());
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
        since: SystemTime::now(),
        state: AtomicU8::new(b'I'),
        requests: AtomicU64::new(0),
        backend: hello.key.as_ref().map(|k| (k.pid, k.secret)),
        cancel_wanted: std::sync::atomic::AtomicBool::new(false),
    });
    proxy.register(info.clone());
    let hot = crate::metrics::hot();
    hot.upstream_connections.increment(1.0);
    Session::new(
        id,
        proxy.clone(),
        client,
        cin,
        server,
        sin,
        startup,
        hello,
        info,
    )
    .run()
    .await;
    hot.upstream_connections.decrement(1.0);
    proxy.unregister(id);
}
