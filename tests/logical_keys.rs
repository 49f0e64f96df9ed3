//! Key-level invalidation with the L2 on the logical source: key column sets
//! are registered through the stream, so two instances sharing one Redis use
//! the same sets at the same stream position. A write to another key leaves
//! B's L2 hit; a write to the read key reaches both, also when B never read
//! by that column set itself, when B started after the registration, and
//! after an epoch change (an instance restarted).

mod common;

use std::time::{Duration, Instant};

use common::logical::{cluster, control_url, schema, TTL};
use common::redis::RedisServer;
use common::sql::first;
use common::{connect_str, Metrics, Pgtier};
use tokio_postgres::Client;

fn l2_hits(m: &Metrics) -> f64 {
    m.get(
        "pgtier_cache_lookups_total",
        &[("tier", "l2"), ("outcome", "hit")],
    )
}

fn start(port: u16, redis: &str, extra: &[&str]) -> Pgtier {
    let control = control_url(port);
    let mut args = vec![
        "--control-url",
        &control,
        "--invalidation-source",
        "logical",
        "--auto-install-triggers",
        "--key-level",
        "--redis",
        redis,
    ];
    args.extend_from_slice(extra);
    Pgtier::start_with(port, TTL, &args)
}

/// B keeps nothing in L1: every cached read of B's is a Redis lookup.
fn start_b(port: u16, redis: &str) -> Pgtier {
    start(port, redis, &["--l1-max-bytes", "0"])
}

async fn tables(port: u16) -> Client {
    let ctl = schema(port).await;
    ctl.batch_execute(
        "create table kt(id int primary key, v int);
         insert into kt select g, g from generate_series(1, 20) g;
         create table k2(id int primary key, g int, v int);
         insert into k2 select g, g * 10, g from generate_series(1, 20) g;
         alter table k2 replica identity full;
         grant all on kt, k2 to app;",
    )
    .await
    .expect("tables");
    ctl
}

/// A write through `c`: its pgtier has applied it when this returns (the
/// session's fence comes back through that pgtier's stream after it).
async fn write(c: &Client, sql: &str) {
    c.batch_execute(sql).await.expect("write");
}

/// Wait (bounded) until A has stored a result in Redis since `stored`.
async fn until_stored(a: &Pgtier, stored: f64) {
    let t = Instant::now();
    while a
        .metrics()
        .await
        .get("pgtier_l2_writes_total", &[("result", "stored")])
        <= stored
    {
        assert!(t.elapsed() < Duration::from_secs(5), "A stored nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Until B reads `q` from Redis right after a write to another key of its
/// table (both instances in step, the column set live on both): bounded.
async fn until_b_keeps_l2_hit(
    (a, ca): (&Pgtier, &Client),
    (b, cb): (&Pgtier, &Client),
    q: &str,
    want: &str,
    other_key: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored = a
            .metrics()
            .await
            .get("pgtier_l2_writes_total", &[("result", "stored")]);
        assert_eq!(first(ca, q).await, want);
        // A hit of A's stores nothing: its store is waited for, not required.
        let _ = tokio::time::timeout(Duration::from_millis(500), until_stored(a, stored)).await;
        assert_eq!(first(cb, q).await, want);
        write(ca, other_key).await;
        // B has applied A's write once its own fenced write comes back.
        write(cb, other_key).await;
        let before = l2_hits(&b.metrics().await);
        assert_eq!(
            first(cb, q).await,
            want,
            "B: stale or wrong after {other_key}"
        );
        if l2_hits(&b.metrics().await) > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "B never kept its L2 hit of {q} across a write to another key:\nA:\n{}\nB:\n{}",
            a.logs(),
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Until A reads `q` by key (a write to another key of k2 keeps its L1 hit)
/// and has stored that result in Redis: bounded.
async fn until_a_keyed_in_l2(a: &Pgtier, ca: &Client, q: &str, want: &str) {
    let t = Instant::now();
    let stored_count = || async {
        a.metrics()
            .await
            .get("pgtier_l2_writes_total", &[("result", "stored")])
    };
    let mut stored = stored_count().await;
    loop {
        // The kept entry was filled by the read below or by the last one of
        // the previous round: its store is counted after `before`.
        let before = stored;
        stored = stored_count().await;
        assert_eq!(first(ca, q).await, want);
        write(ca, "update k2 set v = v where id = 19").await;
        let hits = a.metrics().await.hits();
        assert_eq!(first(ca, q).await, want);
        if a.metrics().await.hits() > hits {
            until_stored(a, before).await;
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "A never keyed {q}");
    }
}

/// A write to `q`'s key through A: afterwards (once B's fenced write has
/// come back), neither instance ever answers the old value, L2 included.
async fn write_reaches_both(
    (_, ca): (&Pgtier, &Client),
    (b, cb): (&Pgtier, &Client),
    q: &str,
    write_key: &str,
    want: &str,
) {
    write(ca, write_key).await;
    assert_eq!(first(ca, q).await, want, "A after its own write");
    write(cb, "update k2 set v = v where id = 20").await;
    // B's read is a miss, an L2 hit of A's new result, or its own: never the
    // old value. Read until it comes from Redis (A's fill), bounded.
    let t = Instant::now();
    loop {
        let before = l2_hits(&b.metrics().await);
        assert_eq!(first(cb, q).await, want, "B served a stale result");
        assert_eq!(first(ca, q).await, want, "A served a stale result");
        if l2_hits(&b.metrics().await) > before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "B never found {q} in Redis:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn instances_agree_on_key_sets_through_their_streams() {
    let redis = RedisServer::start();
    let url = redis.url();
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = tables(port).await;
    let a = start(port, &url, &[]);
    a.wait_listener("lg").await;
    let b = start_b(port, &url);
    b.wait_listener("lg").await;
    let ca = a.connect("lg").await;
    let cb = b.connect("lg").await;

    // (1) A write to another key leaves B's L2 hit.
    let q5 = "select v from kt where id = 5";
    until_b_keeps_l2_hit(
        (&a, &ca),
        (&b, &cb),
        q5,
        "5",
        "update kt set v = v where id = 9",
    )
    .await;
    // (2) A write to the read key reaches both.
    write_reaches_both(
        (&a, &ca),
        (&b, &cb),
        q5,
        "update kt set v = 55 where id = 5",
        "55",
    )
    .await;

    // B reads k2 by g, A by id: were sets made live by each instance's own
    // reads, a write to id 3 would move neither one's whole-table version,
    // only A's version of key id=3, and B, making (id) live later, would
    // compute the L2 key of A's result from before the write.
    let qg = "select v from k2 where g = 50";
    let t = Instant::now();
    loop {
        assert_eq!(first(&cb, qg).await, "5");
        write(&cb, "update k2 set v = v where id = 18").await;
        let before = l2_hits(&b.metrics().await);
        assert_eq!(first(&cb, qg).await, "5");
        if l2_hits(&b.metrics().await) > before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "B never keyed k2 by g"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let q3 = "select v from k2 where id = 3";
    until_a_keyed_in_l2(&a, &ca, q3, "3").await;
    // An epoch from a third instance: the L2 versions restart on every
    // instance, so the whole-table versions are equal again. Had A kept
    // (id) live and B (g), A's next result would be stored under a key that
    // B computes again after the write below.
    let c = start_b(port, &url);
    c.wait_listener("lg").await;
    write(&ca, "update kt set v = v where id = 20").await;
    write(&cb, "update kt set v = v where id = 20").await;
    let q3 = "select v + 0 from k2 where id = 3";
    until_a_keyed_in_l2(&a, &ca, q3, "3").await;
    write(&ca, "update k2 set v = 33 where id = 3").await;
    write(&cb, "update kt set v = v where id = 20").await;
    // B's reads of id 3 (the first table-level, then keyed): never the
    // result A stored before the write; until one is a Redis hit, bounded.
    let t = Instant::now();
    loop {
        let before = l2_hits(&b.metrics().await);
        assert_eq!(first(&cb, q3).await, "33", "B read A's pre-write result");
        if l2_hits(&b.metrics().await) > before {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "B never keyed k2");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    write_reaches_both(
        (&a, &ca),
        (&b, &cb),
        q3,
        "update k2 set v = 34 where id = 3",
        "34",
    )
    .await;

    // (3) An epoch change (B restarts: its epoch resets every instance's live
    // sets and L2 versions): they still agree.
    drop(cb);
    drop(b);
    let b = start_b(port, &url);
    b.wait_listener("lg").await;
    let cb = b.connect("lg").await;
    until_b_keeps_l2_hit(
        (&a, &ca),
        (&b, &cb),
        q5,
        "55",
        "update kt set v = v where id = 8",
    )
    .await;
    write_reaches_both(
        (&a, &ca),
        (&b, &cb),
        q5,
        "update kt set v = 56 where id = 5",
        "56",
    )
    .await;
    write_reaches_both(
        (&a, &ca),
        (&b, &cb),
        q3,
        "update k2 set v = 35 where id = 3",
        "35",
    )
    .await;
    let m = b.metrics().await;
    assert!(
        m.get("pgtier_invalidations_total", &[("level", "key")]) > 0.0,
        "B invalidated by key"
    );
}

/// B starts after A registered the column set and a write moved the key's
/// version on A: B's epoch makes both register again, and neither finds a
/// result from before a write. Then the streams are cut (every walsender
/// terminated): both reconnect with new epochs and still agree.
#[tokio::test]
async fn an_instance_started_after_a_registration_agrees() {
    let redis = RedisServer::start();
    let url = redis.url();
    let cluster = cluster();
    let port = cluster.port;
    let _ctl = tables(port).await;
    let a = start(port, &url, &[]);
    a.wait_listener("lg").await;
    let ca = a.connect("lg").await;
    let q7 = "select v from kt where id = 7";
    let t = Instant::now();
    loop {
        first(&ca, q7).await;
        write(&ca, "update kt set v = v where id = 18").await;
        let hits = a.metrics().await.hits();
        assert_eq!(first(&ca, q7).await, "7");
        if a.metrics().await.hits() > hits {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "A never keyed kt");
    }
    write(&ca, "update kt set v = 70 where id = 7").await;
    assert_eq!(first(&ca, q7).await, "70");

    let b = start_b(port, &url);
    b.wait_listener("lg").await;
    let cb = b.connect("lg").await;
    assert_eq!(first(&cb, q7).await, "70");
    until_b_keeps_l2_hit(
        (&a, &ca),
        (&b, &cb),
        q7,
        "70",
        "update kt set v = v where id = 17",
    )
    .await;
    write_reaches_both(
        (&a, &ca),
        (&b, &cb),
        q7,
        "update kt set v = 71 where id = 7",
        "71",
    )
    .await;

    // Cut both streams: each instance reconnects and sends an epoch.
    let direct = connect_str(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=lg"
    ))
    .await;
    let reconnects = |m: &Metrics| m.get("pgtier_listener_reconnects_total", &[("database", "lg")]);
    let (ra, rb) = (
        reconnects(&a.metrics().await),
        reconnects(&b.metrics().await),
    );
    direct
        .batch_execute(
            "select pg_terminate_backend(pid) from pg_stat_replication
             where application_name = 'pgtier-logical'",
        )
        .await
        .expect("terminate");
    let t = Instant::now();
    while reconnects(&a.metrics().await) <= ra || reconnects(&b.metrics().await) <= rb {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the streams were not lost"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.wait_listener("lg").await;
    b.wait_listener("lg").await;
    // Sessions opened before may have been tainted by the outage: new ones.
    let ca = a.connect("lg").await;
    let cb = b.connect("lg").await;
    until_b_keeps_l2_hit(
        (&a, &ca),
        (&b, &cb),
        q7,
        "71",
        "update kt set v = v where id = 16",
    )
    .await;
    write_reaches_both(
        (&a, &ca),
        (&b, &cb),
        q7,
        "update kt set v = 72 where id = 7",
        "72",
    )
    .await;
}
