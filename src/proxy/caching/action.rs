//! What the cache layer decided to do with a request, for the session to carry
//! out: answer it with composed replies, forward it (with the Parse messages
//! the server has not seen, and a tag per message for its replies), or both
//! (a stale answer followed by its refresh).

use bytes::Bytes;
use smallvec::SmallVec;

use crate::proxy::tracker::ReplyTag;

/// Replies composed by pgtier: shared `Bytes` (static protocol messages and
/// cached results) written as they are.
pub type Reply = SmallVec<[Bytes; 8]>;

/// Send a request to the server.
#[derive(Debug, Default)]
pub struct Forward {
    /// Parse messages of statements the request uses that the server never
    /// saw (pgtier answered their Parse); they go first, their replies are
    /// swallowed.
    pub inject: Option<Bytes>,
    /// The Parse messages `inject` holds: the tag of each one's reply.
    pub replayed: SmallVec<[ReplyTag; 2]>,
    /// `inject` begins with a Close of the unnamed statement (ahead of the
    /// Parse messages): the server's is not the client's. Its reply is
    /// swallowed.
    pub close_unnamed: bool,
    /// Per message of the batch (in order), what to do with its reply.
    pub tags: SmallVec<[ReplyTag; 8]>,
    /// The replies are not the client's (a background refresh): swallow them.
    pub swallow: bool,
}

/// The decision for one request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Answer the client with this, now or once the replies ahead of it are out.
    pub answer: Option<Reply>,
    /// Then send the request to the server.
    pub forward: Option<Forward>,
}

impl Outcome {
    pub fn answer(reply: Reply) -> Outcome {
        Outcome {
            answer: Some(reply),
            forward: None,
        }
    }

    pub fn forward(forward: Forward) -> Outcome {
        Outcome {
            answer: None,
            forward: Some(forward),
        }
    }
}
