//! Raw-byte tests of the request path without sockets: what the cache layer
//! decides (answer, forward, with which tags), what the session does with it,
//! and what captures store when their request ends (issue 12, cases 24 and 27,
//! and the request-path cases of issue 13).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::cache::key::{extended_key, simple_key, statement_hash};
use crate::cache::{Cache, Entry};
use crate::config::Config;
use crate::invalidation::{DbState, Invalidation};
use crate::protocol::backend;
use crate::protocol::batch::Batch;
use crate::protocol::frontend::Frontend;
use crate::protocol::TxStatus;
use crate::proxy::apply;
use crate::proxy::conn::OutQueue;
use crate::proxy::replies::Expect;
use crate::proxy::startup::ServerHello;
use crate::proxy::tracker::{ReplyTag, Tracker};

pub(super) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub(super) fn parse(name: &str, sql: &str) -> Vec<u8> {
    let body = [name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat();
    frame(b'P', &body)
}

/// Bind with no parameters and default result formats.
pub(super) fn bind(statement: &str) -> Vec<u8> {
    let body = [b"\0", statement.as_bytes(), b"\0\0\0\0\0\0\0"].concat();
    frame(b'B', &body)
}

pub(super) fn execute() -> Vec<u8> {
    frame(b'E', b"\0\0\0\0\0")
}

pub(super) fn sync() -> Vec<u8> {
    frame(b'S', b"")
}

pub(super) fn flush() -> Vec<u8> {
    frame(b'H', b"")
}

pub(super) struct Harness {
    pub(super) cache: Cache,
    pub(super) db: Arc<DbState>,
    pub(super) session: SessionCache,
    pub(super) track: Tracker,
    pub(super) cout: OutQueue,
    pub(super) sout: OutQueue,
}

impl Harness {
    pub(super) fn new() -> Harness {
        let inv = Invalidation::new(["db".to_string()], "ch");
        let db = inv.db("db").expect("db state");
        db.come_up();
        let mut session = SessionCache::new("db", "u", &[], Some(db.clone()));
        session.reseed(&[]);
        Harness {
            cache: Cache::new(&Config::default()),
            db,
            session,
            track: Tracker::new(&ServerHello::default()),
            cout: OutQueue::default(),
            sout: OutQueue::default(),
        }
    }

    /// Put a result for `sql` (unnamed statement, no parameters) in L1.
    pub(super) fn cache_result(&self, sql: &str) {
        let b = bind("");
        let Ok(Frontend::Bind(args)) = Frontend::decode(b'B', &b[5..]) else {
            panic!("bind");
        };
        let key = extended_key(
            self.session.seed.user,
            statement_hash(sql.as_bytes(), &[]),
            args.args,
        );
        let rows = [
            frame(b'D', b"\0\x01\0\0\0\x011"),
            frame(b'C', b"SELECT 1\0"),
        ]
        .concat();
        self.cache.insert(
            key,
            Entry::new(
                None,
                Bytes::from(rows),
                Duration::from_secs(60),
                Duration::ZERO,
                0,
                self.db.epoch(),
                Box::new([]),
            ),
        );
    }

    /// Hand one request to the cache layer; (bytes answered, bytes forwarded).
    pub(super) async fn request(&mut self, parts: &[Vec<u8>]) -> (usize, usize) {
        let (c, s) = (self.cout.len(), self.sout.len());
        apply::handle(
            &mut self.session,
            &self.cache,
            Bytes::from(parts.concat()),
            &mut self.track,
            &mut self.cout,
            &mut self.sout,
        )
        .await;
        (self.cout.len() - c, self.sout.len() - s)
    }
}

#[tokio::test]
async fn a_cached_result_proves_its_parse_and_bind() {
    let mut h = Harness::new();
    h.cache_result("select 1");
    let (answered, forwarded) = h
        .request(&[parse("", "select 1"), bind(""), execute(), sync()])
        .await;
    assert!(answered > 0 && forwarded == 0, "a full hit is answered");
}

#[tokio::test]
async fn a_prepare_alone_goes_to_postgres() {
    let mut h = Harness::new();
    h.cache_result("select 1");
    for sql in ["SELEC 1", "select 1"] {
        let (answered, forwarded) = h.request(&[parse("", sql), sync()]).await;
        assert_eq!(answered, 0, "{sql}: Parse + Sync answered without Postgres");
        assert!(forwarded > 0);
    }
}

#[tokio::test]
async fn bind_without_execute_and_reparse_go_to_postgres() {
    let mut h = Harness::new();
    h.request(&[parse("s1", "select 1"), sync()]).await;
    h.cache_result("select 1");
    let (answered, _) = h.request(&[bind("s1"), sync()]).await;
    assert_eq!(answered, 0, "Bind + Sync answered without Postgres");
    // the same text under an existing name: Postgres reports 42P05
    let (answered, _) = h
        .request(&[parse("s1", "select 1"), bind("s1"), execute(), sync()])
        .await;
    assert_eq!(answered, 0, "re-Parse of an existing name answered");
}

#[tokio::test]
async fn sync_after_flush_goes_to_postgres() {
    let mut h = Harness::new();
    let (answered, _) = h.request(&[parse("", "SELEC 1"), flush()]).await;
    assert_eq!(answered, 0);
    assert!(h.track.open_batch, "Flush leaves the batch open");
    let (answered, forwarded) = h.request(&[sync()]).await;
    assert_eq!(
        answered, 0,
        "the Sync of an open batch was answered by pgtier"
    );
    assert!(forwarded > 0);
    assert!(!h.track.open_batch);
}

pub(super) fn query(sql: &str) -> Vec<u8> {
    frame(b'Q', &[sql.as_bytes(), b"\0"].concat())
}

impl Harness {
    /// Put a result for the simple query `sql` in L1, under this session's key.
    pub(super) fn cache_simple(&self, sql: &str) {
        let rows = [
            frame(b'D', b"\0\x01\0\0\0\x011"),
            frame(b'C', b"SELECT 1\0"),
        ]
        .concat();
        self.cache.insert(
            simple_key(self.session.seed.user, sql.as_bytes()),
            Entry::new(
                Some(Bytes::from(frame(b'T', b"\0\0"))),
                Bytes::from(rows),
                Duration::from_secs(60),
                Duration::ZERO,
                0,
                self.db.epoch(),
                Box::new([]),
            ),
        );
    }
}

pub(super) const READ: &str = "select v from t where id = 1";

#[tokio::test]
async fn a_simple_hit_is_answered_from_l1_with_ready_for_query() {
    let mut h = Harness::new();
    h.cache_simple(READ);
    let (answered, forwarded) = h.request(&[query(READ)]).await;
    assert_eq!(forwarded, 0);
    // RowDescription + DataRow + CommandComplete + ReadyForQuery
    let want = frame(b'T', b"\0\0").len()
        + frame(b'D', b"\0\x01\0\0\0\x011").len()
        + frame(b'C', b"SELECT 1\0").len()
        + crate::protocol::backend::READY_IDLE_BYTES.len();
    assert_eq!(answered, want);
}

#[tokio::test]
async fn a_simple_miss_is_forwarded_whole_and_awaits_its_reply() {
    let mut h = Harness::new();
    let q = query(READ);
    let (answered, forwarded) = h.request(std::slice::from_ref(&q)).await;
    assert_eq!((answered, forwarded), (0, q.len()));
    assert!(!h.track.replies.is_empty(), "the reply is expected");
}

#[tokio::test]
async fn nothing_is_answered_while_earlier_replies_are_due() {
    let mut h = Harness::new();
    h.request(&[query("select 2")]).await;
    h.cache_simple(READ);
    // Cached, but a forwarded request is still in flight: answering now could
    // reorder replies or read around an open implicit transaction.
    let (answered, forwarded) = h.request(&[query(READ)]).await;
    assert_eq!(answered, 0);
    assert!(forwarded > 0);
}

#[tokio::test]
async fn nothing_is_answered_inside_a_transaction_block() {
    let mut h = Harness::new();
    h.cache_simple(READ);
    h.track.tx = TxStatus::InTransaction;
    let (answered, forwarded) = h.request(&[query(READ)]).await;
    assert_eq!(answered, 0);
    assert!(forwarded > 0);
}

#[tokio::test]
async fn a_set_that_succeeds_changes_the_key() {
    let mut h = Harness::new();
    let before = h.session.seed;
    h.request(&[query("set timezone = 'Asia/Kolkata'")]).await;
    // its ReadyForQuery: idle, no error
    h.session
        .on_ready(&h.cache, ReplyTag::Effects, TxStatus::Idle, false, 1);
    assert!(h.session.take_settings_changed());
    h.session.reseed(&[]);
    assert_ne!(h.session.seed, before, "the setting is part of the key");
    // a SET whose request failed changes nothing
    let mut h = Harness::new();
    let before = h.session.seed;
    h.request(&[query("set timezone = 'Nowhere/Else'")]).await;
    h.session
        .on_ready(&h.cache, ReplyTag::Effects, TxStatus::Idle, true, 1);
    h.session.reseed(&[]);
    assert_eq!(h.session.seed, before);
}

#[tokio::test]
async fn code_pgtier_cannot_follow_stops_caching_for_the_session() {
    for (setup, why) in [
        (query("do $$ begin perform 1; end $$"), "do_block"),
        (query("call p()"), "procedure_call"),
        (query("create table pg_temp.x(a int)"), "temporary_objects"),
        (query("select my_function()"), "function_call"),
        (frame(b'F', b"\0\0\x04\xd2\0\0\0\0\0\0"), "function_call"),
    ] {
        let mut h = Harness::new();
        h.request(&[setup]).await;
        assert_eq!(h.session.tainted.map(|r| r.label()), Some(why));
        h.track = Tracker::new(&ServerHello::default());
        h.cache_simple(READ);
        let (answered, forwarded) = h.request(&[query(READ)]).await;
        assert_eq!(
            answered, 0,
            "{why}: a tainted session was served from the cache"
        );
        assert!(forwarded > 0);
    }
}

#[tokio::test]
async fn settings_that_change_how_statements_parse_stop_caching() {
    for (name, value, why) in [
        (
            "standard_conforming_strings",
            "off",
            "standard_conforming_strings",
        ),
        ("client_encoding", "SJIS", "client_encoding"),
    ] {
        let mut h = Harness::new();
        h.session.reseed(&[(name.into(), value.into())]);
        assert_eq!(h.session.tainted.map(|r| r.label()), Some(why));
    }
    let mut h = Harness::new();
    h.session.reseed(&[
        ("standard_conforming_strings".into(), "on".into()),
        ("client_encoding".into(), "UTF8".into()),
    ]);
    assert_eq!(h.session.tainted, None);
}

#[tokio::test]
async fn a_write_is_fenced_when_its_own_request_ends_not_before() {
    let mut h = Harness::new();
    // request 1: a read that goes upstream; request 2: a write, pipelined
    h.request(&[query("select 2")]).await;
    h.request(&[query("update t set v = 'x'")]).await;
    assert!(
        !h.session
            .on_ready(&h.cache, ReplyTag::None, TxStatus::Idle, false, 1),
        "the read's end is not the write's"
    );
    assert!(h
        .session
        .on_ready(&h.cache, ReplyTag::None, TxStatus::Idle, false, 2));
}

/// The server's replies to a one-row result, as the session relays them.
pub(super) fn serve_result(h: &mut Harness, tag: ReplyTag, expect: Expect) {
    for msg in [
        frame(b'T', b"\0\0"),
        frame(b'D', b"\0\x01\0\0\0\x011"),
        frame(b'C', b"SELECT 1\0"),
    ] {
        if msg[0] == b'T' && expect != Expect::Query {
            continue; // only a Describe gets a RowDescription
        }
        h.session.on_reply(expect, tag, msg[0], &msg, 1 << 20);
    }
}

impl Harness {
    pub(super) async fn decide(&mut self, parts: &[Vec<u8>]) -> Outcome {
        let bytes = Bytes::from(parts.concat());
        let batch = Batch::new(&bytes);
        self.session.decide(&self.cache, &batch, &self.track).await
    }
}

#[tokio::test]
async fn a_hit_is_an_answer_and_nothing_is_forwarded() {
    let mut h = Harness::new();
    h.cache_simple(READ);
    let out = h.decide(&[query(READ)]).await;
    let answer = out.answer.expect("answered");
    assert!(out.forward.is_none());
    let tags: Vec<u8> = answer.iter().map(|c| c[0]).collect();
    assert_eq!(
        tags,
        vec![b'T', b'D', b'Z'],
        "RowDescription, rows, ReadyForQuery"
    );
}

#[tokio::test]
async fn a_miss_is_forwarded_with_a_fill_stored_once_its_request_commits() {
    let mut h = Harness::new();
    let out = h.decide(&[query("select 1")]).await;
    assert!(out.answer.is_none());
    let forward = out.forward.expect("forwarded");
    let [tag @ ReplyTag::Fill(_)] = forward.tags[..] else {
        panic!("no fill: {:?}", forward.tags);
    };
    assert!(!forward.swallow);
    serve_result(&mut h, tag, Expect::Query);
    h.session.on_ready(&h.cache, tag, TxStatus::Idle, false, 1);
    let (answered, forwarded) = h.request(&[query("select 1")]).await;
    assert!(answered > 0, "the fill was not stored");
    assert_eq!(forwarded, 0);
}

#[tokio::test]
async fn an_error_or_an_open_transaction_stores_nothing() {
    for (error, status) in [(true, TxStatus::Idle), (false, TxStatus::InTransaction)] {
        let mut h = Harness::new();
        let out = h.decide(&[query("select 1")]).await;
        let tag = out.forward.expect("forwarded").tags[0];
        serve_result(&mut h, tag, Expect::Query);
        if error {
            h.session.on_error(1);
        }
        h.session.on_ready(&h.cache, tag, status, error, 1);
        let (answered, _) = h.request(&[query("select 1")]).await;
        assert_eq!(answered, 0, "stored after error={error} status={status:?}");
    }
}

#[tokio::test]
async fn captures_keep_their_ids_when_an_earlier_one_ends() {
    let mut h = Harness::new();
    // Two requests in one batch, each filling its own result.
    let out = h
        .decide(&[
            parse("", "select 1"),
            bind(""),
            execute(),
            sync(),
            parse("", "select 2"),
            bind(""),
            execute(),
            sync(),
        ])
        .await;
    let tags = out.forward.expect("forwarded").tags;
    let fills: Vec<ReplyTag> = tags
        .iter()
        .copied()
        .filter(|t| matches!(t, ReplyTag::Fill(_)))
        .collect();
    assert_eq!(fills.len(), 2, "tags: {tags:?}");
    // The first request ends with nothing captured; the second's capture must
    // still be found under its own id.
    h.session
        .on_ready(&h.cache, ReplyTag::None, TxStatus::Idle, false, 1);
    serve_result(&mut h, fills[1], Expect::Execute);
    h.session
        .on_ready(&h.cache, ReplyTag::None, TxStatus::Idle, false, 2);
    h.track = Tracker::new(&ServerHello::default());
    let (answered, forwarded) = h
        .request(&[parse("", "select 2"), bind(""), execute(), sync()])
        .await;
    assert!(answered > 0 && forwarded == 0, "the second fill was lost");
    let (answered, _) = h
        .request(&[parse("", "select 1"), bind(""), execute(), sync()])
        .await;
    assert_eq!(answered, 0, "the first request stored nothing");
}

#[tokio::test]
async fn a_named_statement_goes_to_the_server_when_it_is_defined() {
    let mut h = Harness::new();
    h.cache_result("select 1");
    // Parsed later, it would be analysed against the catalog of that moment.
    let (answered, forwarded) = h
        .request(&[parse("s1", "select 1"), bind("s1"), execute(), sync()])
        .await;
    assert!(answered == 0 && forwarded > 0, "forwarded, not answered");
    h.track = Tracker::new(&ServerHello::default());
    // Defined on the server: its executions are hits, and it is never replayed.
    let (answered, forwarded) = h.request(&[bind("s1"), execute(), sync()]).await;
    assert!(answered > 0 && forwarded == 0, "answered from the cache");
    h.cache.l1.clear();
    let out = h.decide(&[bind("s1"), execute(), sync()]).await;
    assert_eq!(out.forward.expect("forwarded").replayed.len(), 0);
}

#[tokio::test]
async fn an_unnamed_statement_only_pgtier_parsed_is_replayed_before_its_first_forward() {
    let mut h = Harness::new();
    h.cache_result("select 1");
    let p = parse("", "select 1");
    let (answered, forwarded) = h.request(&[p.clone(), bind(""), execute(), sync()]).await;
    assert!(answered > 0 && forwarded == 0, "answered from the cache");
    h.cache.l1.clear();
    let out = h.decide(&[bind(""), execute(), sync()]).await;
    let forward = out.forward.expect("forwarded");
    assert_eq!(forward.replayed.len(), 1);
    assert_eq!(
        forward.inject.as_deref(),
        Some(&p[..]),
        "the client's own Parse"
    );
    // Applied: the replayed Parse's reply is expected first, and swallowed.
    let bytes = Bytes::from([bind(""), execute(), sync()].concat());
    let mut h2 = Harness::new();
    apply::apply(
        Outcome::forward(forward),
        &Batch::new(&bytes),
        &mut h2.track,
        &mut h2.cout,
        &mut h2.sout,
    );
    let front = h2.track.replies.iter().next().expect("queued");
    assert_eq!((front.expect, front.swallow), (Expect::Parse, true));
    assert_eq!(h2.sout.len(), p.len() + bytes.len());
    // Known to the server now: not replayed again.
    let out = h.decide(&[bind(""), execute(), sync()]).await;
    assert_eq!(out.forward.expect("forwarded").replayed.len(), 0);
}

#[tokio::test]
async fn an_answer_behind_pending_replies_waits_in_the_reply_queue() {
    let mut h = Harness::new();
    h.cache_simple(READ);
    // A Sync still to be answered by the server (neutral: answering may go on).
    h.track.expect(Expect::Sync, false, ReplyTag::None);
    let (answered, forwarded) = h.request(&[query(READ)]).await;
    assert_eq!((answered, forwarded), (0, 0), "held back, not forwarded");
    assert!(h.track.replies.synthetic_bytes() > 0);
    assert!(h.track.replies.pop_synthetic().is_none(), "not due yet");
    let route = h.track.on_server(backend::READY_FOR_QUERY, b"I");
    assert!(route.is_ok());
    let reply = h.track.replies.pop_synthetic().expect("due now");
    assert_eq!(reply.len(), 3);
    assert_eq!(h.track.replies.synthetic_bytes(), 0);
}

#[tokio::test]
async fn a_stale_entry_is_answered_and_refreshed_with_swallowed_replies() {
    let mut h = Harness::new();
    let key = simple_key(h.session.seed.user, b"select 1");
    let rows = Bytes::from(frame(b'C', b"SELECT 0\0"));
    let e = Entry::new(
        Some(Bytes::from(frame(b'T', b"\0\0"))),
        rows,
        Duration::ZERO,
        Duration::from_secs(60),
        0,
        h.db.epoch(),
        Box::new([]),
    );
    h.cache.insert(key, e);
    let out = h.decide(&[query("select 1")]).await;
    assert!(out.answer.is_some(), "stale-while-revalidate answers");
    let forward = out.forward.expect("and refreshes");
    assert!(forward.swallow);
    assert!(matches!(forward.tags[0], ReplyTag::Fill(_)));
}

#[tokio::test]
async fn a_set_in_a_request_tags_its_end_with_the_effects() {
    let mut h = Harness::new();
    let out = h.decide(&[query("set timezone = 'UTC'")]).await;
    assert_eq!(
        out.forward.expect("forwarded").tags[..],
        [ReplyTag::Effects]
    );
    let out = h
        .decide(&[
            parse("", "set datestyle = 'ISO'"),
            bind(""),
            execute(),
            sync(),
        ])
        .await;
    let tags = out.forward.expect("forwarded").tags;
    assert_eq!(
        tags.last(),
        Some(&ReplyTag::Effects),
        "on the Sync: {tags:?}"
    );
}
