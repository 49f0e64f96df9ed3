//! Raw-byte tests of a session's part in warming hot keys: the hits that make
//! an entry hot leave a recipe, a warm job becomes a swallowed request whose
//! result fills the cache, and a session that is not the job's context or not
//! idle refuses it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::cache::key::{extended_key, simple_key, statement_hash};
use crate::cache::{Cache, Entry};
use crate::config::Config;
use crate::invalidation::warm::{test_job, Recipe};
use crate::invalidation::{DbState, Invalidation};
use crate::protocol::backend;
use crate::protocol::batch::Batch;
use crate::protocol::frontend::Frontend;
use crate::protocol::TxStatus;
use crate::proxy::apply;
use crate::proxy::conn::OutQueue;
use crate::proxy::replies::{Expect, Replies, Route};
use crate::proxy::startup::ServerHello;
use crate::proxy::tracker::{ReplyTag, Tracker};

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn query(sql: &str) -> Vec<u8> {
    frame(b'Q', &[sql.as_bytes(), b"\0"].concat())
}

/// Bind arguments: no parameters, default result formats.
const NO_ARGS: &[u8] = b"\0\0\0\0\0\0";

struct Harness {
    cache: Cache,
    db: Arc<DbState>,
    session: SessionCache,
    track: Tracker,
    cout: OutQueue,
    sout: OutQueue,
}

impl Harness {
    fn new() -> Harness {
        let inv = Invalidation::new(["db".to_string()], "ch");
        let db = inv.db("db").expect("db state");
        db.come_up();
        let mut session = SessionCache::new("db", "u", &[], Some(db.clone()));
        session.reseed(&[]);
        Harness {
            cache: Cache::new(&{
                let mut cfg = Config::default();
                cfg.cache.warm_hot_keys = true;
                cfg
            }),
            db,
            session,
            track: Tracker::new(&ServerHello::default()),
            cout: OutQueue::default(),
            sout: OutQueue::default(),
        }
    }

    fn after(&self) -> u32 {
        self.cache.warm_after()
    }

    /// Hand `job`'s request to the session and, if it takes it, apply it.
    fn warm(&mut self, recipe: Recipe, key: u128, seed: u128) -> Option<(Bytes, Forward)> {
        let job = test_job(&self.cache, key, seed, recipe, self.after());
        let (bytes, forward) = self.session.warm_request(&self.cache, job, &self.track)?;
        Some((bytes, forward))
    }

    /// The server's replies to a one-row result, then ReadyForQuery.
    fn serve(&mut self, tag: ReplyTag, expect: Expect) {
        for msg in [
            frame(b'T', b"\0\0"),
            frame(b'D', b"\0\x01\0\0\0\x011"),
            frame(b'C', b"SELECT 1\0"),
        ] {
            let e = if msg[0] == b'T' && expect == Expect::Execute {
                Expect::Describe
            } else {
                expect
            };
            self.session.on_reply(e, tag, msg[0], &msg, 1 << 20);
        }
        self.session
            .on_ready(&self.cache, ReplyTag::None, TxStatus::Idle, false, 1);
    }
}

#[tokio::test]
async fn a_warm_job_is_a_swallowed_query_whose_result_is_stored_one_read_short_of_hot() {
    let mut h = Harness::new();
    let key = simple_key(h.session.seed.user, b"select 1");
    let recipe = Recipe::Simple {
        sql: Bytes::from_static(b"select 1"),
    };
    let (bytes, forward) = h.warm(recipe, key, h.session.seed.user).expect("taken");
    assert_eq!(&bytes[..], &query("select 1")[..]);
    assert!(forward.swallow);
    let [tag @ ReplyTag::Fill(_)] = forward.tags[..] else {
        panic!("no fill: {:?}", forward.tags);
    };
    apply::apply(
        Outcome::forward(forward),
        &Batch::new(&bytes),
        &mut h.track,
        &mut h.cout,
        &mut h.sout,
    );
    let front = h.track.replies.iter().next().expect("queued");
    assert_eq!((front.expect, front.swallow), (Expect::Query, true));
    assert_eq!(h.sout.len(), bytes.len());
    // A reader missing meanwhile waits for this refresh.
    assert!(matches!(
        h.cache.claim(key),
        crate::cache::Claim::Follower(_)
    ));
    h.serve(tag, Expect::Query);
    let e = h.cache.l1.get(&key).expect("stored");
    assert_eq!(
        e.hits.load(std::sync::atomic::Ordering::Relaxed),
        h.after() - 1
    );
    assert!(e.row_desc.is_some());
    assert!(matches!(h.cache.claim(key), crate::cache::Claim::Leader(_)));
}

#[tokio::test]
async fn a_job_of_another_context_or_for_a_busy_session_is_refused() {
    let recipe = || Recipe::Simple {
        sql: Bytes::from_static(b"select 1"),
    };
    let mut h = Harness::new();
    let seed = h.session.seed.user;
    let key = simple_key(seed, b"select 1");
    assert!(h.warm(recipe(), key, seed ^ 1).is_none(), "another seed");
    assert!(
        h.warm(recipe(), simple_key(seed, b"select 2"), seed)
            .is_none(),
        "a key the recipe does not hash to"
    );
    h.track.tx = TxStatus::InTransaction;
    assert!(h.warm(recipe(), key, seed).is_none(), "in a transaction");
    h.track.tx = TxStatus::Idle;
    h.track.expect(Expect::Sync, false, ReplyTag::None);
    assert!(h.warm(recipe(), key, seed).is_none(), "replies pending");
    let mut h = Harness::new();
    h.session.taint(crate::bypass::BypassReason::DoBlock);
    assert!(h.warm(recipe(), key, seed).is_none(), "a tainted session");
    let mut h = Harness::new();
    let volatile = Recipe::Simple {
        sql: Bytes::from_static(b"select now()"),
    };
    let key = simple_key(seed, b"select now()");
    assert!(h.warm(volatile, key, seed).is_none(), "not cacheable");
}

#[tokio::test]
async fn an_extended_recipe_runs_unnamed_and_the_clients_unnamed_statement_is_replayed_later() {
    let mut h = Harness::new();
    // The client's unnamed statement, known to the server.
    let parse = frame(b'P', b"\0select 2\0\0\0");
    let bytes = Bytes::from(
        [
            parse.clone(),
            frame(b'B', &[b"\0\0", NO_ARGS].concat()),
            frame(b'E', b"\0\0\0\0\0"),
            frame(b'S', b""),
        ]
        .concat(),
    );
    apply::handle(
        &mut h.session,
        &h.cache,
        bytes,
        &mut h.track,
        &mut h.cout,
        &mut h.sout,
    )
    .await;
    h.track = Tracker::new(&ServerHello::default());
    let seed = h.session.seed.user;
    let key = extended_key(seed, statement_hash(b"select 1", b""), NO_ARGS);
    let recipe = Recipe::Extended {
        sql: Bytes::from_static(b"select 1"),
        types: Bytes::new(),
        args: Bytes::from_static(NO_ARGS),
    };
    let (bytes, forward) = h.warm(recipe, key, seed).expect("taken");
    let batch = Batch::new(&bytes);
    let names: Vec<(u8, Vec<u8>)> = batch
        .views()
        .map(|m| match m {
            Frontend::Parse(p) => (b'P', p.name.to_vec()),
            Frontend::Bind(b) => (b'B', [b.portal, b.statement].concat()),
            Frontend::Describe(d) => (b'D', d.name.to_vec()),
            Frontend::Execute(x) => (b'E', x.portal.to_vec()),
            Frontend::Sync => (b'S', vec![]),
            other => panic!("{other:?}"),
        })
        .collect();
    let unnamed = |t: u8| (t, vec![]);
    assert_eq!(
        names,
        [
            unnamed(b'P'),
            unnamed(b'B'),
            unnamed(b'D'),
            unnamed(b'E'),
            unnamed(b'S')
        ]
    );
    let fill = forward.tags[3];
    assert!(matches!(fill, ReplyTag::Fill(_)) && forward.tags[2] == fill);
    assert!(forward.swallow);
    assert!(
        !h.session.statements.get(b"").expect("kept").on_server,
        "the client's unnamed statement must be replayed before its next use"
    );
    h.serve(fill, Expect::Execute);
    let e = h.cache.l1.get(&key).expect("stored");
    assert!(
        e.row_desc.is_some(),
        "with its RowDescription, for Describe"
    );
    // The client's next use of its unnamed statement replays its Parse.
    h.track = Tracker::new(&ServerHello::default());
    let again = Bytes::from(
        [
            frame(b'B', &[b"\0\0", NO_ARGS].concat()),
            frame(b'E', b"\0\0\0\0\0"),
            frame(b'S', b""),
        ]
        .concat(),
    );
    let out = h
        .session
        .decide(&h.cache, &Batch::new(&again), &h.track)
        .await;
    assert_eq!(
        out.forward.expect("forwarded").inject.as_deref(),
        Some(&parse[..])
    );
}

#[tokio::test]
async fn the_hit_that_makes_an_entry_hot_registers_it_once() {
    let mut h = Harness::new();
    let sql = "select v from t where id = 1";
    let key = simple_key(h.session.seed.user, sql.as_bytes());
    let rows = [
        frame(b'D', b"\0\x01\0\0\0\x011"),
        frame(b'C', b"SELECT 1\0"),
    ]
    .concat();
    h.cache.insert(
        key,
        Entry::new(
            Some(Bytes::from(frame(b'T', b"\0\0"))),
            Bytes::from(rows),
            Duration::from_secs(60),
            Duration::ZERO,
            0,
            h.db.epoch(),
            Box::new([(5, 0)]),
        ),
    );
    for i in 1..=h.after() + 2 {
        let bytes = Bytes::from(query(sql));
        apply::handle(
            &mut h.session,
            &h.cache,
            bytes,
            &mut h.track,
            &mut h.cout,
            &mut h.sout,
        )
        .await;
        let want = usize::from(i >= h.after());
        assert_eq!(h.db.warm.registered(), want, "after {i} hits");
    }
}

#[test]
fn an_error_in_a_request_that_is_ours_through_its_sync_is_swallowed() {
    let mut q: Replies<ReplyTag> = Replies::default();
    for e in [Expect::Parse, Expect::Bind, Expect::Execute, Expect::Sync] {
        q.push(e, true, ReplyTag::None);
    }
    assert!(matches!(
        q.on_server(backend::ERROR_RESPONSE),
        Route::Swallow { .. }
    ));
    // A replayed Parse ahead of the client's own request: its error is the
    // client's.
    let mut q: Replies<ReplyTag> = Replies::default();
    q.push(Expect::Parse, true, ReplyTag::None);
    for e in [Expect::Bind, Expect::Execute, Expect::Sync] {
        q.push(e, false, ReplyTag::None);
    }
    assert!(matches!(
        q.on_server(backend::ERROR_RESPONSE),
        Route::Relay { .. }
    ));
}
