//! Raw-byte tests of prepared statements the server never defined: after an
//! error in an extended-protocol request, Postgres skips every message up to
//! Sync, so a Parse (or Close) among them changes nothing on the server, and
//! a Parse that fails drops the unnamed statement before failing. pgtier's
//! record of the session's statements must follow, or it would answer a Bind
//! of a statement Postgres does not have, or of an older text.

use super::dispatch_tests::{bind, execute, flush, frame, parse, sync, Harness, READ};
use crate::proxy::replies::Route;

fn error() -> Vec<u8> {
    frame(b'E', b"SERROR\0C22012\0Mdivision by zero\0\0")
}

fn ready() -> Vec<u8> {
    frame(b'Z', b"I")
}

/// A request whose Execute fails, with `m` behind it (skipped by the server).
fn behind_a_failure(m: Vec<u8>) -> [Vec<u8>; 5] {
    [parse("", "select 1/0"), bind(""), execute(), m, sync()]
}

/// The server's replies to [`behind_a_failure`].
fn failure_replies() -> [Vec<u8>; 4] {
    [frame(b'1', b""), frame(b'2', b""), error(), ready()]
}

impl Harness {
    /// The server's replies, through the tracker and the session as the
    /// proxy hands them on.
    fn serve(&mut self, replies: &[Vec<u8>]) {
        for msg in replies {
            let route = self.track.on_server(msg[0], &msg[5..]).expect("valid");
            let front = match route {
                Route::Swallow { front } => Some(front),
                Route::Relay { front, .. } => front,
                Route::Desync(why) => panic!("desync: {why}"),
            };
            if msg[0] == b'E' {
                self.session.on_error(self.track.requests_done + 1);
                self.session.refused(&self.track.replies.take_discarded());
            }
            if let (Some((expect, tag)), false) = (front, msg[0] == b'Z') {
                self.session.on_reply(expect, tag, msg[0], msg, 1 << 20);
            }
        }
    }
}

#[tokio::test]
async fn a_parse_skipped_after_an_error_defines_nothing() {
    let mut h = Harness::new();
    h.cache_result(READ);
    // Parse "s1" comes after an Execute that fails: the server skips it.
    h.request(&behind_a_failure(parse("s1", READ))).await;
    h.serve(&failure_replies());
    assert!(h.track.replies.is_empty(), "in step with the server");
    assert!(h.session.statements.get(b"s1").is_none(), "never defined");
    // Postgres answers 26000 "prepared statement does not exist".
    let (answered, forwarded) = h.request(&[bind("s1"), execute(), sync()]).await;
    assert_eq!(answered, 0, "not answered from the cache");
    assert!(forwarded > 0);
}

#[tokio::test]
async fn a_name_whose_parse_was_skipped_may_be_parsed_with_another_text() {
    let mut h = Harness::new();
    h.cache_result(READ);
    h.request(&behind_a_failure(parse("s1", READ))).await;
    h.serve(&failure_replies());
    // The server takes this Parse (it has no "s1"): it is the one in force.
    let other = "select v from t where id = 2";
    h.request(&[parse("s1", other), sync()]).await;
    h.serve(&[frame(b'1', b""), ready()]);
    let s = h.session.statements.get(b"s1").expect("defined");
    assert_eq!(s.sql(), other.as_bytes());
    assert!(s.on_server);
    // READ's cached result is not "s1"'s.
    let (answered, _) = h.request(&[bind("s1"), execute(), sync()]).await;
    assert_eq!(answered, 0);
}

#[tokio::test]
async fn a_failed_unnamed_parse_drops_the_unnamed_statement_a_skipped_one_keeps_it() {
    let mut h = Harness::new();
    h.request(&[parse("", READ), sync()]).await;
    h.serve(&[frame(b'1', b""), ready()]);
    assert!(h.session.statements.get(b"").is_some());
    // Skipped: READ stays the unnamed statement.
    h.request(&[
        parse("x", "select 1/0"),
        bind("x"),
        execute(),
        parse("", "select 2"),
        sync(),
    ])
    .await;
    h.serve(&failure_replies());
    let s = h.session.statements.get(b"").expect("kept");
    assert_eq!(s.sql(), READ.as_bytes());
    // Failed (say, in an aborted transaction): gone, as on the server.
    h.request(&[parse("", "select 3"), sync()]).await;
    h.serve(&[error(), ready()]);
    assert!(h.session.statements.get(b"").is_none());
}

#[tokio::test]
async fn a_close_skipped_after_an_error_keeps_the_statement() {
    let mut h = Harness::new();
    h.request(&[parse("s1", READ), sync()]).await;
    h.serve(&[frame(b'1', b""), ready()]);
    h.request(&behind_a_failure(frame(b'C', b"Ss1\0"))).await;
    h.serve(&failure_replies());
    let s = h.session.statements.get(b"s1").expect("still there");
    assert!(s.on_server);
    // So a Parse of another text under the name is refused by Postgres, and
    // pgtier keeps the old one in force.
    h.request(&[parse("s1", "select 9"), sync()]).await;
    let s = h.session.statements.get(b"s1").expect("still there");
    assert_eq!(s.sql(), READ.as_bytes());
}

#[tokio::test]
async fn an_undo_leaves_a_later_pipelined_change_in_force() {
    let mut h = Harness::new();
    h.request(&[parse("s1", READ), sync()]).await;
    h.serve(&[frame(b'1', b""), ready()]);
    // R1: a Close of "s1" behind a failure (skipped); R2, pipelined before
    // R1's error arrives: a Close and a Parse with another text (applied).
    h.request(&behind_a_failure(frame(b'C', b"Ss1\0"))).await;
    let other = "select v from t where id = 2";
    h.request(&[frame(b'C', b"Ss1\0"), parse("s1", other), sync()])
        .await;
    h.serve(&failure_replies());
    let s = h.session.statements.get(b"s1").expect("defined");
    assert_eq!(s.sql(), other.as_bytes(), "R2's Parse is in force");
    h.serve(&[frame(b'3', b""), frame(b'1', b""), ready()]);
    let s = h.session.statements.get(b"s1").expect("defined");
    assert_eq!(s.sql(), other.as_bytes());
    assert!(h.track.replies.is_empty());
}

#[tokio::test]
async fn a_skipped_close_of_the_servers_stray_unnamed_statement_is_sent_again() {
    let mut h = Harness::new();
    h.request(&[parse("", "select 2"), sync()]).await;
    h.serve(&[frame(b'1', b""), ready()]);
    // Defined and closed for the client alone (both answered from the
    // cache): the server still has "select 2" as its unnamed statement.
    h.cache_result(READ);
    let (answered, _) = h
        .request(&[parse("", READ), bind(""), execute(), sync()])
        .await;
    assert!(answered > 0, "the control: a hit");
    let (answered, forwarded) = h.request(&[frame(b'C', b"S\0"), sync()]).await;
    assert!(answered > 0 && forwarded == 0);
    // R1 fails and ends in a Flush: the server skips up to the next Sync,
    // so the Close pgtier puts ahead of R2 (pipelined before R1's error
    // arrives) is skipped too.
    h.request(&[parse("x", "select 1/0"), bind("x"), execute(), flush()])
        .await;
    let r2 = [bind(""), execute(), sync()];
    let (_, forwarded) = h.request(&r2).await;
    let close = frame(b'C', b"S\0");
    assert_eq!(
        forwarded,
        close.len() + r2.concat().len(),
        "the control: a Close goes first"
    );
    h.serve(&failure_replies());
    assert!(h.track.replies.is_empty(), "in step with the server");
    // "select 2" is still the server's unnamed statement: a Bind of it must
    // meet a Close first, or Postgres would run it where it says 26000.
    let out = h.decide(&[bind(""), execute(), sync()]).await;
    assert!(out.forward.expect("forwarded").close_unnamed);
}
