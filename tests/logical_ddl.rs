//! Issue 15, the logical source against DDL, views and the fill race: with no
//! event triggers, a renamed or altered table is noticed when the stream next
//! describes it (the periodic rescan is set far off here, so only the stream
//! can be what noticed), reads through views are invalidated by writes to
//! their tables, and a fill that raced a write is never served.

mod common;

use std::time::{Duration, Instant};

use common::logical::{cluster, control_url, schema};
use common::sql::{first, until, warm};
use common::{connect_str, Pgtier};

const CONFIG: &str = "[cache]\ndefault_ttl = \"10m\"\n[invalidation]\nrescan_interval = \"10m\"\n";

#[tokio::test]
async fn ddl_views_and_the_fill_race() {
    let cluster = cluster();
    let port = cluster.port;
    let ctl = schema(port).await;
    ctl.batch_execute(
        "create view tv as select id, v from t where v > 0; grant select on tv to app",
    )
    .await
    .unwrap();
    let p = Pgtier::start_with(
        port,
        CONFIG,
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
    let c = p.connect("lg").await;

    // A view: its table's writes reach it.
    let vq = "select sum(v) from tv";
    warm(&p, &c, vq, "3").await;
    direct
        .batch_execute("update t set v = 10 where id = 1")
        .await
        .unwrap();
    until(&c, vq, "12").await;

    // The fill race: a slow read starts before a write and ends after it; its
    // result must never be served afterwards.
    let slow = "select v, (select count(*) from generate_series(1, 3000000)) from t where id = 2";
    let c2 = p.connect("lg").await;
    let reader = tokio::spawn(async move { c2.simple_query(slow).await.map(|r| r.len()) });
    let t = Instant::now();
    loop {
        let n = first(
            &direct,
            "select count(*) from pg_stat_activity where state = 'active' and query like 'select v, (select count(*)%'",
        )
        .await;
        if n != "0" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the slow read never started"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    direct
        .batch_execute("update t set v = 20 where id = 2")
        .await
        .unwrap();
    assert!(reader.await.unwrap().is_ok());
    until(&c, slow, "20").await;
    warm(&p, &c, slow, "20").await;

    // A column added, then a write: the write kills the table's reads, and
    // the stream describes the table again (a catalog re-read), so reads of
    // it are cached in their new shape.
    let all = "select * from t where id = 1";
    warm(&p, &c, all, "1").await;
    direct
        .batch_execute("alter table t add column w int default 5; update t set v = v where id = 2")
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let rows = c.simple_query(all).await.unwrap();
        let cols = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.len()),
            _ => None,
        });
        if cols == Some(3) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still {cols:?} columns after ADD COLUMN"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A rename, then a write under the new name (which kills nothing read
    // under the old one): only the stream's new description of the table
    // can tell pgtier, before the far-off rescan. A read naming the old name
    // must get Postgres's error.
    let q = "select sum(v) from t";
    warm(&p, &c, q, "30").await;
    direct
        .batch_execute("alter table t rename to t_renamed; insert into t_renamed values (9, 1)")
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        match c.simple_query(q).await {
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") => break,
            other => assert!(
                t.elapsed() < Duration::from_secs(5),
                "a renamed table is still read: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(first(&c, "select sum(v) from t_renamed").await, "31");
    drop(ctl);
}
