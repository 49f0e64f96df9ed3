//! Read-your-writes on the logical source without a commit of its own: after
//! a write through pgtier, the fence is a WAL position the stream must pass.
//! On an otherwise idle cluster the walsender's keepalive carries it past at
//! once; a write costs one transaction, not two (the old fence emitted a
//! transactional message); and a session with asynchronous commit still reads
//! its own writes.

mod common;

use std::time::{Duration, Instant};

use common::logical::{app, cluster, schema, setup_command, start_pgtier, TTL};
use common::sql::{first, warm};
use common::wire::{same_replies_at, unnamed_write_reused};
use common::{connect_str, Pgtier};
use tokio_postgres::Client;

async fn start(port: u16) -> Pgtier {
    let toml = format!("{TTL}[invalidation]\nfence_timeout = \"5s\"\n");
    start_pgtier(port, &toml).await
}

/// The next transaction id the server will assign: how many transactions
/// wrote (were given an xid) in between.
async fn next_xid(direct: &Client) -> i64 {
    first(
        direct,
        "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
    )
    .await
    .parse()
    .expect("an xid")
}

#[tokio::test]
async fn a_write_costs_one_commit_and_its_fence_passes_at_once_when_idle() {
    let cluster = cluster();
    let port = cluster.port;
    let ctl = schema(port).await;
    setup_command(port, &["install-triggers"]);
    let p = start(port).await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let app = app(&p).await;

    // Nothing else writes: each write's fence waits for the stream alone.
    let q = "select v from t where id = 1";
    warm(&p, &app, q, "1").await;
    let mut slowest = Duration::ZERO;
    for i in 2..=11 {
        let t = Instant::now();
        app.batch_execute("update t set v = v + 1 where id = 1")
            .await
            .unwrap();
        slowest = slowest.max(t.elapsed());
        assert_eq!(
            first(&app, q).await,
            i.to_string(),
            "the session's own write"
        );
        warm(&p, &app, q, &i.to_string()).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a fenced write took {slowest:?} (fence_timeout is 5s)"
    );
    assert_eq!(
        p.metrics().await.get("pgtier_fence_timeouts_total", &[]),
        0.0,
        "every fence was passed by the stream"
    );

    // What the old fence cost: a transactional message after each write.
    let before = next_xid(&direct).await;
    for _ in 0..100 {
        direct
            .batch_execute("update t set v = v + 1 where id = 2")
            .await
            .unwrap();
        direct
            .batch_execute("select pg_logical_emit_message(true, 'elsewhere', 'x')")
            .await
            .unwrap();
    }
    let old = next_xid(&direct).await - before;
    assert!(old >= 200, "a write and a message: {old} xids for 100");

    // Now: 100 writes through pgtier, each fenced, one transaction each
    // (a little slack for autovacuum's ANALYZE).
    let before = next_xid(&direct).await;
    let t = Instant::now();
    for _ in 0..100 {
        app.batch_execute("update t set v = v + 1 where id = 2")
            .await
            .unwrap();
    }
    let elapsed = t.elapsed();
    let now = next_xid(&direct).await - before;
    println!("100 writes: {old} xids with a message fence, {now} through pgtier ({elapsed:?})");
    assert!(
        (100..110).contains(&now),
        "100 writes through pgtier assigned {now} xids: one commit per write, not two"
    );
    assert_eq!(first(&app, "select v from t where id = 2").await, "202");
    assert_eq!(
        p.metrics().await.get("pgtier_fence_timeouts_total", &[]),
        0.0
    );
    drop(ctl);
}

#[tokio::test]
async fn asynchronous_commit_still_reads_its_own_writes() {
    let cluster = cluster();
    let port = cluster.port;
    let ctl = schema(port).await;
    setup_command(port, &["install-triggers"]);
    let p = start(port).await;
    let app = app(&p).await;

    // Set for the session (outside a transaction): pgtier keeps caching, and
    // the fence waits for the insert position, flushed by the WAL writer.
    app.batch_execute("set synchronous_commit = off")
        .await
        .unwrap();
    let q = "select v from t where id = 1";
    warm(&p, &app, q, "1").await;
    for i in 2..=6 {
        app.batch_execute("update t set v = v + 1 where id = 1")
            .await
            .unwrap();
        assert_eq!(first(&app, q).await, i.to_string(), "asynchronous commit");
        warm(&p, &app, q, &i.to_string()).await;
    }
    assert_eq!(
        p.metrics().await.get("pgtier_fence_timeouts_total", &[]),
        0.0,
        "the WAL writer flushes well within fence_timeout"
    );

    // Only for one transaction: the session's setting no longer shows it
    // once it has committed, so the session leaves the cache.
    app.batch_execute("set synchronous_commit = on")
        .await
        .unwrap();
    warm(&p, &app, q, "6").await;
    let before = p.metrics().await.bypasses("setting_changed_in_transaction");
    app.batch_execute(
        "begin; set local synchronous_commit = off; update t set v = 100 where id = 1; commit",
    )
    .await
    .unwrap();
    assert_eq!(first(&app, q).await, "100");
    assert!(
        p.metrics().await.bypasses("setting_changed_in_transaction") > before,
        "read from Postgres"
    );
    drop(ctl);
}

/// The fence's position query (and, after a change of roles, the logical messages that
/// announce it) goes on the session's connection after the write: the
/// client's unnamed statement survives it, as it does on Postgres.
#[tokio::test]
async fn the_unnamed_statement_survives_the_fence_query() {
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = schema(port).await;
    setup_command(port, &["install-triggers"]);
    let p = start(port).await;
    let read = "select v from t where id = 1";
    for write in [
        "update t set v = v + 1 where id = 2",
        "alter role postgres bypassrls",
    ] {
        same_replies_at(
            port,
            p.port,
            "lg",
            write,
            &unnamed_write_reused(read, write),
            false,
        );
    }
    let m = p.metrics().await;
    let lsn = m.get("pgtier_fences_total", &[("kind", "lsn")]);
    let notify = m.get("pgtier_fences_total", &[("kind", "notify")]);
    assert!(
        lsn >= 3.0 && notify >= 3.0,
        "fences: {lsn} by position, {notify} by message"
    );
}

/// The fence runs under the session's `search_path`. A session that puts
/// functions and an operator of its own before `pg_catalog` (here, ones that
/// would release every fence at once and log that they ran) does not have
/// them called by pgtier: after its writes and a change of roles, the log is
/// empty and every read shows the session's own write.
#[tokio::test]
async fn the_fence_calls_only_the_servers_functions() {
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = schema(port).await;
    setup_command(port, &["install-triggers"]);
    let p = start(port).await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    direct
        .batch_execute(
            "create schema evil;
             create table evil.calls(f text);
             create function evil.pg_current_wal_flush_lsn() returns pg_lsn language sql
               as $$ insert into evil.calls values ('flush') returning '0/0'::pg_lsn $$;
             create function evil.pg_current_wal_insert_lsn() returns pg_lsn language sql
               as $$ insert into evil.calls values ('insert') returning '0/0'::pg_lsn $$;
             create function evil.current_setting(text) returns text language sql
               as $$ insert into evil.calls values ('setting') returning 'off' $$;
             create function evil.pg_logical_emit_message(boolean, text, text) returns pg_lsn
               language sql as $$ insert into evil.calls values ('emit') returning '0/0'::pg_lsn $$;
             create function evil.eq(text, text) returns boolean language sql
               as $$ insert into evil.calls values ('eq') returning true $$;
             create operator evil.= (leftarg = text, rightarg = text, function = evil.eq);",
        )
        .await
        .unwrap();
    let (c, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=postgres dbname=lg", p.port),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c.batch_execute("set search_path = evil, pg_catalog, public")
        .await
        .unwrap();
    let q = "select v from public.t where id = 1";
    let start_v: i32 = first(&c, q).await.parse().unwrap();
    for i in 1..=5 {
        c.batch_execute("update public.t set v = v + 1 where id = 1")
            .await
            .unwrap();
        assert_eq!(
            first(&c, q).await,
            (start_v + i).to_string(),
            "the session's own write"
        );
    }
    c.batch_execute("alter role postgres bypassrls")
        .await
        .unwrap();
    let calls = first(&direct, "select count(*) from evil.calls").await;
    assert_eq!(calls, "0", "pgtier called the session's functions");
    let m = p.metrics().await;
    let lsn = m.get("pgtier_fences_total", &[("kind", "lsn")]);
    let notify = m.get("pgtier_fences_total", &[("kind", "notify")]);
    assert!(
        lsn >= 5.0 && notify >= 1.0,
        "fences: {lsn} by position, {notify} by message"
    );
    assert_eq!(m.get("pgtier_fence_timeouts_total", &[]), 0.0);
}
