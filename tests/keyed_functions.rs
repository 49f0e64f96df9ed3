//! The generated key-reporting functions (`pgtier.notify_keys_<oid>`, issue
//! 14) against the real Postgres, where a generated body could go wrong and a
//! generic one could not: odd table and column names, column DDL under a
//! writer whose plans are cached, a hostile search_path or
//! `standard_conforming_strings = off` in the writer, regeneration when the
//! column sets change, and what is left behind when tables go. Payloads are
//! read by a second connection that LISTENs; every wait is bounded.

mod common;

use serde_json::json;
use tokio_postgres::Client;

use common::direct;
use common::keyed::{register, setup, table_level, table_oid, Listener};
use pgtier::invalidation::catalog::Catalog;
use pgtier::invalidation::triggers;

/// The generated functions in the database: (name, oid, xmin).
async fn functions(c: &Client) -> Vec<(String, i64, i64)> {
    c.query(
        "SELECT p.proname::text, p.oid::int8, p.xmin::text::int8 FROM pg_proc p
         JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'pgtier' AND p.proname LIKE 'notify\\_keys\\_%' ORDER BY 1",
        &[],
    )
    .await
    .expect("functions")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The functions the table's keyed triggers call, and their row versions.
async fn keyed_calls(c: &Client, oid: u32) -> Vec<(String, i64, i64)> {
    c.query(
        "SELECT tgname::text, tgfoid::int8, xmin::text::int8 FROM pg_trigger
         WHERE tgrelid = $1::int8::oid AND tgname LIKE 'pgtier\\_keys\\_%' ORDER BY 1",
        &[&(oid as i64)],
    )
    .await
    .expect("triggers")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Names Postgres must quote, a table name of exactly 63 bytes, column names
/// that are plpgsql variables or contain the body's dollar quote, quotes and
/// backslashes; written from a session with `standard_conforming_strings`
/// off (the function is compiled under the writer's settings).
#[tokio::test]
async fn odd_names_are_reported_exactly() {
    let db = "pgtier_keyfn_names";
    // 63 bytes: 'é' and 'ü' are two bytes each.
    let table = format!("Tä\"b le 'q' ü{}", "x".repeat(48));
    assert_eq!(table.len(), 63);
    let schema = "Sch\"ema ü";
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let qualified = format!("{}.{}", q(schema), q(&table));
    let cols = [
        "new",
        "payload",
        "tg_op",
        "a\"b",
        "it's",
        "x$pgtier$y",
        "back\\slash",
        "ключ",
    ];
    let coldefs: Vec<String> = cols.iter().map(|c| format!("{} text", q(c))).collect();
    let c = setup(
        db,
        &format!(
            "CREATE SCHEMA {s}; CREATE TABLE {qualified} (id int4, {cols});
             CREATE TABLE public.{t} (id int4);",
            s = q(schema),
            cols = coldefs.join(", "),
            t = q(&table),
        ),
        &[&qualified, &format!("public.{}", q(&table))],
    )
    .await;
    let sets: [&[&str]; 4] = [
        &["new", "payload"],
        &["a\"b"],
        &["x$pgtier$y", "back\\slash"],
        &["it's", "ключ", "tg_op"],
    ];
    for set in sets {
        assert!(register(&c, &qualified, set).await, "{set:?}");
    }
    // A table of the same name in another schema has a function of its own.
    assert!(register(&c, &format!("public.{}", q(&table)), &["id"]).await);
    let oids = [
        table_oid(&c, &qualified).await,
        table_oid(&c, &format!("public.{}", q(&table))).await,
    ];
    let names: Vec<String> = functions(&c).await.into_iter().map(|f| f.0).collect();
    let mut want: Vec<String> = oids.iter().map(|o| format!("notify_keys_{o}")).collect();
    want.sort();
    assert_eq!(names, want);

    let mut l = Listener::new(db).await;
    let writer = direct(db).await;
    writer
        .batch_execute("SET standard_conforming_strings = off; SET escape_string_warning = off")
        .await
        .unwrap();
    let values = ["n\"1", "p\\2", "op", "ab", "it's", "$pgtier$", "\\", "ключ"];
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        values.iter().map(|v| v as _).collect();
    writer
        .execute(
            &format!("INSERT INTO {qualified} VALUES (1, $1, $2, $3, $4, $5, $6, $7, $8)"),
            &params,
        )
        .await
        .unwrap();
    // The registry's order: by column names, as text[].
    assert_eq!(
        l.next_keys().await,
        json!([
            schema,
            table,
            [
                [["a\"b"], [["ab"]]],
                [["it's", "ключ", "tg_op"], [["it's", "ключ", "op"]]],
                [["new", "payload"], [["n\"1", "p\\2"]]],
                [["x$pgtier$y", "back\\slash"], [["$pgtier$", "\\"]]],
            ]
        ])
    );
    writer
        .batch_execute(&format!("INSERT INTO public.{} VALUES (7)", q(&table)))
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", table, [[["id"], [["7"]]]]])
    );
    l.nothing_before_marker(&c).await;
}

/// Column DDL made while a writer's backend has the function's plans cached:
/// writes never fail, a dropped or renamed key column announces the table,
/// and a column that takes a registered name is reported under it.
#[tokio::test]
async fn column_ddl_under_a_cached_plan() {
    let db = "pgtier_keyfn_ddl";
    let c = setup(db, "CREATE TABLE t (id int4, a int4, b int4)", &["t"]).await;
    assert!(register(&c, "t", &["a"]).await);
    assert!(register(&c, "t", &["id"]).await);
    let mut l = Listener::new(db).await;
    let writer = direct(db).await;
    writer
        .batch_execute("INSERT INTO t VALUES (1, 10, 20)")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["a"], [["10"]]], [["id"], [["1"]]]]])
    );

    // a and b swap names: the new a (the old b) is what is reported.
    c.batch_execute(
        "ALTER TABLE t RENAME COLUMN a TO tmp; ALTER TABLE t RENAME COLUMN b TO a;
         ALTER TABLE t RENAME COLUMN tmp TO b",
    )
    .await
    .unwrap();
    writer
        .batch_execute("INSERT INTO t (id, a, b) VALUES (2, 21, 11)")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["a"], [["21"]]], [["id"], [["2"]]]]])
    );

    // The registered column goes: the table is announced, for every event.
    c.batch_execute("ALTER TABLE t DROP COLUMN a")
        .await
        .unwrap();
    for sql in [
        "INSERT INTO t VALUES (3, 12)",
        "UPDATE t SET b = b + 1 WHERE id = 3",
        "DELETE FROM t WHERE id = 3",
    ] {
        writer.batch_execute(sql).await.unwrap();
        assert_eq!(l.next().await, table_level("public", "t"), "{sql}");
    }
    // It comes back (as text now): keys again, printed as the new type.
    c.batch_execute("ALTER TABLE t ADD COLUMN a text")
        .await
        .unwrap();
    writer
        .batch_execute("INSERT INTO t VALUES (4, 13, 'x y')")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["a"], [["x y"]]], [["id"], [["4"]]]]])
    );
    // A key column changes type, the table its name and schema.
    c.batch_execute(
        "ALTER TABLE t ALTER COLUMN id TYPE numeric USING id * 1.5;
         CREATE SCHEMA s2; ALTER TABLE t RENAME TO t2; ALTER TABLE t2 SET SCHEMA s2",
    )
    .await
    .unwrap();
    writer
        .batch_execute("UPDATE s2.t2 SET b = 0 WHERE id = 6")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["s2", "t2", [[["a"], [["x y"]]], [["id"], [["6.0"]]]]])
    );
    l.nothing_before_marker(&c).await;
}

/// A writer whose search_path puts functions, operators and types of the
/// same names as pg_catalog's first gets the same payloads.
#[tokio::test]
async fn a_hostile_search_path_changes_nothing() {
    let db = "pgtier_keyfn_path";
    let c = setup(
        db,
        "CREATE TABLE t (id int4, k text);
         CREATE SCHEMA evil;
         CREATE FUNCTION evil.boom() RETURNS text LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'evil function called'; END $$;
         CREATE FUNCTION evil.left(text, int4) RETURNS text LANGUAGE sql AS 'SELECT evil.boom()';
         CREATE FUNCTION evil.octet_length(text) RETURNS int4 LANGUAGE sql AS 'SELECT evil.boom()::int4';
         CREATE FUNCTION evil.concat_ws(text, VARIADIC text[]) RETURNS text LANGUAGE sql AS 'SELECT evil.boom()';
         CREATE FUNCTION evil.to_json(anyelement) RETURNS json LANGUAGE sql AS 'SELECT evil.boom()::json';
         CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE sql AS 'SELECT evil.boom()';
         CREATE FUNCTION evil.cat(text, text) RETURNS text LANGUAGE sql AS 'SELECT evil.boom()';
         CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.cat);
         CREATE FUNCTION evil.eq(text, text) RETURNS bool LANGUAGE sql AS 'SELECT evil.boom()::bool';
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
         CREATE FUNCTION evil.gt(int8, int4) RETURNS bool LANGUAGE sql AS 'SELECT evil.boom()::bool';
         CREATE OPERATOR evil.> (LEFTARG = int8, RIGHTARG = int4, FUNCTION = evil.gt);
         CREATE TABLE evil.text (x int);",
        &["t"],
    )
    .await;
    assert!(register(&c, "t", &["k", "id"]).await);
    let mut l = Listener::new(db).await;
    let writer = direct(db).await;
    writer
        .batch_execute("SET search_path = evil, pg_catalog, public")
        .await
        .unwrap();
    // The schema is really in the way of unqualified names.
    let e = writer.batch_execute("SELECT 'a' || 'b'").await;
    assert!(e.is_err(), "evil.|| is what an unqualified || means here");
    writer
        .batch_execute("INSERT INTO public.t VALUES (1, 'a'), (2, NULL); UPDATE public.t SET id = 3 WHERE id = 1")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["k", "id"], [["a", "1"]]]]])
    );
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["k", "id"], [["a", "1"], ["a", "3"]]]]])
    );
    writer.batch_execute("DELETE FROM public.t").await.unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["k", "id"], [["a", "3"]]]]])
    );
    l.nothing_before_marker(&c).await;
}

/// The function follows the column sets (and nothing is rewritten when they
/// did not change), triggers calling another function are pointed back at it,
/// registering does not change the database's routines (which would
/// invalidate every entry), and functions of dropped tables go.
#[tokio::test]
async fn functions_follow_the_sets_and_go_with_their_tables() {
    let db = "pgtier_keyfn_regen";
    let c = setup(
        db,
        "CREATE TABLE t (id int4, a text); CREATE TABLE gone (id int4); CREATE TABLE other (id int4)",
        &["t", "gone", "other"],
    )
    .await;
    let oid = table_oid(&c, "t").await;
    // (The first registration creates the registry table, whose array type
    // counts among the routines' types.)
    assert!(register(&c, "other", &["id"]).await);
    let before = Catalog::load(&c, 1).await.unwrap().routines.fingerprint;
    assert!(register(&c, "t", &["id"]).await);
    let mut first = functions(&c).await;
    first.retain(|f| f.0 == format!("notify_keys_{oid}"));
    assert_eq!(first.len(), 1);
    let calls = keyed_calls(&c, oid).await;
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|t| t.1 == first[0].1), "{calls:?}");
    assert_eq!(
        Catalog::load(&c, 2).await.unwrap().routines.fingerprint,
        before,
        "a generated function is not a routine statements may use"
    );

    // The same set again: neither the function nor the triggers are rewritten.
    let all = functions(&c).await;
    assert!(register(&c, "t", &["id"]).await);
    assert_eq!(functions(&c).await, all);
    assert_eq!(keyed_calls(&c, oid).await, calls);

    // A new set replaces the function in place (same oid) and the triggers.
    assert!(register(&c, "t", &["a"]).await);
    let mut second = functions(&c).await;
    second.retain(|f| f.0 == first[0].0);
    assert_eq!(second[0].1, first[0].1);
    assert_ne!(second[0].2, first[0].2, "replaced");
    let src: String = c
        .query_one(
            "SELECT prosrc FROM pg_proc WHERE oid = $1::int8::oid",
            &[&second[0].1],
        )
        .await
        .unwrap()
        .get(0);
    assert!(src.contains("'[\"a\"]'") && src.contains("'[\"id\"]'"));
    let mut l = Listener::new(db).await;
    c.batch_execute("INSERT INTO t VALUES (5, 'five')")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["a"], [["five"]]], [["id"], [["5"]]]]])
    );

    // Triggers left calling another function (an older pgtier's generic
    // one) are pointed back at the generated one.
    c.batch_execute(&format!(
        "CREATE FUNCTION pgtier.notify_keys() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
         CREATE OR REPLACE TRIGGER pgtier_keys_ins AFTER INSERT ON t REFERENCING NEW TABLE AS n
           FOR EACH STATEMENT EXECUTE FUNCTION pgtier.notify_keys({});
         ALTER TABLE t ENABLE ALWAYS TRIGGER pgtier_keys_ins;",
        keyed_calls_args(&c, oid).await
    ))
    .await
    .unwrap();
    assert!(register(&c, "t", &["a"]).await);
    assert!(keyed_calls(&c, oid)
        .await
        .iter()
        .all(|t| t.1 == second[0].1));
    c.batch_execute("INSERT INTO t VALUES (6, 'six')")
        .await
        .unwrap();
    assert_eq!(
        l.next_keys().await,
        json!(["public", "t", [[["a"], [["six"]]], [["id"], [["6"]]]]])
    );

    // A dropped table's function and registry rows go at the next
    // registration that generates a function.
    assert!(register(&c, "gone", &["id"]).await);
    let gone = table_oid(&c, "gone").await;
    c.batch_execute("DROP TABLE gone").await.unwrap();
    assert_eq!(functions(&c).await.len(), 3);
    assert!(!register(&c, "other", &["id", "id2"]).await);
    c.batch_execute("ALTER TABLE other ADD COLUMN id2 int4")
        .await
        .unwrap();
    assert!(register(&c, "other", &["id", "id2"]).await);
    let names: Vec<String> = functions(&c).await.into_iter().map(|f| f.0).collect();
    assert!(!names.contains(&format!("notify_keys_{gone}")), "{names:?}");
    assert_eq!(names.len(), 2);
    let generic: bool = c
        .query_one(
            "SELECT to_regprocedure('pgtier.notify_keys()') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        generic,
        "an older pgtier may still use the generic function"
    );
    let rows: i64 = c
        .query_one(
            "SELECT count(*) FROM pgtier.keys WHERE relid = $1::int8::oid",
            &[&(gone as i64)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);

    // Uninstalling leaves no generated function behind.
    triggers::uninstall(&c).await.unwrap();
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'notify\\_keys%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    c.batch_execute("INSERT INTO t VALUES (7, 'seven')")
        .await
        .unwrap();
    l.nothing_before_marker(&c).await;
}

/// The keyed triggers' arguments, as SQL literals.
async fn keyed_calls_args(c: &Client, oid: u32) -> String {
    let args: Vec<u8> = c
        .query_one(
            "SELECT tgargs FROM pg_trigger WHERE tgrelid = $1::int8::oid AND tgname = 'pgtier_keys_ins'",
            &[&(oid as i64)],
        )
        .await
        .unwrap()
        .get(0);
    args.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| format!("'{}'", String::from_utf8_lossy(a).replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(", ")
}
