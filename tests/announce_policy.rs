//! The announce policy (issue 14): a table's writes stay announced while the
//! hits on its cached reads pay for them (`invalidation.min_hits_per_write`),
//! and are switched off when they do not — whether the table is read per table
//! or by key.

mod common;

use std::time::{Duration, Instant};

use common::sql::{announced, first, warm};
use common::{direct, fresh_db, Pgtier};
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// Writes through pgtier (so the next read waits for the write's
/// notification), each followed by `reads` reads of `q`, for at least
/// `at_least` and at least 40 writes (two judgements' worth). Returns how
/// many times the table's announcing was switched off meanwhile (a switch-off
/// may last only until the next read watches it again, after a hold-off of
/// 1 s), and the share of reads that hit.
async fn write_and_read(
    p: &Pgtier,
    c: &Client,
    update: &str,
    q: &str,
    reads: usize,
    at_least: Duration,
) -> (f64, f64) {
    let before = p.metrics().await;
    let t = Instant::now();
    let mut n = 0;
    while n < 40 || t.elapsed() < at_least {
        n += 1;
        c.execute(update, &[]).await.expect("write");
        for _ in 0..reads {
            first(c, q).await;
        }
    }
    let after = p.metrics().await;
    let off = after.get("pgtier_unwatches_total", &[]) - before.get("pgtier_unwatches_total", &[]);
    let hits = after.hits() - before.hits();
    (off, hits / (n * reads) as f64)
}

#[tokio::test]
async fn a_table_read_more_than_written_stays_announced() {
    let db = fresh_db("pgtier_policy_table").await;
    let d = direct(&db).await;
    d.batch_execute("create table t(id int primary key, v int); insert into t values (1, 0)")
        .await
        .expect("setup");
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let q = "select v from t where id = 1";
    warm(&p, &c, q, "0").await;
    // Each write kills the entry; the nine reads after its refill hit: nine
    // hits per write, against a bar of five.
    let upd = "update t set v = v + 1 where id = 1";
    let (off, hit_ratio) = write_and_read(&p, &c, upd, q, 10, Duration::from_millis(700)).await;
    assert_eq!(off, 0.0, "switched off while its hits paid for its writes");
    assert_eq!(announced(&d, "t").await, 2);
    assert!(hit_ratio >= 0.85, "reads hit {hit_ratio}");

    // The same load against a bar of twenty hits per write: switched off.
    drop(c);
    drop(p);
    let p = Pgtier::cached(
        &db,
        &format!("{TTL}[invalidation]\nmin_hits_per_write = 20\n"),
        &[],
    )
    .await;
    let c = p.connect(&db).await;
    let v = first(&c, q).await;
    warm(&p, &c, q, &v).await;
    let (off, _) = write_and_read(&p, &c, upd, q, 10, Duration::from_millis(700)).await;
    assert!(
        off >= 1.0,
        "announced on although nine hits per write are under the bar\n{}\n{:?}",
        p.logs(),
        lookups(&p).await
    );
    // Never stale meanwhile, and cached again once a read wants it (after the
    // hold-off).
    let direct_v: i32 = d.query_one("select v from t", &[]).await.expect("v").get(0);
    assert_eq!(first(&c, q).await, direct_v.to_string());
    let t = Instant::now();
    while announced(&d, "t").await != 2 {
        first(&c, q).await;
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never watched again after the hold-off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_table_read_by_key_stays_announced_while_written_and_not_once_reads_stop() {
    let db = fresh_db("pgtier_policy_keys").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int);
         insert into t select g, 0 from generate_series(1, 100) g",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, TTL, &["--key-level"]).await;
    let c = p.connect(&db).await;
    let q = "select v from t where id = 1";
    // Until the key column set is live, reads are table-level: wait (bounded)
    // until a write to another key leaves the read cached.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        first(&c, q).await;
        c.execute("update t set v = v + 1 where id = 50", &[])
            .await
            .expect("write");
        let before = p.metrics().await.hits();
        first(&c, q).await;
        if p.metrics().await.hits() > before {
            break;
        }
        assert!(Instant::now() < deadline, "never keyed:\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Writes to another key kill nothing the reads need: ten hits per write.
    let upd = "update t set v = v + 1 where id = 50";
    let (off, hit_ratio) = write_and_read(&p, &c, upd, q, 10, Duration::from_millis(700)).await;
    assert_eq!(
        off,
        0.0,
        "a table read by key was switched off\n{}",
        p.logs()
    );
    assert_eq!(announced(&d, "t").await, 2);
    assert!(
        hit_ratio >= 0.9,
        "reads by key of an unwritten key hit {hit_ratio}: {:?}",
        lookups(&p).await
    );

    // Writes alone earn nothing: switched off.
    let t = Instant::now();
    while announced(&d, "t").await != 1 {
        d.execute("update t set v = v + 1 where id = 50", &[])
            .await
            .expect("write");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a table written with no reads stays announced"
        );
    }
    // And its reads are never stale meanwhile.
    let v: i32 = d
        .query_one("select v from t where id = 50", &[])
        .await
        .expect("v")
        .get(0);
    assert_eq!(
        first(&c, "select v from t where id = 50").await,
        v.to_string()
    );
}

async fn lookups(p: &Pgtier) -> Vec<String> {
    p.metrics()
        .await
        .0
        .samples
        .iter()
        .filter(|s| s.metric == "pgtier_cache_lookups_total")
        .map(|s| format!("{:?} {:?}", s.labels, s.value))
        .collect()
}

/// Writers busy on a table from before pgtier starts, readers by key, and the
/// policy switching the table off and on: the listener must keep making
/// progress. A key column set's registration waits for the table's writers
/// while holding its switch lock, and a switch-off needs that lock; once, the
/// registration was polled only by the listener loop that was awaiting the
/// switch-off, and the listener stopped for good (no table was ever cached
/// again). After the writers stop, reads by key must come to hit.
#[tokio::test]
async fn reads_by_key_get_cached_after_writers_that_ran_from_the_start() {
    let db = fresh_db("pgtier_policy_busy").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int);
         insert into t select g, 0 from generate_series(1, 1000) g",
    )
    .await
    .expect("setup");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3u32 {
        let (db, stop) = (db.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let c = direct(&db).await;
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i = i.wrapping_mul(2_654_435_761).wrapping_add(7);
                let id = (i % 1000 + 1) as i32;
                c.execute("update t set v = v + 1 where id = $1", &[&id])
                    .await
                    .expect("write");
            }
        }));
    }
    let p = Pgtier::cached(&db, TTL, &["--key-level"]).await;
    let c = p.connect(&db).await;
    // Reads by key while the writers run: column sets get registered, and the
    // table is switched off and on.
    let busy = Instant::now();
    let mut id = 1i32;
    while busy.elapsed() < Duration::from_secs(3) {
        id = id % 20 + 1;
        c.query_one("select v from t where id = $1", &[&id])
            .await
            .expect("read");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    // Hold-offs double from 1 s, up to 30 s at most.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let before = p.metrics().await.hits();
        for _ in 0..3 {
            c.query_one("select v from t where id = $1", &[&1i32])
                .await
                .expect("read");
        }
        if p.metrics().await.hits() > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads never cached again once the writers stopped:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v: i32 = d
        .query_one("select v from t where id = 1", &[])
        .await
        .expect("v")
        .get(0);
    let got: i32 = c
        .query_one("select v from t where id = $1", &[&1i32])
        .await
        .expect("read")
        .get(0);
    assert_eq!(got, v, "a cached read by key is current");
}
