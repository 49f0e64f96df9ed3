//! Key-reporting triggers (issue 14, the write side): writes to a table with
//! registered column sets announce, for each set, the values of those columns
//! in every row they change, so entries that read other keys of the table can
//! stay cached.
//!
//! A registered table has three statement triggers with transition tables
//! (`pgtier_keys_ins`, `_upd`, `_del`; Postgres allows one event per trigger
//! with transition tables), all `ENABLE ALWAYS` and calling
//! `pgtier.notify_keys()`, and its `pgtier_notify` is re-created for TRUNCATE
//! only. Each write statement then sends one notification:
//!
//! - `k["schema","table",[[["c1","c2"],[["v1","v2"],...]],...]]`: for each
//!   column set (as registered), the distinct value tuples of the rows the
//!   statement changed (INSERT: new rows; DELETE: old rows; UPDATE: old and
//!   new, so a key that moves is reported under both values), each value as
//!   Postgres prints it (`col::text`). Tuples with a NULL are left out (no
//!   equality lookup finds them), and so are sets left with no tuple; a
//!   statement that changed no reportable tuple sends nothing.
//! - `w[["schema", "table"]]` instead when the statement changed more than
//!   `MAX_ROWS` rows (counted before anything is aggregated), when the payload
//!   (or a single value) would exceed `MAX_BYTES`, or when a registered column
//!   no longer exists (renamed or dropped: writes must never fail because of
//!   pgtier).
//!
//! The function builds one query per column set and statement (`EXECUTE`, so
//! only the key columns are read and each value is exactly `col::text`); that
//! planning is most of its cost, about 0.2 ms per write statement.
//!
//! TRUNCATE (through `pgtier_notify`) stays table-level, and so do the writes
//! of logical replication's apply worker, which fires row triggers only (the
//! row trigger `pgtier_notify_replica` is left as it is); a session in replica
//! mode (pg_restore) fires both, and sends both `w` and `k`.
//!
//! The registry `pgtier.keys (relid, cols)` records which column sets each
//! table reports. The triggers carry the same column sets as arguments
//! (`notify_keys('<watch sequence oid>', '["c1","c2"]', ...)`), written in the
//! same transaction as the registry row, and the function reads them from
//! there rather than from the registry: trigger definitions are read with a
//! fresh catalog snapshot, while a query of the registry in a REPEATABLE READ
//! writer whose snapshot predates the registration would miss the new column
//! set, and its write would not be reported under it.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::catalog::Catalog;
use super::payload::Payload;
use super::triggers::{drain_writers, switch_lock, watch_sequence, KEYED_TRIGGERS, TRIGGER};

/// Statements changing more rows than this announce the whole table.
pub const MAX_ROWS: usize = 1000;
/// Key payloads longer than this (bytes) announce the whole table instead
/// (Postgres refuses payloads of 8000 bytes and more).
pub const MAX_BYTES: usize = 7900;

/// Serialises creating the registry and the function across pgtier instances.
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

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The body of `pgtier.notify_keys()`, with `channel` baked in.
pub fn function_body(channel: &str) -> String {
    let ch = quote_literal(channel);
    format!(
        "
DECLARE
  nrows int8;
  i int;
  found int;
  wanted int;
  sel text;
  nonnull text;
  long text;
  too_long bool;
  size int8 := 0;
  xs text;
  ordered text;
  src text;
  vals json;
  sets text[] := '{{}}';
  payload text;
BEGIN
  -- pgtier-keys-v1. TG_ARGV[0] is the table's watch sequence (at 2 while some
  -- pgtier caches the table); TG_ARGV[1..] are the registered column sets, each
  -- a JSON array of column names (read from the trigger, not from
  -- pgtier.keys: see src/invalidation/keyed.rs). Not SECURITY DEFINER, like
  -- pgtier.notify_change().
  IF NOT coalesce(pg_sequence_last_value(TG_ARGV[0]::oid::regclass) > 1, false) THEN
    RETURN NULL;
  END IF;
  -- Count before aggregating: a large statement announces the whole table.
  IF TG_OP = 'INSERT' THEN
    SELECT count(*) INTO nrows FROM (SELECT FROM n LIMIT {limit}) l;
  ELSE
    SELECT count(*) INTO nrows FROM (SELECT FROM o LIMIT {limit}) l;
  END IF;
  IF nrows > {max_rows} THEN
    PERFORM pg_notify({ch}, 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
    RETURN NULL;
  END IF;
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    -- Values are cut to {cut} characters before anything else sees them: one
    -- that long is over the payload bound anyway, and a long key column must
    -- not make the aggregate large.
    SELECT string_agg(format('left(%I::text, {cut}) AS x%s', a.c, a.k), ', ' ORDER BY a.k),
           string_agg(format('x%s IS NOT NULL', a.k), ' AND ' ORDER BY a.k),
           string_agg(format('octet_length(x%s) > {max_bytes}', a.k), ' OR ' ORDER BY a.k),
           string_agg(format('x%s', a.k), ', ' ORDER BY a.k),
           string_agg(format('x%s COLLATE \"C\"', a.k), ', ' ORDER BY a.k),
           count(t.attname), count(*)
      INTO sel, nonnull, long, xs, ordered, found, wanted
      FROM json_array_elements_text(TG_ARGV[i]::json) WITH ORDINALITY AS a(c, k)
      LEFT JOIN pg_attribute t ON t.attrelid = TG_RELID AND t.attname = a.c
                              AND t.attnum > 0 AND NOT t.attisdropped;
    IF found < wanted OR wanted = 0 THEN
      -- A registered column was renamed or dropped.
      PERFORM pg_notify({ch}, 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
      RETURN NULL;
    END IF;
    src := CASE TG_OP WHEN 'INSERT' THEN format('SELECT %s FROM n', sel)
                      WHEN 'DELETE' THEN format('SELECT %s FROM o', sel)
                      ELSE format('SELECT %s FROM o UNION SELECT %s FROM n', sel, sel) END;
    EXECUTE format('SELECT coalesce(bool_or(%s), false),
                           json_agg(json_build_array(%s) ORDER BY %s) FILTER (WHERE NOT (%s))
                    FROM (SELECT DISTINCT * FROM (%s) s WHERE %s) d',
                   long, xs, ordered, long, src, nonnull)
      INTO too_long, vals;
    IF vals IS NOT NULL THEN
      sets := sets || json_build_array(TG_ARGV[i]::json, vals)::text;
      size := size + octet_length(sets[cardinality(sets)]);
    END IF;
    IF too_long OR size > {max_bytes} THEN
      PERFORM pg_notify({ch}, 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
      RETURN NULL;
    END IF;
  END LOOP;
  IF cardinality(sets) = 0 THEN
    RETURN NULL;
  END IF;
  payload := 'k[' || to_json(TG_TABLE_SCHEMA)::text || ',' || to_json(TG_TABLE_NAME)::text
             || ',[' || array_to_string(sets, ',') || ']]';
  IF octet_length(payload) > {max_bytes} THEN
    payload := 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text;
  END IF;
  PERFORM pg_notify({ch}, payload);
  RETURN NULL;
END
",
        limit = MAX_ROWS + 1,
        cut = MAX_BYTES + 1,
        max_rows = MAX_ROWS,
        max_bytes = MAX_BYTES,
    )
}

/// Creates the registry and `pgtier.notify_keys()` (replacing an older one).
pub fn setup_sql(channel: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS pgtier;
GRANT USAGE ON SCHEMA pgtier TO PUBLIC;
CREATE TABLE IF NOT EXISTS pgtier.keys (relid oid NOT NULL, cols text[] NOT NULL, PRIMARY KEY (relid, cols));
GRANT SELECT ON pgtier.keys TO PUBLIC;
CREATE OR REPLACE FUNCTION pgtier.notify_keys() RETURNS trigger
LANGUAGE plpgsql AS $pgtier${}$pgtier$;
COMMENT ON FUNCTION pgtier.notify_keys() IS 'pgtier: announces the keys writes change, for cache invalidation';",
        function_body(channel)
    )
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
/// `pgtier_notify` fire on TRUNCATE only. `table` is the quoted qualified name.
/// Meant to run inside one transaction (see `triggers::trigger_sql`).
pub fn trigger_sql(
    table: &str,
    sequence: u32,
    args: &[String],
    truncate_args: &[String],
) -> String {
    let list = |a: &[String]| {
        a.iter()
            .map(|s| quote_literal(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let keyed = list(args);
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
             FOR EACH STATEMENT {when} EXECUTE FUNCTION pgtier.notify_keys({keyed});
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

    let body = function_body(channel);
    let ready: bool = client
        .query_one(
            "SELECT to_regclass('pgtier.keys') IS NOT NULL
                    AND coalesce((SELECT prosrc = $1 FROM pg_proc
                                  WHERE oid = to_regprocedure('pgtier.notify_keys()')), false)",
            &[&body],
        )
        .await?
        .get(0);
    if !ready {
        client
            .query_one("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK])
            .await?;
        client.batch_execute(&setup_sql(channel)).await?;
    }
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
            "SELECT tgname::text, tgtype::int4, tgenabled = 'A', tgargs FROM pg_trigger
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
    let args = trigger_args(sequence, &sets);
    let truncate = truncate_args(&schema, &name, sequence);
    let want = [
        (KEYED_TRIGGERS[0], TYPE_INSERT, tgargs(&args)),
        (KEYED_TRIGGERS[1], TYPE_UPDATE, tgargs(&args)),
        (KEYED_TRIGGERS[2], TYPE_DELETE, tgargs(&args)),
        (TRIGGER, TYPE_TRUNCATE, tgargs(&truncate)),
    ];
    let in_place = want.iter().all(|(name, ty, args)| {
        have.iter().any(|r| {
            r.get::<_, String>(0) == *name
                && r.get::<_, i32>(1) == *ty
                && r.get::<_, bool>(2)
                && r.get::<_, Vec<u8>>(3) == *args
        })
    });
    if !in_place {
        client
            .batch_execute(&trigger_sql(&table, sequence, &args, &truncate))
            .await?;
    }
    Ok(true)
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
        let sql = trigger_sql("\"public\".\"t\"", 77, &args, &truncate);
        let when = "FOR EACH STATEMENT WHEN (pg_sequence_last_value(77::oid::regclass) > 1)";
        let call = r#"EXECUTE FUNCTION pgtier.notify_keys('77', '["id"]', '["it''s"]');"#;
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
    fn the_function_bakes_in_the_channel_and_the_bounds() {
        let body = function_body("pg'tier");
        assert!(body.contains("pgtier-keys-v1"));
        assert!(body.contains("pg_notify('pg''tier', payload)"));
        assert!(body.contains("LIMIT 1001"));
        assert!(body.contains("nrows > 1000"));
        assert!(body.contains("octet_length(payload) > 7900"));
        assert!(
            !body.contains("$pgtier$"),
            "the body must not end its quoting"
        );
        let setup = setup_sql("ch");
        assert!(setup.contains(
            "CREATE TABLE IF NOT EXISTS pgtier.keys (relid oid NOT NULL, cols text[] NOT NULL, \
             PRIMARY KEY (relid, cols))"
        ));
        assert!(setup.contains("GRANT SELECT ON pgtier.keys TO PUBLIC"));
        assert!(setup.contains("RETURNS trigger\nLANGUAGE plpgsql AS $pgtier$\n"));
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
