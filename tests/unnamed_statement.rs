//! A simple Query destroys the unnamed prepared statement and the unnamed
//! portal. pgtier's reply stream for raw frontend bytes that use them after a
//! Query must be Postgres's, byte for byte (its ErrorResponse included), both
//! when the Query goes to Postgres and when pgtier answers it from its cache
//! (the server then never saw what destroyed its unnamed statement).

mod common;

use common::wire::{
    bind, close_statement, concat, describe_portal, describe_statement, execute, extended_query,
    flush, parse, probe, query, same_replies, step, sync, unnamed_write_reused, Step, Until,
};
use common::{direct, fresh_db, Pgtier};

const TOML: &str = "[cache]\ndefault_ttl = \"5m\"\n";
const READ: &str = "select v from t where id = 1";

async fn cached(name: &str) -> (String, Pgtier) {
    let db = fresh_db(name).await;
    direct(&db)
        .await
        .batch_execute(
            "create table t(id int primary key, v text);
             insert into t select g, 'v' || g from generate_series(1, 10) g;",
        )
        .await
        .expect("setup");
    let p = Pgtier::cached(&db, TOML, &[]).await;
    (db, p)
}

/// The unnamed statement (and portal) used after a Query of `between`.
fn script(between: &str) -> Vec<Step> {
    let use_statement = concat(&[bind("", "", &[]), execute("", 0), sync()]);
    vec![
        // fills (or hits) the cache, leaves READ as the unnamed statement
        step(extended_query(READ, &[]), Until::Ready(1)),
        step(query(between), Until::Ready(1)),
        // 26000: unnamed prepared statement does not exist
        step(use_statement.clone(), Until::Ready(1)),
        // again, with the statement defined and a Query in between
        step(extended_query(READ, &[]), Until::Ready(1)),
        step(query(between), Until::Ready(1)),
        step(concat(&[describe_statement(""), sync()]), Until::Ready(1)),
        // a statement parsed again after the Query is the client's to use
        step(extended_query(READ, &[]), Until::Ready(1)),
        step(query(between), Until::Ready(1)),
        step(concat(&[parse("", READ, &[]), sync()]), Until::Ready(1)),
        step(use_statement, Until::Ready(1)),
        // the unnamed portal: bound, then a Query, then executed
        step(
            concat(&[parse("", READ, &[]), bind("", "", &[]), flush()]),
            Until::Tag(b'2'),
        ),
        step(query(between), Until::Ready(1)),
        step(
            concat(&[describe_portal(""), execute("", 0), sync()]),
            Until::Ready(1),
        ),
        probe(),
    ]
}

#[tokio::test]
async fn a_forwarded_query_destroys_the_unnamed_statement_and_portal() {
    let (db, p) = cached("unnamed_fwd").await;
    // Volatile: never cached, always forwarded (and it changes no setting,
    // which would change the keys).
    same_replies(
        p.port,
        &db,
        "forwarded query",
        &script("select now() is not null"),
    );
}

#[tokio::test]
async fn a_query_answered_from_cache_destroys_the_unnamed_statement_too() {
    let (db, p) = cached("unnamed_hit").await;
    let steps = script(READ);
    // The first run fills the cache; in the second, the Query is a hit and the
    // server never sees it.
    same_replies(p.port, &db, "cache filling", &steps);
    let before = p.metrics().await.hits();
    let got = same_replies(p.port, &db, "query answered from cache", &steps);
    let hits = p.metrics().await.hits() - before;
    assert!(hits >= 3.0, "the Queries must be hits ({hits} hits)");
    let error = got[2]
        .msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an error");
    assert_eq!(error.code().as_deref(), Some("26000"), "{:?}", got[2].msgs);
}

/// After an error in an extended-protocol request Postgres skips everything
/// up to Sync, so statements parsed (or closed) there do not exist (or still
/// exist); a failed unnamed Parse has dropped the unnamed statement. The
/// replies to their later use must be Postgres's, cached result or not.
fn skipped_script() -> Vec<Step> {
    let fail_then = |m: Vec<u8>| {
        concat(&[
            parse("", "select 1/0", &[]),
            bind("", "", &[]),
            execute("", 0),
            m,
            sync(),
        ])
    };
    let use_s1 = concat(&[bind("", "s1", &[]), execute("", 0), sync()]);
    vec![
        // fills (or hits) the cache with READ's result
        step(extended_query(READ, &[]), Until::Ready(1)),
        // "s1" parsed behind a failure: skipped, so 26000 on use
        step(fail_then(parse("s1", READ, &[])), Until::Ready(1)),
        step(use_s1.clone(), Until::Ready(1)),
        // the name is free on the server: another text takes it
        step(
            concat(&[parse("s1", "select v from t where id = 2", &[]), sync()]),
            Until::Ready(1),
        ),
        step(use_s1.clone(), Until::Ready(1)),
        // a Close behind a failure is skipped: "s1" still answers
        step(fail_then(close_statement("s1")), Until::Ready(1)),
        step(use_s1, Until::Ready(1)),
        // a failed unnamed Parse (aborted transaction) drops the unnamed statement
        step(extended_query(READ, &[]), Until::Ready(1)),
        step(query("begin"), Until::Ready(1)),
        step(query("select 1/0"), Until::Ready(1)),
        step(concat(&[parse("", READ, &[]), sync()]), Until::Ready(1)),
        step(query("rollback"), Until::Ready(1)),
        step(
            concat(&[bind("", "", &[]), execute("", 0), sync()]),
            Until::Ready(1),
        ),
        probe(),
    ]
}

#[tokio::test]
async fn statements_parsed_or_closed_behind_an_error_are_as_postgres_has_them() {
    let (db, p) = cached("unnamed_skipped").await;
    let steps = skipped_script();
    same_replies(p.port, &db, "cache filling", &steps);
    let before = p.metrics().await.hits();
    let got = same_replies(p.port, &db, "cached", &steps);
    assert!(
        p.metrics().await.hits() - before >= 1.0,
        "READ must be a hit the second time"
    );
    let code = |i: usize| got[i].msgs.iter().find_map(|m| m.code());
    assert_eq!(code(2).as_deref(), Some("26000"), "{:?}", got[2].msgs);
    assert_eq!(code(12).as_deref(), Some("26000"), "{:?}", got[12].msgs);
}

/// After a write, pgtier fences on the session's connection: with NOTIFY on
/// this server, a query only after a change of roles (an ALTER ROLE, which also
/// invalidates everything). The client's unnamed statement survives it, as
/// it does on Postgres.
#[tokio::test]
async fn the_unnamed_statement_survives_a_read_your_writes_fence() {
    let (db, p) = cached("unnamed_fence").await;
    for write in [
        "update t set v = v || '+' where id = 2",
        "alter role postgres bypassrls",
    ] {
        let before = p.metrics().await;
        same_replies(p.port, &db, write, &unnamed_write_reused(READ, write));
        let after = p.metrics().await;
        let fences = |m: &common::Metrics| {
            m.get("pgtier_fences_total", &[("kind", "probe")])
                + m.get("pgtier_fences_total", &[("kind", "notify")])
        };
        assert!(
            fences(&after) - fences(&before) >= 3.0,
            "{write}: every write was fenced"
        );
    }
    let m = p.metrics().await;
    assert!(
        m.get("pgtier_fences_total", &[("kind", "notify")]) >= 3.0,
        "the role changes were fenced with a query on the session's connection"
    );
}

/// A named statement keeps what it meant when it was parsed: after a column
/// is added, Postgres refuses to run it (`0A000`, cached plan must not change
/// result type), and so does pgtier when its first execution was a cache
/// hit. An unnamed statement with a read-your-writes fence (a role change)
/// between its Parse and its use is still there, as on Postgres.
#[tokio::test]
async fn statements_parsed_before_ddl_keep_what_they_meant() {
    let (db, p) = cached("unnamed_ddl").await;
    const ALL: &str = "select * from t where id = 1";
    let named = |sql: &str, name: &str| {
        concat(&[
            parse(name, sql, &[]),
            bind("", name, &[]),
            execute("", 0),
            sync(),
        ])
    };
    let add = named("alter table t add column c int default 7", "ddl1");
    let drop = named("alter table t drop column c", "ddl2");
    let run = |name: &str| {
        concat(&[
            bind("", name, &[]),
            describe_portal(""),
            execute("", 0),
            sync(),
        ])
    };
    let steps = vec![
        // fills the cache: the named Parse below is a hit's
        step(extended_query(ALL, &[]), Until::Ready(1)),
        step(concat(&[parse("s1", ALL, &[]), run("s1")]), Until::Ready(1)),
        step(add.clone(), Until::Ready(1)),
        step(run("s1"), Until::Ready(1)),
        step(drop.clone(), Until::Ready(1)),
        // the unnamed statement, then a fenced role change
        step(concat(&[parse("", ALL, &[]), sync()]), Until::Ready(1)),
        step(named("alter role postgres bypassrls", "g"), Until::Ready(1)),
        step(add, Until::Ready(1)),
        step(run(""), Until::Ready(1)),
        step(drop, Until::Ready(1)),
        probe(),
    ];
    let got = same_replies(p.port, &db, "statements parsed before DDL", &steps);
    let code = |i: usize| got[i].msgs.iter().find_map(|m| m.code());
    assert_eq!(code(3).as_deref(), Some("0A000"), "{:?}", got[3].msgs);
    // The unnamed statement's result type may change (Postgres analyses it
    // again): what matters is that it is still there, as on Postgres.
    assert_eq!(code(8), None, "{:?}", got[8].msgs);
}
