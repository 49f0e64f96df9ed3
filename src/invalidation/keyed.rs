//! Key-reporting triggers (issue 14, the write side): writes to a table with
//! registered column sets announce, for each set, the values of those columns
//! in every row they change, so entries that read other keys of the table can
//! stay cached.
//!
//! A registered table has three statement triggers with transition tables
//! (`pgtier_keys_ins`, `_upd`, `_del`; Postgres allows one event per trigger
//! with transition tables), all `ENABLE ALWAYS` and calling the table's own
//! generated function `pgtier.notify_keys_<oid>()` (see `function`), and its
//! `pgtier_notify` is re-created for TRUNCATE only. Each write statement then
//! sends one notification:
//!
//! - `k["schema","table",[[["c1","c2"],[["v1","v2"],...]],...]]`: for each
//!   column set (as registered), the distinct value tuples of the rows the
//!   statement changed (INSERT: new rows; DELETE: old rows; UPDATE: old and
//!   new, so a key that moves is reported under both values), each value as
//!   Postgres prints it (`col::text`). Tuples with a NULL are left out (no
//!   equality lookup finds them), and so are sets left with no tuple; a
//!   statement that changed no reportable tuple sends nothing.
//! - `w[["schema", "table"]]` instead when the statement changed more than
//!   `MAX_ROWS` rows (counted on at most `MAX_ROWS + 1` rows of each
//!   transition table), when the payload (or a single key value) would exceed
//!   `MAX_BYTES`, or when a registered column no longer exists (renamed or
//!   dropped: writes must never fail because of pgtier).
//!
//! The function's queries are static, so plpgsql plans them once per backend;
//! it is generated from the column sets and replaced whenever they change
//! (here, under the table's switch lock, before the triggers that carry the
//! same sets). The triggers' `WHEN` clause reads the watch sequence, so a
//! write to a table nobody caches does not enter plpgsql.
//!
//! TRUNCATE (through `pgtier_notify`) stays table-level, and so do the writes
//! of logical replication's apply worker, which fires row triggers only (the
//! row trigger `pgtier_notify_replica` is left as it is); a session in replica
//! mode (pg_restore) fires both, and sends both `w` and `k`.
//!
//! The registry `pgtier.keys (relid, cols)` records which column sets each
//! table reports. The triggers carry the same column sets as arguments
//! (`notify_keys_<oid>('<watch sequence oid>', '["c1","c2"]', ...)`, where
//! registration reads them back), and the function bakes them in; both are
//! written in the same transaction as the registry row. A writer reads them
//! with a fresh catalog snapshot (plpgsql recompiles a replaced function on
//! its next call), never with its own: a REPEATABLE READ writer whose snapshot
//! predates a registration still reports the new column set. Registration
//! also drops the functions (and registry rows) of tables that no longer
//! exist, and, for a table with no keyed triggers yet, registry rows naming
//! columns it lacks (a dropped table's, whose oid it reused); the listener
//! forgets live sets of an oid whose table changed (`DbState::set_catalog`).
//! `triggers::uninstall` drops the whole `pgtier` schema.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::catalog::Catalog;
use super::payload::Payload;
use super::triggers::{drain_writers, switch_lock, watch_sequence, KEYED_TRIGGERS, TRIGGER};

mod function;

pub use function::{MAX_BYTES, MAX_ROWS};

/// Serialises creating the registry across pgtier instances.
const SETUP_LOCK: i64 = 0x7067_746b_0000_0000;

/// pg_trigger.tgtype bits (statement-level, AFTER) of the four triggers.
const TYPE_INSERT: i32 = 1 << 2;
const TYPE_DELETE: i32 = 1 << 3;
const TYPE_UPDATE: i32 = 1 << 4;
const TYPE_TRUNCATE: i32 = 1 << 5;

/// The longest a registration waits for writers in flight on the table before
/// giving up: while its trigger DDL waits for their lock, new writers queue
/// behind it.
const LOCK_PATIENCE: Duration = Duration::from_secs(1);

/// Creates the registry (generated functions are created per table).
pub fn setup_sql() -> &'static str {
    "CREATE SCHEMA IF NOT EXISTS pgtier;
GRANT USAGE ON SCHEMA pgtier TO PUBLIC;
CREATE TABLE IF NOT EXISTS pgtier.keys (relid oid NOT NULL, cols text[] NOT NULL, PRIMARY KEY (relid, cols));
GRANT SELECT ON pgtier.keys TO PUBLIC;"
}

/// The arguments of the keyed triggers: the watch sequence's oid, then each
/// column set as a JSON array of names.
pub fn trigger_args(sequence: u32, sets: &[Vec<String>]) -> Vec<String> {
    let mut args = vec![sequence.to_string()];
    args.extend(
        sets.iter()
            .map(|cols| serde_json::to_string(cols).unwrap_or_default()),
    );
    args
}

/// Arguments as pg_trigger.tgargs stores them (each one NUL-terminated).
fn tgargs(args: &[String]) -> Vec<u8> {
    let mut b = Vec::new();
    for a in args {
        b.extend_from_slice(a.as_bytes());
        b.push(0);
    }
    b
}

/// The column sets in a keyed trigger's pg_trigger.tgargs (after the watch
/// sequence); arguments that are not a column set are skipped.
fn reported_sets(tgargs: &[u8]) -> Vec<Vec<String>> {
    tgargs
        .split(|b| *b == 0)
        .skip(1)
        .filter_map(|a| serde_json::from_slice::<Vec<String>>(a).ok())
        .filter(|set| valid_set(set))
        .collect()
}

/// The `pgtier_notify` arguments `triggers::trigger_sql` gives a table without
/// inheritance family: its write payload, and its watch sequence's oid.
fn truncate_args(schema: &str, name: &str, sequence: u32) -> Vec<String> {
    vec![
        Payload::write_payload(&[(schema.to_string(), name.to_string())]),
        sequence.to_string(),
    ]
}

/// The statements that (re)create one table's keyed triggers and make its
/// `pgtier_notify` fire on TRUNCATE only. `table` is the quoted qualified name,
/// `oid` its oid (whose generated function the triggers call). Meant to run
/// inside one transaction (see `triggers::trigger_sql`).
pub fn trigger_sql(
    table: &str,
    oid: u32,
    sequence: u32,
    args: &[String],
    truncate_args: &[String],
) -> String {
    let list = |a: &[String]| {
        a.iter()
            .map(|s| function::literal(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let keyed = list(args);
    let function = function::name(oid);
    let when = format!("WHEN (pg_sequence_last_value({sequence}::oid::regclass) > 1)");
    let [ins, upd, del] = KEYED_TRIGGERS;
    let mut sql = String::new();
    for (name, event, referencing) in [
        (ins, "INSERT", "NEW TABLE AS n"),
        (upd, "UPDATE", "OLD TABLE AS o NEW TABLE AS n"),
        (del, "DELETE", "OLD TABLE AS o"),
    ] {
        sql.push_str(&format!(
            "CREATE OR REPLACE TRIGGER {name} AFTER {event} ON {table} REFERENCING {referencing} \
             FOR EACH STATEMENT {when} EXECUTE FUNCTION {function}({keyed});
ALTER TABLE {table} ENABLE ALWAYS TRIGGER {name};
"
        ));
    }
    sql.push_str(&format!(
        "CREATE OR REPLACE TRIGGER {TRIGGER} AFTER TRUNCATE ON {table} \
         FOR EACH STATEMENT {when} EXECUTE FUNCTION pgtier.notify_change({});
ALTER TABLE {table} ENABLE ALWAYS TRIGGER {TRIGGER};",
        list(truncate_args)
    ));
    sql
}

/// Have writes to table `oid` report the values of `cols` in the rows they
/// change. Returns true once that holds for every write that commits from now
/// on; false if the table is not a plain table with pgtier's triggers
/// installed, a column does not exist, the role may not do it (not the
/// table's owner), or writers in flight kept it from finishing within
/// `patience` (then nothing changed, or a later call finishes the job).
pub async fn register(
    client: &Client,
    channel: &str,
    catalog: &Catalog,
    oid: u32,
    cols: &[String],
    patience: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let Some(rel) = catalog.get(oid) else {
        return Ok(false);
    };
    // Transition tables are not allowed on partitions and inheritance
    // children, and a write through a parent would not report its rows.
    if rel.kind != b'r' || !rel.parents.is_empty() || !rel.children.is_empty() {
        tracing::debug!(
            table = format!("{}.{}", rel.schema, rel.name),
            "key reporting is for plain tables only"
        );
        return Ok(false);
    }
    if !valid_set(cols) {
        return Ok(false);
    }
    // The generated function hands its payload to `pgtier.announce`, which
    // only `install-triggers` (or auto_install) of this version creates:
    // without it every write to the table would fail.
    let announce: bool = client
        .query_one(
            "SELECT to_regprocedure('pgtier.announce(text,text)') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !announce {
        tracing::warn!(
            "pgtier.announce is missing: run `pgtier install-triggers` again; reads by key stay table-level"
        );
        return Ok(false);
    }
    let lock = switch_lock(oid);
    client
        .query_one("SELECT pg_advisory_lock($1)", &[&lock])
        .await?;
    let done = register_locked(client, channel, oid, cols, patience).await;
    let unlocked = client
        .query_one("SELECT pg_advisory_unlock($1)", &[&lock])
        .await;
    let done = done?;
    unlocked?;
    if !done {
        return Ok(false);
    }
    // Every writer that fired the old triggers held its lock on the table until
    // the DDL above could take its own; this also covers those of a
    // registration that committed but gave up waiting.
    drain_writers(client, &[oid], patience).await
}

/// A column set is a non-empty list of distinct names.
fn valid_set(cols: &[String]) -> bool {
    !cols.is_empty()
        && cols
            .iter()
            .enumerate()
            .all(|(i, c)| !c.is_empty() && !cols[..i].contains(c))
}

/// `register`'s transaction, under the table's switch lock.
async fn register_locked(
    client: &Client,
    channel: &str,
    oid: u32,
    cols: &[String],
    patience: Duration,
) -> Result<bool, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await?;
    let result = register_in_transaction(client, channel, oid, cols, patience).await;
    match result {
        Ok(true) => {
            client.batch_execute("COMMIT").await?;
            Ok(true)
        }
        Ok(false) => {
            client.batch_execute("ROLLBACK").await?;
            Ok(false)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            match e.code() {
                Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    tracing::warn!(
                        oid,
                        error = %e,
                        "cannot install the key-reporting triggers (they need the table's owner); \
                         the table's writes stay announced per table"
                    );
                    Ok(false)
                }
                Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    tracing::info!(
                        oid,
                        "writers in flight on the table: key reporting not installed this time"
                    );
                    Ok(false)
                }
                _ => Err(e),
            }
        }
    }
}

async fn register_in_transaction(
    client: &Client,
    channel: &str,
    oid: u32,
    cols: &[String],
    patience: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let wait = patience.min(LOCK_PATIENCE).as_millis().max(1);
    client
        .batch_execute(&format!("SET LOCAL lock_timeout = '{wait}ms'"))
        .await?;
    let Some(row) = client
        .query_opt(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname::text,
                    c.relname::text, c.relkind = 'r'
                      AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid),
                    to_regclass($2)::oid::int8,
                    (SELECT count(*) FROM pg_attribute a
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attname = ANY($3::text[]::name[]))
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = $1::int8::oid",
            &[&(oid as i64), &watch_sequence(oid), &cols],
        )
        .await?
    else {
        return Ok(false);
    };
    let table: String = row.get(0);
    let (schema, name): (String, String) = (row.get(1), row.get(2));
    let plain: bool = row.get(3);
    let sequence: Option<i64> = row.get(4);
    let found: i64 = row.get(5);
    let Some(sequence) = sequence.filter(|_| plain) else {
        // Not a plain table, or pgtier's triggers were never installed on it.
        return Ok(false);
    };
    if found != cols.len() as i64 {
        tracing::debug!(table, ?cols, "no such column: key reporting not installed");
        return Ok(false);
    }
    let sequence = sequence as u32;

    let ready: bool = client
        .query_one("SELECT to_regclass('pgtier.keys') IS NOT NULL", &[])
        .await?
        .get(0);
    if !ready {
        client
            .query_one("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK])
            .await?;
        client.batch_execute(setup_sql()).await?;
    }
    // A table without keyed triggers reports no set yet, so nobody's reads
    // can rely on one: registry rows for its oid naming columns it lacks are
    // a dropped table's whose oid it got (the generated function would fail
    // on them and announce every write per table, for good).
    client
        .execute(
            "DELETE FROM pgtier.keys k
             WHERE k.relid = $1::int8::oid
               AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                               WHERE t.tgrelid = k.relid AND t.tgname = ANY($2::text[]::name[]))
               AND NOT k.cols <@ ARRAY(SELECT a.attname::text FROM pg_attribute a
                                       WHERE a.attrelid = k.relid AND a.attnum > 0
                                         AND NOT a.attisdropped)
               AND has_table_privilege('pgtier.keys', 'DELETE')",
            &[&(oid as i64), &KEYED_TRIGGERS.to_vec()],
        )
        .await?;
    client
        .execute(
            "INSERT INTO pgtier.keys (relid, cols) VALUES ($1::int8::oid, $2::text[])
             ON CONFLICT DO NOTHING",
            &[&(oid as i64), &cols],
        )
        .await?;
    let mut sets: Vec<Vec<String>> = client
        .query(
            "SELECT cols FROM pgtier.keys WHERE relid = $1::int8::oid ORDER BY cols",
            &[&(oid as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let names = vec![
        KEYED_TRIGGERS[0],
        KEYED_TRIGGERS[1],
        KEYED_TRIGGERS[2],
        TRIGGER,
    ];
    let have = client
        .query(
            "SELECT tgname::text, tgtype::int4, tgenabled = 'A', tgargs, tgfoid::int8 FROM pg_trigger
             WHERE tgrelid = $1::int8::oid AND tgname = ANY($2::text[]::name[]) AND NOT tgisinternal",
            &[&(oid as i64), &names],
        )
        .await?;
    // The column sets the triggers report now stay reported, registered or
    // not: some pgtier instance may be reading by them (a registry row deleted
    // by hand must not silently stop a set's keys being reported).
    let mut unregistered = Vec::new();
    for r in &have {
        if KEYED_TRIGGERS.contains(&r.get::<_, String>(0).as_str()) {
            for set in reported_sets(&r.get::<_, Vec<u8>>(3)) {
                if !sets.contains(&set) && !unregistered.contains(&set) {
                    unregistered.push(set);
                }
            }
        }
    }
    for set in &unregistered {
        client
            .execute(
                "INSERT INTO pgtier.keys (relid, cols) VALUES ($1::int8::oid, $2::text[])
                 ON CONFLICT DO NOTHING",
                &[&(oid as i64), set],
            )
            .await?;
    }
    sets.extend(unregistered);
    let function = generated_function(client, channel, oid, &sets).await?;
    let args = trigger_args(sequence, &sets);
    let truncate = truncate_args(&schema, &name, sequence);
    let want = [
        (
            KEYED_TRIGGERS[0],
            TYPE_INSERT,
            tgargs(&args),
            Some(function),
        ),
        (
            KEYED_TRIGGERS[1],
            TYPE_UPDATE,
            tgargs(&args),
            Some(function),
        ),
        (
            KEYED_TRIGGERS[2],
            TYPE_DELETE,
            tgargs(&args),
            Some(function),
        ),
        (TRIGGER, TYPE_TRUNCATE, tgargs(&truncate), None),
    ];
    let in_place = want.iter().all(|(name, ty, args, calls)| {
        have.iter().any(|r| {
            r.get::<_, String>(0) == *name
                && r.get::<_, i32>(1) == *ty
                && r.get::<_, bool>(2)
                && r.get::<_, Vec<u8>>(3) == *args
                && calls.is_none_or(|f| r.get::<_, i64>(4) == f)
        })
    });
    if !in_place {
        client
            .batch_execute(&trigger_sql(&table, oid, sequence, &args, &truncate))
            .await?;
    }
    Ok(true)
}

/// The oid of table `oid`'s function reporting `sets`, created or replaced
/// unless it already is that function. Each time it is, the functions and
/// registry rows of tables dropped since are dropped too.
async fn generated_function(
    client: &Client,
    channel: &str,
    oid: u32,
    sets: &[Vec<String>],
) -> Result<i64, tokio_postgres::Error> {
    let body = function::body(channel, oid, sets);
    let signature = format!("{}()", function::name(oid));
    const CURRENT: &str = "SELECT p.oid::int8, p.prosrc = $2 FROM pg_proc p
                           WHERE p.oid = to_regprocedure($1)";
    if let Some(row) = client.query_opt(CURRENT, &[&signature, &body]).await? {
        if row.get::<_, bool>(1) {
            return Ok(row.get(0));
        }
    }
    client
        .batch_execute(&function::create_sql(oid, &body))
        .await?;
    drop_orphans(client).await?;
    Ok(client
        .query_one(CURRENT, &[&signature, &body])
        .await?
        .get(0))
}

/// Drop what registration left of tables that no longer exist: their
/// functions (those this role may drop and no trigger calls) and registry rows.
/// Older versions' generic `pgtier.notify_keys()` stays: an older pgtier may be
/// creating a trigger that calls it right now, uncommitted and so unseen here.
async fn drop_orphans(client: &Client) -> Result<(), tokio_postgres::Error> {
    let orphans = client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = 'pgtier'::regnamespace
               AND p.proname ~ '^notify_keys_[0-9]{1,10}$'
               AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid::text = substr(p.proname, 13))
               AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid)
               AND pg_has_role(p.proowner, 'USAGE')",
            &[],
        )
        .await?;
    for f in &orphans {
        let f: String = f.get(0);
        client
            .batch_execute(&format!("DROP FUNCTION IF EXISTS {f}"))
            .await?;
    }
    client
        .execute(
            "DELETE FROM pgtier.keys k
             WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = k.relid)
               AND has_table_privilege('pgtier.keys', 'DELETE')",
            &[],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_arguments_carry_the_column_sets() {
        let sets = vec![
            vec!["order_id".to_string(), "line_no".to_string()],
            vec!["we\"ird'".to_string()],
        ];
        let args = trigger_args(4242, &sets);
        assert_eq!(
            args,
            ["4242", r#"["order_id","line_no"]"#, r#"["we\"ird'"]"#]
        );
        assert_eq!(tgargs(&args[..2]), b"4242\0[\"order_id\",\"line_no\"]\0");
        assert_eq!(reported_sets(&tgargs(&args)), sets, "read back");
        assert!(reported_sets(b"4242\0").is_empty());
    }

    #[test]
    fn trigger_sql_creates_three_keyed_triggers_and_a_truncate_one() {
        let args = trigger_args(77, &[vec!["id".to_string()], vec!["it's".to_string()]]);
        let truncate = truncate_args("public", "t", 77);
        assert_eq!(truncate, [r#"w[["public","t"]]"#, "77"]);
        let sql = trigger_sql("\"public\".\"t\"", 16400, 77, &args, &truncate);
        let when = "FOR EACH STATEMENT WHEN (pg_sequence_last_value(77::oid::regclass) > 1)";
        let call = r#"EXECUTE FUNCTION pgtier.notify_keys_16400('77', '["id"]', '["it''s"]');"#;
        for (name, head) in [
            (
                "pgtier_keys_ins",
                "AFTER INSERT ON \"public\".\"t\" REFERENCING NEW TABLE AS n",
            ),
            (
                "pgtier_keys_upd",
                "AFTER UPDATE ON \"public\".\"t\" REFERENCING OLD TABLE AS o NEW TABLE AS n",
            ),
            (
                "pgtier_keys_del",
                "AFTER DELETE ON \"public\".\"t\" REFERENCING OLD TABLE AS o",
            ),
        ] {
            let create = format!("CREATE OR REPLACE TRIGGER {name} {head} {when} {call}");
            assert!(sql.contains(&create), "{create}\nnot in\n{sql}");
            let enable = format!("ALTER TABLE \"public\".\"t\" ENABLE ALWAYS TRIGGER {name};");
            assert!(sql.contains(&enable), "{enable}");
        }
        let notify = format!(
            "CREATE OR REPLACE TRIGGER pgtier_notify AFTER TRUNCATE ON \"public\".\"t\" {when} \
             EXECUTE FUNCTION pgtier.notify_change('w[[\"public\",\"t\"]]', '77');"
        );
        assert!(sql.contains(&notify), "{notify}\nnot in\n{sql}");
        assert!(sql.ends_with("ENABLE ALWAYS TRIGGER pgtier_notify;"));
        assert_eq!(sql.matches("CREATE OR REPLACE TRIGGER").count(), 4);
    }

    #[test]
    fn the_registry() {
        let setup = setup_sql();
        assert!(setup.contains(
            "CREATE TABLE IF NOT EXISTS pgtier.keys (relid oid NOT NULL, cols text[] NOT NULL, \
             PRIMARY KEY (relid, cols))"
        ));
        assert!(setup.contains("GRANT SELECT ON pgtier.keys TO PUBLIC"));
        assert!(!setup.contains("FUNCTION"), "functions are per table");
    }

    #[test]
    fn column_sets_are_non_empty_and_distinct() {
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert!(valid_set(&s(&["id"])));
        assert!(valid_set(&s(&["a", "b"])));
        assert!(!valid_set(&s(&[])));
        assert!(!valid_set(&s(&["a", "a"])));
        assert!(!valid_set(&s(&[""])));
    }
}
