//! Trust boundaries (issue 12, cases 8, 21, 22): what another role connected
//! straight to Postgres can NOTIFY, what whoever can write Redis can store, and
//! two-phase commit, must never make pgtier answer anything Postgres would not.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::sql::first;
use common::{direct, fresh_db, Metrics, Pgtier};

fn l2(m: &Metrics, outcome: &str) -> f64 {
    m.get(
        "pgtier_cache_lookups_total",
        &[("tier", "l2"), ("outcome", outcome)],
    )
}

fn l2_errors(m: &Metrics, kind: &str) -> f64 {
    m.get("pgtier_l2_errors_total", &[("kind", kind)])
}

/// Wait (bounded) until `p` has stored `n` values in Redis.
async fn stored(p: &Pgtier, n: f64) {
    let t = Instant::now();
    while p
        .metrics()
        .await
        .get("pgtier_l2_writes_total", &[("result", "stored")])
        < n
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "nothing stored in L2"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A pgtier caching `db` that keeps nothing in L1: every cached read goes to
/// the Redis at `url`.
async fn l2_only(db: &str, url: &str, args: &[&str]) -> Pgtier {
    let mut all = vec!["--redis", url, "--l1-max-bytes", "0"];
    all.extend_from_slice(args);
    // A generous L2 timeout: a lookup that times out under load is counted as
    // unavailable, never checked, and the tests count checks.
    Pgtier::cached(
        db,
        "[cache]\ndefault_ttl = \"10m\"\n[l2]\ntimeout = \"2s\"\n",
        &all,
    )
    .await
}

fn redis_conn(r: &RedisServer) -> redis::Connection {
    redis::Client::open(r.url())
        .and_then(|c| c.get_connection())
        .expect("redis connection")
}

fn keys(c: &mut redis::Connection) -> Vec<String> {
    let mut k: Vec<String> = redis::cmd("KEYS").arg("*").query(c).expect("KEYS");
    k.sort();
    k
}

fn backend_msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A value in the format of the unsigned (format 2) L2, with a valid
/// checksum: the RowDescription of `genuine` and one row saying `text`.
fn forged_v2(genuine: &[u8], text: &str) -> Vec<u8> {
    let rd_len = u32::from_le_bytes(genuine[4..8].try_into().unwrap()) as usize;
    let rd = &genuine[8..8 + rd_len];
    let mut row = 1i16.to_be_bytes().to_vec();
    row.extend_from_slice(&(text.len() as i32).to_be_bytes());
    row.extend_from_slice(text.as_bytes());
    let mut rows = backend_msg(b'D', &row);
    rows.extend(backend_msg(b'C', b"SELECT 1\0"));
    let mut v = b"PGT2".to_vec();
    v.extend_from_slice(&(rd.len() as u32).to_le_bytes());
    v.extend_from_slice(rd);
    v.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    v.extend_from_slice(&rows);
    let sum = xxhash_rust::xxh3::xxh3_64(&v);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

#[tokio::test]
async fn case_21_values_written_into_redis_are_never_replayed() {
    let redis = RedisServer::start();
    let db = fresh_db("ht_l2_forge").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v text); insert into t values (1, 'one'), (2, 'two')",
    )
    .await
    .unwrap();
    let url = redis.url();
    let p = l2_only(&db, &url, &[]).await;
    let c = p.connect(&db).await;
    let q1 = "select v from t where id = 1";
    let q2 = "select v from t where id = 2";
    assert_eq!(first(&c, q1).await, "one");
    stored(&p, 1.0).await;
    assert_eq!(first(&c, q2).await, "two");
    stored(&p, 2.0).await;
    // L2 is in use: a read is an L2 hit.
    let before = p.metrics().await;
    assert_eq!(first(&c, q1).await, "one");
    assert_eq!(l2(&p.metrics().await, "hit") - l2(&before, "hit"), 1.0);

    let mut r = redis_conn(&redis);
    let ks = keys(&mut r);
    assert_eq!(ks.len(), 2, "{ks:?}");
    let values: Vec<Vec<u8>> = ks
        .iter()
        .map(|k| redis::cmd("GET").arg(k).query(&mut r).unwrap())
        .collect();

    // 1. Values swapped between keys: each is genuine, but for the other query.
    for (k, v) in ks.iter().zip(values.iter().rev()) {
        let _: () = redis::cmd("SET").arg(k).arg(v).query(&mut r).unwrap();
    }
    let before = p.metrics().await;
    assert_eq!(first(&c, q1).await, "one", "a value moved to another key");
    assert_eq!(first(&c, q2).await, "two", "a value moved to another key");
    let after = p.metrics().await;
    assert_eq!(l2(&after, "hit") - l2(&before, "hit"), 0.0);
    assert!(l2_errors(&after, "bad_signature") - l2_errors(&before, "bad_signature") >= 2.0);

    // 2. Values written by someone without the key (a well-formed reply with a
    //    valid checksum in the old unsigned format, and random bytes).
    let ks = keys(&mut r);
    for k in &ks {
        let genuine: Vec<u8> = redis::cmd("GET").arg(k).query(&mut r).unwrap();
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(forged_v2(&genuine, "pwned"))
            .query(&mut r)
            .unwrap();
    }
    let before = p.metrics().await;
    assert_eq!(first(&c, q1).await, "one", "a forged value was replayed");
    assert_eq!(first(&c, q2).await, "two", "a forged value was replayed");
    let after = p.metrics().await;
    assert!(l2_errors(&after, "corrupt") - l2_errors(&before, "corrupt") >= 2.0);
    let ks = keys(&mut r);
    for k in &ks {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(
                b"PGT3\xff\xff\xff\xff\x00\x00\x00\x00random bytes, then a made-up tag...."
                    .to_vec(),
            )
            .query(&mut r)
            .unwrap();
    }
    assert_eq!(first(&c, q1).await, "one");

    // 3. A pgtier with another key shares the Redis: it trusts none of it
    //    (including the value `p` stores after `q` started).
    let other = "00".repeat(32);
    let q = l2_only(&db, &url, &["--l2-signing-key", &other]).await;
    let cq = q.connect(&db).await;
    let n = p
        .metrics()
        .await
        .get("pgtier_l2_writes_total", &[("result", "stored")]);
    assert_eq!(first(&c, q2).await, "two");
    stored(&p, n + 1.0).await;
    let before = q.metrics().await;
    assert_eq!(first(&cq, q2).await, "two");
    assert_eq!(first(&cq, q1).await, "one");
    let after = q.metrics().await;
    assert_eq!(l2(&after, "hit") - l2(&before, "hit"), 0.0);
}

const CHANNEL: &str = "pgtier_invalidate";

/// A plain role with no privileges beyond connecting: what any application
/// user of the database is.
async fn plain_role(db: &str) -> tokio_postgres::Client {
    let d = direct(db).await;
    d.batch_execute(
        "DO $$ BEGIN CREATE ROLE ht_plain LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
    )
    .await
    .unwrap();
    common::connect_str(&format!(
        "host={} port={} user=ht_plain dbname={db}",
        common::PG_HOST,
        common::PG_PORT
    ))
    .await
}

async fn listen(
    db: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    common::listen(db, CHANNEL).await
}

/// The next payload on the channel that starts with `prefix` (bounded wait).
async fn next_payload(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    prefix: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(p)) if p.starts_with(prefix) => return p,
            Ok(Some(_)) => {}
            _ => panic!("no '{prefix}' notification within 10 s"),
        }
    }
}

fn notifications(m: &Metrics, db: &str) -> f64 {
    m.get(
        "pgtier_invalidation_notifications_total",
        &[("database", db)],
    )
}

/// Send `payloads` as `who`, and wait (bounded) until `p`'s listener has
/// taken them all in.
async fn notify_as(who: &tokio_postgres::Client, p: &Pgtier, db: &str, payloads: &[String]) {
    let before = notifications(&p.metrics().await, db);
    for payload in payloads {
        who.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, payload])
            .await
            .unwrap();
    }
    let t = Instant::now();
    while notifications(&p.metrics().await, db) < before + payloads.len() as f64 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pgtier never saw the notifications"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn case_08_forged_or_replayed_epochs_never_bring_back_overwritten_values() {
    let redis = RedisServer::start();
    let db = fresh_db("ht_epoch").await;
    let d = direct(&db).await;
    d.batch_execute("create table t(id int primary key, v int); insert into t values (1, 1)")
        .await
        .unwrap();
    let attacker = plain_role(&db).await;
    let (_l, mut seen) = listen(&db).await;
    let url = redis.url();
    let p = l2_only(&db, &url, &[]).await;
    // The genuine epoch notification pgtier sent when its listener connected:
    // anyone listening sees it.
    let genuine = next_payload(&mut seen, "e").await;
    let c = p.connect(&db).await;
    let q = "select v from t where id = 1";
    assert_eq!(first(&c, q).await, "1");
    stored(&p, 1.0).await;
    // The value is served from L2.
    l2_warm(&p, &c, q, "1").await;

    // Overwritten: the old value stays in Redis under the old versions' key.
    d.execute("update t set v = 2 where id = 1", &[])
        .await
        .unwrap();
    common::sql::until(&c, q, "2").await;
    stored(&p, 2.0).await;

    // The attacker replays the genuine epoch, and forges others from it.
    let e: String = genuine[1..]
        .split(':')
        .nth(if genuine.contains(':') { 1 } else { 0 })
        .unwrap()
        .to_string();
    let forged = [
        genuine.clone(),
        format!("e{e}"),
        format!("e{}:{e}:{}", u64::MAX - 1, "00".repeat(32)),
    ];
    for f in &forged {
        notify_as(&attacker, &p, &db, std::slice::from_ref(f)).await;
        assert_eq!(
            first(&c, q).await,
            "2",
            "after a forged epoch '{f}', an overwritten value came back"
        );
    }
    let m = p.metrics().await;
    assert_eq!(
        m.get(
            "pgtier_control_notifications_rejected_total",
            &[("database", &db), ("kind", "epoch")]
        ),
        3.0
    );
    // L2 still works for this instance.
    l2_warm(&p, &c, q, "2").await;
}

/// Read until a read is an L2 hit (bounded): a fill is stored in the
/// background, and a listener reconnect on a loaded machine starts afresh.
async fn l2_warm(p: &Pgtier, c: &tokio_postgres::Client, q: &str, want: &str) {
    let t = Instant::now();
    loop {
        let before = p.metrics().await;
        assert_eq!(first(c, q).await, want);
        if l2(&p.metrics().await, "hit") - l2(&before, "hit") == 1.0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{q} never an L2 hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGCONT on drop: a Postgres backend stopped by a test always resumes.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// Fences are only ever completed by the instance's own notification: a forged
/// one, committed before a write but read by a lagging listener after the
/// write registered its fence, must not release the client before the write's
/// own invalidation has been applied.
#[tokio::test]
async fn case_08_forged_fences_do_not_release_a_write_early() {
    let db = fresh_db("ht_fence").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int); insert into t values (1, 1);
         create table scratch(x int)",
    )
    .await
    .unwrap();
    let attacker = plain_role(&db).await;
    let (_l, mut seen) = listen(&db).await;
    let p = Pgtier::cached(
        &db,
        "[cache]\ndefault_ttl = \"10m\"\n[invalidation]\nfence_timeout = \"60s\"\ncheck_interval = \"1h\"\n",
        &[],
    )
    .await;
    let c = std::sync::Arc::new(p.connect(&db).await);
    let q = "select v from t where id = 1";
    assert_eq!(first(&c, q).await, "1");
    let before = p.metrics().await;
    assert_eq!(first(&c, q).await, "1");
    assert_eq!(p.metrics().await.hits() - before.hits(), 1.0, "cached");

    // A role change through pgtier is fenced by a notification of its own
    // (after a `*`), which shows the instance id and fence number. (Writes
    // are fenced by a probe of the listening connection: nothing to forge.)
    c.batch_execute("alter role ht_plain connection limit -1")
        .await
        .unwrap();
    let fence = next_payload(&mut seen, "f").await;
    // Cached again after the `*`.
    let t = Instant::now();
    loop {
        let before = p.metrics().await.hits();
        assert_eq!(first(&c, q).await, "1");
        if p.metrics().await.hits() > before {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never cached again");
    }
    let mut parts = fence[1..].split(':');
    let instance: u64 = parts.next().unwrap().parse().unwrap();
    let seq: u64 = parts.next().unwrap().parse().unwrap();

    // pgtier's control backends (the listening one among them), held still to
    // make the listener lag.
    let pids: Vec<i32> = d
        .query(
            "select pid from pg_stat_activity where datname = $1
             and application_name = 'pgtier-control' order by backend_start",
            &[&db],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let stopped: Vec<Stopped> = pids.iter().map(|p| Stopped::new(*p)).collect();
    for p in &pids {
        let t = Instant::now();
        loop {
            let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
            if st
                .lines()
                .any(|l| l.starts_with("State:") && l.contains("stopped"))
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "backend {p} did not stop"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The forged fence for the next write, then work queued behind it ahead
    // of that write's own invalidation: write notifications naming 250 tables
    // that do not exist (each distinct, or Postgres would fold them into one).
    let n = 500;
    attacker
        .batch_execute(&format!(
            "BEGIN; SELECT pg_notify('{CHANNEL}', 'f{instance}:{}');
             SELECT pg_notify('{CHANNEL}', 'w[' || (
                 SELECT string_agg(format('[\"public\",\"ht_junk_%s\"]%s', i,
                                          CASE WHEN (g >> i) & 1 = 1 THEN ' ' ELSE '' END), ',')
                 FROM generate_series(0, 249) i) || ']')
             FROM generate_series(1, {n}) g;
             COMMIT",
            seq + 1
        ))
        .await
        .unwrap();
    let writer = c.clone();
    let write = tokio::spawn(async move {
        writer
            .batch_execute("update t set v = 2 where id = 1")
            .await
    });
    // The forged fence is out, and the write has committed (its fence holds
    // the reply): the listener, held still, has seen neither yet.
    next_payload(&mut seen, &format!("f{instance}:{}", seq + 1)).await;
    let t = Instant::now();
    while first(&d, q).await != "2" {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the write never committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!write.is_finished(), "the write waits for its invalidation");
    drop(stopped);
    tokio::time::timeout(Duration::from_secs(60), write)
        .await
        .expect("the write returns")
        .unwrap()
        .unwrap();
    assert_eq!(
        first(&c, q).await,
        "2",
        "read-your-writes: a forged fence released the write before its invalidation"
    );
}

/// Two-phase commit: a prepared transaction that wrote a table pgtier caches
/// fails at PREPARE (Postgres refuses it after the trigger's NOTIFY) with a
/// hint saying what to do; tables outside the trigger scope take prepared
/// transactions through pgtier; and whatever happens, no read is stale.
#[tokio::test]
async fn case_22_prepared_transactions_fail_clearly_and_never_leave_stale_reads() {
    let mut cluster = common::cluster::Cluster::start(
        "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        "ALTER SYSTEM SET max_prepared_transactions = 10",
    );
    cluster.stop(false);
    cluster.pg_ctl_start();
    let port = cluster.port;
    let url = |db: &str| format!("host=127.0.0.1 port={port} user=postgres dbname={db}");
    let admin = common::connect_str(&url("postgres")).await;
    admin.batch_execute("CREATE DATABASE ht_2pc").await.unwrap();
    let db = "ht_2pc";
    let d = common::connect_str(&url(db)).await;
    d.batch_execute(
        "create table w(id int primary key, v int); insert into w values (1, 1);
         create table y(id int primary key, v int); insert into y values (1, 1);
         create table x(id int primary key, v int); insert into x values (1, 1)",
    )
    .await
    .unwrap();
    let control = format!("postgres://postgres@127.0.0.1:{port}/{db}");
    let p = Pgtier::start_with(
        port,
        "[cache]\ndefault_ttl = \"10m\"\n[invalidation]\ntables = [\"public.w\", \"public.y\"]\n",
        &[
            "--control-url",
            &control,
            "--auto-install-triggers",
            "--watch",
            "lazy",
        ],
    );
    p.wait_listener(db).await;
    let c = p.connect(db).await;
    let qw = "select v from w where id = 1";
    common::sql::warm(&p, &c, qw, "1").await;

    // A table pgtier caches: PREPARE fails, clearly, and the write is gone.
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("UPDATE w SET v = 2 WHERE id = 1")
        .await
        .unwrap();
    let e = c
        .batch_execute("PREPARE TRANSACTION 'ht_w'")
        .await
        .expect_err("Postgres refuses PREPARE after a NOTIFY");
    let e = e.as_db_error().expect("an error from Postgres");
    assert_eq!(e.code().code(), "0A000", "{e:?}");
    assert!(
        e.hint()
            .is_some_and(|h| h.contains("pgtier") && h.contains("invalidation.tables")),
        "the error should say what to do: {e:?}"
    );
    let _ = c.batch_execute("ROLLBACK").await;
    assert_eq!(first(&c, qw).await, "1");
    assert_eq!(first(&d, qw).await, "1");

    // A table outside the trigger scope: two-phase commit works through pgtier.
    let qx = "select v from x where id = 1";
    c.batch_execute("BEGIN; UPDATE x SET v = 2 WHERE id = 1; PREPARE TRANSACTION 'ht_x'")
        .await
        .unwrap();
    c.batch_execute("COMMIT PREPARED 'ht_x'").await.unwrap();
    assert_eq!(first(&c, qx).await, "2");

    // A table in scope but not yet watched: prepared before anyone caches it.
    // Reads meanwhile must not cache the pre-commit value past COMMIT PREPARED.
    let qy = "select v from y where id = 1";
    d.batch_execute("BEGIN; UPDATE y SET v = 2 WHERE id = 1")
        .await
        .unwrap();
    d.batch_execute("PREPARE TRANSACTION 'ht_y'").await.unwrap();
    for _ in 0..5 {
        assert_eq!(first(&c, qy).await, "1");
    }
    d.batch_execute("COMMIT PREPARED 'ht_y'").await.unwrap();
    assert_eq!(first(&c, qy).await, "2", "stale after COMMIT PREPARED");
    common::sql::warm(&p, &c, qy, "2").await;
    d.execute("UPDATE y SET v = 3 WHERE id = 1", &[])
        .await
        .unwrap();
    common::sql::until(&c, qy, "3").await;
    drop((c, d, admin));
    drop(p);
}

/// Postgres sees pgtier's address, so its `hostssl` rules cannot demand TLS of
/// pgtier's clients: `server.require_tls` does, for sessions and the admin
/// console alike.
#[tokio::test]
async fn case_23_require_tls_refuses_plaintext_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = common::self_signed_pem(dir.path(), "localhost");
    let toml = format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nrequire_tls = true\n",
        cert.display(),
        key.display()
    );
    let p = Pgtier::start_with(common::PG_PORT, &toml, &[]);
    let psql = |sslmode: &str| {
        common::run_bounded(
            std::process::Command::new("psql")
                .arg(format!(
                    "host=127.0.0.1 port={} user=postgres dbname=test sslmode={sslmode}",
                    p.port
                ))
                .args(["-X", "-Atc", "select 'ok'"]),
            Duration::from_secs(30),
        )
    };
    let (st, out, err) = psql("require");
    assert!(st.success() && out.contains("ok"), "{err}");
    let (st, _, err) = psql("disable");
    assert!(!st.success(), "a plaintext client got in");
    assert!(err.contains("requires TLS"), "{err}");
}
