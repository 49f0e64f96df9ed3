//! Issue 12, the session's side: what a client does in its own session must
//! never make pgtier serve it (or anyone else) a result Postgres would not give
//! that session now. Each test is named after the case it covers and checks
//! that caching was active where it matters, so it cannot pass by not caching.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::sql::{first, warm};
use common::{direct, fresh_db, run_bounded, Pgtier};

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

/// A raw protocol connection, for what drivers never send.
struct Raw(TcpStream);

impl Raw {
    fn open(port: u16, params: &[(&str, &str)]) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        let mut raw = Raw(s);
        raw.0.write_all(&pkt).unwrap();
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Next message (tag, body), or None at EOF.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.0.read_exact(&mut head).ok()?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.0.read_exact(&mut body).ok()?;
        Some((head[0], body))
    }

    /// Messages up to and including the next ReadyForQuery (or EOF).
    fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(m) = self.next() {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse(sql: &str) -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(sql));
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

fn bind_execute() -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(""));
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // no formats, no params, no result formats
    let mut out = msg(b'B', &b);
    let mut e = cstr("");
    e.extend_from_slice(&0i32.to_be_bytes());
    out.extend(msg(b'E', &e));
    out
}

fn data_rows(msgs: &[(u8, Vec<u8>)]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| {
            // one column: count (2) + length (4) + value
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]);
            if len < 0 {
                "NULL".into()
            } else {
                String::from_utf8_lossy(&b[6..6 + len as usize]).into_owned()
            }
        })
        .collect()
}

fn sqlstate(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"C"))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn case_01_duplicate_startup_keys_are_refused() {
    let db = fresh_db("hs_dup_keys").await;
    let d = direct(&db).await;
    d.batch_execute(
        "do $$ begin
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
        let mut raw = Raw::open(p.port, &params);
        let first = raw.next().expect("an answer to the startup packet");
        assert_eq!(first.0, b'E', "a repeated startup key must be refused");
        assert_eq!(sqlstate(&first.1), "08P01");
        assert!(
            raw.next().is_none(),
            "the connection is closed after the error"
        );
    }
    // and a well-formed bob never sees alice's rows
    let mut bob = Raw::open(p.port, &[("user", "hs_bob"), ("database", db.as_str())]);
    let hello = bob.until_ready();
    assert_eq!(hello.last().map(|m| m.0), Some(b'Z'));
    bob.send(&msg(b'Q', &cstr("select v from secret")));
    let reply = bob.until_ready();
    assert!(reply.iter().any(|m| m.0 == b'E'), "bob may not read secret");
    assert!(data_rows(&reply).is_empty());
}

/// psql with a startup TimeZone (libpq sends PGTZ as a startup parameter).
fn psql_tz(port: u16, db: &str, tz: &str, commands: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("psql");
    cmd.env("PGTZ", tz).args([
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        db,
    ]);
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
    let other = p.connect(db).await;
    let before = p.metrics().await.hits();
    assert_eq!(first(&other, "select v from items").await, "public");
    assert_eq!(
        p.metrics().await.hits(),
        before + 1.0,
        "a fresh session is still served from the cache"
    );
    // and the private session's rows never reached the cache
    for _ in 0..3 {
        assert_eq!(first(&other, "select v from items").await, "public");
    }
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
    let mut raw = Raw::open(p.port, &[("user", "postgres"), ("database", db.as_str())]);
    raw.until_ready();
    let read = [parse(q), bind_execute(), msg(b'S', &[])].concat();
    for _ in 0..2 {
        raw.send(&read);
        assert_eq!(data_rows(&raw.until_ready()), vec!["1"]);
    }
    let before = p.metrics().await.hits();
    raw.send(&read);
    assert_eq!(data_rows(&raw.until_ready()), vec!["1"]);
    assert!(p.metrics().await.hits() > before, "the read is cached");

    // UPDATE + Flush: the implicit transaction is still open, so the read that
    // follows before Sync must see the uncommitted update.
    raw.send(
        &[
            parse("update f set v = 2 where id = 1"),
            bind_execute(),
            msg(b'H', &[]),
        ]
        .concat(),
    );
    let mut got = Vec::new();
    while got.iter().all(|m: &(u8, Vec<u8>)| m.0 != b'C') {
        got.push(raw.next().expect("replies to the flushed update"));
    }
    raw.send(&read);
    let reply = raw.until_ready();
    assert_eq!(
        data_rows(&reply),
        vec!["2"],
        "the read sees its own transaction's write"
    );
    assert_eq!(reply.last().map(|m| m.1.clone()), Some(b"I".to_vec()));
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
    // A fence is a notification on pgtier's channel; watch for it directly.
    let (listener, mut conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port=5432 user=postgres dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        use futures_util::StreamExt;
        while let Some(Ok(m)) = stream.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    listener
        .batch_execute("listen pgtier_invalidate")
        .await
        .unwrap();

    let c2 = p.connect(&db).await;
    for i in 1..=20 {
        c2.simple_query("select now(), write_fn()").await.unwrap();
        assert_eq!(first(&c, "select count(*) from w").await, i.to_string());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut fences = 0;
    while fences == 0 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) if p.starts_with('f') => fences += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert!(
        fences > 0,
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
