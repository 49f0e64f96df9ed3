//! Key-level invalidation of joins (issue 14) end to end, on the real server:
//! `FROM a JOIN b ON .. WHERE a.id = $1` depends on the keys of `a` it asks
//! for and on all of `b`. Writes to other keys of `a` leave it cached; writes
//! to its keys (an update, a key moved in or out, an insert) and any write to
//! `b` reach it. Inner, left and USING joins with aliases are keyed; a join
//! with a view over the keyed table, or the table twice, stays table-level.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{direct, fresh_db, pgtier_bin, run_bounded, Pgtier};
use tokio_postgres::{Client, SimpleQueryMessage};

const JOIN: &str = "select a.v || ':' || b.name from a join b on b.id = a.b_id where a.id = $1";
const LEFT: &str =
    "select x.v || ':' || coalesce(b.name, '-') from a x left join b on b.id = x.b_id where x.id = $1";
const USING: &str = "select x.v from a x join b using (id) where x.id = $1";

async fn rows(c: &Client, sql: &str, id: i32) -> Vec<String> {
    c.query(sql, &[&id])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

async fn hit(p: &Pgtier, c: &Client, sql: &str, id: i32) -> bool {
    let before = p.metrics().await.hits();
    rows(c, sql, id).await;
    p.metrics().await.hits() > before
}

/// Poll (bounded) until `sql` gives `want`: a write made directly to
/// Postgres reaches pgtier through its notification.
async fn eventually(c: &Client, sql: &str, id: i32, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = rows(c, sql, id).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} ({id}): still {got:?}, want {want:?} (a stale cached read)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run `sql` until it survives a write (through pgtier) to another key of
/// `a`, bounded: it is keyed once `a`'s column set is registered.
async fn keyed(p: &Pgtier, c: &Client, sql: &str, id: i32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        rows(c, sql, id).await;
        c.batch_execute("update a set v = v where id = 10")
            .await
            .expect("write");
        if hit(p, c, sql, id).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} never survived a write to another key of a:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn verifier(password: &str) -> String {
    let (st, out, err) = run_bounded(
        Command::new(pgtier_bin()).args(["hash-password", "--password", password]),
        Duration::from_secs(30),
    );
    assert!(st.success(), "{err}");
    out.trim().to_string()
}

/// `a` (ids 1..=10, each pointing at a row of `b`; id 4 at none), `b` (ids
/// 1..=5), a view over `a`; pgtier with key-level invalidation and an admin.
async fn setup(name: &str) -> (Pgtier, Client, Client) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table b(id int primary key, name text not null);
         insert into b select g, 'b' || g from generate_series(1, 5) g;
         create table a(id int primary key, b_id int, v text not null);
         insert into a select g, 1 + g % 5, 'a' || g from generate_series(1, 10) g;
         update a set b_id = null where id = 4;
         create view va as select id, v from a;",
    )
    .await
    .expect("setup");
    let toml = format!(
        "[cache]\ndefault_ttl = \"10m\"\n[[admin.users]]\nname = \"ops\"\npassword = \"{}\"\n",
        verifier("ops-pw")
    );
    let p = Pgtier::cached(&db, &toml, &["--key-level"]).await;
    let c = p.connect(&db).await;
    (p, c, d)
}

#[tokio::test]
async fn a_join_is_keyed_on_its_fixed_table_and_table_level_on_the_other() {
    let (p, c, d) = setup("pgtier_klj_inner").await;
    keyed(&p, &c, JOIN, 1).await;
    assert_eq!(rows(&c, JOIN, 1).await, ["a1:b2"]);
    // Another key of a: still cached.
    c.batch_execute("update a set v = 'nine' where id = 9")
        .await
        .expect("write");
    assert!(hit(&p, &c, JOIN, 1).await, "a write to a.id 9 left a.id 1");
    // Any write to b reaches it, even to a row it did not join; also once
    // b's own writes report keys (b read by key elsewhere).
    c.batch_execute("update b set name = name where id = 5")
        .await
        .expect("write");
    assert!(!hit(&p, &c, JOIN, 1).await, "b is table-level");
    let by_b = "select name from b where id = $1";
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        rows(&c, by_b, 1).await;
        c.batch_execute("update b set name = name where id = 5")
            .await
            .expect("write");
        if hit(&p, &c, by_b, 1).await {
            break;
        }
        assert!(Instant::now() < deadline, "b never keyed:\n{}", p.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rows(&c, JOIN, 1).await;
    assert!(hit(&p, &c, JOIN, 1).await);
    c.batch_execute("update b set name = name where id = 5")
        .await
        .expect("write");
    assert!(!hit(&p, &c, JOIN, 1).await, "b's keyed writes reach it");
    d.execute("update b set name = 'B2' where id = 2", &[])
        .await
        .expect("write");
    eventually(&c, JOIN, 1, &["a1:B2"]).await;
    // Its own key: updated, moved in and out, inserted.
    d.execute("update a set v = 'one' where id = 1", &[])
        .await
        .expect("write");
    eventually(&c, JOIN, 1, &["one:B2"]).await;
    for id in [3, 50, 60] {
        rows(&c, JOIN, id).await;
        assert!(hit(&p, &c, JOIN, id).await, "{id} cached");
    }
    d.execute("update a set id = 50 where id = 3", &[])
        .await
        .expect("move");
    eventually(&c, JOIN, 50, &["a3:b4"]).await;
    eventually(&c, JOIN, 3, &[]).await;
    d.execute("insert into a values (60, 1, 'sixty')", &[])
        .await
        .expect("insert");
    eventually(&c, JOIN, 60, &["sixty:b1"]).await;
    // A row of b appearing for a key that had none.
    d.execute("insert into b values (100, 'hundred')", &[])
        .await
        .expect("insert b");
    d.execute("update a set b_id = 100 where id = 60", &[])
        .await
        .expect("repoint");
    eventually(&c, JOIN, 60, &["sixty:hundred"]).await;

    // SHOW CACHES names the keyed table.
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
            SimpleQueryMessage::Row(r) if r.get(1).is_some_and(|q| q.contains("join b on")) => {
                r.get(10).map(str::to_string)
            }
            _ => None,
        })
        .collect();
    assert_eq!(how, ["key (a: id)"]);
}

#[tokio::test]
async fn outer_and_using_joins_with_aliases_are_keyed_too() {
    let (p, c, d) = setup("pgtier_klj_outer").await;
    keyed(&p, &c, LEFT, 4).await;
    assert_eq!(rows(&c, LEFT, 4).await, ["a4:-"]);
    c.batch_execute("update a set v = 'eight' where id = 8")
        .await
        .expect("write");
    assert!(hit(&p, &c, LEFT, 4).await, "a.id 8 left a.id 4");
    // b gains the row a.id 4 will point at; then a.id 4 points at it.
    d.execute("insert into b values (6, 'b6')", &[])
        .await
        .expect("insert b");
    d.execute("update a set b_id = 6 where id = 4", &[])
        .await
        .expect("repoint");
    eventually(&c, LEFT, 4, &["a4:b6"]).await;
    d.execute("delete from b where id = 6", &[])
        .await
        .expect("delete b");
    eventually(&c, LEFT, 4, &["a4:-"]).await;

    keyed(&p, &c, USING, 2).await;
    assert_eq!(rows(&c, USING, 2).await, ["a2"]);
    d.execute("delete from b where id = 2", &[])
        .await
        .expect("delete b");
    eventually(&c, USING, 2, &[]).await;
    d.execute("insert into b values (2, 'again')", &[])
        .await
        .expect("insert b");
    eventually(&c, USING, 2, &["a2"]).await;
}

#[tokio::test]
async fn joins_that_read_the_table_again_stay_table_level() {
    let (p, c, d) = setup("pgtier_klj_again").await;
    keyed(&p, &c, JOIN, 1).await;
    // Every row of a, through a view: keyed on a.id 1 alone, an insert of
    // another id would be missed.
    let view = "select count(*)::text from a join va on true where a.id = $1";
    // The same table twice.
    let twice = "select count(*)::text from a join a a2 on true where a.id = $1";
    for sql in [view, twice] {
        assert_eq!(rows(&c, sql, 1).await, ["10"], "{sql}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !hit(&p, &c, sql, 1).await {
            assert!(Instant::now() < deadline, "{sql} never cached");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.batch_execute("update a set v = v where id = 9")
            .await
            .expect("write");
        assert!(!hit(&p, &c, sql, 1).await, "{sql}: table-level");
    }
    d.execute("insert into a values (70, 1, 'seventy')", &[])
        .await
        .expect("insert");
    eventually(&c, view, 1, &["11"]).await;
    eventually(&c, twice, 1, &["11"]).await;
    let m = p.metrics().await;
    assert!(m.get("pgtier_key_fallbacks_total", &[("reason", "read_again")]) > 0.0);
}
