//! Issue 12, invalidation cases: privilege changes (5), renamed and re-parented
//! tables (6), writes in `session_replication_role = replica` (7), and what the
//! catalog rescan must notice when no event trigger reports DDL (14). Each test
//! first proves a read is served from the cache, then changes something behind
//! pgtier's back and waits (bounded) for Postgres's answer.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::sql::{first, warm};
use common::{connect_str, direct, fresh_db, pgtier_bin, run_bounded, Pgtier};
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// Create roles idempotently (they are cluster-wide and shared by test runs).
async fn roles(d: &Client, login: &[&str], nologin: &[&str]) {
    // Tests of one binary run at once: create roles one at a time.
    let mut sql = String::from("do $$ begin\nperform pg_advisory_xact_lock(7201);\n");
    for (names, kind) in [(login, "login"), (nologin, "nologin")] {
        for r in names {
            sql.push_str(&format!(
                "if not exists (select from pg_roles where rolname = '{r}') then create role {r} {kind}; end if;\n"
            ));
        }
    }
    sql.push_str("end $$;");
    d.batch_execute(&sql).await.unwrap();
}

/// Read through pgtier until the result is `want` (bounded; pgtier's log on failure).
async fn until(p: &Pgtier, c: &Client, sql: &str, want: &str) {
    let t = Instant::now();
    loop {
        let got = first(c, sql).await;
        if got == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{sql}: still {got}, want {want}\n{}\n{:?}",
            p.logs(),
            {
                let m = p.metrics().await;
                (
                    lookups(p).await,
                    m.get("pgtier_unwatches_total", &[]),
                    m.get("pgtier_invalidation_notifications_total", &[]),
                )
            }
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
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

async fn connect_as(p: &Pgtier, user: &str, db: &str) -> Client {
    connect_str(&format!(
        "host=127.0.0.1 port={} user={user} dbname={db} connect_timeout=10",
        p.port
    ))
    .await
}

/// Read until Postgres refuses it for lack of privilege (bounded).
async fn until_denied(c: &Client, sql: &str) {
    let t = Instant::now();
    loop {
        match c.simple_query(sql).await {
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                return
            }
            Err(e) => panic!("{sql}: unexpected error {e}"),
            Ok(_) => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{sql}: still served after the privilege was taken away"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn denied_now(c: &Client, sql: &str) {
    let e = c
        .simple_query(sql)
        .await
        .expect_err("privilege was taken away");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e}"
    );
}

#[tokio::test]
async fn case_05_privilege_changes_invalidate() {
    let db = fresh_db("hi_priv").await;
    let d = direct(&db).await;
    roles(&d, &["hi_alice5"], &["hi_readers5"]).await;
    d.batch_execute(
        "create table secret(v int); insert into secret values (1);
         create table shared(v int); insert into shared values (2);
         create table docs(v int); insert into docs values (3);
         create table mine(v int); insert into mine values (4);
         create table cols(a int, b int); insert into cols values (5, 6);
         create schema s5; create table s5.t(v int); insert into s5.t values (7);
         grant select on secret, docs to hi_alice5;
         grant select on shared to hi_readers5;
         grant hi_readers5 to hi_alice5;
         alter table mine owner to hi_alice5;
         grant select (a) on cols to hi_alice5;
         grant usage on schema s5 to hi_alice5; grant select on s5.t to hi_alice5;",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let alice = connect_as(&p, "hi_alice5", &db).await;

    // REVOKE on the table: the old session and a new one are refused.
    let q = "select sum(v) from secret";
    warm(&p, &alice, q, "1").await;
    d.batch_execute("revoke select on secret from hi_alice5")
        .await
        .unwrap();
    until_denied(&alice, q).await;
    denied_now(&connect_as(&p, "hi_alice5", &db).await, q).await;

    // Role membership taken away (no event trigger fires for it).
    let q = "select sum(v) from shared";
    warm(&p, &alice, q, "2").await;
    d.batch_execute("revoke hi_readers5 from hi_alice5")
        .await
        .unwrap();
    until_denied(&alice, q).await;
    denied_now(&connect_as(&p, "hi_alice5", &db).await, q).await;

    // Row level security switched on (no policy: nothing visible), then a
    // policy; tables with row security are not cached at all.
    let q = "select sum(v) from docs";
    warm(&p, &alice, q, "3").await;
    d.batch_execute("alter table docs enable row level security")
        .await
        .unwrap();
    until(&p, &alice, q, "NULL").await;
    d.batch_execute("create policy everything on docs for select using (true)")
        .await
        .unwrap();
    until(&p, &alice, q, "3").await;
    // Reads during the catalog re-read may still be cached (with what
    // Postgres answered after the change); then the table is not cached.
    let t = Instant::now();
    loop {
        let before = p.metrics().await.bypasses("row_security");
        assert_eq!(first(&alice, q).await, "3");
        if p.metrics().await.bypasses("row_security") > before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a table with row security is still cached: {:?}",
            lookups(&p).await
        );
    }

    // Ownership given away.
    let q = "select sum(v) from mine";
    warm(&p, &alice, q, "4").await;
    d.batch_execute("alter table mine owner to postgres")
        .await
        .unwrap();
    until_denied(&alice, q).await;

    // Column privilege.
    let q = "select a from cols";
    warm(&p, &alice, q, "5").await;
    d.batch_execute("revoke select (a) on cols from hi_alice5")
        .await
        .unwrap();
    until_denied(&alice, q).await;

    // Schema privilege.
    let q = "select sum(v) from s5.t";
    warm(&p, &alice, q, "7").await;
    d.batch_execute("revoke usage on schema s5 from hi_alice5")
        .await
        .unwrap();
    until_denied(&alice, q).await;
}

#[tokio::test]
async fn case_06_renamed_tables_stay_fresh() {
    let db = fresh_db("hi_rename").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table r(v int); insert into r values (1);
         create table r_new(v int); insert into r_new values (100);
         create schema other;
         create table m(k int, v int) partition by list (k);
         create table m1 partition of m for values in (1); insert into m values (1, 1);
         create table m2(k int, v int); insert into m2 values (2, 10);
         create table pa(v int); insert into pa values (1);
         create table ch(v int); insert into ch values (50);",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;

    // Renamed: writes to the new name reach reads of it.
    warm(&p, &c, "select sum(v) from r", "1").await;
    d.batch_execute("alter table r rename to r2").await.unwrap();
    warm(&p, &c, "select sum(v) from r2", "1").await;
    d.batch_execute("insert into r2 values (2)").await.unwrap();
    until(&p, &c, "select sum(v) from r2", "3").await;

    // Moved to another schema.
    d.batch_execute("alter table r2 set schema other")
        .await
        .unwrap();
    warm(&p, &c, "select sum(v) from other.r2", "3").await;
    d.batch_execute("insert into other.r2 values (4)")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from other.r2", "7").await;

    // Rename swap: r_new becomes r.
    d.batch_execute("create table r(v int); insert into r values (1)")
        .await
        .unwrap();
    warm(&p, &c, "select sum(v) from r", "1").await;
    d.batch_execute("begin; alter table r rename to r_old; alter table r_new rename to r; commit")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from r", "100").await;
    warm(&p, &c, "select sum(v) from r", "100").await;
    d.batch_execute("insert into r values (1)").await.unwrap();
    until(&p, &c, "select sum(v) from r", "101").await;

    // A partition's parent renamed: writes to the partition reach it.
    d.batch_execute("alter table m rename to mm").await.unwrap();
    warm(&p, &c, "select sum(v) from mm", "1").await;
    d.batch_execute("insert into m1 values (1, 2)")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from mm", "3").await;

    // Attach, write into the new partition, detach.
    d.batch_execute("alter table mm attach partition m2 for values in (2)")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from mm", "13").await;
    warm(&p, &c, "select sum(v) from mm", "13").await;
    d.batch_execute("insert into m2 values (2, 100)")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from mm", "113").await;
    d.batch_execute("alter table mm detach partition m2")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from mm", "3").await;
    warm(&p, &c, "select sum(v) from m2", "110").await;
    d.batch_execute("insert into m2 values (2, 1)")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from m2", "111").await;

    // Inheritance added and removed.
    warm(&p, &c, "select sum(v) from pa", "1").await;
    d.batch_execute("alter table ch inherit pa").await.unwrap();
    until(&p, &c, "select sum(v) from pa", "51").await;
    warm(&p, &c, "select sum(v) from pa", "51").await;
    d.batch_execute("insert into ch values (1)").await.unwrap();
    until(&p, &c, "select sum(v) from pa", "52").await;
    d.batch_execute("alter table ch no inherit pa")
        .await
        .unwrap();
    until(&p, &c, "select sum(v) from pa", "1").await;
}

#[tokio::test]
async fn case_07_replica_role_writes_are_announced() {
    let db = fresh_db("hi_replica").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table t(id int primary key, v int); insert into t values (1, 1);
         create table m(k int, v int) partition by list (k);
         create table m1 partition of m for values in (1); insert into m values (1, 1);",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let replica = direct(&db).await;
    replica
        .batch_execute("set session_replication_role = replica")
        .await
        .unwrap();

    let q = "select sum(v) from t";
    warm(&p, &c, q, "1").await;
    replica.batch_execute("update t set v = 2").await.unwrap();
    until(&p, &c, q, "2").await;
    warm(&p, &c, q, "2").await;
    replica
        .batch_execute("insert into t values (2, 3)")
        .await
        .unwrap();
    until(&p, &c, q, "5").await;
    warm(&p, &c, q, "5").await;
    replica
        .batch_execute("delete from t where id = 2")
        .await
        .unwrap();
    until(&p, &c, q, "2").await;
    warm(&p, &c, q, "2").await;
    replica.batch_execute("truncate t").await.unwrap();
    until(&p, &c, q, "NULL").await;

    let q = "select sum(v) from m";
    warm(&p, &c, q, "1").await;
    replica
        .batch_execute("insert into m values (1, 5)")
        .await
        .unwrap();
    until(&p, &c, q, "6").await;

    // The statement trigger fires always, the row trigger in replica mode.
    let modes: Vec<String> = d
        .query(
            "select tgname || ':' || tgenabled::text from pg_trigger
             where tgrelid = 't'::regclass and tgname like 'pgtier%' order by 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(modes, ["pgtier_notify:A", "pgtier_notify_replica:R"]);
}

/// A trigger that fires in origin mode only does not count as installed.
#[tokio::test]
async fn case_07_origin_only_triggers_are_not_trusted() {
    let db = fresh_db("hi_origin").await;
    let d = direct(&db).await;
    d.batch_execute("create table t(v int); insert into t values (1)")
        .await
        .unwrap();
    let control = format!("postgres://postgres@127.0.0.1:5432/{db}");
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args(["install-triggers", "--control-url", &control]),
        Duration::from_secs(60),
    );
    assert!(st.success(), "{out}{err}");
    // What a DBA (or an older pgtier) may leave behind.
    d.batch_execute(
        "alter table t enable trigger pgtier_notify;
         drop trigger if exists pgtier_notify_replica on t;",
    )
    .await
    .unwrap();
    let p = Pgtier::start_with(
        common::PG_PORT,
        TTL,
        &["--control-url", &control, "--watch", "eager"],
    );
    p.wait_listener(&db).await;
    let c = p.connect(&db).await;
    let q = "select sum(v) from t";
    let before = p.metrics().await;
    for _ in 0..3 {
        assert_eq!(first(&c, q).await, "1");
    }
    let after = p.metrics().await;
    assert_eq!(after.hits(), before.hits(), "served from the cache");
    assert!(after.bypasses("no_trigger") >= before.bypasses("no_trigger") + 3.0);
    // A replica-mode write is then simply read from Postgres.
    d.batch_execute("set session_replication_role = replica; insert into t values (1); reset session_replication_role")
        .await
        .unwrap();
    assert_eq!(first(&c, q).await, "2");
}

/// A database whose tables belong to `hi_ctl14`, a role that may not create
/// event triggers, and pgtier caching it through that role: only its rescans
/// (every 300 ms here) and polls can notice DDL and privilege changes.
async fn without_event_triggers(name: &str, setup: &str) -> (String, Client, Pgtier) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    roles(&d, &["hi_alice14", "hi_ctl14"], &["hi_readers14"]).await;
    d.batch_execute(&format!(
        "grant create on database {db} to hi_ctl14; {setup}"
    ))
    .await
    .unwrap();
    d.batch_execute(
        "do $$ declare r record; begin
           for r in select c.oid::regclass as t from pg_class c
                    where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v') loop
             execute format('alter table %s owner to hi_ctl14', r.t);
           end loop; end $$;",
    )
    .await
    .unwrap();
    let control = format!("postgres://hi_ctl14@127.0.0.1:5432/{db}");
    let p = Pgtier::start_with(
        common::PG_PORT,
        &format!("{TTL}[invalidation]\nrescan_interval = \"300ms\"\n"),
        &[
            "--control-url",
            &control,
            "--auto-install-triggers",
            "--watch",
            "eager",
        ],
    );
    p.wait_listener(&db).await;
    let n: i64 = d
        .query_one("select count(*) from pg_event_trigger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the control role cannot create event triggers");
    (db, d, p)
}

#[tokio::test]
async fn case_14_without_event_triggers_privileges_roles_and_row_security_are_noticed() {
    let (db, d, p) = without_event_triggers(
        "hi_rescan_priv",
        "create table secret(v int); insert into secret values (1);
         create table shared(v int); insert into shared values (2);
         create table docs(v int); insert into docs values (3);
         grant select on secret, docs to hi_alice14;
         grant select on shared to hi_readers14;
         grant hi_readers14 to hi_alice14;",
    )
    .await;
    let alice = connect_as(&p, "hi_alice14", &db).await;

    // Privilege revoked, membership revoked.
    let q = "select sum(v) from secret";
    warm(&p, &alice, q, "1").await;
    d.batch_execute("revoke select on secret from hi_alice14")
        .await
        .unwrap();
    until_denied(&alice, q).await;
    let q = "select sum(v) from shared";
    warm(&p, &alice, q, "2").await;
    d.batch_execute("revoke hi_readers14 from hi_alice14")
        .await
        .unwrap();
    until_denied(&alice, q).await;

    // Row level security switched on.
    let q = "select sum(v) from docs";
    warm(&p, &alice, q, "3").await;
    d.batch_execute("alter table docs enable row level security")
        .await
        .unwrap();
    until(&p, &alice, q, "NULL").await;
}

#[tokio::test]
async fn case_14_without_event_triggers_partitions_inheritance_and_views_are_noticed() {
    let (db, d, p) = without_event_triggers(
        "hi_rescan_ddl",
        "create table m(k int, v int) partition by list (k);
         create table m1 partition of m for values in (1); insert into m values (1, 1);
         create table m2(k int, v int); insert into m2 values (2, 10);
         create table pa(v int); insert into pa values (1);
         create table ch(v int); insert into ch values (50);
         create table base(v int); insert into base values (1), (200);
         create view vw as select v from base where v > 0;",
    )
    .await;
    let c = p.connect(&db).await;

    // ATTACH and DETACH PARTITION.
    let q = "select sum(v) from m";
    warm(&p, &c, q, "1").await;
    d.batch_execute("alter table m attach partition m2 for values in (2)")
        .await
        .unwrap();
    until(&p, &c, q, "11").await;
    warm(&p, &c, q, "11").await;
    d.batch_execute("alter table m detach partition m2")
        .await
        .unwrap();
    until(&p, &c, q, "1").await;

    // INHERIT.
    let q = "select sum(v) from pa";
    warm(&p, &c, q, "1").await;
    d.batch_execute("alter table ch inherit pa").await.unwrap();
    until(&p, &c, q, "51").await;

    // CREATE OR REPLACE VIEW with the same columns.
    let q = "select sum(v) from vw";
    warm(&p, &c, q, "201").await;
    d.batch_execute("create or replace view vw as select v from base where v > 100")
        .await
        .unwrap();
    until(&p, &c, q, "200").await;
}

/// Logical replication's apply worker writes in replica mode and fires row
/// triggers only: rows it applies must still invalidate.
#[tokio::test]
async fn case_07_logical_replication_applies_are_announced() {
    use common::cluster::Cluster;
    let mut cluster = Cluster::start(
        "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        "ALTER SYSTEM SET wal_level = logical",
    );
    cluster.stop(false);
    cluster.pg_ctl_start();
    let port = cluster.port;
    let at = |db: &str| format!("host=127.0.0.1 port={port} user=postgres dbname={db}");
    let admin = connect_str(&at("postgres")).await;
    for db in ["hi_pub", "hi_sub"] {
        admin
            .batch_execute(&format!("create database {db}"))
            .await
            .unwrap();
    }
    let publisher = connect_str(&at("hi_pub")).await;
    for sql in [
        "create table t(id int primary key, v int)",
        "insert into t values (1, 1)",
        "create publication hi_p for table t",
        "select pg_create_logical_replication_slot('hi_slot', 'pgoutput')",
    ] {
        publisher.batch_execute(sql).await.unwrap();
    }
    let sub = connect_str(&at("hi_sub")).await;
    sub.batch_execute("create table t(id int primary key, v int); insert into t values (1, 1)")
        .await
        .unwrap();
    sub.batch_execute(&format!(
        "create subscription hi_s connection 'host=127.0.0.1 port={port} user=postgres dbname=hi_pub'
           publication hi_p with (create_slot = false, slot_name = 'hi_slot', copy_data = false);"
    ))
    .await
    .unwrap();
    let control = format!("postgres://postgres@127.0.0.1:{port}/hi_sub");
    let p = Pgtier::start_with(
        port,
        TTL,
        &[
            "--control-url",
            &control,
            "--auto-install-triggers",
            "--watch",
            "eager",
        ],
    );
    p.wait_listener("hi_sub").await;
    let c = p.connect("hi_sub").await;
    let q = "select sum(v) from t";
    warm(&p, &c, q, "1").await;
    publisher
        .batch_execute("insert into t values (2, 10)")
        .await
        .unwrap();
    until(&p, &c, q, "11").await;
    warm(&p, &c, q, "11").await;
    publisher
        .batch_execute("update t set v = v + 100 where id = 1")
        .await
        .unwrap();
    until(&p, &c, q, "111").await;
    // The subscription goes before the cluster (its worker holds the slot).
    sub.batch_execute("alter subscription hi_s disable; alter subscription hi_s set (slot_name = none); drop subscription hi_s")
        .await
        .unwrap();
}
