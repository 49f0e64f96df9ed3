//! Server replies captured on their way to the client, to be stored once the
//! request that produced them has ended committed.
//!
//! Captures are opened in request order and end in request order, so they
//! queue; each keeps the id it was opened with (the reply queue's tags name
//! it), never shifted by the removal of another.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use super::fill::FillPlan;
use crate::bypass::BypassReason;
use crate::cache::{Cache, Entry, FillLease, Key};
use crate::invalidation::warm::Ticket;
use crate::metrics;
use crate::protocol::backend;
use crate::proxy::replies::Expect;
use crate::proxy::tracker::{CaptureId, ReplyTag};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    Complete,
    Aborted,
}

enum Kind {
    Fill {
        key: Key,
        plan: FillPlan,
        /// Simple-protocol results must carry their RowDescription.
        simple: bool,
        /// Held until the fill ends; dropping it wakes coalesced waiters.
        _lease: Option<FillLease>,
        /// A warm refresh's count, told how it ended.
        warm: Option<Ticket>,
    },
    Describe {
        key: Key,
    },
}

struct Capture {
    /// The request (by count of requests sent) whose ReadyForQuery ends it.
    request: u64,
    kind: Kind,
    row_desc: Option<Bytes>,
    buf: BytesMut,
    state: State,
}

/// The open captures of a session.
#[derive(Default)]
pub struct Captures {
    open: VecDeque<Capture>,
    /// The id of `open[0]`.
    first: u64,
}

impl Captures {
    fn push(&mut self, request: u64, kind: Kind) -> CaptureId {
        debug_assert!(self.open.back().is_none_or(|c| c.request <= request));
        let id = CaptureId(self.first + self.open.len() as u64);
        self.open.push_back(Capture {
            request,
            kind,
            row_desc: None,
            buf: BytesMut::new(),
            state: State::Open,
        });
        id
    }

    fn get_mut(&mut self, id: CaptureId) -> Option<&mut Capture> {
        let i = id.0.checked_sub(self.first)?;
        self.open.get_mut(usize::try_from(i).ok()?)
    }

    /// Capture the result of a cacheable execution in `request`.
    pub fn open_fill(
        &mut self,
        request: u64,
        key: Key,
        plan: FillPlan,
        simple: bool,
        lease: Option<FillLease>,
    ) -> ReplyTag {
        let kind = Kind::Fill {
            key,
            plan,
            simple,
            _lease: lease,
            warm: None,
        };
        ReplyTag::Fill(self.push(request, kind))
    }

    /// Capture the result of a warm refresh in `request` (see `open_fill`).
    pub fn open_warm(
        &mut self,
        request: u64,
        key: Key,
        plan: FillPlan,
        simple: bool,
        lease: Option<FillLease>,
        mut ticket: Ticket,
    ) -> ReplyTag {
        ticket.sent();
        let kind = Kind::Fill {
            key,
            plan,
            simple,
            _lease: lease,
            warm: Some(ticket),
        };
        ReplyTag::Fill(self.push(request, kind))
    }

    /// Capture a statement description in `request`.
    pub fn open_describe(&mut self, request: u64, key: Key) -> ReplyTag {
        ReplyTag::Describe(self.push(request, Kind::Describe { key }))
    }

    /// Capture a relayed server message for the capture its request opened.
    pub fn on_reply(&mut self, expect: Expect, tag: ReplyTag, msg_tag: u8, msg: &[u8], max: usize) {
        let id = match tag {
            ReplyTag::Fill(id) | ReplyTag::Describe(id) => id,
            _ => return,
        };
        let Some(c) = self.get_mut(id) else {
            return;
        };
        if c.state != State::Open {
            return;
        }
        match (&c.kind, expect, msg_tag) {
            (Kind::Describe { .. }, _, backend::PARAMETER_DESCRIPTION) => {
                c.buf.extend_from_slice(msg)
            }
            (Kind::Describe { .. }, _, backend::ROW_DESCRIPTION | backend::NO_DATA) => {
                c.buf.extend_from_slice(msg);
                c.state = State::Complete;
            }
            (Kind::Fill { .. }, Expect::Describe | Expect::Query, backend::ROW_DESCRIPTION) => {
                c.row_desc = Some(Bytes::copy_from_slice(msg));
            }
            (Kind::Fill { .. }, _, backend::DATA_ROW) => {
                if c.buf.len() + msg.len() > max {
                    c.state = State::Aborted;
                    c.buf = BytesMut::new();
                    metrics::bypass(BypassReason::TooLarge);
                } else {
                    c.buf.extend_from_slice(msg);
                }
            }
            (Kind::Fill { .. }, Expect::Execute | Expect::Query, backend::COMMAND_COMPLETE) => {
                c.buf.extend_from_slice(msg);
                c.state = State::Complete;
            }
            // NoData, EmptyQuery, PortalSuspended, COPY: nothing cacheable.
            (Kind::Fill { .. }, _, _) => c.state = State::Aborted,
            _ => {}
        }
    }

    /// A message streamed through without buffering cannot be captured.
    pub fn abort(&mut self, tag: ReplyTag) {
        if let ReplyTag::Fill(id) | ReplyTag::Describe(id) = tag {
            if let Some(c) = self.get_mut(id) {
                c.state = State::Aborted;
                c.buf = BytesMut::new();
            }
        }
    }

    /// An error in request `request`: nothing it produced is stored.
    pub fn on_error(&mut self, request: u64) {
        for c in self.open.iter_mut().filter(|c| c.request == request) {
            c.state = State::Aborted;
        }
    }

    /// Request `request` ended: store what it captured if it `committed`, and
    /// drop the captures of earlier requests (they can no longer complete).
    pub fn finish(&mut self, cache: &Cache, request: u64, committed: bool) {
        while self.open.front().is_some_and(|c| c.request <= request) {
            let Some(c) = self.open.pop_front() else {
                break;
            };
            self.first += 1;
            let stored = committed && c.request == request && c.state == State::Complete;
            match c.kind {
                Kind::Fill {
                    key,
                    plan,
                    simple,
                    warm,
                    ..
                } => {
                    let stored = stored && (!simple || c.row_desc.is_some());
                    if stored {
                        let ttl = plan.policy.ttl;
                        if let (Some(tier), Some(k2)) = (cache.l2(), plan.l2key) {
                            tier.put(k2, c.row_desc.as_deref(), &c.buf, ttl + plan.policy.swr);
                        }
                        let entry = Entry::new(
                            c.row_desc,
                            // A right-sized copy: the capture buffer grew by doubling.
                            Bytes::copy_from_slice(&c.buf),
                            ttl,
                            plan.policy.swr,
                            plan.decision.analysis.fingerprint,
                            plan.epoch,
                            plan.deps,
                        )
                        .reading(plan.tables);
                        if let Some(t) = &warm {
                            entry.hits.store(t.start_hits, Ordering::Relaxed);
                        }
                        cache.insert(key, entry);
                        metrics::hot().fills.increment(1);
                    } else {
                        metrics::hot().fills_aborted.increment(1);
                    }
                    if let Some(t) = warm {
                        t.finish(stored);
                    }
                }
                Kind::Describe { key } => {
                    if stored {
                        cache.store_describe(key, Bytes::copy_from_slice(&c.buf));
                    }
                }
            }
        }
    }
}
