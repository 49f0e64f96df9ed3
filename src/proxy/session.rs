//! One client session: the event loop that moves bytes between the client and its
//! upstream connection, and the per-message bookkeeping that keeps the proxy in
//! step with both (transaction status, COPY mode, expected replies).
//!
//! IO is driven by hand-written polling rather than `select!` over whole reads and
//! writes: the session always reads from whichever side has data while writes to
//! the other side are still pending, so neither peer can deadlock the other by
//! filling a socket buffer, and one vectored write sends each reply.

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};

use super::apply;
use super::caching::SessionCache;
use super::conn::{poll_read_into, OutQueue};
use super::replies::Route;
use super::startup::{ClientConn, ServerHello};
use super::tracker::{ReplyTag, Tracker};
use super::upstream::ServerConn;
use super::Proxy;
use crate::invalidation::warm::{Job, Seat};
use crate::metrics;
use crate::protocol::backend::{self, ErrorResponse, Severity};
use crate::protocol::codec::peek_header;
use crate::protocol::frontend::{self, Frontend};
use crate::protocol::startup::StartupMessage;
use crate::protocol::ProtocolError;

/// Messages larger than this are streamed through in pieces instead of buffered
/// whole (large DataRows, COPY data), so memory per session stays bounded.
const STREAM_THRESHOLD: usize = 64 * 1024;
/// Stop reading a peer while this much is queued for the other one (for the
/// client: its replies, forwarded or answered by pgtier, including those waiting
/// behind server replies). With the batch that crossed it, this bounds what a
/// session buffers however many requests a client pipelines without reading.
const OUT_HIGH_WATER: usize = 1 << 20;
/// Forward an unfinished extended-protocol batch once it grows this large.
const BATCH_LIMIT: usize = 1 << 20;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;
/// Server messages are trusted more than client ones, but a bogus length must not
/// make us buffer without bound: 1 GiB is the protocol's own ceiling.
const SERVER_MAX_MESSAGE: usize = 1 << 30;
/// How long to keep writing the last bytes after one side has gone.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

mod fence;
mod warm;

use fence::Fence;

/// Why the session loop stopped.
enum End {
    ClientGone,
    ServerGone,
    Terminated,
    ClientProtocol(ProtocolError),
    ServerProtocol(ProtocolError),
    Io(io::Error),
}

enum Event {
    Client(io::Result<usize>),
    /// Requests already received may be processed again (the client's replies
    /// drained below the high-water mark).
    Backlog,
    /// The client sent Terminate and every reply due to it has been queued.
    Finished,
    Server(io::Result<usize>),
    ClientWrite(io::Error),
    ServerWrite(io::Error),
    /// A warm refresh was left for this idle session.
    Warm(Job),
}

pub struct Session {
    pub id: u64,
    info: Arc<super::SessionInfo>,
    fence: Option<Fence>,
    proxy: Arc<Proxy>,
    client: ClientConn,
    server: ServerConn,
    /// Received from the client, not yet forwarded or answered.
    cin: BytesMut,
    /// Received from the server, not yet relayed.
    sin: BytesMut,
    cout: OutQueue,
    sout: OutQueue,
    /// Length of the complete messages at the front of `cin` (the pending batch).
    scanned: usize,
    /// Bytes of an oversized client message still to stream to the server.
    client_stream: usize,
    /// `cin` holds requests left unprocessed while the client's replies were
    /// over the high-water mark.
    backlog: bool,
    /// A malformed client message, answered with FATAL once the requests that
    /// came before it have been answered (Postgres reads and runs those first).
    violation: Option<ProtocolError>,
    /// Bytes of an oversized server message still to stream to the client.
    server_stream: usize,
    max_message: usize,
    pub startup: StartupMessage,
    pub hello: ServerHello,
    pub track: Tracker,
    pub caching: SessionCache,
    /// Its place among the sessions that carry warm refreshes.
    warm: Option<Seat>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        proxy: Arc<Proxy>,
        client: ClientConn,
        cin: BytesMut,
        server: ServerConn,
        sin: BytesMut,
        startup: StartupMessage,
        hello: ServerHello,
        info: Arc<super::SessionInfo>,
    ) -> Self {
        let max_message = proxy.config.load().server.max_message_size.0 as usize;
        let user = startup.user().unwrap_or_default().to_string();
        let database = startup.database().unwrap_or_default().to_string();
        let db = proxy.invalidation.db(&database);
        let warm = db.as_ref().map(|d| d.warm.join());
        let mut caching = SessionCache::new(&database, &user, &startup.params, db);
        caching.set_defaults(hello.defaults.clone());
        caching.reseed(&hello.params);
        Session {
            info,
            fence: None,
            caching,
            id,
            proxy,
            client,
            server,
            cin,
            sin,
            cout: OutQueue::default(),
            sout: OutQueue::default(),
            scanned: 0,
            client_stream: 0,
            backlog: false,
            violation: None,
            server_stream: 0,
            max_message,
            startup,
            track: Tracker::new(&hello),
            hello,
            warm,
        }
    }

    /// Run until either side closes. Never panics on peer input.
    pub async fn run(mut self) {
        let end = self.event_loop().await;
        match &end {
            End::ClientGone => {
                self.sout.push_static(frontend::TERMINATE_BYTES);
                let _ = self.final_flush(false).await;
            }
            End::Terminated => {
                // Replies to requests sent before Terminate still reach the client.
                let _ = self.final_flush(true).await;
                self.sout.push_static(frontend::TERMINATE_BYTES);
                let _ = self.final_flush(false).await;
            }
            End::ServerGone => {
                let _ = self.final_flush(true).await;
            }
            End::ClientProtocol(e) => {
                tracing::info!(error = %e, "closing session: client protocol violation");
                self.cout.push(
                    ErrorResponse {
                        severity: Severity::Fatal,
                        code: "08P01",
                        message: &format!("pgtier: {e}"),
                    }
                    .to_bytes(),
                );
                self.sout.push_static(frontend::TERMINATE_BYTES);
                let _ = self.final_flush(true).await;
                let _ = self.final_flush(false).await;
            }
            End::ServerProtocol(e) => {
                tracing::warn!(error = %e, "closing session: server protocol violation");
                self.cout.push(
                    ErrorResponse {
                        severity: Severity::Fatal,
                        code: "08P01",
                        message: &format!("pgtier: invalid data from upstream: {e}"),
                    }
                    .to_bytes(),
                );
                let _ = self.final_flush(true).await;
            }
            End::Io(e) => tracing::debug!(error = %e, "session i/o error"),
        }
        tracing::debug!("session closed");
        let _ = &self.proxy;
    }

    async fn event_loop(&mut self) -> End {
        // Bytes that came with the last startup or authentication packet: the
        // client may not send more until they are answered.
        if !self.sin.is_empty() {
            if let Err(end) = self.process_server() {
                return end;
            }
        }
        if !self.cin.is_empty() {
            if let Err(end) = self.process_client().await {
                return end;
            }
        }
        loop {
            let ev = poll_fn(|cx| self.poll_io(cx)).await;
            let step = match ev {
                Event::Client(Ok(0)) => return End::ClientGone,
                Event::Server(Ok(0)) => return End::ServerGone,
                Event::Finished => {
                    return self
                        .violation
                        .take()
                        .map_or(End::Terminated, End::ClientProtocol)
                }
                Event::Backlog => {
                    self.backlog = false;
                    self.process_client().await
                }
                Event::Client(Ok(_)) => self.process_client().await,
                Event::Server(Ok(_)) => self.process_server(),
                Event::Warm(job) => {
                    self.run_warm(job);
                    Ok(())
                }
                Event::Client(Err(e)) | Event::ClientWrite(e) => {
                    self.sout.push_static(frontend::TERMINATE_BYTES);
                    let _ = self.final_flush(false).await;
                    return End::Io(e);
                }
                Event::Server(Err(e)) | Event::ServerWrite(e) => {
                    let _ = self.final_flush(true).await;
                    return End::Io(e);
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    fn may_read_client(&self) -> bool {
        !self.track.terminating && !self.backlog && !self.outgoing_full()
    }

    /// Whether enough is queued for either peer that no further request should
    /// be taken in: hits add to the client's queue as forwarded replies do.
    fn outgoing_full(&self) -> bool {
        self.sout.len() >= OUT_HIGH_WATER
            || self.cout.len() + self.track.replies.synthetic_bytes() >= OUT_HIGH_WATER
    }

    /// After Terminate: every reply due has arrived (or been composed) and no
    /// fence holds the client's output, so the session can end.
    fn terminate_due(&self) -> bool {
        self.track.terminating
            && !self.track.blind
            && self.track.replies.is_empty()
            && self.fence.is_none()
    }

    fn may_read_server(&self) -> bool {
        self.cout.len() < OUT_HIGH_WATER
    }

    /// Make all the progress the sockets allow; return once something was read.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        fence::poll(&mut self.fence, &mut self.caching, cx);
        let hot = metrics::hot();
        if !self.sout.is_empty() {
            let before = self.sout.len();
            let r = self.sout.poll_write(&mut self.server, cx);
            hot.upstream_bytes_out
                .increment((before - self.sout.len()) as u64);
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Event::ServerWrite(e));
            }
        }
        if !self.cout.is_empty() && self.fence.is_none() {
            let before = self.cout.len();
            let r = self.cout.poll_write(&mut self.client, cx);
            hot.client_bytes_out
                .increment((before - self.cout.len()) as u64);
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Event::ClientWrite(e));
            }
        }
        if self.may_read_server() {
            if let Poll::Ready(r) = poll_read_into(&mut self.server, cx, &mut self.sin, READ_CHUNK)
            {
                if let Ok(n) = &r {
                    hot.upstream_bytes_in.increment(*n as u64);
                }
                return Poll::Ready(Event::Server(r));
            }
        }
        if self.may_read_client() {
            if let Poll::Ready(r) = poll_read_into(&mut self.client, cx, &mut self.cin, READ_CHUNK)
            {
                if let Ok(n) = &r {
                    hot.client_bytes_in.increment(*n as u64);
                }
                return Poll::Ready(Event::Client(r));
            }
        }
        if self.backlog && !self.outgoing_full() {
            return Poll::Ready(Event::Backlog);
        }
        if self.terminate_due() {
            return Poll::Ready(Event::Finished);
        }
        if let Some(job) = self.poll_warm(cx) {
            return Poll::Ready(Event::Warm(job));
        }
        Poll::Pending
    }

    /// Hand the complete request buffered so far to the cache layer, which
    /// answers it or queues it for the server.
    async fn forward_batch(&mut self) {
        if self.scanned == 0 {
            return;
        }
        let batch = self.cin.split_to(self.scanned).freeze();
        self.scanned = 0;
        self.info
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = &self.warm {
            w.mailbox.busy();
        }
        self.reseed_if_changed();
        apply::handle(
            &mut self.caching,
            &self.proxy.cache,
            batch,
            &mut self.track,
            &mut self.cout,
            &mut self.sout,
        )
        .await;
    }

    /// Follow setting changes into the key seed before the session next uses it.
    fn reseed_if_changed(&mut self) {
        let settings_changed = self.caching.take_settings_changed();
        if std::mem::take(&mut self.track.params_changed) || settings_changed {
            self.caching.reseed(&self.track.server_params);
        }
    }

    async fn process_client(&mut self) -> Result<(), End> {
        match self.scan_client().await {
            Err(End::ClientProtocol(e)) => self.on_violation(e).await,
            other => other,
        }
    }

    /// A malformed message: what came before it still runs and is answered,
    /// then the session ends with FATAL, as in Postgres. Nothing after it is
    /// read.
    async fn on_violation(&mut self, e: ProtocolError) -> Result<(), End> {
        if self.track.blind || self.track.terminating {
            return Err(End::ClientProtocol(e));
        }
        self.forward_batch().await;
        self.cin.clear();
        self.track.terminating = true;
        self.violation = Some(e);
        Ok(())
    }

    async fn scan_client(&mut self) -> Result<(), End> {
        loop {
            if self.track.terminating {
                // Nothing after Terminate is read, as Postgres reads nothing.
                self.cin.clear();
                return Ok(());
            }
            if self.scanned == 0 && self.client_stream == 0 && self.outgoing_full() {
                // Leave further requests unread until the client reads its replies.
                self.backlog = !self.cin.is_empty();
                return Ok(());
            }
            if self.client_stream > 0 {
                let n = self.client_stream.min(self.cin.len());
                self.sout.push_from(&mut self.cin, n);
                self.client_stream -= n;
                if self.client_stream > 0 {
                    return Ok(());
                }
                continue;
            }
            let rest = &self.cin[self.scanned..];
            let header = peek_header(rest, self.max_message).map_err(End::ClientProtocol)?;
            let Some(h) = header else { break };
            if !Frontend::is_known_tag(h.tag) {
                return Err(End::ClientProtocol(ProtocolError::UnknownFrontend(
                    crate::protocol::error::tag_char(h.tag),
                )));
            }
            if h.tag == frontend::COPY_DATA && h.total_len > STREAM_THRESHOLD {
                self.forward_batch().await;
                self.client_stream = h.total_len;
                continue;
            }
            if rest.len() < h.total_len {
                break;
            }
            let msg =
                Frontend::decode(h.tag, &rest[5..h.total_len]).map_err(End::ClientProtocol)?;
            if matches!(msg, Frontend::Terminate) {
                self.on_terminate(h.total_len).await;
                if self.track.terminating {
                    return Ok(());
                }
                continue;
            }
            let (_, boundary) = self.track.expectation(&msg);
            self.scanned += h.total_len;
            if boundary {
                self.forward_batch().await;
            }
        }
        if self.scanned >= BATCH_LIMIT {
            self.forward_batch().await;
        }
        Ok(())
    }

    /// Terminate: the requests before it still run and are answered (Postgres
    /// reads them before it reads Terminate). The session ends once their
    /// replies are queued; Terminate itself is sent last.
    async fn on_terminate(&mut self, len: usize) {
        self.forward_batch().await;
        self.cin.advance(len);
        if self.track.copy_in {
            // During COPY FROM STDIN Postgres takes Terminate for a bad COPY
            // message (an error) and carries on: so does the session.
            self.sout.push_static(frontend::TERMINATE_BYTES);
            return;
        }
        self.track.terminating = true;
        if self.track.blind {
            // Replies are not tracked: let the server end the session once it
            // has answered everything before Terminate.
            self.sout.push_static(frontend::TERMINATE_BYTES);
        }
    }

    fn process_server(&mut self) -> Result<(), End> {
        // Contiguous relayed messages are moved to the client as one chunk.
        let mut relay = 0usize;
        let max_entry = self.proxy.cache.max_entry_bytes();
        loop {
            if self.server_stream > 0 {
                let n = self.server_stream.min(self.sin.len() - relay);
                relay += n;
                self.server_stream -= n;
                if self.server_stream > 0 {
                    break;
                }
                continue;
            }
            let rest = &self.sin[relay..];
            let header = peek_header(rest, SERVER_MAX_MESSAGE).map_err(End::ServerProtocol)?;
            let Some(h) = header else { break };
            if !backend::is_known_tag(h.tag) {
                return Err(End::ServerProtocol(ProtocolError::UnknownBackend(
                    crate::protocol::error::tag_char(h.tag),
                )));
            }
            let streamable = matches!(h.tag, backend::DATA_ROW | backend::COPY_DATA);
            if streamable && h.total_len > STREAM_THRESHOLD {
                let route = self
                    .track
                    .on_server(h.tag, &[])
                    .map_err(End::ServerProtocol)?;
                if let Route::Relay {
                    front: Some((_, tag)),
                    ..
                } = route
                {
                    self.caching.abort(tag);
                }
                self.server_stream = h.total_len;
                continue;
            }
            if rest.len() < h.total_len {
                break;
            }
            let msg = &rest[..h.total_len];
            let route = self
                .track
                .on_server(h.tag, &msg[5..])
                .map_err(End::ServerProtocol)?;
            if h.tag == backend::COPY_IN_RESPONSE && self.track.terminating && self.track.copy_in {
                // The client wrote Terminate before the server started this COPY:
                // the server reads it now, as a bad COPY message, and carries on.
                self.track.terminating = false;
                self.sout.push_static(frontend::TERMINATE_BYTES);
            }
            let (front, mut swallow) = match route {
                Route::Swallow { front } => (Some(front), true),
                Route::Relay { front, .. } => (front, false),
                Route::Desync(_) => (None, false),
            };
            let request = self.track.requests_done + u64::from(h.tag != backend::READY_FOR_QUERY);
            if h.tag == backend::NOTICE_RESPONSE {
                // Sent while the server runs the request at the front: a
                // result that came with a notice is not stored (a hit would
                // leave the notice out), and the notices of pgtier's own
                // requests (refreshes, fences) are not the client's.
                self.caching.on_notice(request);
                swallow = self.track.replies.front_is_own();
            }
            if h.tag == backend::ERROR_RESPONSE {
                if swallow {
                    self.cancel_again_if_misdirected(&msg[5..]);
                }
                self.caching.on_error(request);
                self.caching.refused(&self.track.replies.take_discarded());
            }
            // A PREPARE TRANSACTION refused for a trigger's NOTIFY says why.
            let explained = (h.tag == backend::ERROR_RESPONSE && !swallow)
                .then(|| super::two_phase::explain(msg))
                .flatten();
            if let Some((expect, tag)) = front {
                if swallow && tag == ReplyTag::FenceLsn {
                    fence::reply(&mut self.fence, &mut self.caching, h.tag, &msg[5..]);
                }
                if h.tag == backend::READY_FOR_QUERY {
                    // A request ended without the cancel stopping pgtier's
                    // own one: it reached the client's statement, or came
                    // when nothing ran (the server ignores those). Kept, it
                    // could later misread a statement timeout (also 57014).
                    self.info
                        .cancel_wanted
                        .store(false, std::sync::atomic::Ordering::Release);
                    self.info.state.store(
                        self.track.tx.as_byte(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    let error = std::mem::take(&mut self.track.error_in_request);
                    let fence = self.caching.on_ready(
                        &self.proxy.cache,
                        tag,
                        self.track.tx,
                        error,
                        self.track.requests_done,
                    );
                    if fence {
                        self.fence = fence::start(
                            &mut self.caching,
                            &self.proxy,
                            &mut self.sout,
                            &mut self.track,
                        );
                    }
                } else {
                    self.caching.on_reply(expect, tag, h.tag, msg, max_entry);
                }
            }
            if swallow || explained.is_some() {
                self.cout.push_from(&mut self.sin, relay);
                relay = 0;
                self.sin.advance(h.total_len);
                if let Some(e) = explained {
                    self.cout.push(e);
                }
            } else {
                relay += h.total_len;
            }
            // Replies pgtier composed for requests queued behind this one are due now.
            while let Some(reply) = self.track.replies.pop_synthetic() {
                self.cout.push_from(&mut self.sin, relay);
                relay = 0;
                for chunk in reply {
                    self.cout.push(chunk);
                }
            }
        }
        self.cout.push_from(&mut self.sin, relay);
        Ok(())
    }

    /// One of pgtier's own requests (a refresh ahead of the client's request)
    /// failed with `query_canceled` while the client's cancel was pending: the
    /// cancel was meant for the client's statement, which the server runs
    /// next. Send it again (a cancel arriving after that statement ended is
    /// ignored by the server, as a late one would be).
    fn cancel_again_if_misdirected(&self, error: &[u8]) {
        use std::sync::atomic::Ordering;
        let canceled = backend::ErrorFields::decode(backend::ERROR_RESPONSE, error)
            .is_ok_and(|e| e.code == b"57014");
        if !canceled
            || !self.track.replies.client_request_queued()
            || !self.info.cancel_wanted.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let Some((pid, secret)) = self.info.backend else {
            return;
        };
        let proxy = self.proxy.clone();
        tokio::spawn(async move {
            let req = crate::protocol::startup::CancelRequest { pid, secret };
            if let Err(e) = proxy.upstream.cancel(req).await {
                tracing::warn!(error = %e, "could not relay a cancel request again");
            }
        });
    }

    /// Write what is queued for one side, bounded in time.
    async fn final_flush(&mut self, to_client: bool) -> io::Result<()> {
        let fut = poll_fn(|cx| {
            if to_client {
                self.cout.poll_write(&mut self.client, cx)
            } else {
                self.sout.poll_write(&mut self.server, cx)
            }
        });
        match tokio::time::timeout(FINAL_FLUSH, fut).await {
            Ok(r) => r,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}
