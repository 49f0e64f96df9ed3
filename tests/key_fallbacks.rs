//! `pgtier_key_fallbacks_total` counts each fallback once: a read left
//! table-level by its values once per read, even when it was planned twice
//! (for its L2 lookup, then for its fill); a shape left table-level by its
//! columns once per statement and catalog, not again each time another
//! column set going live makes pgtier resolve the statement again.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{direct, fresh_db, Pgtier};
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";
const BY_ID: &str = "select v from kv where id = $1";
const BY_CODE: &str = "select v from ck where code = $1";

async fn fallbacks(p: &Pgtier, reason: &str) -> f64 {
    p.metrics()
        .await
        .get("pgtier_key_fallbacks_total", &[("reason", reason)])
}

async fn read_id(c: &Client, id: Option<i32>) -> Option<String> {
    c.query_opt(BY_ID, &[&id])
        .await
        .expect("read")
        .map(|r| r.get(0))
}

/// Wait (bounded) until reads of `kv` by id are key-level: a read stays
/// cached across a write to another key.
async fn until_keyed(p: &Pgtier, c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        read_id(c, Some(1)).await;
        c.execute("update kv set v = v where id = 10", &[])
            .await
            .expect("write");
        let before = p.metrics().await.hits();
        read_id(c, Some(1)).await;
        if p.metrics().await.hits() > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reads by key never survived a write to another key:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn setup(name: &str, args: &[&str]) -> (Pgtier, Client) {
    let db = fresh_db(name).await;
    direct(&db)
        .await
        .batch_execute(
            "create table kv(id int primary key, v text not null);
             insert into kv select g, 'v' || g from generate_series(1, 10) g;
             create table ck(code char(3) primary key, v text not null);
             insert into ck values ('abc', 'one');",
        )
        .await
        .expect("setup");
    let mut all = vec!["--key-level"];
    all.extend_from_slice(args);
    let p = Pgtier::cached(&db, TTL, &all).await;
    let c = p.connect(&db).await;
    (p, c)
}

#[tokio::test]
async fn a_read_left_table_level_by_its_values_is_counted_once() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (p, c) = setup("pgtier_kfb_values", &["--redis", &url]).await;
    until_keyed(&p, &c).await;
    let before = fallbacks(&p, "null").await;
    // A miss with L2 in use: planned for the L2 lookup, then for its fill.
    assert_eq!(read_id(&c, None).await, None);
    let after = fallbacks(&p, "null").await;
    assert_eq!(after - before, 1.0, "one read left table-level by a NULL");
}

#[tokio::test]
async fn a_shape_left_table_level_by_its_columns_is_counted_once() {
    let (p, c) = setup("pgtier_kfb_columns", &[]).await;
    let before = fallbacks(&p, "column_type").await;
    for _ in 0..3 {
        let row = c.query_one(BY_CODE, &[&"abc"]).await.expect("read");
        assert_eq!(row.get::<_, String>(0), "one");
    }
    let once = fallbacks(&p, "column_type").await - before;
    assert_eq!(once, 1.0, "char(3) key: counted once for the statement");
    // Another column set going live makes pgtier resolve statements again;
    // the catalog is the same, so the fallback is not counted again.
    until_keyed(&p, &c).await;
    // A write makes the next read a miss, planned (and resolved) again.
    c.execute("update ck set v = v", &[]).await.expect("write");
    let row = c.query_one(BY_CODE, &[&"abc"]).await.expect("read");
    assert_eq!(row.get::<_, String>(0), "one");
    let total = fallbacks(&p, "column_type").await - before;
    assert_eq!(total, 1.0, "counted again after a column set went live");
}
