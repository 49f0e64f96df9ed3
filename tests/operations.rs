//! Operations: metrics with exact deltas, health probes, the admin console, and
//! configuration reload on SIGHUP.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{direct, fresh_db, pgtier_bin, run_bounded, Metrics, Pgtier};
use tokio_postgres::{Client, SimpleQueryMessage};

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn verifier(password: &str) -> String {
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args(["hash-password", "--password", password]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    out.trim().to_string()
}

fn lookups(m: &Metrics, outcome: &str, reason: &str) -> f64 {
    m.get(
        "pgtier_cache_lookups_total",
        &[("tier", "l1"), ("outcome", outcome), ("reason", reason)],
    )
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let db = fresh_db("pgtier_ops_metrics").await;
    let d = direct(&db).await;
    d.batch_execute("create table m(id int primary key, v int); insert into m values (1, 1)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"10m\"\n", &[]).await;
    let c = p.connect(&db).await;
    let m0 = p.metrics().await;

    c.simple_query("select v from m where id = 1")
        .await
        .unwrap(); // miss
    c.simple_query("select v from m where id = 1")
        .await
        .unwrap(); // hit
    c.simple_query("select v from m where id = 1")
        .await
        .unwrap(); // hit
    c.simple_query("select random()").await.unwrap(); // bypass: volatile
    c.batch_execute("begin").await.unwrap(); // bypass: not_select
    c.simple_query("select v from m where id = 1")
        .await
        .unwrap(); // bypass: in_transaction
    c.batch_execute("commit").await.unwrap(); // bypass: not_select
    let m1 = p.metrics().await;
    assert_eq!(lookups(&m1, "miss", "") - lookups(&m0, "miss", ""), 1.0);
    assert_eq!(lookups(&m1, "hit", "") - lookups(&m0, "hit", ""), 2.0);
    assert_eq!(
        lookups(&m1, "bypass", "volatile") - lookups(&m0, "bypass", "volatile"),
        1.0
    );
    assert_eq!(
        lookups(&m1, "bypass", "not_select") - lookups(&m0, "bypass", "not_select"),
        2.0
    );
    assert_eq!(
        lookups(&m1, "bypass", "in_transaction") - lookups(&m0, "bypass", "in_transaction"),
        1.0
    );
    let stored = |m: &Metrics| m.get("pgtier_cache_fills_total", &[("result", "stored")]);
    assert_eq!(stored(&m1) - stored(&m0), 1.0);

    // one direct write: one invalidation of one table
    let inv = |m: &Metrics| m.get("pgtier_invalidations_total", &[("database", db.as_str())]);
    d.execute("update m set v = 2", &[]).await.unwrap();
    let t = Instant::now();
    while inv(&p.metrics().await) - inv(&m1) < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "invalidation never counted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let m2 = p.metrics().await;
    assert_eq!(inv(&m2) - inv(&m1), 1.0);
    assert_eq!(
        m2.get("pgtier_listener_connected", &[("database", db.as_str())]),
        1.0
    );
    assert!(m2.get("pgtier_client_connections", &[]) >= 1.0);
    assert!(
        m2.get(
            "pgtier_bytes_total",
            &[("peer", "client"), ("direction", "in")]
        ) > 0.0
    );

    // latency histograms have real buckets, by source
    let (_, text) = p.http_get("/metrics").await;
    assert!(
        text.contains("pgtier_query_duration_seconds_bucket{source=\"l1\",le=\"0.0001\"}"),
        "{text}"
    );
    assert!(text.contains("pgtier_query_duration_seconds_bucket{source=\"upstream\""));
    assert!(text.contains("# TYPE pgtier_query_duration_seconds histogram"));
    // per-shape figures, labelled by fingerprint, never by query text
    assert!(text.contains("pgtier_statement_calls_total{shape=\""));
    assert!(
        !text.contains("select v from m"),
        "query text leaked into metrics"
    );

    // a database with no listener is forwarded without analysis, counted as such
    let other = p.connect("test").await;
    let m3 = p.metrics().await;
    other
        .batch_execute("set search_path = public")
        .await
        .unwrap();
    let rows = other.simple_query("select 41 + 1").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("42"))
    );
    let m4 = p.metrics().await;
    assert_eq!(
        lookups(&m4, "bypass", "no_listener") - lookups(&m3, "bypass", "no_listener"),
        2.0
    );
    assert_eq!(lookups(&m4, "miss", "") - lookups(&m3, "miss", ""), 0.0);

    let (h, body) = p.http_get("/health").await;
    assert_eq!((h, body.trim()), (200, "ok"));
    let (r, _) = p.http_get("/ready").await;
    assert_eq!(r, 200);
    let (nf, _) = p.http_get("/nope").await;
    assert_eq!(nf, 404);
}

#[tokio::test]
async fn ready_fails_without_upstream() {
    let dead = common::free_port();
    let p = Pgtier::start_with(dead, "", &["--connect-timeout", "1s"]);
    let (status, body) = p.http_get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{dead}")), "{body}");
    assert_eq!(p.http_get("/health").await.0, 200);
}

async fn admin(p: &Pgtier, user: &str, password: &str) -> Result<Client, tokio_postgres::Error> {
    let s = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=pgtier connect_timeout=10",
        p.port
    );
    let (c, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

#[tokio::test]
async fn admin_console_commands_and_access() {
    let db = fresh_db("pgtier_ops_admin").await;
    let d = direct(&db).await;
    d.batch_execute("create table a(id int primary key, v int); insert into a values (1, 10)")
        .await
        .unwrap();
    let toml = format!(
        "[cache]\ndefault_ttl = \"10m\"\n[[admin.users]]\nname = \"ops\"\npassword = \"{}\"\n",
        verifier("console-secret")
    );
    let p = Pgtier::cached(&db, &toml, &[]).await;
    let c = p.connect(&db).await;
    c.simple_query("select v from a where id = 1")
        .await
        .unwrap();
    c.simple_query("select v from a where id = 1")
        .await
        .unwrap();

    let ops = admin(&p, "ops", "console-secret").await.unwrap();
    let caches = rows(&ops.simple_query("SHOW CACHES").await.unwrap());
    let row = caches
        .iter()
        .find(|r| r[1].contains("select v from a"))
        .unwrap_or_else(|| panic!("no cache row: {caches:?}"));
    assert_eq!(
        (row[2].as_str(), row[3].as_str(), row[4].as_str()),
        ("2", "1", "1"),
        "calls, hits, misses"
    );
    assert_eq!(row[6], "1", "one entry held");
    assert_eq!(row[8], "10m");
    assert_eq!(row[10], "key (id)", "a read by key, shown as such");
    let stats = rows(&ops.simple_query("show stats").await.unwrap());
    assert!(stats
        .iter()
        .any(|r| r[0].starts_with("pgtier_cache_lookups_total")));
    let conns = rows(&ops.simple_query("SHOW CONNECTIONS").await.unwrap());
    assert!(
        conns.iter().any(|r| r[2] == "postgres" && r[3] == db),
        "{conns:?}"
    );
    let config = rows(&ops.simple_query("SHOW CONFIG").await.unwrap());
    assert!(config
        .iter()
        .any(|r| r[0] == "cache.default_ttl" && r[1] == "10m"));
    assert!(
        !config.iter().any(|r| r[1].contains("SCRAM-SHA-256")),
        "verifiers are hidden"
    );

    // INVALIDATE TABLE: the next read goes to Postgres
    let done = rows(&ops.simple_query("INVALIDATE TABLE a").await.unwrap());
    assert!(done.is_empty());
    let miss = |m: &Metrics| lookups(m, "miss", "");
    let t = Instant::now();
    loop {
        let before = p.metrics().await;
        c.simple_query("select v from a where id = 1")
            .await
            .unwrap();
        if miss(&p.metrics().await) - miss(&before) == 1.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "INVALIDATE TABLE had no effect"
        );
    }
    ops.simple_query("INVALIDATE ALL").await.unwrap();
    ops.simple_query("RELOAD").await.unwrap();
    let err = ops.simple_query("DROP EVERYTHING").await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42601");
    ops.simple_query("SHOW STATS").await.unwrap();

    // psql, the other real client
    let (st, out, err) = run_bounded(
        Command::new("psql")
            .env("PGPASSWORD", "console-secret")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &p.port.to_string(),
                "-U",
                "ops",
                "-d",
                "pgtier",
            ])
            .args(["-X", "-Atc", "SHOW CONFIG"]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    assert!(out.contains("cache.default_ttl|10m"), "{out}");

    // wrong password, unknown user: refused the way Postgres refuses
    for (user, pw) in [
        ("ops", "nope"),
        ("postgres", "console-secret"),
        ("intruder", "x"),
    ] {
        let e = admin(&p, user, pw).await.expect_err("must be refused");
        let db_err = e.as_db_error().unwrap_or_else(|| panic!("{user}: {e:?}"));
        assert_eq!(db_err.code().code(), "28P01", "{user}");
    }
    // without admin users the console does not exist
    let plain = Pgtier::start(&[]);
    let e = admin(&plain, "ops", "console-secret").await.err().unwrap();
    assert_eq!(e.as_db_error().unwrap().code().code(), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_and_keeps_sessions() {
    let db = fresh_db("pgtier_ops_reload").await;
    let d = direct(&db).await;
    d.batch_execute("create table r(id int primary key, v int); insert into r values (1, 1)")
        .await
        .unwrap();
    let rule = |ttl: &str| {
        format!(
            "[cache]\ndefault_ttl = \"10m\"\n[[cache.rules]]\ntable = \"r\"\nttl = \"{ttl}\"\n\
             [[admin.users]]\nname = \"ops\"\npassword = \"{}\"\n",
            verifier("pw")
        )
    };
    let p = Pgtier::cached(&db, &rule("5m"), &[]).await;
    let config_path = p.dir.path().join("pgtier.toml");
    let session = p.connect(&db).await;
    let ops = admin(&p, "ops", "pw").await.unwrap();
    let ttl_shown = || async {
        let caches = rows(&ops.simple_query("SHOW CACHES").await.unwrap());
        caches
            .iter()
            .find(|r| r[1].contains("from r"))
            .map(|r| r[8].clone())
            .unwrap_or_default()
    };
    let reloads =
        |m: &Metrics, result: &str| m.get("pgtier_config_reloads_total", &[("result", result)]);
    session
        .simple_query("select v from r where id = 1")
        .await
        .unwrap();
    assert_eq!(ttl_shown().await, "5m");

    // a new TTL rule, SIGHUP: applied to new entries; the open session goes on
    std::fs::write(&config_path, rule("2s")).unwrap();
    let m0 = p.metrics().await;
    p.signal(libc::SIGHUP);
    let t = Instant::now();
    while reloads(&p.metrics().await, "ok") - reloads(&m0, "ok") < 1.0 {
        assert!(t.elapsed() < Duration::from_secs(5), "SIGHUP not acted on");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rows1 = rows(
        &session
            .simple_query("select v from r where id = 1")
            .await
            .unwrap(),
    );
    assert_eq!(
        rows1,
        vec![vec!["1".to_string()]],
        "the session opened before the reload works"
    );
    assert_eq!(ttl_shown().await, "2s");

    // an invalid file is refused and the running configuration stays
    std::fs::write(&config_path, "[cache]\ndefault_ttl = \"forever\"\n").unwrap();
    let m1 = p.metrics().await;
    p.signal(libc::SIGHUP);
    let t = Instant::now();
    while reloads(&p.metrics().await, "error") - reloads(&m1, "error") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "invalid reload not reported"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(p.logs().contains("configuration reload failed"), "logged");
    let config = rows(&ops.simple_query("SHOW CONFIG").await.unwrap());
    assert!(
        config
            .iter()
            .any(|r| r[0] == "cache.default_ttl" && r[1] == "10m"),
        "{config:?}"
    );
    let err = ops.simple_query("RELOAD").await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("forever"));
    session
        .simple_query("select v from r where id = 1")
        .await
        .unwrap();
    assert_eq!(ttl_shown().await, "2s");
}

/// Every metric family the shipped Grafana dashboard queries is exported by an
/// instance that has served nothing, reloaded nothing and failed at nothing yet,
/// so no panel or alert shows "No data" on a healthy instance.
#[tokio::test]
async fn every_dashboard_metric_exists_on_a_fresh_instance() {
    let db = fresh_db("pgtier_ops_fresh_metrics").await;
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/grafana/dashboards/pgtier.json"
    ))
    .expect("read the dashboard");
    let re = regex::Regex::new(r"pgtier_[a-z0-9_]+").unwrap();
    let mut families: Vec<String> = re
        .find_iter(&dashboard)
        .map(|m| {
            let name = m.as_str();
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name)
                .to_string()
        })
        .collect();
    families.sort();
    families.dedup();
    assert!(
        families.len() > 10,
        "the dashboard queries pgtier metrics: {families:?}"
    );
    let redis = common::redis::RedisServer::start();
    let p = Pgtier::cached(&db, "", &["--redis", &redis.url()]).await;
    let m = p.metrics().await;
    let present: std::collections::HashSet<&str> =
        m.0.samples.iter().map(|s| s.metric.as_str()).collect();
    let missing: Vec<&String> = families
        .iter()
        .filter(|f| {
            !present.contains(f.as_str())
                && !present.contains(format!("{f}_bucket").as_str())
                && !present.contains(format!("{f}_count").as_str())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "absent from a fresh /metrics: {missing:?}"
    );
}
