//! Read-your-writes fences: after a transaction that wrote commits, the
//! client's ReadyForQuery is held until the invalidation source has applied
//! the write (or `fence_timeout` passes, and the session stops using the
//! cache).
//!
//! With NOTIFY, the fence is a query on the listening connection after the
//! write's commit (see `invalidation::probe_fences`); on servers older than
//! 15, and after DDL, a notification sent after the write (delivered in
//! commit order). With the logical source it is a WAL position: a query that
//! writes nothing asks the server for a position at or after the session's
//! commit record, and the fence is released once the stream has applied
//! everything before it. No xid, no commit, no WAL flush of its own.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use bytes::BytesMut;
use tokio::sync::oneshot;

use crate::bypass::BypassReason;
use crate::invalidation::lsn_fences::parse_lsn;
use crate::protocol::backend;
use crate::proxy::caching::SessionCache;
use crate::proxy::conn::OutQueue;
use crate::proxy::replies::Expect;
use crate::proxy::tracker::{ReplyTag, Tracker};
use crate::proxy::Proxy;

/// The position the fence waits for. A synchronous commit has flushed its
/// commit record before the client hears of it, so the flush position is at
/// or after it (and readable by the walsender at once); an asynchronous one
/// may not have, so then the insert position is the target and the wait lasts
/// until the WAL writer flushes it. Runs in its own implicit transaction after
/// the write's: it assigns no xid and writes no WAL. Every name is qualified:
/// it runs under the session's `search_path`, which may put the client's own
/// functions and operators before the server's.
pub const LSN_QUERY: &str = "SELECT CASE \
     WHEN pg_catalog.current_setting('synchronous_commit') OPERATOR(pg_catalog.=) 'off' \
     THEN pg_catalog.pg_current_wal_insert_lsn() ELSE pg_catalog.pg_current_wal_flush_lsn() END";

/// An outstanding read-your-writes fence: the client's output is held until
/// it completes (or the timeout passes).
pub(super) struct Fence {
    seq: u64,
    /// Logical source: the waiter's sender, until the server has said which
    /// position to wait for.
    pending: Option<oneshot::Sender<()>>,
    /// That position, once registered (to forget it on timeout).
    lsn: Option<u64>,
    done: oneshot::Receiver<()>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// The position in a DataRow of [`LSN_QUERY`]: one non-null text column.
pub fn row_lsn(body: &[u8]) -> Option<u64> {
    let (count, rest) = body.split_first_chunk::<2>()?;
    if i16::from_be_bytes(*count) != 1 {
        return None;
    }
    let (len, value) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(i32::from_be_bytes(*len)).ok()?;
    if value.len() != len {
        return None;
    }
    parse_lsn(value)
}

/// A server message answering the fence's position query (swallowed). Takes
/// the session's fields, as the message is still borrowed from its buffer.
pub(super) fn reply(fence: &mut Option<Fence>, caching: &mut SessionCache, tag: u8, body: &[u8]) {
    let Some(f) = fence else {
        return;
    };
    match tag {
        backend::DATA_ROW => {
            // Unreadable: the sender stays, and the fence fails at
            // ReadyForQuery (dropping it would release the client as if the
            // stream had gone).
            let (Some(lsn), Some(db)) = (row_lsn(body), caching.db()) else {
                return;
            };
            let Some(tx) = f.pending.take() else {
                return;
            };
            f.lsn = Some(lsn);
            db.fence_at(f.seq, lsn, tx);
        }
        backend::READY_FOR_QUERY if f.pending.is_some() || f.lsn.is_none() => {
            // No position (an error, or a value we cannot read): nothing
            // would release the fence, so end it and leave the cache.
            tracing::warn!(
                "no WAL position for a read-your-writes fence; this session no longer uses the cache"
            );
            *fence = None;
            caching.fencing = false;
            caching.taint(BypassReason::FenceFailed);
        }
        _ => {}
    }
}

/// Whether the fence (if any) is over; clears it, and on a timeout stops
/// the session using the cache. Registers wake-ups otherwise.
pub(super) fn poll(fence: &mut Option<Fence>, caching: &mut SessionCache, cx: &mut Context<'_>) {
    let Some(f) = fence else {
        return;
    };
    let done = Pin::new(&mut f.done).poll(cx).is_ready();
    let expired = !done && f.deadline.as_mut().poll(cx).is_ready();
    if !(done || expired) {
        return;
    }
    let (seq, lsn) = (f.seq, f.lsn);
    *fence = None;
    caching.fencing = false;
    if expired {
        tracing::warn!("invalidation fence timed out; this session no longer uses the cache");
        ::metrics::counter!("pgtier_fence_timeouts_total").increment(1);
        if let Some(db) = caching.db() {
            match lsn {
                Some(lsn) => db.lsn_fences.forget(seq, lsn),
                None => db.forget_fence(seq),
            }
        }
        caching.taint(BypassReason::FenceTimeout);
    }
}

/// After a committed write: send a fence on the session's server connection
/// (queued in `sout`, its reply expected by `track`) and return it; the
/// session holds the client's ReadyForQuery until the invalidation source
/// has seen it.
pub(super) fn start(
    caching: &mut SessionCache,
    proxy: &Proxy,
    sout: &mut OutQueue,
    track: &mut Tracker,
) -> Option<Fence> {
    let db = caching.db().cloned()?;
    let inv = &proxy.invalidation;
    let logical = proxy.config.load().invalidation.source == crate::config::Source::Logical;
    let announce_all = std::mem::take(&mut caching.announce_all);
    let timeout = proxy.config.load().invalidation.fence_timeout.0;
    if !logical && !announce_all && db.probe_fences.usable() {
        // The write's own notifications are enough: no query on the
        // session's connection, and no commit (see `probe_fences`).
        let (tx, done) = oneshot::channel();
        db.probe_fences.wait(tx, || db.live());
        let seq = 0; // nothing to forget: a later probe drops the waiter
        ::metrics::counter!("pgtier_fences_total", "kind" => "probe").increment(1);
        caching.fencing = true;
        return Some(Fence {
            seq,
            pending: None,
            lsn: None,
            done,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        });
    }
    let channel = inv.channel.replace('"', "\"\"");
    let (seq, pending, done, statements, tag) = if logical && !announce_all {
        let (seq, tx, rx) = db.new_lsn_fence();
        (
            seq,
            Some(tx),
            rx,
            vec![LSN_QUERY.to_string()],
            ReplyTag::FenceLsn,
        )
    } else {
        // NOTIFY, or DDL through pgtier on the logical source: a message
        // after the session's commit (delivered in commit order), with
        // `*` ahead of it so the client hears of its commit only after
        // every entry of this database is gone. In one transaction, so
        // one more commit: DDL is rare.
        let (seq, nonce, rx) = db.new_fence();
        let payload = crate::invalidation::Payload::fence(inv.instance, seq, nonce);
        let announce = |payload: &str| {
            if logical {
                crate::invalidation::logical::emit_sql(&inv.channel, payload)
            } else {
                format!("NOTIFY \"{channel}\", '{payload}'")
            }
        };
        let mut statements = Vec::new();
        if announce_all {
            statements.push(announce("*"));
        }
        statements.push(announce(&payload));
        (seq, None, rx, statements, ReplyTag::None)
    };
    let kind = if tag == ReplyTag::FenceLsn {
        "lsn"
    } else {
        "notify"
    };
    ::metrics::counter!("pgtier_fences_total", "kind" => kind).increment(1);
    let mut buf = BytesMut::new();
    for statement in &statements {
        extended(statement.as_bytes(), &mut buf, track, tag);
    }
    buf.extend_from_slice(crate::protocol::frontend::SYNC_BYTES);
    track.expect(Expect::Sync, true, tag);
    sout.push(buf.freeze());
    caching.fencing = true;
    Some(Fence {
        seq,
        pending,
        lsn: None,
        done,
        deadline: Box::pin(tokio::time::sleep(timeout)),
    })
}

/// The name of the statement a fence runs as: a Query, or a Parse of the
/// unnamed statement, would destroy the client's unnamed statement (and one
/// parsed again later may no longer mean what the client parsed). Closed in
/// the same request; a client statement of this name makes the Parse fail, the
/// rest is skipped (the client's statement stays) and the fence fails.
const STATEMENT: &[u8] = b"pgtier_fence";

/// Queue `sql` as Parse, Bind, Execute and Close of [`STATEMENT`] (the
/// caller ends the request with Sync), its replies expected and swallowed.
fn extended(sql: &[u8], buf: &mut BytesMut, track: &mut Tracker, tag: ReplyTag) {
    use crate::protocol::frontend::{Bind, Close, Execute, Parse, Target};
    Parse {
        name: STATEMENT,
        query: sql,
        param_types: &[],
    }
    .encode(buf);
    // No parameter formats, no parameters, no result formats (text).
    Bind {
        portal: b"",
        statement: STATEMENT,
        args: &[0; 6],
        result_formats: &[],
        param_count: 0,
    }
    .encode(buf);
    Execute {
        portal: b"",
        max_rows: 0,
    }
    .encode(buf);
    Close {
        target: Target::Statement,
        name: STATEMENT,
    }
    .encode(buf);
    for e in [Expect::Parse, Expect::Bind, Expect::Execute, Expect::Close] {
        track.expect(e, true, tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::replies::Route;
    use crate::proxy::startup::ServerHello;
    use crate::proxy::tracker::Tracker;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        frame(b'D', &b)
    }

    /// The fence request as sent (a named statement, parsed, run and closed:
    /// nothing of the client's is touched) and the raw bytes Postgres answers
    /// it with, through the tracker as the session sees them: every message is
    /// swallowed, the DataRow's value is the position, and the client's
    /// request behind it still gets its own replies.
    #[test]
    fn the_fence_position_is_read_from_a_swallowed_reply() {
        use crate::protocol::batch::Batch;
        use crate::protocol::frontend::Frontend;
        let mut track = Tracker::new(&ServerHello::default());
        let mut buf = BytesMut::new();
        extended(
            LSN_QUERY.as_bytes(),
            &mut buf,
            &mut track,
            ReplyTag::FenceLsn,
        );
        buf.extend_from_slice(crate::protocol::frontend::SYNC_BYTES);
        track.expect(Expect::Sync, true, ReplyTag::FenceLsn);
        track.expect(Expect::Query, false, ReplyTag::None);
        let sent = buf.freeze();
        let batch = Batch::new(&sent);
        let names: Vec<String> = batch
            .views()
            .map(|m| match m {
                Frontend::Parse(p) => format!("P {}", String::from_utf8_lossy(p.name)),
                Frontend::Bind(b) => format!("B {}", String::from_utf8_lossy(b.statement)),
                Frontend::Execute(e) => format!("E {}", String::from_utf8_lossy(e.portal)),
                Frontend::Close(c) => format!("C {}", String::from_utf8_lossy(c.name)),
                Frontend::Sync => "S".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "P pgtier_fence",
                "B pgtier_fence",
                "E ",
                "C pgtier_fence",
                "S"
            ]
        );
        let reply = [
            frame(b'1', b""),
            frame(b'2', b""),
            data_row(&[Some(b"1/A0B3C4D8")]),
            frame(b'C', b"SELECT 1\0"),
            frame(b'3', b""),
            frame(b'Z', b"I"),
        ];
        let mut captured = None;
        for msg in &reply {
            let route = track.on_server(msg[0], &msg[5..]).expect("valid");
            let Route::Swallow { front: (_, tag) } = route else {
                panic!("relayed to the client: {}", msg[0] as char);
            };
            assert_eq!(tag, ReplyTag::FenceLsn);
            if msg[0] == b'D' {
                captured = row_lsn(&msg[5..]);
            }
        }
        assert_eq!(captured, Some(0x1_A0B3_C4D8));
        assert!(matches!(
            track.on_server(b'Z', b"I").expect("valid"),
            Route::Relay {
                front: Some((Expect::Query, ReplyTag::None)),
                ..
            }
        ));
        assert!(track.replies.is_empty());
    }

    #[test]
    fn only_one_readable_position_counts() {
        assert_eq!(
            row_lsn(&data_row(&[Some(b"0/16B3748")])[5..]),
            Some(0x16B_3748)
        );
        for bad in [
            data_row(&[None]),
            data_row(&[Some(b"0/1"), Some(b"0/2")]),
            data_row(&[Some(b"not an lsn")]),
            data_row(&[]),
        ] {
            assert_eq!(row_lsn(&bad[5..]), None);
        }
        // A length that runs past the message.
        let mut cut = data_row(&[Some(b"0/1")]);
        cut.truncate(cut.len() - 1);
        assert_eq!(row_lsn(&cut[5..]), None);
    }
}
