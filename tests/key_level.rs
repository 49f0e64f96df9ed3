//! Key-level invalidation (issue 14) end to end, on the real server: reads by
//! key stay cached while other rows of their table are written; a write to a
//! key (insert, delete, update, and an update that moves the key) reaches the
//! reads of that key; writes too large to report keys, TRUNCATE, and reads
//! that scan the table stay table-level.

mod common;

use std::time::{Duration, Instant};

use common::{direct, fresh_db, Pgtier};
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";
const READ: &str = "select v from kv where id = $1";

async fn read(c: &Client, id: i32) -> Option<String> {
    c.query_opt(READ, &[&id])
        .await
        .expect("read")
        .map(|r| r.get(0))
}

/// Whether reading `id` now is answered from the cache (and what it says).
async fn read_hit(p: &Pgtier, c: &Client, id: i32) -> (bool, Option<String>) {
    let before = p.metrics().await.hits();
    let v = read(c, id).await;
    (p.metrics().await.hits() > before, v)
}

/// Poll (bounded) until reading `id` gives `want`: a write made directly to
/// Postgres reaches pgtier through its notification, with no fence to wait on.
async fn eventually(c: &Client, id: i32, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = read(c, id).await;
        if got.as_deref() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "id {id}: still {got:?}, want {want:?} (a stale cached read)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup(name: &str) -> (String, Pgtier, Client, Client) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table kv(id int primary key, v text not null);
         insert into kv select g, 'v' || g from generate_series(1, 10) g;",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, TTL, &["--key-level"]).await;
    let c = p.connect(&db).await;
    // The first reads watch the table and register its key column with the
    // triggers; until then reads are cached per table. Wait (bounded) until a
    // write to another key leaves a cached read in place.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        read(&c, 1).await;
        c.execute("update kv set v = v where id = 10", &[])
            .await
            .expect("write");
        if read_hit(&p, &c, 1).await.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads by key never survived a write to another key:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (db, p, c, d)
}

#[tokio::test]
async fn writes_to_other_keys_leave_reads_cached_and_their_own_key_refreshes() {
    let (_db, p, c, d) = setup("pgtier_kl_other").await;
    read(&c, 2).await;
    assert!(read_hit(&p, &c, 2).await.0, "cached");
    // Through pgtier (fenced) and directly.
    c.execute("update kv set v = 'two' where id = 2", &[])
        .await
        .expect("write");
    d.execute("update kv set v = 'nine' where id = 9", &[])
        .await
        .expect("write");
    assert_eq!(read_hit(&p, &c, 2).await, (false, Some("two".into())));
    eventually(&c, 9, Some("nine")).await;
    assert!(read_hit(&p, &c, 1).await.0, "id 1 was written by nobody");
    let m = p.metrics().await;
    assert!(m.get("pgtier_invalidations_total", &[("level", "key")]) > 0.0);
}

#[tokio::test]
async fn inserts_deletes_and_moved_keys_reach_their_readers() {
    let (_db, p, c, d) = setup("pgtier_kl_moves").await;
    // Cache a present key, an absent one, and one about to be deleted.
    for id in [3, 50, 60, 4] {
        read(&c, id).await;
        assert!(read_hit(&p, &c, id).await.0, "id {id} cached");
    }
    d.execute("update kv set id = 50 where id = 3", &[])
        .await
        .expect("move");
    eventually(&c, 50, Some("v3")).await;
    eventually(&c, 3, None).await;
    d.execute("insert into kv values (60, 'sixty')", &[])
        .await
        .expect("insert");
    eventually(&c, 60, Some("sixty")).await;
    d.execute("delete from kv where id = 4", &[])
        .await
        .expect("delete");
    eventually(&c, 4, None).await;
}

#[tokio::test]
async fn large_writes_truncate_and_scans_stay_table_level() {
    let (_db, p, c, d) = setup("pgtier_kl_large").await;
    let scan = "select string_agg(v, ',' order by id) from kv";
    let scanned: String = c.query_one(scan, &[]).await.expect("scan").get(0);
    // A read that scans the table dies with any write, keys or not.
    d.execute("update kv set v = 'x7' where id = 7", &[])
        .await
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now: String = c.query_one(scan, &[]).await.expect("scan").get(0);
        if now != scanned {
            assert!(now.contains("x7"));
            break;
        }
        assert!(Instant::now() < deadline, "the scan stayed stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More rows than a write reports keys for: announced per table.
    read(&c, 1).await;
    assert!(read_hit(&p, &c, 1).await.0);
    d.batch_execute(
        "insert into kv select g, 'w' || g from generate_series(1000, 2600) g;
         update kv set v = v || '!';",
    )
    .await
    .expect("bulk");
    eventually(&c, 1, Some("v1!")).await;
    d.execute("truncate kv", &[]).await.expect("truncate");
    eventually(&c, 1, None).await;
}

#[tokio::test]
async fn simple_queries_by_literal_are_keyed_too() {
    let (_db, p, c, d) = setup("pgtier_kl_simple").await;
    let q = "select v from kv where id = '007'";
    let text = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect()
    };
    assert_eq!(text(c.simple_query(q).await.expect("q")), vec!["v7"]);
    let before = p.metrics().await.hits();
    c.simple_query(q).await.expect("q");
    assert!(p.metrics().await.hits() > before, "cached");
    c.execute("update kv set v = 'eight' where id = 8", &[])
        .await
        .expect("write");
    let before = p.metrics().await.hits();
    assert_eq!(text(c.simple_query(q).await.expect("q")), vec!["v7"]);
    assert!(
        p.metrics().await.hits() > before,
        "a write to id 8 left id 7 cached"
    );
    d.execute("update kv set v = 'seven' where id = 7", &[])
        .await
        .expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    while text(c.simple_query(q).await.expect("q")) != vec!["seven"] {
        assert!(Instant::now() < deadline, "the literal key stayed stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
