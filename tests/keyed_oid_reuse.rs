//! Key registry rows outliving their table: a table dropped leaves its rows
//! in `pgtier.keys` until a registration cleans them up, and a new table may
//! get the same oid (dump and reload, oid wraparound). Its registration must
//! not inherit the old table's column sets where it lacks their columns (its
//! generated function would fail on them and announce every write per table,
//! for good), and its writes must report its own keys.

mod common;

use serde_json::json;

use common::keyed::{register, setup, table_oid, Listener};

/// The column sets registered for `table`.
async fn registered(c: &tokio_postgres::Client, table: &str) -> Vec<Vec<String>> {
    let oid = table_oid(c, table).await;
    c.query(
        "SELECT cols FROM pgtier.keys WHERE relid = $1::int8::oid ORDER BY cols",
        &[&(oid as i64)],
    )
    .await
    .expect("registry")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn a_reused_oid_does_not_inherit_the_dropped_tables_column_sets() {
    let db = "pgtier_keyed_oid_reuse";
    let c = setup(
        db,
        "CREATE TABLE old_t (id int8 PRIMARY KEY, code text);
         CREATE TABLE new_t (k int8 PRIMARY KEY, id int8, v text);",
        &["old_t", "new_t"],
    )
    .await;
    assert!(register(&c, "old_t", &["code"]).await);
    assert!(register(&c, "old_t", &["id"]).await);
    // As if old_t was dropped and new_t got its oid: its rows now name new_t.
    let (old, new) = (table_oid(&c, "old_t").await, table_oid(&c, "new_t").await);
    c.execute(
        "UPDATE pgtier.keys SET relid = $2::int8::oid WHERE relid = $1::int8::oid",
        &[&(old as i64), &(new as i64)],
    )
    .await
    .expect("move the rows");
    assert!(register(&c, "new_t", &["k"]).await);
    // `code` is not new_t's: gone. `id` is, and is kept (reporting it is
    // right for new_t, and some instance may read by it).
    assert_eq!(
        registered(&c, "new_t").await,
        [vec!["id".to_string()], vec!["k".to_string()]]
    );
    let mut l = Listener::new(db).await;
    c.batch_execute("INSERT INTO new_t VALUES (1, 7, 'x')")
        .await
        .expect("a writer of the new table works");
    assert_eq!(
        l.next_keys().await,
        json!(["public", "new_t", [[["id"], [["7"]]], [["k"], [["1"]]]]]),
        "the new table's own keys, not a table-level announcement"
    );
}
