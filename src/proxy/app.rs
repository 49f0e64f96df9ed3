//! The pingora service that owns the listening socket.
//!
//! Pingora accepts and hands us each connection; sessions then run on pgtier's own
//! runtime, so that when pingora stops its runtimes (SIGTERM, or SIGQUIT after
//! passing the listener to a new binary) open sessions keep going until they end
//! or the grace period runs out.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::runtime::Handle;

use super::startup::ClientStream;
use super::Proxy;

pub struct ListenerApp {
    pub proxy: Arc<Proxy>,
    pub sessions: Handle,
}

#[async_trait]
impl ServerApp for ListenerApp {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // Pingora hands out a boxed trait object; the concrete TCP stream avoids a
        // virtual call per read and write.
        match session.into_any().downcast::<ClientStream>() {
            Ok(stream) => {
                let proxy = self.proxy.clone();
                self.sessions.spawn(proxy.serve(*stream));
            }
            Err(_) => tracing::error!("listener produced a non-TCP stream; dropping it"),
        }
        None
    }
}
