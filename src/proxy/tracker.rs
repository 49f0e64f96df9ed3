//! The proxy's view of the session's protocol state: transaction status, COPY
//! mode, and the replies still expected from the server.

use super::replies::{Expect, Replies, Route};
use super::startup::ServerHello;
use crate::protocol::backend::{self, ParameterStatus, ReadyForQuery};
use crate::protocol::frontend::Frontend;
use crate::protocol::{ProtocolError, TxStatus};

/// A capture of server replies opened by the cache, named for its whole life
/// (ids are never reused or shifted).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CaptureId(pub u64);

/// What the session wants done with a reply; carried through the reply queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyTag {
    #[default]
    None,
    /// Capture into this fill (result rows, or the RowDescription of a portal).
    Fill(CaptureId),
    /// Capture a statement description.
    Describe(CaptureId),
    /// The request carries session-setting changes, applied once it succeeds.
    Effects,
    /// A Parse or Close whose change to the session's statements is undone
    /// if the server refuses or skips it (see `Statements::pending`).
    Statement(u64),
    /// The Close of the unnamed statement pgtier sends ahead of a request
    /// (see `SessionCache::stray_unnamed`): if the server skips it, the
    /// statement it closes is still there.
    StrayClose,
    /// pgtier's own query for the WAL position a read-your-writes fence waits
    /// for (logical source): its one value is read, nothing is relayed.
    FenceLsn,
}

/// The reply a forwarded client message will get, if any, and whether the
/// message completes a request (`copy_in`: the client is in COPY FROM STDIN).
pub fn expectation(msg: &Frontend<'_>, copy_in: bool) -> (Option<Expect>, bool) {
    match msg {
        Frontend::Query(_) => (Some(Expect::Query), true),
        Frontend::Parse(_) => (Some(Expect::Parse), false),
        Frontend::Bind(_) => (Some(Expect::Bind), false),
        Frontend::Describe(_) => (Some(Expect::Describe), false),
        Frontend::Execute(_) => (Some(Expect::Execute), false),
        Frontend::Close(_) => (Some(Expect::Close), false),
        // The server ignores Sync while it is in COPY FROM STDIN.
        Frontend::Sync => ((!copy_in).then_some(Expect::Sync), true),
        Frontend::FunctionCall(_) => (Some(Expect::FunctionCall), true),
        Frontend::CopyDone
        | Frontend::CopyFail(_)
        | Frontend::Terminate
        | Frontend::Flush
        | Frontend::CopyData(_)
        | Frontend::Password(_) => (None, true),
    }
}

/// The tracker's state worked forward over a request before it is forwarded,
/// so the cache can number the requests its captures belong to exactly as
/// [`Tracker::expect`] will count them.
#[derive(Clone, Copy, Debug)]
pub struct Preview {
    copy_in: bool,
    skipping: bool,
    blind: bool,
    /// The number the next request ending in ReadyForQuery will get.
    pub next_request: u64,
    /// Whether the last message stepped over will get a reply (the server
    /// is not skipping it after an error).
    pub queued: bool,
}

impl Preview {
    /// Account for forwarding `msg`: its expected reply and whether it ends a
    /// request.
    pub fn step(&mut self, msg: &Frontend<'_>) -> (Option<Expect>, bool) {
        if matches!(msg, Frontend::CopyDone | Frontend::CopyFail(_)) {
            self.copy_in = false;
        }
        let (expect, ends) = expectation(msg, self.copy_in);
        self.queued = true;
        if let (Some(e), false) = (expect, self.blind) {
            // As `Replies::push`: after an error only Sync is queued.
            let queued = !self.skipping || e == Expect::Sync;
            self.queued = queued;
            if e == Expect::Sync {
                self.skipping = false;
            }
            if queued && matches!(e, Expect::Sync | Expect::Query | Expect::FunctionCall) {
                self.next_request += 1;
            }
        }
        (expect, ends)
    }
}

#[derive(Debug)]
pub struct Tracker {
    pub replies: Replies<ReplyTag>,
    pub tx: TxStatus,
    /// The client is sending COPY data (the server started COPY FROM STDIN and
    /// the client has not yet sent the CopyDone/CopyFail ending it).
    pub copy_in: bool,
    /// Tracking was lost (replication protocol, or a reply we could not place): the
    /// session is still proxied faithfully but nothing is answered by pgtier.
    pub blind: bool,
    pub terminating: bool,
    /// Extended-protocol messages were forwarded since the last Sync: the server
    /// has an implicit transaction open, so nothing may be answered around it.
    pub open_batch: bool,
    /// An ErrorResponse arrived since the last ReadyForQuery.
    pub error_in_request: bool,
    /// ParameterStatus values as last reported by the server.
    pub server_params: Vec<(String, String)>,
    /// Set when a ParameterStatus changed a value (the cache seed must follow).
    pub params_changed: bool,
    /// Requests queued for the server that end in ReadyForQuery, and how many of
    /// those have ended: captures belong to the request they were opened in.
    pub requests_sent: u64,
    pub requests_done: u64,
}

impl Tracker {
    pub fn new(hello: &ServerHello) -> Self {
        Tracker {
            replies: Replies::default(),
            tx: TxStatus::Idle,
            copy_in: false,
            blind: false,
            terminating: false,
            open_batch: false,
            error_in_request: false,
            server_params: hello.params.clone(),
            params_changed: false,
            requests_sent: 0,
            requests_done: 0,
        }
    }

    pub fn expect(&mut self, e: Expect, swallow: bool, tag: ReplyTag) {
        if !self.blind
            && self.replies.push(e, swallow, tag)
            && matches!(e, Expect::Sync | Expect::Query | Expect::FunctionCall)
        {
            self.requests_sent += 1;
        }
    }

    /// Queue a reply pgtier composed behind the replies still due.
    pub fn expect_synthetic(&mut self, reply: Vec<bytes::Bytes>) {
        if !self.blind {
            self.replies.push_synthetic(reply, ReplyTag::None);
        }
    }

    /// Where the state stands before a request is forwarded.
    pub fn preview(&self) -> Preview {
        Preview {
            copy_in: self.copy_in,
            skipping: self.replies.skipping(),
            blind: self.blind,
            next_request: self.requests_sent + 1,
            queued: false,
        }
    }

    /// Nothing in flight can change the session's state, and no transaction is
    /// open: a request may be answered by pgtier (behind any pending replies).
    pub fn answerable(&self) -> bool {
        self.tx == TxStatus::Idle
            && !self.copy_in
            && !self.blind
            && !self.open_batch
            && self.replies.all_neutral()
    }

    /// The reply a forwarded client message will get, if any, and whether the
    /// message completes a request.
    pub fn expectation(&self, msg: &Frontend<'_>) -> (Option<Expect>, bool) {
        expectation(msg, self.copy_in)
    }

    /// State changes a client message causes as it is forwarded.
    pub fn on_client(&mut self, msg: &Frontend<'_>) {
        match msg {
            Frontend::CopyDone | Frontend::CopyFail(_) => {
                self.copy_in = false;
                self.replies.client_copy_end();
            }
            Frontend::Terminate => self.terminating = true,
            _ => {}
        }
    }

    /// Account for a server message; says whether to relay it and what it answers.
    pub fn on_server(&mut self, tag: u8, body: &[u8]) -> Result<Route<ReplyTag>, ProtocolError> {
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
                self.requests_done += 1;
            }
            backend::ERROR_RESPONSE => self.error_in_request = true,
            backend::PARAMETER_STATUS => {
                let p = ParameterStatus::decode(body)?;
                let name = String::from_utf8_lossy(p.name);
                let value = String::from_utf8_lossy(p.value);
                match self.server_params.iter_mut().find(|(k, _)| *k == name) {
                    Some(slot) if slot.1 == value => {}
                    Some(slot) => {
                        slot.1 = value.into_owned();
                        self.params_changed = true;
                    }
                    None => {
                        self.server_params
                            .push((name.into_owned(), value.into_owned()));
                        self.params_changed = true;
                    }
                }
            }
            backend::COPY_IN_RESPONSE if !self.blind => {
                self.copy_in = self.replies.copy_in_started();
            }
            backend::COPY_IN_RESPONSE => self.copy_in = true,
            backend::COPY_BOTH_RESPONSE => {
                // Streaming replication: both sides talk freely from here on.
                self.copy_in = true;
                self.go_blind();
            }
            _ => {}
        }
        Ok(route)
    }

    pub fn go_blind(&mut self) {
        self.blind = true;
        self.replies.clear();
    }
}
