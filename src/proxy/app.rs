//! The pingora service that owns the listening socket.
//!
//! Pingora accepts and hands us each connection; sessions then run on pgtier's own
//! runtime, so that when pingora stops its runtimes (SIGTERM, or SIGQUIT after
//! passing the listener to a new binary) open sessions keep going until they end
//! or the grace period runs out.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use super::accept::{self, Handover};
use super::state::Proxy;
use crate::workers::Workers;

pub struct ListenerApp {
    pub proxy: Arc<Proxy>,
    pub sessions: Arc<Workers>,
    /// Takes over connections to its own database (the admin console).
    pub handover: Option<Arc<dyn Handover>>,
}

#[async_trait]
impl ServerApp for ListenerApp {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The accepted socket is registered with pingora's listener runtime, which
        // stops on SIGTERM/SIGQUIT. Sessions must outlive it to drain, so the socket
        // is duplicated and re-registered on the session runtime; the pingora stream
        // (and its copy of the descriptor) is dropped here.
        let fd = match dup_fd(&session) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(error = %e, "cannot take over an accepted connection");
                return None;
            }
        };
        drop(session);
        let proxy = self.proxy.clone();
        let handover = self.handover.clone();
        self.sessions.spawn(async move {
            let std_stream = std::net::TcpStream::from(fd);
            let stream = std_stream
                .set_nonblocking(true)
                .and_then(|_| tokio::net::TcpStream::from_std(std_stream));
            match stream {
                Ok(s) => accept::serve(proxy, s, handover).await,
                Err(e) => tracing::error!(error = %e, "cannot register an accepted connection"),
            }
        });
        None
    }
}

fn dup_fd(stream: &Stream) -> std::io::Result<OwnedFd> {
    let l4 = stream
        .as_any()
        .downcast_ref::<L4Stream>()
        .ok_or_else(|| std::io::Error::other("listener produced a non-TCP stream"))?;
    // SAFETY: the descriptor belongs to `l4`, which outlives this borrow; the
    // borrow is only used to dup(2) it into a descriptor we own.
    let borrowed = unsafe { BorrowedFd::borrow_raw(l4.as_raw_fd()) };
    borrowed.try_clone_to_owned()
}
