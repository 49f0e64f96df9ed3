//! The L1 cache seen through real clients: what hits, what never does, and that a
//! hit returns exactly what Postgres would have.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::sql::{raw_rows, texts};
use common::{direct, fresh_db, run_bounded, Pgtier};

async fn setup_types_table(db: &str) {
    let d = direct(db).await;
    d.batch_execute(
        "create table kinds (
            id int primary key, i2 int2, i8 int8, f4 float4, f8 float8, n numeric(12,3),
            t text, vc varchar(20), b bool, d date, ts timestamp, tz timestamptz,
            iv interval, j jsonb, by bytea, arr int[], tarr text[], u uuid, inet_ inet,
            big numeric);
         insert into kinds
         select g, g::int2, g * 1000000000::int8, g / 3.0, g / 7.0, g * 1.125, 'text ' || g,
                'v' || g, g % 2 = 0, date '2024-01-01' + g, timestamp '2024-01-01 10:00' + g * interval '1 hour',
                timestamptz '2024-06-01 12:00+02' + g * interval '1 day', g * interval '1 minute',
                jsonb_build_object('k', g, 'a', jsonb_build_array(g, 'x')), decode(md5(g::text), 'hex'),
                array[g, g + 1, null], array['a' || g, null], md5(g::text)::uuid, ('10.0.0.' || g)::inet,
                (10::numeric ^ 30) + g
         from generate_series(1, 50) g;
         insert into kinds (id) values (0);",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn repeated_reads_hit_and_match_direct_byte_for_byte() {
    let db = fresh_db("pgtier_cache_types").await;
    setup_types_table(&db).await;
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"5m\"\n", &[]).await;
    let c = p.connect(&db).await;
    let d = direct(&db).await;
    let queries = [
        "select * from kinds order by id",
        "select id, j->>'k' as k, arr[1], tz at time zone 'UTC' from kinds where id between 3 and 9 order by id",
        "select count(*), sum(n), avg(f8), string_agg(t, ',' order by id) from kinds",
        "select * from kinds where id = 0",
    ];
    for sql in queries {
        let want_text = texts(&d.simple_query(sql).await.unwrap());
        let want_raw = raw_rows(&d.query(sql, &[]).await.unwrap());
        for round in 0..3 {
            let before = p.metrics().await;
            assert_eq!(
                texts(&c.simple_query(sql).await.unwrap()),
                want_text,
                "{sql} (simple, round {round})"
            );
            assert_eq!(
                raw_rows(&c.query(sql, &[]).await.unwrap()),
                want_raw,
                "{sql} (binary, round {round})"
            );
            let after = p.metrics().await;
            if round > 0 {
                assert_eq!(
                    after.hits() - before.hits(),
                    2.0,
                    "{sql}: both reads should hit in round {round}"
                );
            }
        }
    }
    // parameters of several types, binary and text formats
    let stmt = c
        .prepare("select id, t, n, tz from kinds where id = $1 or t = $2 or by = $3 order by id")
        .await
        .unwrap();
    let dstmt = d
        .prepare("select id, t, n, tz from kinds where id = $1 or t = $2 or by = $3 order by id")
        .await
        .unwrap();
    let blob: Vec<u8> = vec![0xde, 0xad];
    for (i, t) in [(1i32, "text 2"), (5, "none"), (7, "text 7")] {
        let want = raw_rows(&d.query(&dstmt, &[&i, &t, &blob]).await.unwrap());
        for _ in 0..2 {
            assert_eq!(
                raw_rows(&c.query(&stmt, &[&i, &t, &blob]).await.unwrap()),
                want
            );
        }
    }
}

#[tokio::test]
async fn every_client_and_mode_gets_hits() {
    let db = fresh_db("pgtier_cache_clients").await;
    let d = direct(&db).await;
    d.batch_execute("create table acc(aid int primary key, abalance int); insert into acc select g, g * 10 from generate_series(1, 100) g")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"5m\"\n", &[]).await;

    // psql: separate sessions share entries
    let psql = |sql: &str| {
        let (st, out, err) = run_bounded(
            Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &p.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    &db,
                ])
                .args(["-X", "-Atc", sql]),
            Duration::from_secs(30),
        );
        assert!(st.success(), "{err}");
        out
    };
    let m0 = p.metrics().await;
    assert_eq!(psql("select abalance from acc where aid = 7").trim(), "70");
    assert_eq!(psql("select abalance from acc where aid = 7").trim(), "70");
    let m1 = p.metrics().await;
    assert_eq!(m1.hits() - m0.hits(), 1.0);
    assert_eq!(m1.misses() - m0.misses(), 1.0);

    // pgbench in all three modes over a small hot set
    let script = p.dir.path().join("hot.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 20)\nselect abalance from acc where aid = :aid;\n",
    )
    .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let before = p.metrics().await;
        let (st, out, err) = run_bounded(
            Command::new("pgbench")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &p.port.to_string(),
                    "-U",
                    "postgres",
                    "-n",
                ])
                .args(["-M", mode, "-c", "2", "-j", "2", "-t", "200", "-f"])
                .arg(&script)
                .arg(&db),
            Duration::from_secs(60),
        );
        assert!(st.success(), "{out}{err}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        let after = p.metrics().await;
        let hits = after.hits() - before.hits();
        assert!(
            hits >= 300.0,
            "mode {mode}: only {hits} hits of 400 reads over 20 keys"
        );
    }

    // tokio-postgres: prepared and unprepared
    let c = p.connect(&db).await;
    let before = p.metrics().await;
    let stmt = c
        .prepare("select abalance from acc where aid = $1")
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            c.query_one(&stmt, &[&3i32]).await.unwrap().get::<_, i32>(0),
            30
        );
        assert_eq!(
            c.query_one("select abalance from acc where aid = $1", &[&4i32])
                .await
                .unwrap()
                .get::<_, i32>(0),
            40
        );
    }
    let after = p.metrics().await;
    assert!(after.hits() - before.hits() >= 4.0);
}

#[tokio::test]
async fn keys_separate_users_search_paths_and_time_zones() {
    let db = fresh_db("pgtier_cache_keys").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create schema s1; create schema s2;
         create table s1.t(v text); insert into s1.t values ('one');
         create table s2.t(v text); insert into s2.t values ('two');
         create table shared(ts timestamptz); insert into shared values ('2024-01-01 12:00+00');
         do $$ begin
           -- Tests of one binary run at once: create roles one at a time.
           perform pg_advisory_xact_lock(7201);
           if not exists (select from pg_roles where rolname = 'pgtier_other') then
             create role pgtier_other login; end if; end $$;
         grant usage on schema s1, s2 to pgtier_other; grant select on all tables in schema s1, s2, public to pgtier_other;",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"5m\"\n", &[]).await;
    let a = p.connect(&db).await;
    let b = p.connect(&db).await;
    a.batch_execute("set search_path = s1").await.unwrap();
    b.batch_execute("set search_path = s2").await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            texts(&a.simple_query("select v from t").await.unwrap()),
            vec![vec![Some("one".into())]]
        );
        assert_eq!(
            texts(&b.simple_query("select v from t").await.unwrap()),
            vec![vec![Some("two".into())]]
        );
    }
    a.batch_execute("set timezone = 'UTC'").await.unwrap();
    b.batch_execute("set timezone = 'Asia/Tokyo'")
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            texts(
                &a.simple_query("select ts::text from public.shared")
                    .await
                    .unwrap()
            ),
            vec![vec![Some("2024-01-01 12:00:00+00".into())]]
        );
        assert_eq!(
            texts(
                &b.simple_query("select ts::text from public.shared")
                    .await
                    .unwrap()
            ),
            vec![vec![Some("2024-01-01 21:00:00+09".into())]]
        );
    }
    // back to the default: RESET makes the session share entries again
    b.batch_execute("reset search_path").await.unwrap();

    // a different user does not get postgres's entry
    let other = common::connect_str(&format!(
        "host=127.0.0.1 port={} user=pgtier_other dbname={db}",
        p.port
    ))
    .await;
    let probe = "select v from s1.t";
    a.simple_query(probe).await.unwrap();
    a.simple_query(probe).await.unwrap();
    let before = p.metrics().await;
    assert_eq!(
        texts(&other.simple_query(probe).await.unwrap()),
        vec![vec![Some("one".into())]]
    );
    let after = p.metrics().await;
    assert_eq!(
        after.hits() - before.hits(),
        0.0,
        "another user must not share the entry"
    );
    assert_eq!(after.misses() - before.misses(), 1.0);
}

#[tokio::test]
async fn transactions_and_volatile_reads_always_reach_postgres() {
    let db = fresh_db("pgtier_cache_tx").await;
    let d = direct(&db).await;
    d.batch_execute("create table c(v int); insert into c values (1)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"5m\"\n", &[]).await;
    let mut s = p.connect(&db).await;

    let now1: String = s.query_one("select now()::text", &[]).await.unwrap().get(0);
    let now2: String = s.query_one("select now()::text", &[]).await.unwrap().get(0);
    assert_ne!(now1, now2, "now() must never be cached");
    let r1 = texts(&s.simple_query("select random()").await.unwrap());
    let r2 = texts(&s.simple_query("select random()").await.unwrap());
    assert_ne!(r1, r2);

    // warm the entry outside a transaction
    for _ in 0..2 {
        assert_eq!(
            s.query_one("select v from c", &[])
                .await
                .unwrap()
                .get::<_, i32>(0),
            1
        );
    }
    let before = p.metrics().await;
    let tx = s.transaction().await.unwrap();
    tx.execute("update c set v = 2", &[]).await.unwrap();
    // inside the transaction the read must see the transaction's own write
    assert_eq!(
        tx.query_one("select v from c", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    assert_eq!(
        texts(&tx.simple_query("select v from c").await.unwrap()),
        vec![vec![Some("2".into())]]
    );
    tx.rollback().await.unwrap();
    let after = p.metrics().await;
    assert_eq!(after.hits() - before.hits(), 0.0);
    assert!(after.bypasses("in_transaction") - before.bypasses("in_transaction") >= 2.0);
    let volatile = p.metrics().await.bypasses("volatile");
    assert!(
        volatile >= 4.0,
        "volatile bypasses: {volatile}\n{}",
        p.logs()
    );
}

#[tokio::test]
async fn ttl_expiry_causes_a_refill() {
    let db = fresh_db("pgtier_cache_ttl").await;
    let p = Pgtier::cached(&db, "", &["--default-ttl", "1s"]).await;
    let c = p.connect(&db).await;
    let read = || async {
        c.query_one("select 40 + 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    let stored = || async {
        p.metrics()
            .await
            .get("pgtier_cache_fills_total", &[("result", "stored")])
    };
    assert_eq!(read().await, 42);
    let filled = Instant::now();
    assert_eq!(stored().await, 1.0);
    assert_eq!(read().await, 42);
    assert_eq!(p.metrics().await.hits(), 1.0, "fresh entry is served");
    // poll (bounded) until the entry expires and a read refills it
    loop {
        assert_eq!(read().await, 42);
        if stored().await == 2.0 {
            break;
        }
        assert!(
            filled.elapsed() < Duration::from_secs(5),
            "entry never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        filled.elapsed() >= Duration::from_millis(950),
        "expired before its TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bound_holds_under_100k_distinct_queries() {
    let db = fresh_db("pgtier_cache_memory").await;
    let p = Pgtier::cached(&db, "", &["--default-ttl", "5m", "--l1-max-bytes", "4MiB"]).await;
    // 8 sessions, each issuing its queries one at a time (pipelined requests are
    // not cached), 100k distinct queries in all
    let mut tasks = Vec::new();
    for part in 0..8 {
        let c = p.connect(&db).await;
        tasks.push(tokio::spawn(async move {
            let stmt = c
                .prepare("select $1::int as v, repeat('x', 100) as pad")
                .await
                .unwrap();
            for i in 0..12_500 {
                let v = part * 12_500 + i;
                let row = c.query_one(&stmt, &[&v]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), v);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = p.metrics().await;
    let bytes = m.get("pgtier_l1_bytes", &[]);
    let entries = m.get("pgtier_l1_entries", &[]);
    assert!(
        bytes <= 4.0 * 1024.0 * 1024.0,
        "L1 holds {bytes} bytes, over its 4MiB bound"
    );
    assert!(entries > 1000.0 && entries < 100_000.0, "{entries} entries");
    assert!(m.get("pgtier_cache_fills_total", &[("result", "stored")]) >= 100_000.0);
    // the process itself stays small: no unbounded growth behind the metric
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", p.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert!(rss_kb < 200 * 1024, "pgtier RSS is {rss_kb} kB");
}

#[tokio::test]
async fn large_results_are_streamed_not_cached() {
    let db = fresh_db("pgtier_cache_large").await;
    let p = Pgtier::cached(
        &db,
        "[cache]\ndefault_ttl = \"5m\"\nmax_entry_bytes = \"64kB\"\n",
        &[],
    )
    .await;
    let c = p.connect(&db).await;
    let sql = "select g, repeat('y', 50) from generate_series(1, 20000) g";
    for _ in 0..2 {
        let rows = c.simple_query(sql).await.unwrap();
        assert_eq!(texts(&rows).len(), 20000);
    }
    let m = p.metrics().await;
    assert_eq!(
        m.hits(),
        0.0,
        "a result over max_entry_bytes must not be cached"
    );
    assert!(m.bypasses("too_large") >= 2.0);
    // small results are still cached
    c.simple_query("select 1").await.unwrap();
    c.simple_query("select 1").await.unwrap();
    assert_eq!(p.metrics().await.hits(), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_are_coalesced() {
    let db = fresh_db("pgtier_cache_coalesce").await;
    let p = Pgtier::cached(
        &db,
        "[cache]\ndefault_ttl = \"5m\"\ncoalesce_wait = \"10s\"\n",
        &[],
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(p.connect(&db).await);
    }
    let sql = "select count(*) from generate_series(1, 4000000)";
    let futs = clients
        .iter()
        .map(|c| async move { texts(&c.simple_query(sql).await.unwrap()) });
    let results = futures_util::future::join_all(futs).await;
    assert!(results
        .iter()
        .all(|r| r == &vec![vec![Some("4000000".to_string())]]));
    let m = p.metrics().await;
    assert_eq!(
        m.get("pgtier_cache_fills_total", &[("result", "stored")]),
        1.0,
        "one query went to Postgres"
    );
    assert!(m.get("pgtier_cache_coalesced_total", &[]) >= 1.0);
    assert_eq!(m.hits() + m.misses(), 6.0);
}

#[tokio::test]
async fn statements_answered_by_pgtier_are_replayed_when_needed() {
    let db = fresh_db("pgtier_cache_stmts").await;
    let d = direct(&db).await;
    d.batch_execute("create table s(id int, v text); insert into s select g, 'v' || g from generate_series(1, 10) g")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"5m\"\n", &[]).await;
    let sql = "select v from s where id = $1";
    let a = p.connect(&db).await;
    let st = a.prepare(sql).await.unwrap();
    assert_eq!(
        a.query_one(&st, &[&1i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "v1"
    );

    // b's Parse/Describe and its first execution are answered by pgtier alone
    let b = p.connect(&db).await;
    let before = p.metrics().await;
    let st_b = b.prepare(sql).await.unwrap();
    assert_eq!(
        b.query_one(&st_b, &[&1i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "v1"
    );
    assert_eq!(p.metrics().await.hits() - before.hits(), 1.0);
    // a miss on that statement needs it on the server: pgtier replays the Parse
    assert_eq!(
        b.query_one(&st_b, &[&2i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "v2"
    );
    assert_eq!(
        b.query_one(&st_b, &[&3i32])
            .await
            .unwrap()
            .get::<_, String>(0),
        "v3"
    );
    // a volatile statement in the same session, and closing statements
    drop(st_b);
    let n: i64 = b
        .query_one(
            "select count(*) from s where id > $1 and random() >= 0",
            &[&0i32],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10);
}

#[tokio::test]
async fn session_setting_changes_take_effect() {
    let db = fresh_db("pgtier_cache_settings").await;
    let d = direct(&db).await;
    d.batch_execute("create schema app; create table app.k(v int); insert into app.k values (7); create table public.k(v int); insert into public.k values (1)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"5m\"\n", &[]).await;
    let c = p.connect(&db).await;
    let read = || async { texts(&c.simple_query("select v from k").await.unwrap()) };
    assert_eq!(read().await, vec![vec![Some("1".into())]]);
    assert_eq!(read().await, vec![vec![Some("1".into())]]);
    c.batch_execute("set search_path to app").await.unwrap();
    assert_eq!(read().await, vec![vec![Some("7".into())]]);
    c.batch_execute("reset search_path").await.unwrap();
    assert_eq!(read().await, vec![vec![Some("1".into())]]);
    // a failed SET changes nothing, and the session keeps caching correctly
    assert!(c
        .batch_execute("set search_path to app; select 1/0")
        .await
        .is_err());
    assert_eq!(
        read().await,
        vec![vec![Some("1".into())]],
        "SET in a failed request"
    );
    // SET ROLE makes the session uncacheable
    c.batch_execute("set role postgres").await.unwrap();
    let before = p.metrics().await;
    read().await;
    assert_eq!(p.metrics().await.hits() - before.hits(), 0.0);
}

#[tokio::test]
async fn stale_while_revalidate_serves_then_refreshes() {
    let db = fresh_db("pgtier_cache_swr").await;
    let toml = "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\nquery = \"^select 40 \\\\+ 2\"\nttl = \"1s\"\nswr = \"30s\"\n";
    let p = Pgtier::cached(&db, toml, &[]).await;
    let c = p.connect(&db).await;
    let q = "select 40 + 2";
    let stale = |m: &common::Metrics| {
        m.get(
            "pgtier_cache_lookups_total",
            &[("tier", "l1"), ("outcome", "stale")],
        )
    };
    let stored = |m: &common::Metrics| m.get("pgtier_cache_fills_total", &[("result", "stored")]);
    assert_eq!(
        texts(&c.simple_query(q).await.unwrap()),
        vec![vec![Some("42".into())]]
    );
    assert_eq!(
        texts(&c.simple_query(q).await.unwrap()),
        vec![vec![Some("42".into())]]
    );
    assert_eq!(p.metrics().await.hits(), 1.0);
    // past the TTL, within the stale window: answered from the cache at once,
    // and refreshed behind the answer
    let t = Instant::now();
    loop {
        assert_eq!(
            texts(&c.simple_query(q).await.unwrap()),
            vec![vec![Some("42".into())]]
        );
        if stale(&p.metrics().await) == 1.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never served stale");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t.elapsed() >= Duration::from_millis(500));
    let t = Instant::now();
    while stored(&p.metrics().await) < 2.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no refresh after a stale hit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = p.metrics().await;
    assert_eq!(
        texts(&c.simple_query(q).await.unwrap()),
        vec![vec![Some("42".into())]]
    );
    let after = p.metrics().await;
    assert_eq!(
        after.hits() - before.hits(),
        1.0,
        "the refreshed entry is fresh"
    );
    assert_eq!(
        after.misses(),
        1.0,
        "the refresh was not a client-visible miss"
    );
}
