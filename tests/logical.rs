//! Issue 15: `invalidation.source = "logical"`. On a throwaway cluster with
//! `wal_level = logical`, pgtier takes writes from a temporary pgoutput slot:
//! writes made through it and straight to Postgres invalidate (INSERT, UPDATE,
//! DELETE, TRUNCATE, partitions), a session reads its own writes at once (the
//! fence is a logical message), losing the stream bypasses the cache until a
//! new one runs, and nothing but a publication is installed in the database.

mod common;

use std::time::{Duration, Instant};

use common::logical::{cluster, control_url, schema, setup_command, start_pgtier_with, TTL};
use common::sql::{first, until, warm};
use common::{connect_str, Pgtier};

async fn metric(p: &Pgtier, name: &str) -> f64 {
    p.metrics().await.get(name, &[("database", "lg")])
}

#[tokio::test]
async fn writes_anywhere_invalidate_through_the_stream() {
    let cluster = cluster();
    let port = cluster.port;
    let ctl = schema(port).await;
    let out = setup_command(port, &["install-triggers"]);
    assert!(out.contains("publication \"pgtier\" created"), "{out}");
    assert!(
        out.contains("public.nopk"),
        "a table without identity is named: {out}"
    );
    let p = Pgtier::start_with(
        port,
        TTL,
        &[
            "--control-url",
            &control_url(port),
            "--invalidation-source",
            "logical",
        ],
    );
    p.wait_listener("lg").await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let app = connect_str(&format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=lg connect_timeout=10",
        p.port
    ))
    .await;

    // Nothing of pgtier's in the database but the publication.
    for (what, sql) in [
        (
            "triggers",
            "select count(*) from pg_trigger where not tgisinternal",
        ),
        ("event triggers", "select count(*) from pg_event_trigger"),
        (
            "functions",
            "select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname not in ('pg_catalog', 'information_schema')",
        ),
        (
            "schema",
            "select count(*) from pg_namespace where nspname = 'pgtier'",
        ),
    ] {
        assert_eq!(first(&direct, sql).await, "0", "{what} installed");
    }
    assert_eq!(
        first(&direct, "select string_agg(tablename, ',' order by tablename) from pg_publication_tables where pubname = 'pgtier'").await,
        "parted_a,parted_b,t"
    );
    // The slot is temporary: Postgres drops it with the connection.
    assert_eq!(
        first(
            &direct,
            "select count(*) from pg_replication_slots where temporary and slot_type = 'logical'"
        )
        .await,
        "1"
    );

    // Writes straight to Postgres.
    let q = "select sum(v) from t";
    warm(&p, &app, q, "3").await;
    direct
        .batch_execute("insert into t values (3, 10)")
        .await
        .unwrap();
    until(&app, q, "13").await;
    warm(&p, &app, q, "13").await;
    direct
        .batch_execute("update t set v = v + 100 where id = 1")
        .await
        .unwrap();
    until(&app, q, "113").await;
    warm(&p, &app, q, "113").await;
    direct
        .batch_execute("delete from t where id = 3")
        .await
        .unwrap();
    until(&app, q, "103").await;
    warm(&p, &app, q, "103").await;
    direct.batch_execute("truncate t").await.unwrap();
    until(&app, q, "NULL").await;

    // Writes through pgtier: the session's next read sees them at once (its
    // ReadyForQuery waited for the fence to come through the stream).
    warm(&p, &app, q, "NULL").await;
    for (i, sql) in [
        "insert into t values (1, 7)",
        "update t set v = 8 where id = 1",
        "insert into t values (2, 1)",
        "delete from t where id = 2",
    ]
    .iter()
    .enumerate()
    {
        app.batch_execute(sql).await.unwrap();
        let want = ["7", "8", "9", "8"][i];
        assert_eq!(first(&app, q).await, want, "after {sql}");
        warm(&p, &app, q, want).await;
    }
    app.batch_execute("truncate t").await.unwrap();
    assert_eq!(first(&app, q).await, "NULL", "after truncate");
    assert_eq!(
        p.metrics().await.get("pgtier_fence_timeouts_total", &[]),
        0.0,
        "fences come back through the stream"
    );

    // A partitioned table: writes to a partition and through the parent.
    let pq = "select sum(v) from parted";
    warm(&p, &app, pq, "3").await;
    direct
        .batch_execute("insert into parted_b values (160, 10)")
        .await
        .unwrap();
    until(&app, pq, "13").await;
    warm(&p, &app, pq, "13").await;
    direct
        .batch_execute("update parted set v = v + 100 where id = 1")
        .await
        .unwrap();
    until(&app, pq, "113").await;
    warm(&p, &app, "select v from parted_a where id = 1", "101").await;
    direct.batch_execute("truncate parted").await.unwrap();
    until(&app, "select v from parted_a where id = 1", "<no rows>").await;

    // A table left out of the publication is never cached, and its writers
    // are not broken by it.
    let before = p.metrics().await.bypasses("no_trigger");
    assert_eq!(first(&app, "select sum(v) from nopk").await, "5");
    assert_eq!(first(&app, "select sum(v) from nopk").await, "5");
    assert_eq!(p.metrics().await.bypasses("no_trigger") - before, 2.0);
    app.batch_execute("update nopk set v = 6").await.unwrap();
    assert_eq!(first(&app, "select sum(v) from nopk").await, "6");
    drop(ctl);
}

#[tokio::test]
async fn losing_the_stream_bypasses_until_a_new_one_runs() {
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = schema(port).await;
    let p = Pgtier::start_with(
        port,
        TTL,
        &[
            "--control-url",
            &control_url(port),
            "--invalidation-source",
            "logical",
            "--auto-install-triggers",
        ],
    );
    p.wait_listener("lg").await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let app = connect_str(&format!(
        "host=127.0.0.1 port={} user=app password=app-secret dbname=lg connect_timeout=10",
        p.port
    ))
    .await;
    let q = "select sum(v) from t";
    warm(&p, &app, q, "3").await;
    let reconnects = metric(&p, "pgtier_listener_reconnects_total").await;
    let walsender = "select pid from pg_stat_replication where application_name = 'pgtier-logical'";
    let old = first(&direct, walsender).await;
    // The stream dies; a write made meanwhile must never be hidden by an
    // entry filled before it.
    direct
        .batch_execute(
            "select pg_terminate_backend(pid) from pg_stat_replication where application_name = 'pgtier-logical';
             insert into t values (3, 10);"
        )
        .await
        .unwrap();
    until(&app, q, "13").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = first(&direct, walsender).await;
        if now != old
            && now != "<no rows>"
            && metric(&p, "pgtier_listener_reconnects_total").await > reconnects
            && metric(&p, "pgtier_listener_connected").await == 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stream never came back:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        p.logs().contains("logical replication stream lost"),
        "the loss is logged"
    );
    // The new stream invalidates as the old one did.
    warm(&p, &app, q, "13").await;
    direct
        .batch_execute("update t set v = 0 where id = 3")
        .await
        .unwrap();
    until(&app, q, "3").await;
    // Only the running stream's slot exists (the old one went with its
    // connection).
    assert_eq!(
        first(&direct, "select count(*) from pg_replication_slots").await,
        "1"
    );
    // A table created later is published (auto_install) and cached.
    _ctl.batch_execute("create table later(id int primary key, v int); insert into later values (1, 4); grant select on later to app")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while first(
        &direct,
        "select count(*) from pg_publication_tables where tablename = 'later'",
    )
    .await
        != "1"
    {
        assert!(Instant::now() < deadline, "later never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lq = "select sum(v) from later";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = p.metrics().await.hits();
        assert_eq!(first(&app, lq).await, "4");
        assert_eq!(first(&app, lq).await, "4");
        if p.metrics().await.hits() > before {
            break;
        }
        assert!(Instant::now() < deadline, "later is never cached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    direct
        .batch_execute("insert into later values (2, 1)")
        .await
        .unwrap();
    until(&app, lq, "5").await;
}

#[test]
fn uninstall_drops_the_publication() {
    let cluster = cluster();
    let port = cluster.port;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(schema(port));
    let out = setup_command(port, &["install-triggers"]);
    assert!(out.contains("3 table(s) added"), "{out}");
    let out = setup_command(port, &["install-triggers"]);
    assert!(
        out.contains("exists; 0 table(s) added"),
        "idempotent: {out}"
    );
    let out = setup_command(port, &["uninstall-triggers"]);
    assert!(out.contains("dropped"), "{out}");
    let n = rt.block_on(async {
        let c = connect_str(&format!(
            "host=127.0.0.1 port={port} user=postgres dbname=lg"
        ))
        .await;
        first(&c, "select count(*) from pg_publication").await
    });
    assert_eq!(n, "0");
}

fn l2_hits(m: &common::Metrics) -> f64 {
    m.get(
        "pgtier_cache_lookups_total",
        &[("tier", "l2"), ("outcome", "hit")],
    )
}

/// Instances on their own streams agree on L2 versions: each accepts the
/// epochs the others put into the stream, and decodes the same commits in
/// the same order.
#[tokio::test]
async fn instances_share_l2_through_their_streams() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = schema(port).await;
    let control = control_url(port);
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--control-url",
            &control,
            "--invalidation-source",
            "logical",
            "--auto-install-triggers",
            "--redis",
            &url,
        ];
        args.extend_from_slice(extra);
        Pgtier::start_with(port, TTL, &args)
    };
    let a = start(&[]);
    a.wait_listener("lg").await;
    // B keeps nothing in L1: its cached reads come from Redis.
    let b = start(&["--l1-max-bytes", "0"]);
    b.wait_listener("lg").await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let ca = a.connect("lg").await;
    let cb = b.connect("lg").await;
    let q = "select v from t where id = 2";
    // Until both have accepted the same epoch (B's, sent last), a value A
    // stores is under a key B does not compute: retry, bounded.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stored = a
            .metrics()
            .await
            .get("pgtier_l2_writes_total", &[("result", "stored")]);
        assert_eq!(first(&ca, q).await, "2");
        let t = Instant::now();
        while a
            .metrics()
            .await
            .get("pgtier_l2_writes_total", &[("result", "stored")])
            <= stored
            && t.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = l2_hits(&b.metrics().await);
        assert_eq!(first(&cb, q).await, "2");
        if l2_hits(&b.metrics().await) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never reads A's result from Redis:\n{}",
            b.logs()
        );
        // A new write gives a new key for A to fill.
        direct
            .batch_execute("update t set v = v where id = 2")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A write invalidates both views, B's (Redis only) included.
    direct
        .batch_execute("update t set v = 20 where id = 2")
        .await
        .unwrap();
    until(&ca, q, "20").await;
    until(&cb, q, "20").await;
    assert_eq!(
        b.metrics().await.get(
            "pgtier_control_notifications_rejected_total",
            &[("kind", "epoch")]
        ),
        0.0,
        "B accepted every epoch after its own"
    );
}

/// Key-level invalidation from the stream: a write kills only the keys its
/// rows had and have; where the stream does not carry a column set's old
/// values (outside the replica identity), the write kills the table.
#[tokio::test]
async fn key_level_reads_survive_writes_to_other_keys() {
    let cluster = cluster();
    let port = cluster.port;
    let ctl = schema(port).await;
    ctl.batch_execute(
        "create table kt(id int primary key, grp int, v int);
         insert into kt values (1, 7, 10), (2, 7, 20), (3, 7, 30);
         grant all on kt to app;",
    )
    .await
    .unwrap();
    let p = start_pgtier_with(port, TTL, &["--auto-install-triggers", "--key-level"]).await;
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let c = p.connect("lg").await;
    let q1 = "select v from kt where id = 1";
    let q2 = "select v from kt where id = 2";
    // The first reads register the column set; then q1 is cached by key and
    // a write to row 2 leaves it cached.
    let mut n = 20;
    let mut kept = false;
    for _ in 0..5 {
        warm(&p, &c, q1, "10").await;
        warm(&p, &c, q2, &n.to_string()).await;
        n += 1;
        direct
            .batch_execute("update kt set v = v + 1 where id = 2")
            .await
            .unwrap();
        // q2 changing says the write has come through the stream.
        until(&c, q2, &n.to_string()).await;
        let before = p.metrics().await.hits();
        assert_eq!(first(&c, q1).await, "10");
        if p.metrics().await.hits() - before == 1.0 {
            kept = true;
            break;
        }
    }
    assert!(kept, "a write to row 2 always killed the read of row 1");
    assert!(
        p.metrics()
            .await
            .get("pgtier_invalidations_total", &[("level", "key")])
            > 0.0
    );
    // Its own row's write kills it; so does moving the key away.
    direct
        .batch_execute("update kt set v = 11 where id = 1")
        .await
        .unwrap();
    until(&c, q1, "11").await;
    warm(&p, &c, q1, "11").await;
    direct
        .batch_execute("update kt set id = 100 where id = 1")
        .await
        .unwrap();
    until(&c, q1, "<no rows>").await;
    let q100 = "select v from kt where id = 100";
    warm(&p, &c, q100, "11").await;
    direct
        .batch_execute("delete from kt where id = 100")
        .await
        .unwrap();
    until(&c, q100, "<no rows>").await;
    warm(&p, &c, q100, "<no rows>").await;
    direct
        .batch_execute("insert into kt values (100, 1, 5)")
        .await
        .unwrap();
    until(&c, q100, "5").await;
    // grp is outside the replica identity: an UPDATE does not say its old
    // value, so it kills the table's reads. First make sure the read is
    // cached by key: a row inserted into another group (through pgtier, so
    // the stream has applied it when the write returns) leaves it cached.
    let g = "select sum(v) from kt where grp = 7";
    let sum = first(&direct, g).await;
    let mut kept = false;
    for i in 0..5 {
        warm(&p, &c, g, &sum).await;
        c.batch_execute(&format!("insert into kt values ({}, 1, 1)", 200 + i))
            .await
            .unwrap();
        let before = p.metrics().await.hits();
        assert_eq!(first(&c, g).await, sum);
        if p.metrics().await.hits() - before == 1.0 {
            kept = true;
            break;
        }
    }
    assert!(kept, "the read by grp is never cached by key");
    direct
        .batch_execute("update kt set grp = 8 where id = 3")
        .await
        .unwrap();
    until(&c, g, &first(&direct, g).await).await;
    assert_ne!(first(&c, g).await, sum);
    // Writes through pgtier, read at once.
    c.batch_execute("update kt set v = 99 where id = 2")
        .await
        .unwrap();
    assert_eq!(first(&c, q2).await, "99");
}
