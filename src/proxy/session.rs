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

use super::conn::{poll_read_into, OutQueue};
use super::replies::{Expect, Replies, Route};
use super::startup::{ClientConn, ServerHello};
use super::upstream::ServerConn;
use super::Proxy;
use crate::protocol::backend::{self, ErrorResponse, ParameterStatus, ReadyForQuery, Severity};
use crate::protocol::codec::peek_header;
use crate::protocol::frontend::{self, Frontend};
use crate::protocol::startup::StartupMessage;
use crate::protocol::{ProtocolError, TxStatus};

/// Messages larger than this are streamed through in pieces instead of buffered
/// whole (large DataRows, COPY data), so memory per session stays bounded.
const STREAM_THRESHOLD: usize = 64 * 1024;
/// Stop reading a peer while this much is queued for the other one.
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

/// Per-reply marker the session attaches to expected replies (used by caching).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyTag;

/// What the proxy knows about the session's protocol state.
#[derive(Debug)]
pub struct Tracker {
    pub replies: Replies<ReplyTag>,
    pub tx: TxStatus,
    /// The client is sending COPY data: its messages go through immediately.
    pub copy_in: bool,
    /// Tracking was lost (replication protocol, or a reply we could not place): the
    /// session is still proxied faithfully but nothing is answered by pgtier.
    pub blind: bool,
    pub terminating: bool,
    /// ParameterStatus values as last reported by the server.
    pub server_params: Vec<(String, String)>,
}

impl Tracker {
    fn new(hello: &ServerHello) -> Self {
        Tracker {
            replies: Replies::default(),
            tx: TxStatus::Idle,
            copy_in: false,
            blind: false,
            terminating: false,
            server_params: hello.params.clone(),
        }
    }

    fn expect(&mut self, e: Expect) {
        if !self.blind {
            self.replies.push(e, false, ReplyTag);
        }
    }

    /// Account for a client message about to be forwarded. Returns whether it
    /// completes a request (the batch so far must go to the server now).
    fn on_client(&mut self, msg: &Frontend<'_>) -> bool {
        match msg {
            Frontend::Query(_) => {
                self.expect(Expect::Query);
                true
            }
            Frontend::Parse(_) => {
                self.expect(Expect::Parse);
                false
            }
            Frontend::Bind(_) => {
                self.expect(Expect::Bind);
                false
            }
            Frontend::Describe(_) => {
                self.expect(Expect::Describe);
                false
            }
            Frontend::Execute(_) => {
                self.expect(Expect::Execute);
                false
            }
            Frontend::Close(_) => {
                self.expect(Expect::Close);
                false
            }
            Frontend::Sync => {
                // The server ignores Sync while it is in COPY FROM STDIN.
                if !self.copy_in {
                    self.expect(Expect::Sync);
                }
                true
            }
            Frontend::FunctionCall(_) => {
                self.expect(Expect::FunctionCall);
                true
            }
            Frontend::CopyDone | Frontend::CopyFail(_) => {
                self.copy_in = false;
                true
            }
            Frontend::Terminate => {
                self.terminating = true;
                true
            }
            Frontend::Flush | Frontend::CopyData(_) | Frontend::Password(_) => true,
        }
    }

    /// Account for a server message; says whether to relay it.
    fn on_server(&mut self, tag: u8, body: &[u8]) -> Result<Route<ReplyTag>, ProtocolError> {
        let route = if self.blind {
            Route::Relay {
                front: None,
                done: false,
            }
        } else {
            self.replies.on_server(tag)
        };
        let route = match route {
            Route::Desync(why) => {
                tracing::warn!(%why, "lost track of the protocol; proxying blind");
                self.go_blind();
                Route::Relay {
                    front: None,
                    done: false,
                }
            }
            r => r,
        };
        match tag {
            backend::READY_FOR_QUERY => {
                self.tx = ReadyForQuery::decode(body)?.status;
            }
            backend::PARAMETER_STATUS => {
                let p = ParameterStatus::decode(body)?;
                let name = String::from_utf8_lossy(p.name);
                let value = String::from_utf8_lossy(p.value).into_owned();
                match self.server_params.iter_mut().find(|(k, _)| *k == name) {
                    Some(slot) => slot.1 = value,
                    None => self.server_params.push((name.into_owned(), value)),
                }
            }
            backend::COPY_IN_RESPONSE => {
                self.copy_in = true;
                self.replies.drop_syncs_behind_front();
            }
            backend::COPY_BOTH_RESPONSE => {
                // Streaming replication: both sides talk freely from here on.
                self.copy_in = true;
                self.go_blind();
            }
            _ => {}
        }
        Ok(route)
    }

    fn go_blind(&mut self) {
        self.blind = true;
        self.replies.clear();
    }
}

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
    Server(io::Result<usize>),
    ClientWrite(io::Error),
    ServerWrite(io::Error),
}

pub struct Session {
    pub id: u64,
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
    /// Bytes of an oversized server message still to stream to the client.
    server_stream: usize,
    max_message: usize,
    pub startup: StartupMessage,
    pub hello: ServerHello,
    pub track: Tracker,
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
    ) -> Self {
        let max_message = proxy.config.load().server.max_message_size.0 as usize;
        Session {
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
            server_stream: 0,
            max_message,
            startup,
            track: Tracker::new(&hello),
            hello,
        }
    }

    /// Run until either side closes. Never panics on peer input.
    pub async fn run(mut self) {
        let end = self.event_loop().await;
        match &end {
            End::ClientGone | End::Terminated => {
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
        loop {
            let ev = poll_fn(|cx| self.poll_io(cx)).await;
            let step = match ev {
                Event::Client(Ok(0)) => return End::ClientGone,
                Event::Server(Ok(0)) => return End::ServerGone,
                Event::Client(Ok(_)) => self.process_client(),
                Event::Server(Ok(_)) => self.process_server(),
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
        !self.track.terminating && self.sout.len() < OUT_HIGH_WATER
    }

    fn may_read_server(&self) -> bool {
        self.cout.len() < OUT_HIGH_WATER
    }

    /// Make all the progress the sockets allow; return once something was read.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if !self.sout.is_empty() {
            if let Poll::Ready(Err(e)) = self.sout.poll_write(&mut self.server, cx) {
                return Poll::Ready(Event::ServerWrite(e));
            }
        }
        if !self.cout.is_empty() {
            if let Poll::Ready(Err(e)) = self.cout.poll_write(&mut self.client, cx) {
                return Poll::Ready(Event::ClientWrite(e));
            }
        }
        if self.may_read_server() {
            if let Poll::Ready(r) = poll_read_into(&mut self.server, cx, &mut self.sin, READ_CHUNK)
            {
                return Poll::Ready(Event::Server(r));
            }
        }
        if self.may_read_client() {
            if let Poll::Ready(r) = poll_read_into(&mut self.client, cx, &mut self.cin, READ_CHUNK)
            {
                return Poll::Ready(Event::Client(r));
            }
        }
        Poll::Pending
    }

    /// Send the complete messages buffered so far to the server.
    fn forward_batch(&mut self) {
        self.sout.push_from(&mut self.cin, self.scanned);
        self.scanned = 0;
    }

    fn process_client(&mut self) -> Result<(), End> {
        loop {
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
                self.forward_batch();
                self.client_stream = h.total_len;
                continue;
            }
            if rest.len() < h.total_len {
                break;
            }
            let msg =
                Frontend::decode(h.tag, &rest[5..h.total_len]).map_err(End::ClientProtocol)?;
            let boundary = self.track.on_client(&msg);
            self.scanned += h.total_len;
            if boundary {
                self.forward_batch();
                if self.track.terminating {
                    return Err(End::Terminated);
                }
            }
        }
        if self.scanned >= BATCH_LIMIT {
            self.forward_batch();
        }
        Ok(())
    }

    fn process_server(&mut self) -> Result<(), End> {
        // Contiguous relayed messages are moved to the client as one chunk.
        let mut relay = 0usize;
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
                self.track
                    .on_server(h.tag, &[])
                    .map_err(End::ServerProtocol)?;
                self.server_stream = h.total_len;
                continue;
            }
            if rest.len() < h.total_len {
                break;
            }
            let route = self
                .track
                .on_server(h.tag, &rest[5..h.total_len])
                .map_err(End::ServerProtocol)?;
            match route {
                Route::Swallow => {
                    self.cout.push_from(&mut self.sin, relay);
                    relay = 0;
                    self.sin.advance(h.total_len);
                }
                _ => relay += h.total_len,
            }
        }
        self.cout.push_from(&mut self.sin, relay);
        Ok(())
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
