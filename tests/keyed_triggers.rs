//! Key-reporting triggers (issue 14, the write side) against the real
//! Postgres: after `keyed::register`, writes to a watched table announce the
//! values of the registered column sets in the rows they change (`k`), large
//! statements and TRUNCATE announce the whole table (`w`), and tables nobody
//! caches announce nothing. Payloads are read by a second connection that
//! LISTENs on the channel; every wait is bounded.

mod common;

use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use common::keyed::{register, setup, table_level, table_oid, Listener, CHANNEL, PATIENCE};
use common::{direct, PG_HOST, PG_PORT};
use pgtier::invalidation::catalog::Catalog;
use pgtier::invalidation::keyed;
use pgtier::invalidation::triggers;

#[tokio::test]
async fn inserts_updates_and_deletes_report_their_keys() {
    let db = "pgtier_keyed_trg_basic";
    let c = setup(
        db,
        "CREATE TABLE acct (id int8 PRIMARY KEY, owner text, balance int)",
        &["acct"],
    )
    .await;
    assert!(register(&c, "acct", &["id"]).await);
    let mut l = Listener::new(db).await;

    c.batch_execute("INSERT INTO acct VALUES (1, 'ann', 10), (2, 'bob', 20)")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "acct", [[["id"], [["1"], ["2"]]]]])
    );
    l.nothing_before_marker(&c).await;

    // A key that moves is reported under its old and its new value.
    c.batch_execute("UPDATE acct SET id = 20 WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "acct", [[["id"], [["2"], ["20"]]]]])
    );
    // A key that stays is reported once.
    c.batch_execute("UPDATE acct SET balance = balance + 1")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "acct", [[["id"], [["1"], ["20"]]]]])
    );
    c.batch_execute("DELETE FROM acct WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "acct", [[["id"], [["1"]]]]])
    );
    // A statement that changes no row announces nothing.
    c.batch_execute("DELETE FROM acct WHERE id = 12345; UPDATE acct SET balance = 0 WHERE false")
        .await
        .unwrap();
    l.nothing_before_marker(&c).await;
    // INSERT ... ON CONFLICT DO UPDATE: the statement's UPDATE reports the row.
    c.batch_execute(
        "INSERT INTO acct VALUES (20, 'bob', 0), (30, 'cy', 0)
         ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
    )
    .await
    .unwrap();
    let mut got = vec![l.next_keys().await, l.next_keys().await];
    got.sort_by_key(|v| v.to_string());
    assert_eq!(
        got,
        vec![
            json!(["public", "acct", [[["id"], [["20"]]]]]),
            json!(["public", "acct", [[["id"], [["30"]]]]]),
        ]
    );
    l.nothing_before_marker(&c).await;

    // In replica mode (pg_restore, migration tools) the row trigger still
    // announces the table; the keyed triggers, ENABLE ALWAYS, report the keys
    // too. (Logical replication's apply worker fires row triggers only.)
    c.batch_execute(
        "SET session_replication_role = replica; INSERT INTO acct VALUES (40, 'dee', 0);
         RESET session_replication_role",
    )
    .await
    .unwrap();
    let mut got = vec![l.next().await, l.next().await];
    got.sort();
    assert_eq!(
        got,
        vec![
            r#"k["public","acct",[[["id"],[["40"]]]]]"#.to_string(),
            table_level("public", "acct")
        ]
    );
    l.nothing_before_marker(&c).await;
    drop(l.client);
}

#[tokio::test]
async fn composite_keys_and_several_column_sets() {
    let db = "pgtier_keyed_trg_composite";
    let c = setup(
        db,
        "CREATE SCHEMA shop;
         CREATE TABLE shop.\"Line\" (order_id int4, line_no int2, sku text, note text)",
        &["shop.\"Line\""],
    )
    .await;
    assert!(register(&c, "shop.\"Line\"", &["order_id", "line_no"]).await);
    assert!(register(&c, "shop.\"Line\"", &["sku"]).await);
    let mut l = Listener::new(db).await;

    // Tuples with a NULL are left out; duplicate tuples are reported once.
    c.batch_execute(
        "INSERT INTO shop.\"Line\" VALUES (7, 1, 'a-1', 'x'), (7, 2, 'a-1', 'y'), (8, NULL, NULL, 'z')",
    )
    .await
    .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!([
            "shop",
            "Line",
            [
                [["order_id", "line_no"], [["7", "1"], ["7", "2"]]],
                [["sku"], [["a-1"]]]
            ]
        ])
    );
    // Moving one column of a composite key reports both tuples.
    c.batch_execute("UPDATE shop.\"Line\" SET line_no = 3 WHERE order_id = 7 AND line_no = 2")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!([
            "shop",
            "Line",
            [
                [["order_id", "line_no"], [["7", "2"], ["7", "3"]]],
                [["sku"], [["a-1"]]]
            ]
        ])
    );
    // A statement whose rows have no complete tuple in a set leaves the set out.
    c.batch_execute("UPDATE shop.\"Line\" SET note = 'w' WHERE order_id = 8")
        .await
        .unwrap();
    l.nothing_before_marker(&c).await;
    c.batch_execute("UPDATE shop.\"Line\" SET sku = 'b-2' WHERE order_id = 8")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["shop", "Line", [[["sku"], [["b-2"]]]]])
    );

    // The registry lists both sets; registering one again changes nothing.
    let oid = table_oid(&c, "shop.\"Line\"").await;
    let before: Vec<(String, i64)> = trigger_versions(&c, oid).await;
    assert!(register(&c, "shop.\"Line\"", &["sku"]).await);
    assert_eq!(
        trigger_versions(&c, oid).await,
        before,
        "no DDL the second time"
    );
    let sets: Vec<Vec<String>> = c
        .query(
            "SELECT cols FROM pgtier.keys WHERE relid = $1::int8::oid ORDER BY cols",
            &[&(oid as i64)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sets, vec![vec!["order_id", "line_no"], vec!["sku"]]);
    // The catalog still sees the table's announcing in place, under the same
    // trigger (a changed trigger oid would void the table's watch).
    let catalog = Catalog::load(&c, 2).await.unwrap();
    let rel = catalog.get(oid).unwrap();
    assert!(rel.has_trigger);
    let notify_oid: i64 = c
        .query_one(
            "SELECT oid::int8 FROM pg_trigger WHERE tgrelid = $1::int8::oid AND tgname = 'pgtier_notify'",
            &[&(oid as i64)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rel.trigger_oid, notify_oid as u32);
}

/// Each trigger's name and the transaction that last wrote its row.
async fn trigger_versions(c: &Client, oid: u32) -> Vec<(String, i64)> {
    c.query(
        "SELECT tgname::text, xmin::text::int8 FROM pg_trigger WHERE tgrelid = $1::int8::oid ORDER BY 1",
        &[&(oid as i64)],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn large_statements_and_truncate_announce_the_table() {
    let db = "pgtier_keyed_trg_large";
    let c = setup(
        db,
        "CREATE TABLE big (id int8 PRIMARY KEY, label text, n int);
         INSERT INTO big SELECT g, 'l' || g, 0 FROM generate_series(1, 2000) g;",
        &["big"],
    )
    .await;
    assert!(register(&c, "big", &["id"]).await);
    assert!(register(&c, "big", &["label"]).await);
    let mut l = Listener::new(db).await;

    c.batch_execute("UPDATE big SET n = n + 1").await.unwrap();
    assert_eq!(l.next().await, table_level("public", "big"));
    l.nothing_before_marker(&c).await;

    // 1000 rows is still within the row bound, but not within the byte bound.
    c.batch_execute("UPDATE big SET n = n + 1 WHERE id <= 1000")
        .await
        .unwrap();
    assert_eq!(l.next().await, table_level("public", "big"));
    // Few rows with long values: over the byte bound.
    c.batch_execute("UPDATE big SET label = repeat('x', 4000) || id WHERE id <= 2")
        .await
        .unwrap();
    assert_eq!(l.next().await, table_level("public", "big"));
    // Just under it: still keys.
    c.batch_execute("UPDATE big SET label = repeat('y', 3000) || id WHERE id = 3")
        .await
        .unwrap();
    let k = l.next_keys().await;
    assert_eq!(k[2][0], json!([["id"], [["3"]]]));
    assert_eq!(
        k[2][1][1],
        json!([["l3"], [format!("{}3", "y".repeat(3000))]])
    );

    // One huge value (a key column is not checked for size at registration).
    c.batch_execute("UPDATE big SET label = repeat('z', 1000000) WHERE id = 4")
        .await
        .unwrap();
    assert_eq!(l.next().await, table_level("public", "big"));
    // Multibyte values are measured in bytes: 2000 characters of 4 bytes.
    c.batch_execute("UPDATE big SET label = repeat('😀', 2000) WHERE id = 5")
        .await
        .unwrap();
    assert_eq!(l.next().await, table_level("public", "big"));

    c.batch_execute("TRUNCATE big").await.unwrap();
    assert_eq!(l.next().await, table_level("public", "big"));
    l.nothing_before_marker(&c).await;
}

#[tokio::test]
async fn tables_nobody_caches_announce_nothing() {
    let db = "pgtier_keyed_trg_unwatched";
    let c = setup(db, "CREATE TABLE t (id int4 PRIMARY KEY)", &["t"]).await;
    assert!(register(&c, "t", &["id"]).await);
    let mut l = Listener::new(db).await;
    let seq = triggers::watch_sequence(table_oid(&c, "t").await);
    c.execute("SELECT setval($1::text::regclass, 1)", &[&seq])
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO t SELECT generate_series(1, 5); UPDATE t SET id = id + 10 WHERE id = 1;
         DELETE FROM t WHERE id = 2; INSERT INTO t SELECT generate_series(100, 1200); TRUNCATE t",
    )
    .await
    .unwrap();
    l.nothing_before_marker(&c).await;

    // Watched again: announced again.
    triggers::watch(&c, &[table_oid(&c, "t").await], PATIENCE)
        .await
        .unwrap();
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["id"], [["1"]]]]])
    );
}

#[tokio::test]
async fn values_are_reported_as_postgres_prints_them() {
    let db = "pgtier_keyed_trg_types";
    let c = setup(
        db,
        "CREATE TABLE v (u uuid, b bool, s text, i int8, vc varchar(20), i2 int2)",
        &["v"],
    )
    .await;
    for col in ["u", "b", "s", "i", "vc", "i2"] {
        assert!(register(&c, "v", &[col]).await, "{col}");
    }
    let mut l = Listener::new(db).await;
    c.batch_execute(
        "INSERT INTO v VALUES
           ('{6F9619FF-8B86-D011-B42D-00C04FC964FF}', 'yes', E'it''s \"q\" \\\\ é\\n', -9223372036854775808,
            'abc  ', '-007')",
    )
    .await
    .unwrap();
    let k = l.next_keys().await;
    let printed = c
        .query_one(
            "SELECT u::text, b::text, s, i::text, vc::text, i2::text FROM v",
            &[],
        )
        .await
        .unwrap();
    let value = |set: usize| -> String {
        let entry = &k[2][set];
        entry[1][0][0].as_str().unwrap().to_string()
    };
    // The registry's order (by column name): b, i, i2, s, u, vc.
    let cols: Vec<&str> = (0..6).map(|i| k[2][i][0][0].as_str().unwrap()).collect();
    assert_eq!(cols, ["b", "i", "i2", "s", "u", "vc"]);
    assert_eq!(value(0), "true");
    assert_eq!(value(1), "-9223372036854775808");
    assert_eq!(value(2), "-7");
    assert_eq!(value(3), "it's \"q\" \\ é\n");
    assert_eq!(value(4), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
    assert_eq!(value(5), "abc  ");
    for (set, idx) in [(0, 1), (1, 3), (2, 5), (3, 2), (4, 0), (5, 4)] {
        assert_eq!(value(set), printed.get::<_, String>(idx), "set {set}");
    }
}

#[tokio::test]
async fn registrations_that_cannot_hold_are_refused() {
    let db = "pgtier_keyed_trg_refused";
    let c = setup(
        db,
        "CREATE TABLE t (id int4 PRIMARY KEY, a text);
         CREATE TABLE parent (id int4); CREATE TABLE child () INHERITS (parent);
         CREATE TABLE part (id int4) PARTITION BY RANGE (id);
         CREATE TABLE part1 PARTITION OF part FOR VALUES FROM (0) TO (10);
         CREATE VIEW view_t AS SELECT * FROM t;",
        &["t"],
    )
    .await;
    assert!(!register(&c, "t", &["nope"]).await, "no such column");
    assert!(
        !register(&c, "t", &["id", "nope"]).await,
        "one missing column"
    );
    assert!(!register(&c, "t", &[]).await, "no column");
    assert!(!register(&c, "t", &["id", "id"]).await, "a column twice");
    for rel in ["parent", "child", "part", "part1", "view_t"] {
        assert!(!register(&c, rel, &["id"]).await, "{rel}");
    }
    // Nothing was recorded or installed for any of them.
    let keyed: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtier_keys%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keyed, 0);
    let registry: bool = c
        .query_one("SELECT to_regclass('pgtier.keys') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if registry {
        let rows: i64 = c
            .query_one("SELECT count(*) FROM pgtier.keys", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0);
    }

    // A table whose triggers were never installed (no watch sequence).
    c.batch_execute("CREATE TABLE later (id int4)")
        .await
        .unwrap();
    assert!(!register(&c, "later", &["id"]).await);

    // A role that does not own the table gets false, not an error.
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE pgtier_keyed_nonowner LOGIN; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$",
    )
    .await
    .unwrap();
    let other = common::connect_str(&format!(
        "host={PG_HOST} port={PG_PORT} user=pgtier_keyed_nonowner dbname={db}"
    ))
    .await;
    assert!(
        !register(&other, "t", &["id"]).await,
        "no registry, not its table"
    );
    assert!(register(&c, "t", &["a"]).await);
    assert!(
        !register(&other, "t", &["id"]).await,
        "registry there, not its table"
    );
    // The owner's registration is intact and still reports.
    let mut l = Listener::new(db).await;
    c.batch_execute("INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["a"], [["x"]]]]])
    );
}

/// A REPEATABLE READ writer whose snapshot predates the registration still
/// reports the new column set (the triggers carry the sets; its snapshot
/// would not show the registry row).
#[tokio::test]
async fn writers_with_older_snapshots_report_new_column_sets() {
    let db = "pgtier_keyed_trg_snapshot";
    let c = setup(
        db,
        "CREATE TABLE t (id int4 PRIMARY KEY, email text); CREATE TABLE other (x int)",
        &["t"],
    )
    .await;
    assert!(register(&c, "t", &["id"]).await);
    let writer = direct(db).await;
    writer
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM other")
        .await
        .unwrap();
    assert!(register(&c, "t", &["email"]).await);
    let mut l = Listener::new(db).await;
    writer
        .batch_execute("INSERT INTO t VALUES (1, 'a@x'); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["email"], [["a@x"]]], [["id"], [["1"]]]]])
    );
}

/// A registration does not hold writers up behind a long transaction: it
/// gives up, and succeeds once the writer is gone.
#[tokio::test]
async fn registration_gives_up_behind_a_writer_in_flight() {
    let db = "pgtier_keyed_trg_inflight";
    let c = setup(db, "CREATE TABLE t (id int4, a text)", &["t"]).await;
    let writer = direct(db).await;
    writer
        .batch_execute("BEGIN; INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    let catalog = Catalog::load(&c, 1).await.unwrap();
    let oid = table_oid(&c, "t").await;
    let started = std::time::Instant::now();
    let ok = keyed::register(
        &c,
        CHANNEL,
        &catalog,
        oid,
        &["id".to_string()],
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    assert!(!ok);
    assert!(started.elapsed() < Duration::from_secs(3));
    // It rolled back: writers go on, and nothing was installed.
    c.batch_execute("INSERT INTO t VALUES (2, 'y')")
        .await
        .unwrap();
    let keyed: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtier_keys%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keyed, 0);
    writer.batch_execute("COMMIT").await.unwrap();
    assert!(register(&c, "t", &["id"]).await);

    // drain_writers: true at once without writers; false while one stays.
    assert!(
        triggers::drain_writers(&c, &[oid], Duration::from_millis(100))
            .await
            .unwrap()
    );
    writer
        .batch_execute("BEGIN; INSERT INTO t VALUES (3, 'z')")
        .await
        .unwrap();
    assert!(
        !triggers::drain_writers(&c, &[oid], Duration::from_millis(100))
            .await
            .unwrap()
    );
    writer.batch_execute("COMMIT").await.unwrap();
    assert!(
        triggers::drain_writers(&c, &[oid], Duration::from_millis(100))
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn renamed_or_dropped_columns_fall_back_and_uninstall_removes_everything() {
    let db = "pgtier_keyed_trg_uninstall";
    let c = setup(db, "CREATE TABLE t (id int4, a text, b text)", &["t"]).await;
    assert!(register(&c, "t", &["id"]).await);
    assert!(register(&c, "t", &["a"]).await);
    let mut l = Listener::new(db).await;
    // Writes must never fail because a registered column went away.
    c.batch_execute("ALTER TABLE t RENAME COLUMN a TO a2")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO t VALUES (1, 'x', 'y')")
        .await
        .unwrap();
    assert_eq!(l.next().await, table_level("public", "t"));
    c.batch_execute("ALTER TABLE t DROP COLUMN a2")
        .await
        .unwrap();
    c.batch_execute("UPDATE t SET b = 'z'").await.unwrap();
    assert_eq!(l.next().await, table_level("public", "t"));

    let n = triggers::uninstall(&c).await.unwrap();
    assert_eq!(n, 1, "one table had triggers");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgtier%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let schema: bool = c
        .query_one("SELECT to_regnamespace('pgtier') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!schema);
    c.batch_execute("INSERT INTO t VALUES (2, 'w')")
        .await
        .unwrap();
    l.nothing_before_marker(&c).await;
}
