//! Raw-byte tests of the unnamed statement's life on the request path: a
//! Query destroys it (on the server, or for the client alone when pgtier
//! answers the Query), so a later Bind or Describe of it must reach Postgres
//! and fail there, with the server's own unnamed statement closed first when
//! the server never saw what destroyed it.

use super::dispatch_tests::{bind, execute, flush, frame, parse, query, sync, Harness, READ};
use crate::proxy::replies::Expect;
use crate::proxy::startup::ServerHello;
use crate::proxy::tracker::Tracker;

fn close_unnamed() -> Vec<u8> {
    frame(b'C', b"S\0")
}

fn describe_unnamed() -> Vec<u8> {
    frame(b'D', b"S\0")
}

impl Harness {
    /// The server answered everything sent so far.
    fn replies_done(&mut self) {
        self.track = Tracker::new(&ServerHello::default());
    }

    /// Forward a Parse/Bind/Execute/Sync of the unnamed statement (nothing
    /// cached yet), then cache its result: the server has the statement and
    /// the next Bind of it would be a hit.
    async fn unnamed_on_server(&mut self, sql: &str) {
        let (answered, _) = self
            .request(&[parse("", sql), bind(""), execute(), sync()])
            .await;
        assert_eq!(answered, 0, "nothing cached yet");
        self.replies_done();
        self.cache_result(sql);
        let (answered, forwarded) = self.request(&[bind(""), execute(), sync()]).await;
        assert!(answered > 0 && forwarded == 0, "the control: a hit");
    }
}

#[tokio::test]
async fn a_forwarded_query_forgets_the_unnamed_statement() {
    let mut h = Harness::new();
    h.unnamed_on_server("select 1").await;
    h.request(&[query("select 2")]).await;
    h.replies_done();
    let use_it = [bind(""), execute(), sync()];
    let out = h.decide(&use_it).await;
    assert!(out.answer.is_none(), "Postgres says it does not exist");
    let forward = out.forward.expect("forwarded");
    // The server saw the Query: it destroyed the statement itself.
    assert!(forward.inject.is_none() && !forward.close_unnamed);
}

#[tokio::test]
async fn a_query_answered_from_cache_closes_the_servers_unnamed_statement() {
    let mut h = Harness::new();
    h.unnamed_on_server("select 1").await;
    h.cache_simple(READ);
    let (answered, forwarded) = h.request(&[query(READ)]).await;
    assert!(answered > 0 && forwarded == 0, "the Query is a hit");
    let use_it = [bind(""), execute(), sync()].concat();
    let (answered, forwarded) = h.request(std::slice::from_ref(&use_it)).await;
    assert_eq!(answered, 0, "Postgres says it does not exist");
    let close = close_unnamed();
    assert_eq!(forwarded, close.len() + use_it.len(), "Close first");
    let front = h.track.replies.iter().next().expect("queued");
    assert_eq!((front.expect, front.swallow), (Expect::Close, true));
    h.replies_done();
    // Closed once: the next use goes as it is.
    let out = h.decide(&[describe_unnamed(), sync()]).await;
    let forward = out.forward.expect("forwarded");
    assert!(forward.inject.is_none() && !forward.close_unnamed);
}

#[tokio::test]
async fn a_describe_after_a_cached_query_closes_first_too() {
    let mut h = Harness::new();
    h.unnamed_on_server("select 1").await;
    h.cache_simple(READ);
    h.request(&[query(READ)]).await;
    let out = h.decide(&[describe_unnamed(), sync()]).await;
    assert!(out.answer.is_none());
    let forward = out.forward.expect("forwarded");
    assert!(forward.close_unnamed);
    assert_eq!(forward.inject.as_deref(), Some(&close_unnamed()[..]));
}

#[tokio::test]
async fn a_request_that_parses_the_unnamed_statement_first_needs_no_close() {
    let mut h = Harness::new();
    h.unnamed_on_server("select 1").await;
    h.cache_simple(READ);
    h.request(&[query(READ)]).await;
    h.cache.l1.clear();
    let out = h
        .decide(&[parse("", "select 3"), bind(""), execute(), sync()])
        .await;
    let forward = out.forward.expect("forwarded");
    assert!(forward.inject.is_none() && !forward.close_unnamed);
}

#[tokio::test]
async fn a_statement_parsed_after_a_cached_query_is_replayed_not_closed() {
    let mut h = Harness::new();
    h.unnamed_on_server("select 1").await;
    h.cache_simple(READ);
    h.request(&[query(READ)]).await;
    // Answered from the cache: the server still has the old unnamed statement.
    let p = parse("", "select 1");
    let (answered, _) = h.request(&[p.clone(), bind(""), execute(), sync()]).await;
    assert!(answered > 0);
    h.cache.l1.clear();
    let out = h.decide(&[bind(""), execute(), sync()]).await;
    let forward = out.forward.expect("forwarded");
    assert!(!forward.close_unnamed, "the replayed Parse replaces it");
    assert_eq!(forward.replayed.len(), 1);
    assert_eq!(forward.inject.as_deref(), Some(&p[..]));
}

#[tokio::test]
async fn a_query_inside_a_pipeline_forgets_the_unnamed_statement() {
    let mut h = Harness::new();
    h.cache_result("select 1");
    // Parse, then a Query in the same write: the server drops the statement.
    let (answered, _) = h
        .request(&[parse("", "select 1"), flush(), query("select 2")])
        .await;
    assert_eq!(answered, 0);
    h.replies_done();
    let (answered, forwarded) = h.request(&[bind(""), execute(), sync()]).await;
    assert_eq!(answered, 0, "Postgres says it does not exist");
    assert_eq!(forwarded, [bind(""), execute(), sync()].concat().len());
}

#[tokio::test]
async fn a_cached_close_of_the_unnamed_statement_closes_the_servers_older_one() {
    let mut h = Harness::new();
    h.unnamed_on_server("select 2").await;
    h.cache_result("select 1");
    // Redefined and closed, both answered from the cache: the server still
    // has "select 2".
    let (answered, _) = h
        .request(&[parse("", "select 1"), bind(""), execute(), sync()])
        .await;
    assert!(answered > 0);
    let (answered, forwarded) = h.request(&[close_unnamed(), sync()]).await;
    assert!(answered > 0 && forwarded == 0);
    let out = h.decide(&[bind(""), execute(), sync()]).await;
    assert!(out.answer.is_none());
    assert!(out.forward.expect("forwarded").close_unnamed);
}
