//! The queue of backend replies that forwarded requests still expect.
//!
//! Every message forwarded to the server pushes what it will be answered with;
//! every server message pops (or refers to) the front. This keeps the proxy in step
//! with the server, so it can tell which result belongs to which request, swallow
//! replies to messages it injected itself, and answer whole requests on its own
//! without the stream going out of sync.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::backend;

/// A frontend message whose reply has not fully arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    /// Simple query: any number of results, then ReadyForQuery.
    Query,
    /// Fast-path function call: FunctionCallResponse, then ReadyForQuery.
    FunctionCall,
    /// A reply pgtier composed itself (a cache hit) that must reach the client
    /// after the replies queued before it; the server sends nothing for it.
    Synthetic,
}

impl Expect {
    /// Requests that end with ReadyForQuery.
    fn ends_with_ready(self) -> bool {
        matches!(self, Expect::Sync | Expect::Query | Expect::FunctionCall)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Awaited<T> {
    pub expect: Expect,
    /// Drop the reply instead of relaying it: the proxy sent this message itself.
    pub swallow: bool,
    /// What the session wants to do with this reply (e.g. fill a cache entry).
    pub tag: T,
    /// CopyDone/CopyFail messages the client had sent when this was queued.
    copy_ends: u32,
    /// COPY FROM STDIN operations the server has started for this message.
    copies: u32,
}

/// Where a server message belongs, as decided by [`Replies::on_server`].
#[derive(Debug, PartialEq, Eq)]
pub enum Route<T> {
    /// Relay to the client; `front` is the request it answers, if any.
    Relay {
        front: Option<(Expect, T)>,
        done: bool,
    },
    /// The reply belongs to a message the proxy sent itself: do not relay it
    /// (it may still be captured).
    Swallow { front: (Expect, T) },
    /// The server sent something the queue did not expect: stop tracking.
    Desync(String),
}

#[derive(Debug)]
pub struct Replies<T> {
    queue: VecDeque<Awaited<T>>,
    /// After an error in an extended-protocol batch the server discards messages
    /// until Sync: replies to those will never come, so they are not queued.
    skipping: bool,
    /// CopyDone/CopyFail messages sent by the client (wrapping): places each
    /// queued Sync before or after the end of a COPY in the client's stream.
    copy_ends: u32,
    /// The replies of the `Synthetic` entries, in queue order: each leaves
    /// with its entry.
    synthetic: VecDeque<Vec<Bytes>>,
    /// Bytes held in `synthetic`: they count towards the client's queue.
    synthetic_bytes: usize,
    /// Tags of the entries the last error ended, the failed one first.
    discarded: Vec<T>,
}

impl<T: Copy + Default + std::fmt::Debug> Default for Replies<T> {
    fn default() -> Self {
        Replies {
            queue: VecDeque::with_capacity(16),
            skipping: false,
            copy_ends: 0,
            synthetic: VecDeque::new(),
            synthetic_bytes: 0,
            discarded: Vec::new(),
        }
    }
}

impl<T: Copy + Default + std::fmt::Debug> Replies<T> {
    /// Queue an expected reply; false if the server will not send one (it is
    /// skipping to the next Sync after an error).
    pub fn push(&mut self, expect: Expect, swallow: bool, tag: T) -> bool {
        if self.skipping && expect != Expect::Synthetic {
            if expect != Expect::Sync {
                return false;
            }
            self.skipping = false;
        }
        self.queue.push_back(Awaited {
            expect,
            swallow,
            tag,
            copy_ends: self.copy_ends,
            copies: 0,
        });
        true
    }

    /// Queue a reply pgtier composed, due once everything before it is out.
    pub fn push_synthetic(&mut self, reply: Vec<Bytes>, tag: T) {
        self.queue.push_back(Awaited {
            expect: Expect::Synthetic,
            swallow: false,
            tag,
            copy_ends: self.copy_ends,
            copies: 0,
        });
        self.synthetic_bytes += reply.iter().map(Bytes::len).sum::<usize>();
        self.synthetic.push_back(reply);
    }

    /// The server is skipping messages up to the next Sync after an error.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// The tags of the requests the last error ended, the failed one first
    /// (no reply will come for them).
    pub fn take_discarded(&mut self) -> Vec<T> {
        std::mem::take(&mut self.discarded)
    }

    /// Size of the composed replies waiting behind server replies.
    pub fn synthetic_bytes(&self) -> usize {
        self.synthetic_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
        self.discarded.clear();
        self.synthetic.clear();
        self.synthetic_bytes = 0;
        self.skipping = false;
    }

    pub fn iter(&self) -> impl Iterator<Item = &Awaited<T>> {
        self.queue.iter()
    }

    /// Whether a request of the client's waits for the server (not one of
    /// pgtier's own, not a reply pgtier composed).
    pub fn client_request_queued(&self) -> bool {
        self.queue
            .iter()
            .any(|a| !a.swallow && a.expect != Expect::Synthetic)
    }

    /// Whether what the server is answering now is a request pgtier sent on
    /// its own behalf (its replies swallowed).
    pub fn front_is_own(&self) -> bool {
        self.queue
            .iter()
            .find(|a| a.expect != Expect::Synthetic)
            .is_some_and(|a| a.swallow)
    }

    /// Take the front entry's reply if it is a synthetic reply now due.
    pub fn pop_synthetic(&mut self) -> Option<Vec<Bytes>> {
        match self.queue.front() {
            Some(e) if e.expect == Expect::Synthetic => {
                self.queue.pop_front();
                let reply = self.synthetic.pop_front().unwrap_or_default();
                self.synthetic_bytes -= reply.iter().map(Bytes::len).sum::<usize>();
                Some(reply)
            }
            _ => None,
        }
    }

    /// Whether everything still in flight leaves the session's state as it is
    /// (no statement runs), so a request behind it may be answered by pgtier.
    pub fn all_neutral(&self) -> bool {
        !self.skipping
            && self.queue.iter().all(|e| {
                matches!(
                    e.expect,
                    Expect::Parse
                        | Expect::Bind
                        | Expect::Describe
                        | Expect::Close
                        | Expect::Sync
                        | Expect::Synthetic
                )
            })
    }

    /// The client sent CopyDone or CopyFail.
    pub fn client_copy_end(&mut self) {
        self.copy_ends = self.copy_ends.wrapping_add(1);
    }

    /// The server started COPY FROM STDIN for the front request. During COPY the
    /// server ignores Sync, so Syncs the client sent behind that request and
    /// before the CopyDone/CopyFail ending this COPY get no reply; Syncs sent
    /// after it do. Returns whether the client is still sending this COPY's data.
    pub fn copy_in_started(&mut self) -> bool {
        let Some(front) = self.queue.front_mut() else {
            return true;
        };
        front.copies += 1;
        // This COPY ends with the n-th CopyDone/CopyFail sent after the request.
        let (base, n) = (front.copy_ends, front.copies);
        let mut first = true;
        self.queue.retain(|e| {
            let keep = first || e.expect != Expect::Sync || e.copy_ends.wrapping_sub(base) >= n;
            first = false;
            keep
        });
        self.copy_ends.wrapping_sub(base) < n
    }

    fn pop_front(&mut self, want: &[Expect], tag: u8) -> Route<T> {
        match self.queue.front().copied() {
            Some(e) if want.contains(&e.expect) => {
                self.queue.pop_front();
                if e.swallow {
                    Route::Swallow {
                        front: (e.expect, e.tag),
                    }
                } else {
                    Route::Relay {
                        front: Some((e.expect, e.tag)),
                        done: true,
                    }
                }
            }
            other => Route::Desync(format!(
                "server sent '{}' while expecting {:?}",
                backend::describe_tag(tag),
                other.map(|e| e.expect)
            )),
        }
    }

    fn front_relay(&self, done: bool) -> Route<T> {
        match self.queue.front() {
            Some(e) if e.swallow => Route::Swallow {
                front: (e.expect, e.tag),
            },
            Some(e) => Route::Relay {
                front: Some((e.expect, e.tag)),
                done,
            },
            None => Route::Relay { front: None, done },
        }
    }

    /// Account for one server message and say where it goes.
    pub fn on_server(&mut self, tag: u8) -> Route<T> {
        use Expect::*;
        let front = self.queue.front().map(|e| e.expect);
        match tag {
            backend::PARSE_COMPLETE => self.pop_front(&[Parse], tag),
            backend::BIND_COMPLETE => self.pop_front(&[Bind], tag),
            backend::CLOSE_COMPLETE => self.pop_front(&[Close], tag),
            backend::PARAMETER_DESCRIPTION => match front {
                Some(Describe) => self.front_relay(false),
                _ => self.pop_front(&[Describe], tag),
            },
            backend::NO_DATA => self.pop_front(&[Describe], tag),
            backend::ROW_DESCRIPTION => match front {
                Some(Describe) => self.pop_front(&[Describe], tag),
                Some(Query) => self.front_relay(false),
                _ => self.pop_front(&[Describe, Query], tag),
            },
            backend::COMMAND_COMPLETE
            | backend::EMPTY_QUERY_RESPONSE
            | backend::PORTAL_SUSPENDED => match front {
                Some(Query) => self.front_relay(false),
                _ => self.pop_front(&[Execute], tag),
            },
            backend::DATA_ROW
            | backend::COPY_DATA
            | backend::COPY_DONE
            | backend::COPY_IN_RESPONSE
            | backend::COPY_OUT_RESPONSE
            | backend::FUNCTION_CALL_RESPONSE => match front {
                Some(Query | Execute | FunctionCall) => self.front_relay(false),
                _ => Route::Desync(format!(
                    "server sent '{}' while expecting {:?}",
                    backend::describe_tag(tag),
                    front
                )),
            },
            backend::ERROR_RESPONSE => match front {
                // A simple query or function call still ends with ReadyForQuery.
                Some(Query | FunctionCall) => self.front_relay(false),
                Some(_) => {
                    // Extended protocol: the server skips to the next Sync. The
                    // error answers the front message; it is relayed unless that
                    // message was ours.
                    let first = self.queue.front().copied();
                    while let Some(e) = self.queue.front() {
                        if e.expect == Sync {
                            break;
                        }
                        self.discarded.push(e.tag);
                        self.queue.pop_front();
                    }
                    if self.queue.is_empty() {
                        self.skipping = true;
                    }
                    // A request that is ours through its Sync (a warm refresh):
                    // the error is nobody else's either. (A replayed Parse's
                    // error is the client's: its own request fails with it.)
                    let sync_ours = self.queue.front().is_some_and(|s| s.swallow);
                    match first {
                        Some(e) if e.swallow && sync_ours => Route::Swallow {
                            front: (e.expect, e.tag),
                        },
                        Some(e) if e.swallow => Route::Relay {
                            front: None,
                            done: true,
                        },
                        Some(e) => Route::Relay {
                            front: Some((e.expect, e.tag)),
                            done: true,
                        },
                        None => Route::Relay {
                            front: None,
                            done: true,
                        },
                    }
                }
                // FATAL errors (e.g. admin shutdown) can arrive while idle.
                None => Route::Relay {
                    front: None,
                    done: false,
                },
            },
            backend::READY_FOR_QUERY => match self.queue.front().copied() {
                Some(e) if e.expect.ends_with_ready() => {
                    self.queue.pop_front();
                    if e.swallow {
                        Route::Swallow {
                            front: (e.expect, e.tag),
                        }
                    } else {
                        Route::Relay {
                            front: Some((e.expect, e.tag)),
                            done: true,
                        }
                    }
                }
                other => Route::Desync(format!(
                    "server sent ReadyForQuery while expecting {:?}",
                    other.map(|e| e.expect)
                )),
            },
            // Asynchronous messages belong to no request.
            backend::NOTICE_RESPONSE
            | backend::NOTIFICATION_RESPONSE
            | backend::PARAMETER_STATUS => Route::Relay {
                front: None,
                done: false,
            },
            _ => Route::Desync(format!(
                "unexpected server message '{}'",
                backend::describe_tag(tag)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed<T>(r: &Route<T>) -> bool {
        matches!(r, Route::Relay { .. })
    }

    /// A notice belongs to what the server answers now: pgtier's own request
    /// (a refresh, a fence) when it is at the front, whatever pgtier composed
    /// for the client queued ahead of it.
    #[test]
    fn the_front_request_is_the_servers_not_a_synthetic_reply() {
        let mut q: Replies<()> = Replies::default();
        assert!(!q.front_is_own(), "nothing in flight");
        q.push_synthetic(vec![bytes::Bytes::from_static(b"Z\0\0\0\x05I")], ());
        q.push(Expect::Query, true, ());
        assert!(
            q.front_is_own(),
            "a swallowed Query behind a synthetic reply"
        );
        assert!(!q.client_request_queued(), "nothing of the client's runs");
        q.push(Expect::Query, false, ());
        assert!(q.client_request_queued(), "the client's Query behind it");
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Query, false, ());
        q.push(Expect::Query, true, ());
        assert!(!q.front_is_own(), "the client's request runs first");
    }

    #[test]
    fn extended_batch_in_order() {
        let mut q: Replies<()> = Replies::default();
        for e in [
            Expect::Parse,
            Expect::Bind,
            Expect::Describe,
            Expect::Execute,
            Expect::Sync,
        ] {
            q.push(e, false, ());
        }
        for tag in [b'1', b'2', b'T', b'D', b'D', b'C', b'Z'] {
            assert!(relayed(&q.on_server(tag)), "tag {}", tag as char);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn injected_parse_is_swallowed() {
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Parse, true, ());
        q.push(Expect::Bind, false, ());
        q.push(Expect::Execute, false, ());
        q.push(Expect::Sync, false, ());
        assert_eq!(
            q.on_server(b'1'),
            Route::Swallow {
                front: (Expect::Parse, ())
            }
        );
        assert!(relayed(&q.on_server(b'2')));
    }

    #[test]
    fn error_skips_to_sync_and_later_messages_are_not_queued() {
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Parse, false, ());
        q.push(Expect::Bind, false, ());
        assert!(relayed(&q.on_server(b'E')));
        assert!(q.is_empty());
        // sent after the error, before Sync: the server ignores them
        q.push(Expect::Execute, false, ());
        assert!(q.is_empty());
        q.push(Expect::Sync, false, ());
        assert!(relayed(&q.on_server(b'Z')));
        assert!(q.is_empty());
    }

    #[test]
    fn simple_query_with_error_waits_for_ready() {
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Query, false, ());
        for tag in [b'T', b'D', b'C', b'E'] {
            assert!(relayed(&q.on_server(tag)));
        }
        assert_eq!(q.len(), 1);
        assert!(relayed(&q.on_server(b'Z')));
    }

    #[test]
    fn copy_in_drops_queued_syncs() {
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Bind, false, ());
        q.push(Expect::Execute, false, ());
        q.push(Expect::Sync, false, ());
        assert!(relayed(&q.on_server(b'2')));
        assert!(relayed(&q.on_server(b'G')));
        assert!(q.copy_in_started(), "the client is still sending data");
        assert_eq!(q.len(), 1);
        q.client_copy_end();
        assert!(relayed(&q.on_server(b'C')));
        q.push(Expect::Sync, false, ());
        assert!(relayed(&q.on_server(b'Z')));
        assert!(q.is_empty());
    }

    #[test]
    fn sync_sent_after_copy_done_is_answered() {
        // Query(COPY), CopyData, CopyDone, Sync in one write: the server reads
        // the Sync after the COPY has ended, and answers it.
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Query, false, ());
        q.client_copy_end();
        q.push(Expect::Sync, false, ());
        assert!(relayed(&q.on_server(b'G')));
        assert!(!q.copy_in_started(), "the client already ended the COPY");
        assert_eq!(q.len(), 2);
        for tag in [b'C', b'Z', b'Z'] {
            assert!(relayed(&q.on_server(tag)));
        }
        assert!(q.is_empty());
    }

    #[test]
    fn two_copies_in_one_query() {
        // Syncs between the first CopyDone and the second COPY are ignored too.
        let mut q: Replies<()> = Replies::default();
        q.push(Expect::Query, false, ());
        q.push(Expect::Sync, false, ());
        q.client_copy_end();
        q.push(Expect::Sync, false, ());
        q.client_copy_end();
        q.push(Expect::Sync, false, ());
        assert!(relayed(&q.on_server(b'G')));
        assert!(!q.copy_in_started());
        assert_eq!(q.len(), 3);
        assert!(relayed(&q.on_server(b'C')));
        assert!(relayed(&q.on_server(b'G')));
        assert!(!q.copy_in_started());
        assert_eq!(q.len(), 2);
        for tag in [b'C', b'Z', b'Z'] {
            assert!(relayed(&q.on_server(tag)));
        }
        assert!(q.is_empty());
    }

    #[test]
    fn unexpected_reply_is_reported() {
        let mut q: Replies<()> = Replies::default();
        assert!(matches!(q.on_server(b'1'), Route::Desync(_)));
        assert!(matches!(q.on_server(b'Z'), Route::Desync(_)));
    }
}
