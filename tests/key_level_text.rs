//! Key-level invalidation of text keys (issue 14) end to end, on the real
//! server: `text`/`varchar` columns read by key with a binary or text-format
//! parameter or a literal (plain, `E''`, `U&''`), with unicode, quotes,
//! backslashes and the empty string, stay cached across writes to other keys
//! and are never served stale after a write to their own (update, a key moved
//! in or out, an insert). Columns under a nondeterministic collation, `char(n)`
//! columns, and sessions whose client encoding is not UTF-8 stay table-level,
//! counted with their reason.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::wire::{extended_query, query, Until, Wire};
use common::{direct, fresh_db, pgtier_bin, run_bounded, Pgtier};
use tokio_postgres::{Client, SimpleQueryMessage};

const READ: &str = "select v from users where name = $1";

/// Keys with every character a spelling must get right.
const NAMES: [&str; 10] = [
    "alice",
    "",
    "O'Brien",
    "back\\slash",
    "quo\"te",
    "é€😀",
    "tab\there",
    " spaced ",
    "NULL",
    "a,b{}",
];

async fn read(c: &Client, name: &str) -> Vec<String> {
    c.query(READ, &[&name])
        .await
        .unwrap_or_else(|e| panic!("{name:?}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

async fn simple(c: &Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        })
        .collect()
}

/// `sql` with one text-format parameter over the raw wire: the first column
/// of each DataRow (an error fails the test).
fn wire_rows(w: &mut Wire, sql: &str, param: &[u8]) -> Vec<String> {
    let reply = w.step(&extended_query(sql, &[Some(param)]), Until::Ready(1));
    assert!(
        reply.msgs.iter().all(|m| m.tag != b'E'),
        "{sql}: {:?}",
        reply.msgs
    );
    reply
        .msgs
        .iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let len = i32::from_be_bytes([m.body[2], m.body[3], m.body[4], m.body[5]]);
            String::from_utf8_lossy(&m.body[6..6 + len as usize]).into_owned()
        })
        .collect()
}

async fn hit<F: std::future::Future<Output = Vec<String>>>(
    p: &Pgtier,
    read: impl FnOnce() -> F,
) -> (bool, Vec<String>) {
    let before = p.metrics().await.hits();
    let got = read().await;
    (p.metrics().await.hits() > before, got)
}

/// Poll (bounded) until `read` gives `want`: a write made directly to
/// Postgres reaches pgtier through its notification.
async fn eventually<F: std::future::Future<Output = Vec<String>>>(
    what: &str,
    read: impl Fn() -> F,
    want: &[&str],
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = read().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {got:?}, want {want:?} (a stale cached read)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `users` (varchar keys: NAMES and 'zed'), `folk` (keys under a
/// case-insensitive collation), `codes` (char(3) keys); pgtier with key-level
/// invalidation; returns once reads of `users` by name are keyed.
async fn setup(name: &str) -> (String, Pgtier, Client, Client) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table users(name varchar(40) primary key, v text not null);
         insert into users values ('zed', 'v-zed');
         create collation ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         create table folk(name text collate ci not null, v text not null);
         insert into folk values ('alice', 'lower'), ('bob', 'b');
         create table codes(code char(3) primary key, v text not null);
         insert into codes values ('ab', 'v-ab'), ('zz', 'v-zz');",
    )
    .await
    .expect("setup");
    for n in NAMES {
        d.execute(
            "insert into users values ($1::text, 'v-' || $1::text)",
            &[&n],
        )
        .await
        .expect("insert");
    }
    let (st, hash, err) = run_bounded(
        Command::new(pgtier_bin()).args(["hash-password", "--password", "ops-pw"]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    let toml = format!(
        "[cache]\ndefault_ttl = \"10m\"\n[[admin.users]]\nname = \"ops\"\npassword = \"{}\"\n",
        hash.trim()
    );
    let p = Pgtier::cached(&db, &toml, &["--key-level"]).await;
    let c = p.connect(&db).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        read(&c, "alice").await;
        c.batch_execute("update users set v = v where name = 'zed'")
            .await
            .expect("write");
        if hit(&p, || read(&c, "alice")).await.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "text keys never survived a write to another key:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (db, p, c, d)
}

#[tokio::test]
async fn text_keys_in_every_spelling_stay_cached_and_are_never_stale() {
    let (db, p, c, d) = setup("pgtier_klt_spell").await;
    let mut w = Wire::connect(p.port, "postgres", &db);
    let literals = [
        ("select v from users where name = 'O''Brien'", "O'Brien"),
        ("select v from users where name = E'O\\'Brien'", "O'Brien"),
        (
            "select v from users where name = E'back\\\\slash'",
            "back\\slash",
        ),
        (
            "select v from users where name = E'tab\\there'",
            "tab\there",
        ),
        (
            "select v from users where name = E'\\u00e9\\xe2\\x82\\254\\U0001F600'",
            "é€😀",
        ),
        (
            "select v from users where name = U&'\\00e9\\20ac\\+01F600'",
            "é€😀",
        ),
        ("select v from users where name = ''::text", ""),
        ("select v from users where name = 'NULL'::varchar", "NULL"),
    ];
    // Cache every name in every form.
    for n in NAMES {
        assert_eq!(read(&c, n).await, [format!("v-{n}")], "{n:?}");
        assert_eq!(wire_rows(&mut w, READ, n.as_bytes()), [format!("v-{n}")]);
    }
    for (sql, n) in &literals {
        assert_eq!(simple(&c, sql).await, [format!("v-{n}")], "{sql}");
    }
    c.batch_execute("update users set v = 'z2' where name = 'zed'")
        .await
        .expect("write");
    for n in NAMES {
        assert!(hit(&p, || read(&c, n)).await.0, "{n:?} stays cached");
        let before = p.metrics().await.hits();
        wire_rows(&mut w, READ, n.as_bytes());
        assert!(p.metrics().await.hits() > before, "{n:?} (text format)");
    }
    for (sql, _) in &literals {
        assert!(hit(&p, || simple(&c, sql)).await.0, "{sql} stays cached");
    }
    // Each key written directly: every spelling of it sees the write.
    for n in NAMES {
        d.execute("update users set v = 'new-' || name where name = $1", &[&n])
            .await
            .expect("write");
        let want = format!("new-{n}");
        eventually(n, || read(&c, n), &[&want]).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while wire_rows(&mut w, READ, n.as_bytes()) != [want.as_str()] {
            assert!(Instant::now() < deadline, "{n:?} (text format) stale");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (sql, n) in &literals {
        eventually(sql, || simple(&c, sql), &[&format!("new-{n}")]).await;
    }
    // A key moved out and in, and a new key inserted.
    for n in ["alice", "moved", "fresh"] {
        read(&c, n).await;
    }
    d.execute("update users set name = 'moved' where name = 'alice'", &[])
        .await
        .expect("move");
    eventually("moved", || read(&c, "moved"), &["new-alice"]).await;
    eventually("alice", || read(&c, "alice"), &[]).await;
    d.execute("insert into users values ('fresh', 'f')", &[])
        .await
        .expect("insert");
    eventually("fresh", || read(&c, "fresh"), &["f"]).await;

    // A text array (`= ANY($1)`, binary text[]), keyed by its elements.
    let any = "select v from users where name = any($1) order by v";
    let names = || async {
        let names: Vec<&str> = vec!["fresh", "quo\"te", "absent"];
        c.query(any, &[&names])
            .await
            .expect("any")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<String>>()
    };
    assert_eq!(names().await, ["f", "new-quo\"te"]);
    c.batch_execute("update users set v = 'z4' where name = 'zed'")
        .await
        .expect("write");
    assert!(hit(&p, names).await.0, "text array survives another key");
    d.execute("insert into users values ('absent', 'here')", &[])
        .await
        .expect("insert");
    eventually("any", names, &["f", "here", "new-quo\"te"]).await;

    // SHOW CACHES calls the shape a key lookup of `name`.
    let s = format!(
        "host=127.0.0.1 port={} user=ops password=ops-pw dbname=pgtier connect_timeout=10",
        p.port
    );
    let (ops, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls)
        .await
        .expect("admin");
    tokio::spawn(conn);
    let caches = ops.simple_query("SHOW CACHES").await.expect("show caches");
    let how: Vec<String> = caches
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) if r.get(1) == Some(READ) => r.get(10).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(how, ["key (name)"]);
}

#[tokio::test]
async fn nondeterministic_collations_char_and_other_encodings_stay_table_level() {
    let (db, p, c, d) = setup("pgtier_klt_table").await;
    let folk = "select v from folk where name = $1 order by v";
    let codes = "select v from codes where code = $1";
    let rows = |sql: &'static str, key: &'static str| {
        let c = &c;
        async move {
            c.query(sql, &[&key])
                .await
                .expect("read")
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<String>>()
        }
    };
    assert_eq!(rows(folk, "alice").await, ["lower"]);
    assert!(hit(&p, || rows(folk, "alice")).await.0, "cached per table");
    // 'ALICE' is 'alice' under the collation: a key-level read would miss it.
    d.execute("insert into folk values ('ALICE', 'upper')", &[])
        .await
        .expect("insert");
    eventually("folk", || rows(folk, "alice"), &["lower", "upper"]).await;
    c.batch_execute("update folk set v = 'b2' where name = 'bob'")
        .await
        .expect("write");
    assert!(!hit(&p, || rows(folk, "alice")).await.0, "table-level");
    // char(3) pads: 'ab' is stored as 'ab ', and compared without it.
    assert_eq!(rows(codes, "ab").await, ["v-ab"]);
    assert!(hit(&p, || rows(codes, "ab")).await.0);
    c.batch_execute("update codes set v = 'z2' where code = 'zz'")
        .await
        .expect("write");
    assert!(!hit(&p, || rows(codes, "ab")).await.0, "table-level");
    d.execute("update codes set v = 'new' where code = 'ab '", &[])
        .await
        .expect("write");
    eventually("codes", || rows(codes, "ab"), &["new"]).await;

    // A LATIN1 session: Postgres converts its bytes, so its text keys are
    // not what pgtier sees; its reads stay table-level (and correct).
    let mut w = Wire::connect(p.port, "postgres", &db);
    let set = w.step(&query("set client_encoding = 'LATIN1'"), Until::Ready(1));
    assert!(set.msgs.iter().all(|m| m.tag != b'E'), "{:?}", set.msgs);
    let latin1_e = [0xe9u8];
    d.execute("insert into users values ('é', 'v-é')", &[])
        .await
        .expect("insert");
    for _ in 0..2 {
        let got = wire_rows(&mut w, READ, &latin1_e);
        assert_eq!(got.len(), 1, "the row of 'é', read in LATIN1");
    }
    c.batch_execute("update users set v = 'z3' where name = 'zed'")
        .await
        .expect("write");
    let before = p.metrics().await.hits();
    wire_rows(&mut w, READ, &latin1_e);
    assert_eq!(p.metrics().await.hits(), before, "table-level in LATIN1");
    let m = p.metrics().await;
    for reason in ["collation", "column_type", "encoding"] {
        assert!(
            m.get("pgtier_key_fallbacks_total", &[("reason", reason)]) > 0.0,
            "{reason} counted"
        );
    }
}

/// A user-defined `=` on text that Postgres picks before pg_catalog's
/// (search_path lists its schema first) matches other spellings than the key:
/// here `name = 'alice'` also finds 'ALICE'. No read of the database is keyed.
#[tokio::test]
async fn a_user_defined_text_equality_is_not_a_key_lookup() {
    let db = fresh_db("pgtier_klt_operator").await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table users(name text primary key, v text not null);
         insert into users values ('alice', 'a'), ('zed', 'z');
         create function ci_eq(text, text) returns bool immutable language sql
           as 'select lower($1) operator(pg_catalog.=) lower($2)';
         create operator public.= (leftarg = text, rightarg = text, function = ci_eq);",
    )
    .await
    .expect("setup");
    let p = Pgtier::cached(&db, "[cache]\ndefault_ttl = \"10m\"\n", &["--key-level"]).await;
    let c = p.connect(&db).await;
    c.batch_execute("set search_path = public, pg_catalog")
        .await
        .expect("set");
    let q = "select count(*)::text from users where name = $1";
    let count = || async {
        let n: String = c.query_one(q, &[&"alice"]).await.expect("read").get(0);
        vec![n]
    };
    assert_eq!(count().await, ["1"]);
    // Keyed, the read would survive writes to 'zed' within a few rounds (a
    // registration takes one); table-level, it never does.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        count().await;
        c.batch_execute("update users set v = v where name = 'zed'")
            .await
            .expect("write");
        assert!(!hit(&p, count).await.0, "keyed under a user-defined =");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    count().await;
    d.execute("insert into users values ('ALICE', 'A')", &[])
        .await
        .expect("insert");
    eventually("user-defined =", count, &["2"]).await;
}
