//! Key-level invalidation (issue 14) under attack, on the real server: reads
//! and writes shaped so that a read cached by key would miss the write that
//! changes its result (a view in front of the table, a parameter that takes
//! its type from elsewhere in the statement, a registry row deleted by hand, a
//! user-defined `=`), and write paths other than plain INSERT/UPDATE/DELETE
//! (ON CONFLICT, MERGE, COPY, a foreign key's cascade). Each must reach the
//! read as it would with key-level invalidation off.

mod common;

use std::time::{Duration, Instant};

use common::{direct, fresh_db, Pgtier};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

const TTL: &str = "[cache]\ndefault_ttl = \"10m\"\n";

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The first column (text) of every row `sql` returns.
async fn rows(c: &Client, sql: &str, params: Params<'_>) -> Vec<String> {
    c.query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// Whether running `sql` now is answered from the cache.
async fn hit(p: &Pgtier, c: &Client, sql: &str, params: Params<'_>) -> bool {
    let before = p.metrics().await.hits();
    rows(c, sql, params).await;
    p.metrics().await.hits() > before
}

/// Run `sql` until it is cached (bounded): reads are not cached while their
/// table's watch is being set up.
async fn cached(p: &Pgtier, c: &Client, sql: &str, params: Params<'_>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hit(p, c, sql, params).await {
        assert!(
            Instant::now() < deadline,
            "{sql} is never cached:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `read` becomes cached by key within `within`: it survives `write`,
/// a write (through pgtier) to rows it does not read.
async fn try_keyed(
    p: &Pgtier,
    c: &Client,
    read: &str,
    params: Params<'_>,
    write: &str,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        rows(c, read, params).await;
        c.batch_execute(write).await.expect("write");
        if hit(p, c, read, params).await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait (bounded) until `read` is cached by key.
async fn keyed(p: &Pgtier, c: &Client, read: &str, params: Params<'_>, write: &str) {
    let within = Duration::from_secs(15);
    assert!(
        try_keyed(p, c, read, params, write, within).await,
        "{read} never survived {write}:\n{}",
        p.logs()
    );
}

/// Poll (bounded) until `sql` returns `want`: a write made directly to
/// Postgres reaches pgtier through its notification.
async fn eventually(c: &Client, sql: &str, params: Params<'_>, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = rows(c, sql, params).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: still {got:?}, want {want:?} (a stale cached read)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A database with `ddl` run in it, pgtier with key-level invalidation in
/// front of it, a client through pgtier and one direct.
async fn setup(name: &str, ddl: &str) -> (Pgtier, Client, Client) {
    let db = fresh_db(name).await;
    let d = direct(&db).await;
    d.batch_execute(ddl).await.expect("setup");
    let p = Pgtier::cached(&db, TTL, &["--key-level"]).await;
    let c = p.connect(&db).await;
    (p, c, d)
}

const KV: &str = "select v from kv where id = $1";

/// A view's column named like a column of its one table is not that column:
/// `per_owner.id` is `kv.owner`, and its count changes with writes to any id.
#[tokio::test]
async fn a_view_over_the_table_is_not_read_by_the_tables_key() {
    let (p, c, d) = setup(
        "pgtier_kla_view",
        "create table kv(id int primary key, owner int not null, v text not null);
         insert into kv select g, g % 3, 'v' || g from generate_series(1, 30) g;
         create view per_owner as select owner as id, count(*)::text as n from kv group by owner;",
    )
    .await;
    keyed(&p, &c, KV, &[&1i32], "update kv set v = v where id = 30").await;
    let q = "select n from per_owner where id = $1";
    assert_eq!(rows(&c, q, &[&1i32]).await, ["10"]);
    cached(&p, &c, q, &[&1i32]).await;
    d.execute("insert into kv values (100, 1, 'x')", &[])
        .await
        .expect("insert");
    eventually(&c, q, &[&1i32], &["11"]).await;
}

/// `$1` used twice takes its type from the first use (the select list here):
/// its binary value is a float8, whose 8 bytes read as an int8 are another
/// number than the one Postgres compares `id` with.
#[tokio::test]
async fn a_parameter_typed_elsewhere_in_the_statement_is_not_a_key() {
    let (p, c, d) = setup(
        "pgtier_kla_param_type",
        "create table kb(id int8 primary key, v text not null);
         insert into kb select g, 'v' || g from generate_series(1, 10) g;",
    )
    .await;
    keyed(
        &p,
        &c,
        "select v from kb where id = $1",
        &[&1i64],
        "update kb set v = v where id = 10",
    )
    .await;
    let q = "select v, $1::float8 as f from kb where id = $1";
    assert_eq!(rows(&c, q, &[&1.0f64]).await, ["v1"]);
    cached(&p, &c, q, &[&1.0f64]).await;
    d.execute("update kb set v = 'one' where id = 1", &[])
        .await
        .expect("update");
    eventually(&c, q, &[&1.0f64], &["one"]).await;
}

/// The registry (`pgtier.keys`) is not the only record of which column sets
/// readers use: with its rows deleted, registering another column set must not
/// stop the triggers reporting the ones already in use.
#[tokio::test]
async fn registering_a_column_set_keeps_those_the_triggers_report() {
    let (p, c, d) = setup(
        "pgtier_kla_registry",
        "create table kv(id int primary key, other int not null unique, v text not null);
         insert into kv select g, g + 100, 'v' || g from generate_series(1, 10) g;",
    )
    .await;
    keyed(&p, &c, KV, &[&1i32], "update kv set v = v where id = 10").await;
    d.execute("delete from pgtier.keys", &[])
        .await
        .expect("delete registry rows");
    keyed(
        &p,
        &c,
        "select v from kv where other = $1",
        &[&101i32],
        "update kv set v = v where id = 10",
    )
    .await;
    cached(&p, &c, KV, &[&1i32]).await;
    d.execute("update kv set v = 'one' where id = 1", &[])
        .await
        .expect("update");
    eventually(&c, KV, &[&1i32], &["one"]).await;
}

/// An immutable user-defined `=` for integers that Postgres picks before
/// pg_catalog's (search_path lists its schema first) matches other values than
/// the key: here `id = 1` also finds the row with id -1.
#[tokio::test]
async fn a_user_defined_equality_is_not_a_key_lookup() {
    let (p, c, d) = setup(
        "pgtier_kla_operator",
        "create table kv(id int primary key, v text not null);
         insert into kv select g, 'v' || g from generate_series(1, 10) g;
         create function abs_eq(int, int) returns bool immutable language sql
           as 'select abs($1) operator(pg_catalog.=) abs($2)';
         create operator public.= (leftarg = int, rightarg = int, function = abs_eq);",
    )
    .await;
    // Reads of kv by id would be keyed by now, were they keyed at all.
    let write = "update kv set v = v where id = 10";
    try_keyed(&p, &c, KV, &[&1i32], write, Duration::from_secs(3)).await;
    c.batch_execute("set search_path = public, pg_catalog")
        .await
        .expect("set");
    let q = "select count(*)::text from kv where id = $1";
    assert_eq!(rows(&c, q, &[&1i32]).await, ["1"]);
    cached(&p, &c, q, &[&1i32]).await;
    d.execute("insert into kv values (-1, 'minus one')", &[])
        .await
        .expect("insert");
    eventually(&c, q, &[&1i32], &["2"]).await;
}

/// Writes other than a plain INSERT, UPDATE or DELETE fire the statement
/// triggers too, and report their keys.
#[tokio::test]
async fn upserts_merge_copy_and_cascades_report_their_keys() {
    let (p, c, d) = setup(
        "pgtier_kla_paths",
        "create table kv(id int primary key, v text not null);
         insert into kv select g, 'v' || g from generate_series(1, 10) g;
         create table child(id int primary key,
                            parent int not null references kv(id) on update cascade on delete cascade);
         insert into child select g, 1 + g % 2 from generate_series(1, 10) g;",
    )
    .await;
    keyed(&p, &c, KV, &[&1i32], "update kv set v = v where id = 10").await;
    for id in [2i32, 3, 70] {
        rows(&c, KV, &[&id]).await;
        cached(&p, &c, KV, &[&id]).await;
    }
    d.execute(
        "insert into kv values (2, 'upserted') on conflict (id) do update set v = excluded.v",
        &[],
    )
    .await
    .expect("upsert");
    eventually(&c, KV, &[&2i32], &["upserted"]).await;
    d.execute(
        "merge into kv using (values (3, 'merged')) s(id, v) on kv.id = s.id
         when matched then update set v = s.v",
        &[],
    )
    .await
    .expect("merge");
    eventually(&c, KV, &[&3i32], &["merged"]).await;
    {
        use futures_util::SinkExt;
        let sink = d.copy_in("copy kv (id, v) from stdin").await.expect("copy");
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"70\tseventy\n"))
            .await
            .expect("copy data");
        sink.finish().await.expect("copy done");
    }
    eventually(&c, KV, &[&70i32], &["seventy"]).await;

    // Rows moved by a foreign key's cascade.
    let by_parent = "select count(*)::text from child where parent = $1";
    keyed(
        &p,
        &c,
        by_parent,
        &[&1i32],
        "update child set id = id where parent = 2",
    )
    .await;
    d.execute("update kv set id = 50 where id = 1", &[])
        .await
        .expect("cascade");
    eventually(&c, by_parent, &[&1i32], &["0"]).await;
}
