//! Key-level invalidation keeps the guarantees of table-level invalidation
//! (issue 14): a fill that raced a write to its key is never served, one that
//! raced a write to another key is; two instances sharing Redis agree on key
//! versions; concurrent misses on one key are coalesced.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::sql::{first, until};
use common::{direct, fresh_db, Metrics, Pgtier};
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// Read `read` (simple protocol) until a write to another key (`other`) leaves
/// it cached: the key column set is then live (bounded).
async fn until_keyed(p: &Pgtier, c: &Client, read: &str, other: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        first(c, read).await;
        c.batch_execute(other).await.expect("write");
        let before = p.metrics().await.hits();
        first(c, read).await;
        if p.metrics().await.hits() > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{read} never survived a write to another key:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bounded wait until a statement like `like` is running on the server.
async fn until_running(d: &Client, like: &str) {
    let t = Instant::now();
    loop {
        let n: i64 = d
            .query_one(
                "select count(*) from pg_stat_activity where state = 'active' and query like $1",
                &[&like],
            )
            .await
            .expect("activity")
            .get(0);
        if n > 0 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{like} never started"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn l2_hits(m: &Metrics) -> f64 {
    m.get(
        "pgtier_cache_lookups_total",
        &[("tier", "l2"), ("outcome", "hit")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_raced_a_write_to_its_key_is_never_served() {
    let db = fresh_db("pgtier_kl_fill_race").await;
    let d = direct(&db).await;
    // No index on k: a read by key scans 2M rows, long enough for a write to
    // commit while it runs.
    d.batch_execute(
        "create table big(k int, v int);
         insert into big select g % 1000, 1 from generate_series(1, 2000000) g;
         analyze big;",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, TTL, &["--key-level"]).await;
    let c = p.connect(&db).await;
    let slow = "select sum(v) from big where k = 7";
    until_keyed(&p, &c, slow, "update big set v = v where k = 999 and v < 0").await;

    for (i, write, key_written) in [
        // A write to the read's key commits while the read runs: its result
        // predates the write and must never be served.
        (1, "update big set v = v + 1 where k = 7", true),
        // A write to another key: the raced result is still right, and cached.
        (2, "update big set v = v + 1 where k = 8", false),
    ] {
        // A text never read before: the raced read is a fill, keyed at once
        // (the column set is live for the table).
        let raced_sql = format!("select sum(v), {i} from big where k = 7");
        let before: i64 = d.query_one(slow, &[]).await.expect("direct").get(0);
        let c2 = p.connect(&db).await;
        let sql = raced_sql.clone();
        let reader = tokio::spawn(async move { first(&c2, &sql).await });
        until_running(&d, &format!("select sum(v), {i} from big%")).await;
        d.batch_execute(write).await.expect("write");
        let raced = reader.await.expect("reader");
        assert_eq!(raced, before.to_string(), "the slow read saw its snapshot");
        let now: i64 = d.query_one(slow, &[]).await.expect("direct").get(0);
        assert_eq!(now != before, key_written);
        // Never stale for long (the write's notification kills the raced
        // fill); bounded, where a stored raced result would stay for 10 min.
        until(&c, &raced_sql, &now.to_string()).await;
        let m = p.metrics().await.hits();
        assert_eq!(first(&c, &raced_sql).await, now.to_string());
        if !key_written {
            assert!(
                p.metrics().await.hits() > m,
                "{write}: a result that raced a write to another key was not kept"
            );
        }
    }
}

#[tokio::test]
async fn instances_sharing_redis_agree_on_key_versions() {
    let redis = RedisServer::start();
    let db = fresh_db("pgtier_kl_l2").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int);
         insert into t select g, g from generate_series(1, 100) g",
    )
    .await
    .expect("setup");
    let url = redis.url();
    let a = Pgtier::cached(&db, TTL, &["--key-level", "--redis", &url]).await;
    // B keeps nothing in L1: its every cached read is a Redis lookup.
    let b = Pgtier::cached(
        &db,
        TTL,
        &["--key-level", "--redis", &url, "--l1-max-bytes", "0"],
    )
    .await;
    let ca = a.connect(&db).await;
    let cb = b.connect(&db).await;
    let q5 = "select v from t where id = 5";
    until_keyed(&a, &ca, q5, "update t set v = v where id = 99").await;
    until_keyed_l2(&b, &cb, q5).await;

    // A write to another key: B still finds A's result (the key's version
    // did not move on either instance).
    d.execute("update t set v = 77 where id = 7", &[])
        .await
        .expect("write");
    until(&cb, "select v from t where id = 7", "77").await;
    let before = l2_hits(&b.metrics().await);
    assert_eq!(first(&cb, q5).await, "5");
    assert!(
        l2_hits(&b.metrics().await) > before,
        "a write to id 7 made B miss id 5 in Redis"
    );
    // A write to the key: both see it, never the old value from Redis.
    d.execute("update t set v = 55 where id = 5", &[])
        .await
        .expect("write");
    until(&ca, q5, "55").await;
    until(&cb, q5, "55").await;
    // And the new value is shared again through Redis.
    first(&ca, q5).await;
    let t = Instant::now();
    loop {
        let before = l2_hits(&b.metrics().await);
        assert_eq!(first(&cb, q5).await, "55");
        if l2_hits(&b.metrics().await) > before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "B never found 55 in Redis"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// B reads `q` until it is answered from Redis (A's fill, or its own, under
/// the key's version), bounded.
async fn until_keyed_l2(b: &Pgtier, cb: &Client, q: &str) {
    let t = Instant::now();
    loop {
        let before = l2_hits(&b.metrics().await);
        first(cb, q).await;
        if l2_hits(&b.metrics().await) > before {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{q} never found in Redis by B:\n{}",
            b.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_one_key_are_coalesced() {
    let db = fresh_db("pgtier_kl_coalesce").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table big(k int, v int);
         insert into big select g % 1000, 1 from generate_series(1, 1000000) g;
         analyze big;",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, TTL, &["--key-level"]).await;
    let c = p.connect(&db).await;
    let slow = "select sum(v) from big where k = 3";
    until_keyed(&p, &c, slow, "update big set v = v where k = 999 and v < 0").await;
    // Eight sessions miss one key at once (a text never read before).
    let want: i64 = d.query_one(slow, &[]).await.expect("direct").get(0);
    let fresh = "select sum(v), 'coalesced' from big where k = 3";
    let before = p.metrics().await;
    let mut readers = Vec::new();
    for _ in 0..8 {
        let c = p.connect(&db).await;
        readers.push(tokio::spawn(async move { first(&c, fresh).await }));
    }
    for r in readers {
        assert_eq!(r.await.expect("reader"), want.to_string());
    }
    let after = p.metrics().await;
    let coalesced = after.get("pgtier_cache_coalesced_total", &[])
        - before.get("pgtier_cache_coalesced_total", &[]);
    assert!(
        coalesced >= 1.0,
        "eight concurrent misses of one key were not coalesced"
    );
}
