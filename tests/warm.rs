//! Warming hot keys (issue 14) end to end, on the real server: an entry hit
//! often in its life that a write invalidates is refilled by pgtier without
//! any client request (the next read is a hit, and it reads the new value),
//! table-level and key-level, simple and extended protocol; not with the
//! switch off, not for an entry that was not hot, never with a value that
//! raced a later write, never on a session that is in a transaction, busy, or
//! of another role.

mod common;

use std::time::{Duration, Instant};

use common::{connect_str, direct, fresh_db, Pgtier, PG_HOST};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Hits that make an entry hot in these tests.
const AFTER: usize = 3;
const TOML: &str = "[cache]\ndefault_ttl = \"10m\"\nwarm_hot_keys = true\nwarm_after_hits = 3\n";
const READ: &str = "select v from kv where id = $1";

async fn read(c: &Client, id: i32) -> Option<String> {
    c.query_opt(READ, &[&id])
        .await
        .expect("read")
        .map(|r| r.get(0))
}

async fn read_simple(c: &Client, id: i32) -> Option<String> {
    let msgs = c
        .simple_query(&format!("select v from kv where id = {id}"))
        .await
        .expect("simple read");
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// Read `id` (extended or simple protocol); whether it was a hit, and its value.
async fn read_hit(p: &Pgtier, c: &Client, id: i32, simple: bool) -> (bool, Option<String>) {
    let before = p.metrics().await.hits();
    let v = if simple {
        read_simple(c, id).await
    } else {
        read(c, id).await
    };
    (p.metrics().await.hits() > before, v)
}

/// Read `id` until it has been a hit `AFTER` times (bounded): its entry is hot.
async fn make_hot(p: &Pgtier, c: &Client, id: i32, simple: bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut hits = 0;
    while hits < AFTER {
        if read_hit(p, c, id, simple).await.0 {
            hits += 1;
        }
        assert!(
            Instant::now() < deadline,
            "id {id} never became hot:\n{}",
            p.logs()
        );
    }
}

async fn warm(p: &Pgtier, result: &str) -> f64 {
    p.metrics()
        .await
        .get("pgtier_warm_refreshes_total", &[("result", result)])
}

/// Wait (bounded) until `pgtier_warm_refreshes_total{result}` reaches `n`.
async fn wait_warm(p: &Pgtier, result: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = warm(p, result).await;
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "warm refreshes {result}: {got}, want {n}:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn invalidations(p: &Pgtier) -> f64 {
    p.metrics().await.get("pgtier_invalidations_total", &[])
}

/// Wait (bounded) until the invalidations applied reach `n`.
async fn wait_invalidations(p: &Pgtier, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while invalidations(p).await < n {
        assert!(Instant::now() < deadline, "invalidations never applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn setup(name: &str, toml: &str, args: &[&str]) -> (Pgtier, Client, Client, String) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table kv(id int primary key, v text not null);
         insert into kv select g, 'v' || g from generate_series(1, 10) g;",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, toml, args).await;
    let c = p.connect(&db).await;
    (p, c, d, db)
}

/// A hot entry invalidated by a write is refilled with no request; the next
/// read is a hit and reads the new value.
async fn refilled_after_a_write(name: &str, args: &[&str], simple: bool) {
    let (p, c, d, _db) = setup(name, TOML, args).await;
    make_hot(&p, &c, 1, simple).await;
    d.execute("update kv set v = 'new' where id = 1", &[])
        .await
        .expect("write");
    wait_warm(&p, "filled", 1.0).await;
    assert_eq!(
        read_hit(&p, &c, 1, simple).await,
        (true, Some("new".into())),
        "the warmed entry is the new value, served from the cache"
    );
    assert_eq!(warm(&p, "failed").await, 0.0);
}

#[tokio::test]
async fn a_hot_entry_is_refilled_after_a_table_write() {
    refilled_after_a_write("pgtier_warm_table", &[], false).await;
}

#[tokio::test]
async fn a_hot_simple_query_is_refilled_after_a_table_write() {
    refilled_after_a_write("pgtier_warm_simple", &[], true).await;
}

#[tokio::test]
async fn a_hot_key_is_refilled_after_a_write_to_it() {
    let (p, c, d, _db) = setup("pgtier_warm_key", TOML, &["--key-level"]).await;
    // Until the key column is registered reads are table-level: wait
    // (bounded) until a write to another key leaves a cached read in place.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        read(&c, 1).await;
        let n = invalidations(&p).await;
        d.execute("update kv set v = v where id = 10", &[])
            .await
            .expect("write");
        wait_invalidations(&p, n + 1.0).await;
        if read_hit(&p, &c, 1, false).await.0 {
            break;
        }
        assert!(Instant::now() < deadline, "never key-level:\n{}", p.logs());
    }
    make_hot(&p, &c, 1, false).await;
    let key_level = p
        .metrics()
        .await
        .get("pgtier_invalidations_total", &[("level", "key")]);
    let filled = warm(&p, "filled").await;
    d.execute("update kv set v = 'new' where id = 1", &[])
        .await
        .expect("write");
    wait_warm(&p, "filled", filled + 1.0).await;
    assert!(
        p.metrics()
            .await
            .get("pgtier_invalidations_total", &[("level", "key")])
            > key_level,
        "the write was a key invalidation"
    );
    assert_eq!(read_hit(&p, &c, 1, false).await, (true, Some("new".into())));
}

#[tokio::test]
async fn with_the_switch_off_nothing_is_warmed() {
    let toml = "[cache]\ndefault_ttl = \"10m\"\nwarm_hot_keys = false\nwarm_after_hits = 3\n";
    let (p, c, d, _db) = setup("pgtier_warm_off", toml, &[]).await;
    make_hot(&p, &c, 1, false).await;
    let n = invalidations(&p).await;
    d.execute("update kv set v = 'new' where id = 1", &[])
        .await
        .expect("write");
    wait_invalidations(&p, n + 1.0).await;
    assert_eq!(
        read_hit(&p, &c, 1, false).await,
        (false, Some("new".into()))
    );
    let m = p.metrics().await;
    assert_eq!(m.get("pgtier_warm_refreshes_total", &[]), 0.0);
}

#[tokio::test]
async fn an_entry_that_was_not_hot_is_not_refreshed() {
    let (p, c, d, _db) = setup("pgtier_warm_cold", TOML, &[]).await;
    make_hot(&p, &c, 2, false).await;
    // id 1: cached and hit once, short of hot.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !read_hit(&p, &c, 1, false).await.0 {
        assert!(Instant::now() < deadline, "id 1 never cached");
    }
    // A write to the table kills both; with one idle session, a second
    // candidate would be dropped.
    d.execute("update kv set v = 'x' where id = 3", &[])
        .await
        .expect("write");
    wait_warm(&p, "filled", 1.0).await;
    assert_eq!(warm(&p, "dropped").await, 0.0, "id 1 was a candidate");
    assert_eq!(read_hit(&p, &c, 1, false).await, (false, Some("v1".into())));
    assert_eq!(read_hit(&p, &c, 2, false).await, (true, Some("v2".into())));
}

#[tokio::test]
async fn a_refresh_racing_a_second_write_never_serves_the_first() {
    // Writes in quick succession would switch the table's announcing off.
    let toml = "[cache]\ndefault_ttl = \"10m\"\nwarm_hot_keys = true\nwarm_after_hits = 3\n\
                [invalidation]\nunwatch_on_write = false\n";
    let (p, c, d, _db) = setup("pgtier_warm_race", toml, &[]).await;
    for round in 0..10 {
        make_hot(&p, &c, 1, false).await;
        let n = invalidations(&p).await;
        // The first write's refresh starts as soon as its notification is
        // applied, while the second write commits.
        d.execute("update kv set v = $1 where id = 1", &[&format!("a{round}")])
            .await
            .expect("first write");
        d.execute("update kv set v = $1 where id = 1", &[&format!("b{round}")])
            .await
            .expect("second write");
        wait_invalidations(&p, n + 2.0).await;
        assert_eq!(
            read(&c, 1).await,
            Some(format!("b{round}")),
            "round {round}: a value older than the last write was served"
        );
    }
    assert!(warm(&p, "filled").await > 0.0, "no refresh ever ran");
}

#[tokio::test]
async fn a_session_in_a_transaction_or_busy_is_not_used() {
    let (p, c, d, _) = setup("pgtier_warm_busy", TOML, &[]).await;
    make_hot(&p, &c, 1, false).await;
    // In a transaction block: not idle.
    c.batch_execute("begin").await.expect("begin");
    d.execute("update kv set v = 'one' where id = 1", &[])
        .await
        .expect("write");
    wait_warm(&p, "dropped", 1.0).await;
    c.batch_execute("commit").await.expect("commit");
    assert_eq!(warm(&p, "filled").await, 0.0);
    assert_eq!(
        read_hit(&p, &c, 1, false).await,
        (false, Some("one".into()))
    );
    // Mid-request: a long statement in flight.
    make_hot(&p, &c, 1, false).await;
    let busy = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = d
                .query_one(
                    "select count(*) from pg_stat_activity
                     where query = 'select pg_sleep(1.5)' and state = 'active'",
                    &[],
                )
                .await
                .expect("activity")
                .get(0);
            if n > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "the long statement never ran");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let long = c.simple_query("select pg_sleep(1.5)");
    let (done, ()) = tokio::join!(long, async {
        busy.await;
        d.execute("update kv set v = 'two' where id = 1", &[])
            .await
            .expect("write");
        wait_warm(&p, "dropped", 2.0).await;
    });
    done.expect("long statement");
    assert_eq!(warm(&p, "filled").await, 0.0, "a busy session was used");
    assert_eq!(
        read_hit(&p, &c, 1, false).await,
        (false, Some("two".into()))
    );
}

#[tokio::test]
async fn a_hot_entry_of_one_role_is_refreshed_only_on_that_roles_sessions() {
    let (p, _c, d, db) = setup("pgtier_warm_roles", TOML, &[]).await;
    d.batch_execute(
        "do $$ begin
           -- Tests of one binary run at once: create roles one at a time.
           perform pg_advisory_xact_lock(7201);
           if not exists (select from pg_roles where rolname = 'pgtier_warm_a') then
             create role pgtier_warm_a login; end if;
           if not exists (select from pg_roles where rolname = 'pgtier_warm_b') then
             create role pgtier_warm_b login; end if; end $$;
         grant select on kv to pgtier_warm_a, pgtier_warm_b;",
    )
    .await
    .expect("roles");
    drop(_c);
    let as_role = |role: &str| {
        format!(
            "host={PG_HOST} port={} user={role} dbname={db} connect_timeout=10",
            p.port
        )
    };
    let a = connect_str(&as_role("pgtier_warm_a")).await;
    let b = connect_str(&as_role("pgtier_warm_b")).await;
    make_hot(&p, &a, 1, false).await;
    // Only role B's session is idle: it must not carry role A's refresh.
    a.batch_execute("begin").await.expect("begin");
    d.execute("update kv set v = 'one' where id = 1", &[])
        .await
        .expect("write");
    wait_warm(&p, "dropped", 1.0).await;
    assert_eq!(warm(&p, "filled").await, 0.0, "refreshed on another role");
    a.batch_execute("commit").await.expect("commit");
    // With role A's session idle, it is.
    make_hot(&p, &a, 1, false).await;
    d.execute("update kv set v = 'two' where id = 1", &[])
        .await
        .expect("write");
    wait_warm(&p, "filled", 1.0).await;
    assert_eq!(read_hit(&p, &a, 1, false).await, (true, Some("two".into())));
    assert_eq!(read(&b, 1).await, Some("two".into()));
}
