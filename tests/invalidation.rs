//! Freshness: writes made anywhere invalidate cached results through the
//! triggers and the listener; writes through pgtier are visible to the next read
//! at once; and nothing stale is served while the listener is down.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::sql::{announced, first, until, until_announced, warm};
use common::{direct, fresh_db, pgtier_bin, run_bounded, Pgtier};

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

#[tokio::test]
async fn writes_made_directly_invalidate_every_kind_of_statement() {
    let db = fresh_db("pgtier_inv_direct").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int); insert into t values (1, 10), (2, 20)",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let q = "select coalesce(sum(v), 0) from t";

    warm(&p, &c, q, "30").await;
    d.execute("insert into t values (3, 30)", &[])
        .await
        .unwrap();
    until(&c, q, "60").await;

    warm(&p, &c, q, "60").await;
    d.execute("update t set v = v + 1", &[]).await.unwrap();
    until(&c, q, "63").await;

    warm(&p, &c, q, "63").await;
    d.execute("delete from t where id = 3", &[]).await.unwrap();
    until(&c, q, "32").await;

    warm(&p, &c, q, "32").await;
    d.batch_execute("truncate t").await.unwrap();
    until(&c, q, "0").await;

    // a role that was granted nothing on pgtier's objects writes (the watch
    // sequences the trigger reads are readable by PUBLIC) and is announced too
    d.batch_execute(
        "do $$ begin
           -- Tests of one binary run at once: create roles one at a time.
           perform pg_advisory_xact_lock(7201);
           if not exists (select from pg_roles where rolname = 'pgtier_plain_writer') then
             create role pgtier_plain_writer login; end if; end $$;
         grant select, insert, update, delete, truncate on t to pgtier_plain_writer;",
    )
    .await
    .unwrap();
    let plain = common::connect_str(&format!(
        "host=127.0.0.1 port=5432 user=pgtier_plain_writer dbname={db}"
    ))
    .await;
    warm(&p, &c, q, "0").await;
    plain
        .execute("insert into t values (5, 5)", &[])
        .await
        .unwrap();
    until(&c, q, "5").await;
    plain.execute("delete from t", &[]).await.unwrap();
    until(&c, q, "0").await;

    // a write inside an explicit transaction is visible only after commit
    warm(&p, &c, q, "0").await;
    d.batch_execute("begin; insert into t values (9, 9);")
        .await
        .unwrap();
    assert_eq!(first(&c, q).await, "0");
    d.batch_execute("commit").await.unwrap();
    until(&c, q, "9").await;
}

#[tokio::test]
async fn writes_through_pgtier_are_read_back_immediately() {
    let db = fresh_db("pgtier_inv_ryw").await;
    let d = direct(&db).await;
    d.batch_execute("create table k(id int primary key, v int); insert into k values (1, 0)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let mut a = p.connect(&db).await;
    let b = p.connect(&db).await;
    let q = "select v from k where id = 1";
    let stmt = a.prepare("select v from k where id = $1").await.unwrap();
    for i in 1..=12 {
        warm(&p, &a, q, &(i - 1).to_string()).await;
        let _ = b.query_one(&stmt.clone(), &[&1i32]).await;
        match i % 3 {
            0 => {
                a.execute("update k set v = v + 1 where id = 1", &[])
                    .await
                    .unwrap();
            }
            1 => {
                a.simple_query("update k set v = v + 1 where id = 1")
                    .await
                    .unwrap();
            }
            _ => {
                let tx = a.transaction().await.unwrap();
                tx.execute("update k set v = v + 1 where id = 1", &[])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }
        // no retry: the very next read, in this session and in another, is fresh
        assert_eq!(
            first(&a, q).await,
            i.to_string(),
            "same session after write {i}"
        );
        assert_eq!(
            first(&b, q).await,
            i.to_string(),
            "other session after write {i}"
        );
        let got: i32 = a
            .query_one("select v from k where id = $1", &[&1i32])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, i);
    }
}

#[tokio::test]
async fn partitions_views_and_ddl_invalidate() {
    let db = fresh_db("pgtier_inv_shapes").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table m(id int, region text, v int) partition by list (region);
         create table m_eu partition of m for values in ('eu');
         create table m_us partition of m for values in ('us');
         insert into m values (1, 'eu', 1), (2, 'us', 2);
         create table base(id int, v int); insert into base values (1, 100);
         create view top as select id, v * 2 as doubled from base;
         create table shape(a int); insert into shape values (1);",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;

    // a write straight into a partition invalidates reads of the parent, and vice versa
    warm(&p, &c, "select sum(v) from m", "3").await;
    warm(&p, &c, "select sum(v) from m_eu", "1").await;
    d.execute("insert into m_eu values (3, 'eu', 10)", &[])
        .await
        .unwrap();
    until(&c, "select sum(v) from m", "13").await;
    until(&c, "select sum(v) from m_eu", "11").await;
    warm(&p, &c, "select sum(v) from m_eu", "11").await;
    d.execute("update m set v = v + 100 where region = 'eu'", &[])
        .await
        .unwrap();
    until(&c, "select sum(v) from m_eu", "211").await;

    // a view is invalidated by writes to its base table
    warm(&p, &c, "select doubled from top", "200").await;
    d.execute("update base set v = 7", &[]).await.unwrap();
    until(&c, "select doubled from top", "14").await;

    // DDL: a new column shows up in SELECT *
    warm(&p, &c, "select * from shape", "1").await;
    d.batch_execute("alter table shape add column b int default 5")
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let rows = c.simple_query("select * from shape").await.unwrap();
        let cols = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.len()),
            _ => None,
        });
        if cols == Some(2) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "ALTER TABLE did not invalidate"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // a dropped and recreated table is not served from its old entries
    warm(&p, &c, "select a from shape", "1").await;
    d.batch_execute("drop table shape; create table shape(a int); insert into shape values (2);")
        .await
        .unwrap();
    until(&c, "select a from shape", "2").await;
}

#[tokio::test]
async fn tables_without_triggers_are_never_cached() {
    let db = fresh_db("pgtier_inv_notrigger").await;
    let d = direct(&db).await;
    d.batch_execute("create table watched(v int); insert into watched values (1); create table unwatched(v int); insert into unwatched values (1);")
        .await
        .unwrap();
    let control = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args([
            "install-triggers",
            "--control-url",
            &control,
            "--table",
            "watched",
        ]),
        Duration::from_secs(60),
    );
    assert!(st.success(), "{out}{err}");
    assert!(out.contains("triggers on 1 table(s)"), "{out}");
    // no auto-install: only `watched` has a trigger
    let p = Pgtier::start_with(common::PG_PORT, TTL, &["--control-url", &control]);
    p.wait_listener(&db).await;
    let c = p.connect(&db).await;
    for _ in 0..3 {
        assert_eq!(first(&c, "select v from unwatched").await, "1");
    }
    let m = p.metrics().await;
    assert_eq!(m.hits(), 0.0);
    assert!(m.bypasses("no_trigger") >= 3.0);
    // lazy watching (the default): the first read asks for `watched` to be
    // watched and is not cached; once the watch is in place reads are
    let before = p.metrics().await;
    assert_eq!(first(&c, "select v from watched").await, "1");
    assert_eq!(
        p.metrics().await.bypasses("not_watched") - before.bypasses("not_watched"),
        1.0
    );
    let t = Instant::now();
    loop {
        let h = p.metrics().await.hits();
        assert_eq!(first(&c, "select v from watched").await, "1");
        if p.metrics().await.hits() > h {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "watched table never cached"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.execute("update watched set v = 5", &[]).await.unwrap();
    until(&c, "select v from watched", "5").await;
    // writes to the table without a trigger are still seen at once
    d.execute("update unwatched set v = 2", &[]).await.unwrap();
    assert_eq!(first(&c, "select v from unwatched").await, "2");

    // uninstall removes everything
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args(["uninstall-triggers", "--control-url", &control]),
        Duration::from_secs(60),
    );
    assert!(st.success(), "{out}{err}");
    let n: i64 = d
        .query_one(
            "select count(*) from pg_trigger where tgname = 'pgtier_notify'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let schema: i64 = d
        .query_one(
            "select count(*) from pg_namespace where nspname = 'pgtier'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, 0);
}

#[tokio::test]
async fn invalidations_apply_while_the_listener_waits_to_watch_a_table() {
    let db = fresh_db("pgtier_inv_busy").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table hot(id int primary key, v int); insert into hot values (1, 1);
         create table cold(id int primary key, v int); insert into cold values (1, 1)",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let q = "select v from hot where id = 1";
    let qc = "select v from cold where id = 1";
    warm(&p, &c, q, "1").await;
    warm(&p, &c, qc, "1").await;

    // A long read-only transaction holds no write lock: it must hold no watch up.
    let reader = direct(&db).await;
    reader
        .batch_execute("begin; select pg_current_xact_id(); select count(*) from hot")
        .await
        .unwrap();
    // A writer of `cold` stays open; then committed writes switch `cold`'s
    // announcing off, and watching it again has to wait that writer out (up to
    // 5 s) on the listener's connection.
    let old = direct(&db).await;
    old.batch_execute("begin; insert into cold values (2, 2)")
        .await
        .unwrap();
    // Written often with no read to pay for it: unwatched.
    let last = write_until_unwatched(&d, "cold", "update cold set v = $1 where id = 1").await;
    until(&c, qc, &last).await;
    assert_eq!(
        first(&c, qc).await,
        last,
        "never stale while it cannot be cached"
    );

    // Meanwhile writes to the other table must still invalidate at once, and it
    // must be cached again right after each.
    let t = Instant::now();
    for v in 2..=4 {
        d.execute("update hot set v = $1 where id = 1", &[&v])
            .await
            .unwrap();
        let took = until(&c, q, &v.to_string()).await;
        assert!(
            took < Duration::from_secs(1),
            "invalidation held up {took:?} behind the listener's own queries"
        );
        warm(&p, &c, q, &v.to_string()).await;
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the test must finish while the old writer still blocks the watch"
    );
    old.batch_execute("rollback").await.unwrap();
    reader.batch_execute("rollback").await.unwrap();
    // With the writer gone, `cold` is watched and cached again.
    warm(&p, &c, qc, &last).await;
}

/// Write `update` (with values 1000, 1001, ...) with no read in between until
/// pgtier switches `table`'s announcing off: its announced writes earn no hit
/// (bounded). Returns the last value written.
async fn write_until_unwatched(d: &tokio_postgres::Client, table: &str, update: &str) -> String {
    let t = Instant::now();
    for v in 1000.. {
        d.execute(update, &[&v]).await.unwrap();
        if announced(d, table).await == 1 {
            return v.to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{table}: still announced after {} writes that earned no hit",
            v - 999
        );
    }
    unreachable!()
}

#[tokio::test]
async fn writes_stop_being_announced_until_a_read_wants_the_table_again() {
    let db = fresh_db("pgtier_inv_unwatch").await;
    let d = direct(&db).await;
    d.batch_execute("create table k(id int primary key, v int); insert into k values (1, 1)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let q = "select v from k where id = 1";
    warm(&p, &c, q, "1").await;
    assert_eq!(announced(&d, "k").await, 2);

    // A write now and then is announced and leaves the table watched.
    d.execute("update k set v = 2", &[]).await.unwrap();
    until(&c, q, "2").await;
    warm(&p, &c, q, "2").await;
    assert_eq!(announced(&d, "k").await, 2);
    // Writes in quick succession that earn no hit are announced, then pgtier
    // switches announcing off, so later writes commit without a notification.
    write_until_unwatched(&d, "k", "update k set v = $1").await;
    until_announced(&d, "k", 1).await;
    // A write through pgtier (changing nothing) is fenced: its reply comes
    // once the listener has taken every notification sent before, the `u`
    // and the last announced writes (two were seen still on their way).
    c.execute("update k set v = v where id = -1", &[])
        .await
        .unwrap();
    let before = p.metrics().await.get(
        "pgtier_invalidation_notifications_total",
        &[("database", &db)],
    );
    // One notification more at most; none for these writes (no read through
    // pgtier wants `k` watched meanwhile).
    for v in 3..=5 {
        d.execute("update k set v = $1", &[&v]).await.unwrap();
    }
    // A read wants it cached again: it is watched afresh, never stale.
    until(&c, q, "5").await;
    warm(&p, &c, q, "5").await;
    assert_eq!(announced(&d, "k").await, 2);
    let after = p.metrics().await.get(
        "pgtier_invalidation_notifications_total",
        &[("database", &db)],
    );
    assert!(
        after - before <= 1.0,
        "writes while unwatched were announced: {before} -> {after} notifications"
    );
    // And the next write is announced again.
    d.execute("update k set v = 6", &[]).await.unwrap();
    until(&c, q, "6").await;

    // With unwatch_on_write off, a watched table stays announced however
    // often it is written.
    let p2 = Pgtier::cached(
        &db,
        &format!("{TTL}\n[invalidation]\nunwatch_on_write = false\n"),
        &[],
    )
    .await;
    let c2 = p2.connect(&db).await;
    drop(p);
    warm(&p2, &c2, q, "6").await;
    for v in 30..=36 {
        d.execute("update k set v = $1", &[&v]).await.unwrap();
    }
    until(&c2, q, "36").await;
    warm(&p2, &c2, q, "36").await;
    assert_eq!(announced(&d, "k").await, 2);
}

/// A table that gains an inheritance child (found in review, issue 14): reads
/// of the parent cover the child's rows from then on, so they must not be
/// served from entries cached before, even while the child has no trigger yet.
#[tokio::test]
async fn a_table_that_gains_a_child_is_not_served_stale() {
    let db = fresh_db("pgtier_inherit_later").await;
    let d = direct(&db).await;
    d.batch_execute("create table parent_t(id int, v text); insert into parent_t values (1, 'a')")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"10m\"\n", &[]).await;
    let c = p.connect(&db).await;
    let q = "select count(*)::text from parent_t";
    warm(&p, &c, q, "1").await;
    d.batch_execute(
        "create table child_t () inherits (parent_t); insert into child_t values (2, 'b')",
    )
    .await
    .unwrap();
    until(&c, q, "2").await;
    // A table with rows of its own joins the family: no row is written.
    d.batch_execute("create table other_t(id int, v text); insert into other_t values (3, 'c')")
        .await
        .unwrap();
    warm(&p, &c, q, "2").await;
    d.batch_execute("alter table other_t inherit parent_t")
        .await
        .unwrap();
    until(&c, q, "3").await;
}

/// Found in review: every new table changed the routines fingerprint (its
/// row type's array type), so any CREATE TABLE flushed the whole database.
#[tokio::test]
async fn creating_a_table_leaves_other_tables_cached() {
    let db = fresh_db("pgtier_create_keeps").await;
    let d = direct(&db).await;
    d.batch_execute("create table a(id int primary key, v int); insert into a values (1, 1)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let q = "select v from a where id = 1";
    warm(&p, &c, q, "1").await;
    d.batch_execute("create table b(id int primary key, v int); insert into b values (1, 2)")
        .await
        .unwrap();
    // b cached means the catalog was read again after the CREATE.
    warm(&p, &c, "select v from b where id = 1", "2").await;
    let before = p.metrics().await.hits();
    assert_eq!(first(&c, q).await, "1");
    assert_eq!(
        p.metrics().await.hits() - before,
        1.0,
        "a new table flushed a's entry"
    );
}

/// Rows written while this pgtier caches no table of the database need no
/// read-your-writes fence (a fence commits a notification of its own, which
/// Postgres serialises with every other notifying commit): none is sent, and
/// the session still reads its writes. Once a table is cached, writes are
/// fenced again.
#[tokio::test]
async fn writes_are_fenced_only_while_a_table_is_cached() {
    let db = fresh_db("pgtier_inv_nofence").await;
    let d = direct(&db).await;
    // `u` is never read, but its trigger writes `t`.
    d.batch_execute(
        "create table t(id int primary key, v int); insert into t values (1, 0);
         create table u(x int);
         create function bump() returns trigger language plpgsql as
           $$ begin update t set v = v + 100 where id = 1; return null; end $$;
         create trigger u_bump after insert on u for each statement execute function bump();",
    )
    .await
    .expect("setup");
    let (_l, mut seen) = common::listen(&db, "pgtier_invalidate").await;
    let control = format!(
        "postgres://postgres@{}:{}/{db}",
        common::PG_HOST,
        common::PG_PORT
    );
    let args = [
        "--control-url",
        &control,
        "--auto-install-triggers",
        "--watch",
        "lazy",
    ];
    let fences = |m: &common::Metrics| {
        (
            m.get("pgtier_fences_total", &[("kind", "probe")]),
            m.get("pgtier_fences_total", &[("kind", "notify")]),
        )
    };
    let p = Pgtier::start_with(common::PG_PORT, TTL, &args);
    p.wait_listener(&db).await;
    let c = p.connect(&db).await;
    // Nothing read yet, so nothing watched or cached.
    for _ in 0..3 {
        c.execute("update t set v = v + 1 where id = 1", &[])
            .await
            .expect("write");
    }
    let q = "select v from t where id = 1";
    assert_eq!(first(&c, q).await, "3", "reads its own writes");
    // That read asked for the table: once it is cached, a write is fenced.
    warm(&p, &c, q, "3").await;
    c.execute("update t set v = v + 1 where id = 1", &[])
        .await
        .expect("write");
    assert_eq!(first(&c, q).await, "4");
    // A write to a table nobody caches whose trigger writes a cached one.
    c.execute("insert into u values (1)", &[])
        .await
        .expect("write");
    assert_eq!(first(&c, q).await, "104", "reads the trigger's write");
    assert_eq!(
        fences(&p.metrics().await),
        (2.0, 0.0),
        "three writes with nothing cached were not fenced, the write to the cached \
         table was, and so was the one whose trigger writes it: each by a probe of \
         the listening connection, none by a notification"
    );
    let sent = common::until_marker(&d, "pgtier_invalidate", &mut seen).await;
    assert!(
        !sent.iter().any(|m| m.starts_with('f')),
        "a fence notification: {sent:?}"
    );
}
