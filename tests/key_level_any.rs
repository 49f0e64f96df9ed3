//! Key-level invalidation of `= ANY(array)` reads (issue 14) end to end, on
//! the real server: an array parameter in binary (the driver's) and text form
//! (raw wire), array literals and `ARRAY[...]`, each cached by its elements'
//! keys: a write to another key leaves it cached, a write to one of its keys
//! (an update, a key moved into it, an insert) is never served stale; arrays
//! with a NULL element or too many elements stay table-level, counted with
//! their reason; SHOW CACHES calls the shape a key lookup.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::wire::{extended_query, Until, Wire};
use common::{direct, fresh_db, pgtier_bin, run_bounded, Pgtier};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryMessage};

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

const Q: &str = "select v from kv where id = any($1) order by id";

/// The first column (text) of every row `sql` returns.
async fn rows(c: &Client, sql: &str, params: Params<'_>) -> Vec<String> {
    c.query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// `Q` with `ids` as a binary int8[] parameter (the driver's choice).
async fn any(c: &Client, ids: &[i64]) -> Vec<String> {
    let ids = ids.to_vec();
    rows(c, Q, &[&ids]).await
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

/// `Q` with a text-format parameter, over the raw wire: the first column of
/// each DataRow.
fn wire_rows(w: &mut Wire, array: &str) -> Vec<String> {
    let reply = w.step(
        &extended_query(Q, &[Some(array.as_bytes())]),
        Until::Ready(1),
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

/// Whether `read` is answered from the cache now, and what it gave.
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
            "still {got:?}, want {want:?} (a stale cached read)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// A table `kv` (int8 keys 1..=10), pgtier with key-level invalidation and an
/// admin user, a client through it and one direct; returns once `Q` is keyed
/// (survives a write to another key).
async fn setup(name: &str) -> (String, Pgtier, Client, Client) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(
        "create table kv(id int8 primary key, v text not null);
         insert into kv select g, 'v' || g from generate_series(1, 10) g;",
    )
    .await
    .expect("setup");
    let toml = format!(
        "[cache]\ndefault_ttl = \"10m\"\n[[admin.users]]\nname = \"ops\"\npassword = \"{}\"\n",
        verifier("ops-pw")
    );
    let p = Pgtier::cached(&db, &toml, &["--key-level"]).await;
    let c = p.connect(&db).await;
    let ids: Vec<i64> = vec![1, 2];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        any(&c, &ids).await;
        c.batch_execute("update kv set v = v where id = 10")
            .await
            .expect("write");
        if hit(&p, || any(&c, &ids)).await.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "= ANY($1) never survived a write to another key:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (db, p, c, d)
}

#[tokio::test]
async fn binary_array_parameters_are_keyed_by_their_elements() {
    let (_db, p, c, d) = setup("pgtier_kla_any_bin").await;
    let ids: Vec<i64> = vec![1, 2];
    // Other keys written, through pgtier (fenced) and directly.
    c.batch_execute("update kv set v = 'five' where id = 5")
        .await
        .expect("write");
    assert_eq!(
        hit(&p, || any(&c, &ids)).await,
        (true, vec!["v1".to_string(), "v2".into()])
    );
    // One of its keys written: never stale.
    c.batch_execute("update kv set v = 'two' where id = 2")
        .await
        .expect("write");
    assert_eq!(any(&c, &ids).await, ["v1", "two"]);
    d.execute("update kv set v = 'one' where id = 1", &[])
        .await
        .expect("write");
    eventually(|| any(&c, &ids), &["one", "two"]).await;
    // A key moved into the array, and a new row inserted with one.
    let (moved, inserted): (Vec<i64>, Vec<i64>) = (vec![3, 50], vec![60, 61]);
    for ids in [&moved, &inserted] {
        any(&c, ids).await;
        assert!(hit(&p, || any(&c, ids)).await.0, "{ids:?} cached");
    }
    d.execute("update kv set id = 50 where id = 9", &[])
        .await
        .expect("move");
    eventually(|| any(&c, &moved), &["v3", "v9"]).await;
    d.execute("insert into kv values (61, 'sixty-one')", &[])
        .await
        .expect("insert");
    eventually(|| any(&c, &inserted), &["sixty-one"]).await;
    // A key moved out of the array.
    d.execute("update kv set id = 70 where id = 3", &[])
        .await
        .expect("move");
    eventually(|| any(&c, &moved), &["v9"]).await;
    let m = p.metrics().await;
    assert!(m.get("pgtier_invalidations_total", &[("level", "key")]) > 0.0);
}

#[tokio::test]
async fn text_arrays_literals_and_array_constructors_are_keyed_too() {
    let (db, p, c, d) = setup("pgtier_kla_any_text").await;
    let mut w = Wire::connect(p.port, "postgres", &db);
    // Two spellings of one array: two entries, the same keys.
    let spellings = ["{4,7}", "{ 4 ,\"007\"}"];
    for s in spellings {
        assert_eq!(wire_rows(&mut w, s), ["v4", "v7"]);
    }
    c.batch_execute("update kv set v = 'six' where id = 6")
        .await
        .expect("write");
    for s in spellings {
        let before = p.metrics().await.hits();
        assert_eq!(wire_rows(&mut w, s), ["v4", "v7"]);
        assert!(
            p.metrics().await.hits() > before,
            "{s}: a text-format array survives a write to another key"
        );
    }
    d.execute("update kv set v = 'seven' where id = 7", &[])
        .await
        .expect("write");
    for s in spellings {
        let deadline = Instant::now() + Duration::from_secs(5);
        while wire_rows(&mut w, s) != ["v4", "seven"] {
            assert!(Instant::now() < deadline, "{s}: stayed stale");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (sql, want) in [
        ("select v from kv where id = any('{2,8}') order by id", "v8"),
        (
            "select v from kv where id = any(array[2, '8']) order by id",
            "v8",
        ),
        (
            "select v from kv where id = any('{2,8}'::int4[]) order by id",
            "v8",
        ),
    ] {
        simple(&c, sql).await;
        c.batch_execute("update kv set v = v where id = 5")
            .await
            .expect("write");
        let (cached, got) = hit(&p, || simple(&c, sql)).await;
        assert!(cached, "{sql}: survives a write to another key");
        assert_eq!(got, ["v2", want], "{sql}");
    }
    d.execute("update kv set v = 'eight' where id = 8", &[])
        .await
        .expect("write");
    for sql in [
        "select v from kv where id = any('{2,8}') order by id",
        "select v from kv where id = any(array[2, '8']) order by id",
    ] {
        eventually(|| simple(&c, sql), &["v2", "eight"]).await;
    }
}

#[tokio::test]
async fn null_elements_and_long_arrays_stay_table_level() {
    let (_db, p, c, _d) = setup("pgtier_kla_any_null").await;
    let long: Vec<i64> = (1..=65).collect();
    let null = "select v from kv where id = any('{1,NULL}') order by id";
    for _ in 0..2 {
        any(&c, &long).await;
        simple(&c, null).await;
    }
    c.batch_execute("update kv set v = 'five' where id = 5")
        .await
        .expect("write");
    let (cached, got) = hit(&p, || any(&c, &long)).await;
    assert!(!cached, "65 keys: per table, so the write reached it");
    assert!(got.contains(&"five".to_string()));
    assert!(!hit(&p, || simple(&c, null)).await.0, "NULL element");
    let m = p.metrics().await;
    for reason in ["too_many", "null"] {
        assert!(
            m.get("pgtier_key_fallbacks_total", &[("reason", reason)]) > 0.0,
            "{reason} counted"
        );
    }
    // Table-level still means correct, and cached until a write.
    assert!(hit(&p, || simple(&c, null)).await.0);

    // SHOW CACHES calls the shape (constants and parameters alike) a key
    // lookup of `id`.
    let s = format!(
        "host=127.0.0.1 port={} user=ops password=ops-pw dbname=pgtier connect_timeout=10",
        p.port
    );
    let (ops, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls)
        .await
        .expect("admin");
    tokio::spawn(conn);
    let caches = ops.simple_query("SHOW CACHES").await.expect("show caches");
    let shapes: Vec<(String, String)> = caches
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get(1).unwrap_or("").to_string(),
                r.get(10).unwrap_or("").to_string(),
            )),
            _ => None,
        })
        .collect();
    let (_, how) = shapes
        .iter()
        .find(|(q, _)| q.contains("= any("))
        .unwrap_or_else(|| panic!("no SHOW CACHES row: {shapes:?}"));
    assert_eq!(how, "key (id)");
}
