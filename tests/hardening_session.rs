//! Issue 12, the session's side: what a client does in its own session must
//! never make pgtier serve it (or anyone else) a result Postgres would not give
//! that session now. Each test is named after the case it covers and checks
//! that caching was active where it matters, so it cannot pass by not caching.

mod common;

use std::time::Duration;

use common::sql::{first, warm};
use common::wire::{
    bind, concat, execute, extended_query, flush, parse, query, startup, End, Reply, Until, Wire,
    STEP_TIMEOUT,
};
use common::{direct, fresh_db, run_bounded, Pgtier};

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// The first column of each DataRow, as text.
fn data_rows(reply: &Reply) -> Vec<String> {
    reply
        .msgs
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let b = &m.body;
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
            if len < 0 {
                "NULL".into()
            } else {
                String::from_utf8_lossy(&b[6..6 + len as usize]).into_owned()
            }
        })
        .collect()
}

#[tokio::test]
async fn case_01_duplicate_startup_keys_are_refused() {
    let db = fresh_db("hs_dup_keys").await;
    let d = direct(&db).await;
    d.batch_execute(
        "do $$ begin
           -- Tests of one binary run at once: create roles one at a time.
           perform pg_advisory_xact_lock(7201);
           if not exists (select from pg_roles where rolname = 'hs_alice') then
             create role hs_alice login; end if;
           if not exists (select from pg_roles where rolname = 'hs_bob') then
             create role hs_bob login; end if; end $$;
         create table secret(v text); insert into secret values ('alice only');
         grant select on secret to hs_alice;",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    // alice fills the cache: caching is active for this statement
    let alice = common::connect_str(&format!(
        "host=127.0.0.1 port={} user=hs_alice dbname={db}",
        p.port
    ))
    .await;
    warm(&p, &alice, "select v from secret", "alice only").await;

    for params in [
        vec![
            ("user", "hs_alice"),
            ("database", db.as_str()),
            ("user", "hs_bob"),
        ],
        vec![
            ("user", "hs_bob"),
            ("database", "postgres"),
            ("database", db.as_str()),
        ],
    ] {
        let mut w = Wire::open(p.port);
        w.send(&startup(&params));
        let r = w.read(Until::Closed, STEP_TIMEOUT);
        assert_eq!(r.end, End::Closed, "the connection is closed: {:?}", r.msgs);
        assert_eq!(r.tags(), "E", "a repeated startup key must be refused");
        assert_eq!(r.msgs[0].code().as_deref(), Some("08P01"));
    }
    // and a well-formed bob never sees alice's rows
    let mut bob = Wire::connect(p.port, "hs_bob", &db);
    let reply = bob.step(&query("select v from secret"), Until::Ready(1));
    assert!(
        reply.msgs.iter().any(|m| m.tag == b'E'),
        "bob may not read secret"
    );
    assert!(data_rows(&reply).is_empty());
}

/// psql with a startup TimeZone (libpq sends PGTZ as a startup parameter).
fn psql_tz(port: u16, db: &str, tz: &str, commands: &[&str]) -> Vec<String> {
    let mut cmd = common::psql(port, db);
    cmd.env("PGTZ", tz);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let (st, out, err) = run_bounded(&mut cmd, Duration::from_secs(30));
    assert!(st.success(), "psql failed: {err}");
    out.lines().map(str::to_string).collect()
}

#[tokio::test]
async fn case_02_the_newest_setting_is_what_is_keyed() {
    let db = fresh_db("hs_settings_precedence").await;
    direct(&db)
        .await
        .batch_execute(
            "create table ts(t timestamptz); insert into ts values ('2020-01-01 12:00:00+00')",
        )
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let q = "select t from ts";
    // Started in New York, switched to UTC: renders UTC, and fills the cache.
    let utc = psql_tz(
        p.port,
        &db,
        "America/New_York",
        &["SET TIME ZONE 'UTC'", q, q],
    );
    assert_eq!(
        utc,
        vec!["SET", "2020-01-01 12:00:00+00", "2020-01-01 12:00:00+00"]
    );
    // Another New York session must get New York's rendering, from the cache on
    // its second read.
    let before = p.metrics().await.hits();
    let ny = psql_tz(p.port, &db, "America/New_York", &[q, q]);
    assert_eq!(ny, vec!["2020-01-01 07:00:00-05", "2020-01-01 07:00:00-05"]);
    assert!(
        p.metrics().await.hits() > before,
        "the New York session's repeated read is a hit"
    );
    let utc2 = psql_tz(p.port, &db, "UTC", &[q]);
    assert_eq!(utc2, vec!["2020-01-01 12:00:00+00"]);
}

#[tokio::test]
async fn case_02_role_and_database_defaults_are_keyed() {
    let (db, p) = items_db("hs_role_defaults").await;
    let d = direct(&db).await;
    d.batch_execute(
        "do $$ begin
           -- Tests of one binary run at once: create roles one at a time.
           perform pg_advisory_xact_lock(7201);
           if not exists (select from pg_roles where rolname = 'hs_pathrole') then
             create role hs_pathrole login; end if; end $$;
         alter role hs_pathrole reset all;
         grant usage on schema alt to hs_pathrole;
         grant select on items, alt.items to hs_pathrole;",
    )
    .await
    .unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user=hs_pathrole dbname={db}",
        p.port
    );
    let conn = || common::connect_str(&url);
    let before = conn().await;
    warm(&p, &before, "select v from items", "public").await;
    // The DBA gives the role a search_path of its own: new sessions of the role
    // read alt.items, and must not be served what older sessions cached.
    d.batch_execute("alter role hs_pathrole set search_path = alt, public")
        .await
        .unwrap();
    let after = conn().await;
    warm(&p, &after, "select v from items", "alt").await;
    assert_eq!(first(&before, "select v from items").await, "public");
    // and per database
    d.batch_execute(&format!(
        "alter role hs_pathrole reset all; alter database {db} set extra_float_digits = -3"
    ))
    .await
    .unwrap();
    let c = conn().await;
    warm(&p, &c, "select 1.0::float8 / 3", "0.333333333333").await;
    let c2 = p.connect(&db).await;
    c2.batch_execute("set extra_float_digits = 1")
        .await
        .unwrap();
    warm(&p, &c2, "select 1.0::float8 / 3", "0.3333333333333333").await;
    d.batch_execute("alter role hs_pathrole reset all")
        .await
        .unwrap();
}

/// A database with `public.items` holding 'public', cached by pgtier, and the
/// statement warmed in a separate session so caching is shown to be active.
async fn items_db(name: &str) -> (String, Pgtier) {
    let db = fresh_db(name).await;
    direct(&db)
        .await
        .batch_execute(
            "create table items(v text); insert into items values ('public');
             create schema alt; create table alt.items(v text); insert into alt.items values ('alt');",
        )
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let warmer = p.connect(&db).await;
    warm(&p, &warmer, "select v from items", "public").await;
    (db, p)
}

/// After `setup` in one session, its reads of `items` match Postgres, and a
/// fresh session is still served 'public' from the cache.
async fn check_private_session(p: &Pgtier, db: &str, setup: &str, want_private: &str) {
    let c = p.connect(db).await;
    c.batch_execute(setup).await.unwrap();
    for _ in 0..3 {
        assert_eq!(first(&c, "select v from items").await, want_private);
    }
    // Another session is served 'public', from the cache (DDL in the setup may
    // have invalidated the entry: warm waits, bounded, for it to be cached again),
    // so the private session's rows never reached the cache.
    let other = p.connect(db).await;
    warm(p, &other, "select v from items", "public").await;
}

#[tokio::test]
async fn case_09_temporary_tables_without_the_temp_keyword() {
    let (db, p) = items_db("hs_pg_temp").await;
    check_private_session(
        &p,
        &db,
        "create table pg_temp.items(v text); insert into pg_temp.items values ('temp')",
        "temp",
    )
    .await;
    check_private_session(
        &p,
        &db,
        "do $$ begin create temp table items(v text); insert into items values ('temp-do'); end $$",
        "temp-do",
    )
    .await;
    let d = direct(&db).await;
    d.batch_execute(
        "create or replace function make_temp() returns void language plpgsql as $$
           begin create temp table items(v text); insert into items values ('temp-fn'); end $$",
    )
    .await
    .unwrap();
    check_private_session(&p, &db, "select make_temp()", "temp-fn").await;
    let m = p.metrics().await;
    assert!(
        m.bypasses("temporary_objects") + m.bypasses("do_block") + m.bypasses("function_call")
            > 0.0
    );
}

#[tokio::test]
async fn case_10_settings_changed_in_do_blocks_or_functions() {
    let (db, p) = items_db("hs_do_settings").await;
    check_private_session(
        &p,
        &db,
        "do $$ begin perform set_config('search_path', 'alt, public', false); end $$",
        "alt",
    )
    .await;
    direct(&db)
        .await
        .batch_execute(
            "create or replace function to_alt() returns int language plpgsql as $$
               begin perform set_config('search_path', 'alt, public', false); return 1; end $$",
        )
        .await
        .unwrap();
    check_private_session(&p, &db, "select to_alt()", "alt").await;
    // a procedure
    direct(&db)
        .await
        .batch_execute(
            "create or replace procedure go_alt() language plpgsql as $$
               begin perform set_config('search_path', 'alt, public', false); end $$",
        )
        .await
        .unwrap();
    check_private_session(&p, &db, "call go_alt()", "alt").await;
    assert!(p.metrics().await.bypasses("do_block") > 0.0);
}

#[tokio::test]
async fn case_11_flush_does_not_end_the_implicit_transaction() {
    let db = fresh_db("hs_flush").await;
    let d = direct(&db).await;
    d.batch_execute("create table f(id int primary key, v int); insert into f values (1, 1)")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    let q = "select v from f where id = 1";
    // The extended-protocol form of the read is cached.
    let mut w = Wire::connect(p.port, "postgres", &db);
    let read = extended_query(q, &[]);
    for _ in 0..2 {
        assert_eq!(data_rows(&w.step(&read, Until::Ready(1))), vec!["1"]);
    }
    let before = p.metrics().await.hits();
    assert_eq!(data_rows(&w.step(&read, Until::Ready(1))), vec!["1"]);
    assert!(p.metrics().await.hits() > before, "the read is cached");

    // UPDATE + Flush: the implicit transaction is still open, so the read that
    // follows before Sync must see the uncommitted update.
    let update = concat(&[
        parse("", "update f set v = 2 where id = 1", &[]),
        bind("", "", &[]),
        execute("", 0),
        flush(),
    ]);
    let r = w.step(&update, Until::Tag(b'C'));
    assert_eq!(
        r.end,
        End::Ready,
        "replies to the flushed update: {:?}",
        r.msgs
    );
    let reply = w.step(&read, Until::Ready(1));
    assert_eq!(
        data_rows(&reply),
        vec!["2"],
        "the read sees its own transaction's write"
    );
    assert_eq!(
        reply.msgs.last().map(|m| m.body.clone()),
        Some(b"I".to_vec())
    );
    assert_eq!(first(&c, q).await, "2");
}

async fn row_count(c: &tokio_postgres::Client, q: &str) -> usize {
    c.simple_query(q)
        .await
        .unwrap()
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count()
}

#[tokio::test]
async fn case_13_parser_settings_pgtier_cannot_follow() {
    let db = fresh_db("hs_scs").await;
    let d = direct(&db).await;
    d.batch_execute("create table secret(v text); insert into secret values ('s1')")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    // caching is active for reads of secret
    let plain = p.connect(&db).await;
    warm(&p, &plain, "select count(*) from secret", "1").await;

    let c = p.connect(&db).await;
    c.batch_execute("set standard_conforming_strings = off")
        .await
        .unwrap();
    // With standard_conforming_strings off, Postgres reads `secret` here (a row
    // per row of secret), while a standard-conforming parse sees two string
    // literals and no table.
    let q = r"SELECT 'a\', ' FROM secret --'";
    assert_eq!(row_count(&c, q).await, 1);
    assert_eq!(row_count(&c, q).await, 1);
    d.batch_execute("insert into secret values ('s2')")
        .await
        .unwrap();
    assert_eq!(
        row_count(&c, q).await,
        2,
        "no stale result for a misparsed statement"
    );
    // Back on: still nothing cached in this session (what it ran before may have
    // been read differently by pgtier and by the server).
    c.batch_execute("set standard_conforming_strings = on")
        .await
        .unwrap();
    let before = p.metrics().await.hits();
    for _ in 0..3 {
        assert_eq!(first(&c, "select count(*) from secret").await, "2");
    }
    assert_eq!(p.metrics().await.hits(), before);
    assert!(p.metrics().await.bypasses("standard_conforming_strings") > 0.0);
}

#[tokio::test]
async fn case_15_a_read_that_calls_a_writing_function_is_fenced() {
    let db = fresh_db("hs_write_fn").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table w(id serial, at timestamptz);
         create function write_fn() returns int language sql as
           'insert into w(at) values (now()) returning id';",
    )
    .await
    .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    warm(&p, &c, "select count(*) from w", "0").await;
    let fences = |m: &common::Metrics| {
        m.get("pgtier_fences_total", &[("kind", "probe")])
            + m.get("pgtier_fences_total", &[("kind", "notify")])
    };
    let before = fences(&p.metrics().await);
    let c2 = p.connect(&db).await;
    for i in 1..=20 {
        c2.simple_query("select now(), write_fn()").await.unwrap();
        assert_eq!(first(&c, "select count(*) from w").await, i.to_string());
    }
    assert!(
        fences(&p.metrics().await) - before >= 20.0,
        "a read calling a writing function is followed by a fence"
    );
}

#[tokio::test]
async fn case_16_time_words_built_at_run_time() {
    let db = fresh_db("hs_time_words").await;
    let d = direct(&db).await;
    d.batch_execute("create table words(w text); insert into words values ('now')")
        .await
        .unwrap();
    let p = Pgtier::cached(&db, TTL, &[]).await;
    let c = p.connect(&db).await;
    // caching is active for reads of this table
    warm(&p, &c, "select count(*) from words", "1").await;
    // Each of these reads the clock when it runs: no two answers are equal.
    for q in [
        "select (('n'||'ow')::timestamptz)::text",
        "select w::timestamptz::text from words",
        "select cast(w as timestamp)::text from words",
        "select timestamptz(w)::text from words",
    ] {
        let before = p.metrics().await.hits();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let v = first(&c, q).await;
            assert!(
                seen.insert(v.clone()),
                "{q} answered {v} twice: served from a cache"
            );
        }
        assert_eq!(p.metrics().await.hits(), before, "{q} must not be cached");
    }
    assert!(p.metrics().await.bypasses("time_cast") > 0.0);
}
