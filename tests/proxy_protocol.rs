//! Transparent proxying with a real driver (tokio-postgres): every result through
//! pgtier must equal what Postgres returns directly.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use common::sql::{texts, Raw};
use common::{direct, Pgtier, PG_PORT};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use rust_decimal::Decimal;
use tokio_postgres::{AsyncMessage, NoTls};

#[tokio::test]
async fn simple_query_and_multi_statement() {
    let p = Pgtier::start(&[]);
    let c = p.connect("test").await;
    let d = direct("test").await;
    let sql = "select 1 as a, 'x'::text as b; select generate_series(1,3) as n; select null::int";
    let via = c.simple_query(sql).await.unwrap();
    let dir = d.simple_query(sql).await.unwrap();
    assert_eq!(texts(&via), texts(&dir));
    assert_eq!(texts(&via).len(), 5);
    // an empty query and a statement without rows
    c.simple_query("").await.unwrap();
    c.simple_query("set application_name = 'pgtier-test'")
        .await
        .unwrap();
    let r = c.simple_query("show application_name").await.unwrap();
    assert_eq!(texts(&r), vec![vec![Some("pgtier-test".to_string())]]);
}

#[tokio::test]
async fn prepared_statements_with_typed_parameters() {
    let p = Pgtier::start(&[]);
    let c = p.connect("test").await;
    let ts: DateTime<Utc> = Utc.with_ymd_and_hms(2024, 2, 29, 12, 34, 56).unwrap();
    let num = Decimal::new(1234567, 3);
    let blob: Vec<u8> = (0u8..=255).collect();
    let arr = vec![1i32, -2, 3];
    let stmt = c
        .prepare(
            "select $1::int4, $2::text, $3::numeric, $4::timestamptz, $5::bytea, $6::int4[], \
             $7::int8, $8::float8, $9::bool, $10::text",
        )
        .await
        .unwrap();
    let none: Option<&str> = None;
    for _ in 0..3 {
        let row = c
            .query_one(
                &stmt,
                &[
                    &42i32,
                    &"héllo",
                    &num,
                    &ts,
                    &blob,
                    &arr,
                    &(-7i64),
                    &2.5f64,
                    &true,
                    &none,
                ],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
        assert_eq!(row.get::<_, String>(1), "héllo");
        assert_eq!(row.get::<_, Decimal>(2), num);
        assert_eq!(row.get::<_, DateTime<Utc>>(3), ts);
        assert_eq!(row.get::<_, Vec<u8>>(4), blob);
        assert_eq!(row.get::<_, Vec<i32>>(5), arr);
        assert_eq!(row.get::<_, i64>(6), -7);
        assert_eq!(row.get::<_, f64>(7), 2.5);
        assert!(row.get::<_, bool>(8));
        assert_eq!(row.get::<_, Option<String>>(9), None);
    }
    // unnamed statements (query with a &str) and many rows in binary format
    let rows = c
        .query(
            "select g, g::text, g * 1.5 from generate_series(1, 5000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 5000);
    assert_eq!(rows[4999].get::<_, i32>(0), 5000);
    assert_eq!(rows[4999].get::<_, String>(1), "5000");
}

#[tokio::test]
async fn text_and_binary_results_match_direct() {
    let p = Pgtier::start(&[]);
    let c = p.connect("test").await;
    let d = direct("test").await;
    let sql = "select 1::int2, 2::int4, 3::int8, 1.5::float4, 'abc'::varchar, '2020-01-01'::date, \
               '{\"a\":1}'::json, '\\xdeadbeef'::bytea, array['a','b'], null::text, \
               interval '1 day 2 hours', 12.50::numeric(10,2), 'f'::bool, uuid_nil()";
    let sql = sql.replace("uuid_nil()", "'00000000-0000-0000-0000-000000000000'::uuid");
    // text results through the simple protocol
    assert_eq!(
        texts(&c.simple_query(&sql).await.unwrap()),
        texts(&d.simple_query(&sql).await.unwrap())
    );
    // binary results through the extended protocol: compare the raw column bytes
    let via = c.query_one(sql.as_str(), &[]).await.unwrap();
    let dir = d.query_one(sql.as_str(), &[]).await.unwrap();
    assert_eq!(via.len(), dir.len());
    assert_eq!(
        format!("{:?}", via.columns()),
        format!("{:?}", dir.columns())
    );
    for i in 0..via.len() {
        let a: Option<Raw> = via.get(i);
        let b: Option<Raw> = dir.get(i);
        assert_eq!(a, b, "column {i}");
    }
}

#[tokio::test]
async fn transactions_commit_rollback_and_errors() {
    let p = Pgtier::start(&[]);
    let mut c = p.connect("test").await;
    c.batch_execute("drop table if exists pt_tx; create table pt_tx(id int primary key, v text)")
        .await
        .unwrap();

    let tx = c.transaction().await.unwrap();
    tx.execute("insert into pt_tx values (1, 'one')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let tx = c.transaction().await.unwrap();
    tx.execute("insert into pt_tx values (2, 'two')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // an error inside a transaction aborts it; later statements fail until rollback
    let tx = c.transaction().await.unwrap();
    let err = tx
        .execute("insert into pt_tx values (1, 'dup')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505");
    let err = tx.execute("select 1", &[]).await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "25P02");
    tx.rollback().await.unwrap();

    let rows = c
        .query("select id, v from pt_tx order by id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(1), "one");

    // an error outside a transaction leaves the session usable
    assert!(c.simple_query("select 1/0").await.is_err());
    assert_eq!(
        c.query_one("select 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
    c.batch_execute("drop table pt_tx").await.unwrap();
}

#[tokio::test]
async fn pipelined_queries_with_an_error_in_the_middle() {
    let p = Pgtier::start(&[]);
    let c = p.connect("test").await;
    let s1 = c.prepare("select $1::int + 1").await.unwrap();
    let s2 = c.prepare("select 1 / $1::int").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection
    let (a, b, e, d) = tokio::join!(
        c.query_one(&s1, &[&1i32]),
        c.query_one(&s1, &[&2i32]),
        c.query_one(&s2, &[&0i32]),
        c.query_one(&s1, &[&3i32]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 2);
    assert_eq!(b.unwrap().get::<_, i32>(0), 3);
    assert_eq!(e.unwrap_err().code().unwrap().code(), "22012");
    assert_eq!(d.unwrap().get::<_, i32>(0), 4);
    let many: Vec<_> = (0..200)
        .map(|i| {
            let c = &c;
            let s1 = &s1;
            async move { c.query_one(s1, &[&i]).await.unwrap().get::<_, i32>(0) }
        })
        .collect();
    let got = futures_util::future::join_all(many).await;
    assert_eq!(got, (1..=200).collect::<Vec<i32>>());
}

#[tokio::test]
async fn copy_in_and_out() {
    let p = Pgtier::start(&[]);
    let c = p.connect("test").await;
    c.batch_execute("drop table if exists pt_copy; create table pt_copy(id int, t text)")
        .await
        .unwrap();
    let sink = c.copy_in("copy pt_copy from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..20000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    // one big chunk, bigger than the proxy's streaming threshold
    sink.send(Bytes::from(data.clone())).await.unwrap();
    for i in 20000..20010 {
        sink.send(Bytes::from(format!("{i}\tsmall\n")))
            .await
            .unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 20010);

    let out = c
        .copy_out("copy (select * from pt_copy where id < 20000 order by id) to stdout")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = out.try_collect().await.unwrap();
    let all: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(all).unwrap(), data);

    // a failing COPY leaves the session usable
    let sink = c.copy_in("copy pt_copy from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    assert!(sink.finish().await.is_err());
    assert_eq!(
        c.query_one("select count(*) from pt_copy", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        20010
    );
    c.batch_execute("drop table pt_copy").await.unwrap();
}

#[tokio::test]
async fn listen_notify_through_pgtier() {
    let p = Pgtier::start(&[]);
    let (client, mut conn) = tokio_postgres::connect(&p.conn_str("test"), NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    client
        .batch_execute("listen pgtier_test_chan")
        .await
        .unwrap();
    // notify from a different, direct connection
    let d = direct("test").await;
    d.batch_execute("notify pgtier_test_chan, 'hello'")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification did not arrive through pgtier")
        .unwrap();
    assert_eq!(got, ("pgtier_test_chan".to_string(), "hello".to_string()));
}

#[tokio::test]
async fn cancel_request_stops_a_running_query() {
    let p = Pgtier::start(&[]);
    let c = p.connect("test").await;
    let token = c.cancel_token();
    let d = direct("test").await;
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { c.simple_query("select pg_sleep(10)").await });
    // wait until the query is running on the server, bounded
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = d
            .query_one(
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(10)' and state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel_query(NoTls).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("cancel did not return promptly")
        .unwrap();
    let err = res.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "57014", "{err}");
    assert!(started.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn upstream_unreachable_is_reported_not_hung() {
    let dead = common::free_port();
    let p = Pgtier::start_with(dead, "", &["--connect-timeout", "2s"]);
    let started = Instant::now();
    let err = tokio_postgres::connect(&p.conn_str("test"), NoTls)
        .await
        .err()
        .expect("connection must fail");
    let db = err
        .as_db_error()
        .expect("a server error, not a hang or reset");
    assert_eq!(db.code().code(), "08001");
    let msg = db.message();
    assert!(
        msg.contains(&format!("127.0.0.1:{dead}")),
        "error should name the upstream: {msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn unix_socket_upstream() {
    let p = Pgtier::start_upstream(&format!("/var/run/postgresql:{PG_PORT}"), "", &[]);
    let c = p.connect("test").await;
    let v: String = c
        .query_one("select coalesce(inet_client_addr()::text, 'unix')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "unix");
}
