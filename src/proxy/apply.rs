//! Carrying out the cache layer's decision for a request: composed replies go
//! to the client (or wait in the reply queue behind replies still due), and
//! forwarded messages go to the server with what each will be answered with.

use bytes::Bytes;

use super::caching::{Outcome, SessionCache};
use super::conn::OutQueue;
use super::replies::Expect;
use super::tracker::{ReplyTag, Tracker};
use crate::cache::Cache;
use crate::protocol::batch::Batch;

/// Decode one complete client request, let the cache layer decide, and act.
pub async fn handle(
    session: &mut SessionCache,
    cache: &Cache,
    bytes: Bytes,
    track: &mut Tracker,
    cout: &mut OutQueue,
    sout: &mut OutQueue,
) {
    let batch = Batch::new(&bytes);
    let outcome = session.decide(cache, &batch, track).await;
    apply(outcome, &batch, track, cout, sout);
}

/// Act on `outcome` for `batch`.
pub fn apply(
    outcome: Outcome,
    batch: &Batch<'_>,
    track: &mut Tracker,
    cout: &mut OutQueue,
    sout: &mut OutQueue,
) {
    if let Some(reply) = outcome.answer {
        if track.replies.is_empty() {
            for chunk in reply {
                cout.push(chunk);
            }
        } else {
            track.expect_synthetic(reply.into_vec());
        }
    }
    let Some(forward) = outcome.forward else {
        return;
    };
    if forward.close_unnamed {
        track.expect(Expect::Close, true, ReplyTag::StrayClose);
    }
    for tag in forward.replayed {
        // Their ParseComplete replies come next and are not the client's.
        track.expect(Expect::Parse, true, tag);
    }
    for (m, tag) in batch.messages().iter().zip(forward.tags) {
        let Some(msg) = m.view else {
            continue;
        };
        track.on_client(&msg);
        let (expect, ends) = track.expectation(&msg);
        if let Some(e) = expect {
            track.expect(e, forward.swallow, tag);
            // Only what the server answers moves the batch on: a Flush or a
            // stray CopyData leaves its implicit transaction open.
            track.open_batch = !ends;
        }
    }
    if let Some(inject) = forward.inject {
        sout.push(inject);
    }
    sout.push(batch.bytes().clone());
}
