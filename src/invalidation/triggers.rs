//! Installing and removing the change-capture triggers.
//!
//! One plpgsql function and one statement-level trigger per table
//! (`AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT`). The
//! payload names the written table as it is called when the trigger fires
//! (`TG_TABLE_SCHEMA`, `TG_TABLE_NAME`), so renames and schema moves cannot make
//! it announce a stale name; a reader depends on its tables' whole inheritance
//! family (see `Catalog::resolve`), so a write through a parent or straight into
//! a partition reaches both without the trigger doing catalog work.
//!
//! The statement triggers are `ENABLE ALWAYS`: writes made with `session_replication_role =
//! replica` (pg_restore, migration tools) are announced too. Logical replication's
//! apply worker fires row triggers only, so plain tables also get a row-level
//! trigger that is `ENABLE REPLICA` (it fires only in replica mode). Where the role may
//! create event triggers, DDL is announced too (also `ENABLE ALWAYS`); otherwise
//! the listener notices it by re-reading the catalog periodically.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::catalog::Catalog;
use super::payload::Payload;

pub const TRIGGER: &str = "pgtier_notify";
/// The row-level trigger for writes in `session_replication_role = replica`.
pub const REPLICA_TRIGGER: &str = "pgtier_notify_replica";
/// The statement triggers that report the keys a write changes (see `keyed`).
pub const KEYED_TRIGGERS: [&str; 3] = ["pgtier_keys_ins", "pgtier_keys_upd", "pgtier_keys_del"];

/// Which tables to cover; empty lists mean every user table.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub schemas: Vec<String>,
    /// `name` or `schema.name`.
    pub tables: Vec<String>,
}

impl Scope {
    pub fn covers(&self, schema: &str, name: &str) -> bool {
        let schema_ok = self.schemas.is_empty() || self.schemas.iter().any(|s| s == schema);
        let table_ok = self.tables.is_empty()
            || self.tables.iter().any(|t| match t.split_once('.') {
                Some((s, n)) => s == schema && n == name,
                None => t == name,
            });
        schema_ok && table_ok
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub tables: usize,
    pub event_triggers: bool,
    /// Tables whose triggers the role may not install (or make `ENABLE ALWAYS`,
    /// which needs ownership): they stay uncached.
    pub refused: Vec<u32>,
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Marks `pgtier.announce`'s body with the source it serves; see
/// [`announce_mode`].
pub const ANNOUNCE_NOTIFY: &str = "pgtier-announce: notify";
pub const ANNOUNCE_POLL: &str = "pgtier-announce: poll";

/// How triggers hand on what a write changed: a NOTIFY, or (`poll`) a row
/// in pgtier's change table, which takes no lock a writer waits for (see
/// `invalidation::poll`). Only the function may append: it runs as its
/// owner, and writers get no privilege on the table (one that chose its own
/// ids could move every poller's cursor past everyone's writes). Payloads
/// over NOTIFY's limit become `*`, as they would have failed there.
fn announce_sql(poll: bool) -> String {
    let body = if poll {
        format!(
            "  -- {ANNOUNCE_POLL}
  IF pg_catalog.octet_length(p) > 7999 THEN
    p := '*';
  END IF;
  INSERT INTO pgtier.changes (payload) VALUES (p);"
        )
    } else {
        format!(
            "  -- {ANNOUNCE_NOTIFY}
  PERFORM pg_catalog.pg_notify(ch, p);"
        )
    };
    let table = if poll {
        "CREATE UNLOGGED TABLE IF NOT EXISTS pgtier.changes (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tx xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
  payload text NOT NULL);
CREATE INDEX IF NOT EXISTS changes_tx ON pgtier.changes (tx);
REVOKE ALL ON pgtier.changes FROM PUBLIC;
"
    } else {
        ""
    };
    let definer = if poll {
        "SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    } else {
        ""
    };
    format!(
        "{table}CREATE OR REPLACE FUNCTION pgtier.announce(ch text, p text) RETURNS void
LANGUAGE plpgsql {definer} AS $pgtier$
BEGIN
{body}
END
$pgtier$;
GRANT EXECUTE ON FUNCTION pgtier.announce(text, text) TO PUBLIC;
"
    )
}

/// Which source `pgtier.announce` serves, if it exists: every pgtier of a
/// database must use the same one, or some would hear of no write.
pub async fn announce_mode(client: &Client) -> Result<Option<bool>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT prosrc FROM pg_catalog.pg_proc \
             WHERE oid = pg_catalog.to_regprocedure('pgtier.announce(text,text)')",
            &[],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, String>(0).contains(ANNOUNCE_POLL)))
}

fn function_sql(channel: &str, poll: bool) -> String {
    let ch = quote_literal(channel);
    let announce = announce_sql(poll);
    format!(
        "CREATE SCHEMA IF NOT EXISTS pgtier;
GRANT USAGE ON SCHEMA pgtier TO PUBLIC;
{announce}CREATE OR REPLACE FUNCTION pgtier.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $pgtier$
BEGIN
  -- pgtier-notify-v7. The table is named as it is called now: a payload fixed
  -- at install time went stale when the table was renamed. (TG_ARGV[0], the
  -- install-time payload, is only read by older versions.) Only tables a pgtier
  -- caches are announced: their watch
  -- sequence (TG_ARGV[1]) stands at 2. A notifying commit serialises with every
  -- other one (Postgres's notify queue lock is held through the commit), so
  -- tables nobody caches must not pay for it. The trigger's WHEN clause makes
  -- the same test without entering plpgsql; it is repeated here for triggers
  -- installed before it had one. (Not SECURITY DEFINER: that costs every write
  -- a privilege and search_path switch; writers instead may read the watch
  -- sequences, which say nothing but whether pgtier caches.)
  IF pg_sequence_last_value(TG_ARGV[1]::oid::regclass) > 1 THEN
    PERFORM pgtier.announce({ch}, 'w' || json_build_array(json_build_array(TG_TABLE_SCHEMA, TG_TABLE_NAME))::text);
  END IF;
  RETURN NULL;
END
$pgtier$;
COMMENT ON FUNCTION pgtier.notify_change() IS 'pgtier: announces writes for cache invalidation';"
    )
}

fn ddl_function_sql(channel: &str) -> String {
    let ch = quote_literal(channel);
    format!(
        "CREATE OR REPLACE FUNCTION pgtier.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $pgtier$
DECLARE
  t jsonb := '[]'::jsonb;
  r record;
BEGIN
  -- pgtier-ddl-v3. pgtier's own listener reloads the catalog after its DDL;
  -- announcing it would only echo back.
  IF current_setting('application_name', true) = 'pgtier-control' THEN
    RETURN;
  END IF;
  -- Privileges and row security policies change what a role may see without
  -- naming a relation here (GRANT ON ALL TABLES, schemas, columns): every
  -- entry of this database goes.
  IF TG_TAG IN ('GRANT', 'REVOKE', 'ALTER DEFAULT PRIVILEGES', 'CREATE POLICY',
                'ALTER POLICY', 'DROP POLICY', 'ALTER SCHEMA', 'DROP OWNED', 'REASSIGN OWNED') THEN
    PERFORM pg_notify({ch}, '*');
    RETURN;
  END IF;
  IF TG_EVENT = 'sql_drop' THEN
    FOR r IN SELECT schema_name AS s, object_name AS n FROM pg_event_trigger_dropped_objects()
             WHERE object_type IN ('table', 'view', 'materialized view', 'foreign table') LOOP
      t := t || jsonb_build_array(jsonb_build_array(r.s, r.n));
    END LOOP;
  ELSE
    FOR r IN SELECT n.nspname::text AS s, c.relname::text AS n
             FROM pg_event_trigger_ddl_commands() d
             JOIN pg_class c ON c.oid = d.objid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE d.classid = 'pg_class'::regclass LOOP
      t := t || jsonb_build_array(jsonb_build_array(r.s, r.n));
    END LOOP;
  END IF;
  IF length(t::text) > 7000 THEN
    PERFORM pg_notify({ch}, '*');
  ELSE
    PERFORM pg_notify({ch}, 'd' || t::text);
  END IF;
END
$pgtier$;
DROP EVENT TRIGGER IF EXISTS pgtier_ddl;
DROP EVENT TRIGGER IF EXISTS pgtier_drop;
CREATE EVENT TRIGGER pgtier_ddl ON ddl_command_end EXECUTE FUNCTION pgtier.on_ddl();
CREATE EVENT TRIGGER pgtier_drop ON sql_drop EXECUTE FUNCTION pgtier.on_ddl();
ALTER EVENT TRIGGER pgtier_ddl ENABLE ALWAYS;
ALTER EVENT TRIGGER pgtier_drop ENABLE ALWAYS;"
    )
}

/// The watch sequence of a table: at 2 while some pgtier caches it.
pub fn watch_sequence(oid: u32) -> String {
    format!("pgtier.w{oid}")
}

/// The statements that (re)create one table's triggers, given its watch
/// sequence's oid. Meant to run as one implicit transaction: `CREATE OR REPLACE
/// TRIGGER` resets a trigger to fire in origin mode only, and no other session
/// may see it in that state.
pub fn trigger_sql(catalog: &Catalog, oid: u32, sequence: u32) -> Option<String> {
    let r = catalog.get(oid)?;
    let family: Vec<(String, String)> = catalog
        .family(oid)
        .into_iter()
        .filter_map(|o| catalog.get(o).map(|m| (m.schema.clone(), m.name.clone())))
        .collect();
    let payload = Payload::write_payload(&family);
    let table = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.name));
    let args = format!("{}, '{sequence}'", quote_literal(&payload));
    // The WHEN test runs in the executor: a write to a table nobody caches
    // costs one sequence read, not a plpgsql call.
    let mut sql = format!(
        "CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
         FOR EACH STATEMENT WHEN (pg_sequence_last_value({sequence}::oid::regclass) > 1) \
         EXECUTE FUNCTION pgtier.notify_change({args});
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER {TRIGGER};"
    );
    // Only leaf tables: a row trigger on a partitioned table would be cloned to
    // its partitions (whose own would then clash with the clone), and rows are
    // written to the leaves anyway. ENABLE REPLICA: outside replica mode the
    // executor skips it without evaluating anything per row (a WHEN test of
    // the setting doubled the cost of a bulk INSERT).
    if r.kind == b'r' {
        sql.push_str(&format!(
            "CREATE OR REPLACE TRIGGER {REPLICA_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {table} \
             FOR EACH ROW WHEN (pg_sequence_last_value({sequence}::oid::regclass) > 1) \
             EXECUTE FUNCTION pgtier.notify_change({args});
             ALTER TABLE {table} ENABLE REPLICA TRIGGER {REPLICA_TRIGGER};"
        ));
    }
    Some(sql)
}

/// Install the function, the event triggers (when permitted) and the table
/// triggers. With `only_missing`, tables that already have the trigger are left
/// alone (the periodic auto-install); otherwise every trigger is (re)created so
/// payloads follow the current inheritance tree.
pub async fn install(
    client: &Client,
    channel: &str,
    scope: &Scope,
    only_missing: bool,
    poll: bool,
) -> Result<Report, tokio_postgres::Error> {
    client.batch_execute(&function_sql(channel, poll)).await?;
    let event_triggers = match client.batch_execute(&ddl_function_sql(channel)).await {
        Ok(()) => true,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            tracing::info!(
                "no permission to create event triggers; DDL is detected by periodic catalog scans"
            );
            false
        }
        Err(e) => return Err(e),
    };
    let catalog = Catalog::load(client, 0).await?;
    let mut tables = 0;
    let mut refused = Vec::new();
    for r in &catalog.relations {
        if !matches!(r.kind, b'r' | b'p') || !scope.covers(&r.schema, &r.name) {
            continue;
        }
        if only_missing && r.has_trigger {
            continue;
        }
        let seq = watch_sequence(r.oid);
        client
            .batch_execute(&format!(
                "CREATE SEQUENCE IF NOT EXISTS {seq} MINVALUE 1 MAXVALUE 2 START 1 NO CYCLE;
                 GRANT SELECT ON SEQUENCE {seq} TO PUBLIC"
            ))
            .await?;
        let seq_oid: i64 = client
            .query_one("SELECT $1::text::regclass::oid::int8", &[&seq])
            .await?
            .get(0);
        if let Some(sql) = trigger_sql(&catalog, r.oid, seq_oid as u32) {
            match client.batch_execute(&sql).await {
                Ok(()) => tables += 1,
                // ENABLE ALWAYS needs the table's owner; the table stays
                // uncached rather than announced only in origin mode.
                Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                    tracing::warn!(
                        table = format!("{}.{}", r.schema, r.name),
                        error = %e,
                        "cannot install the invalidation triggers (ENABLE ALWAYS needs the table's owner); \
                         the table is not cached: run `pgtier install-triggers` as its owner"
                    );
                    refused.push(r.oid);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Report {
        tables,
        event_triggers,
        refused,
    })
}

/// Start announcing writes to these tables, then wait until every transaction
/// that might have written them without announcing it has ended; from then on
/// results read from them may be cached. Returns the tables now watched (none
/// if some old writer is still running after `patience`).
///
/// A writer whose trigger looked before the setval holds a write lock on the
/// table until it ends, so only those transactions are waited for: a long
/// read-only transaction (a report, pg_dump) does not hold a watch up.
pub async fn watch(
    client: &Client,
    oids: &[u32],
    patience: std::time::Duration,
) -> Result<Vec<u32>, tokio_postgres::Error> {
    let mut set = Vec::with_capacity(oids.len());
    for oid in oids {
        // A table whose trigger predates watch sequences has none: skip it (it
        // stays uncached until its trigger is reinstalled).
        // Under the table's switch lock, so it cannot land in the middle of
        // another instance's `unwatch`.
        let ok: bool = client
            .query_one(
                "SELECT CASE WHEN pg_advisory_lock($2) IS NULL THEN false
                             WHEN to_regclass($1) IS NULL THEN false
                             ELSE setval($1::text::regclass, 2) > 0 END",
                &[&watch_sequence(*oid), &switch_lock(*oid)],
            )
            .await?
            .get(0);
        client
            .query_one("SELECT pg_advisory_unlock($1)", &[&switch_lock(*oid)])
            .await?;
        if ok {
            set.push(*oid);
        }
    }
    if drain_writers(client, &set, patience).await? {
        Ok(set)
    } else {
        Ok(Vec::new())
    }
}

/// Wait until every transaction now holding a write lock on one of these
/// tables has ended: true once they have, false if some is still running after
/// `patience`. Transactions that take a write lock later are not waited for.
pub async fn drain_writers(
    client: &Client,
    oids: &[u32],
    patience: std::time::Duration,
) -> Result<bool, tokio_postgres::Error> {
    if oids.is_empty() {
        return Ok(true);
    }
    let rels: Vec<i64> = oids.iter().map(|o| *o as i64).collect();
    const WRITERS: &str = "SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}')
         FROM pg_locks
         WHERE locktype = 'relation' AND relation = ANY($1::int8[]::oid[])
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND mode NOT IN ('AccessShareLock', 'RowShareLock') AND pid IS DISTINCT FROM pg_backend_pid()";
    let writers: Vec<String> = client.query_one(WRITERS, &[&rels]).await?.get(0);
    if writers.is_empty() {
        return Ok(true);
    }
    let deadline = std::time::Instant::now() + patience;
    let mut pause = std::time::Duration::from_micros(500);
    loop {
        // Writers' transactions are usually a millisecond or two: poll fast
        // first, since reads of these tables go uncached until this returns.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(5));
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'relation' AND relation = ANY($1::int8[]::oid[])
                   AND virtualtransaction = ANY($2)",
                &[&rels, &writers],
            )
            .await?
            .get(0);
        if left == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
    }
}

/// The advisory lock key that serialises switching one table's announcing on
/// and off, across pgtier instances (writers never take it).
pub(super) fn switch_lock(oid: u32) -> i64 {
    0x7067_7469_0000_0000 | oid as i64
}

/// Stop announcing writes to these tables (those still announced). The `u`
/// notification commits first, and only then does announcing stop: every
/// pgtier has dropped the tables' entries before an unannounced write can
/// commit after it in the stream, and a session's read-your-writes fence comes
/// after the `u`. The switch locks keep any instance from watching a table
/// again until this is done; if this connection dies half-way, Postgres
/// releases them and the tables simply stay announced. Returns how many
/// tables were switched off.
pub async fn unwatch(
    client: &Client,
    channel: &str,
    tables: &[(u32, String, String)],
) -> Result<usize, tokio_postgres::Error> {
    let mut done = 0;
    // Bounded batches keep the payload under Postgres's 8000 bytes.
    for chunk in tables.chunks(64) {
        let mut keys: Vec<i64> = chunk.iter().map(|t| switch_lock(t.0)).collect();
        keys.sort_unstable();
        keys.dedup();
        let oids: Vec<i64> = chunk.iter().map(|t| t.0 as i64).collect();
        let schemas: Vec<&str> = chunk.iter().map(|t| t.1.as_str()).collect();
        let names: Vec<&str> = chunk.iter().map(|t| t.2.as_str()).collect();
        client
            .query(
                "SELECT pg_advisory_lock(k) FROM unnest($1::int8[]) AS k ORDER BY k",
                &[&keys],
            )
            .await?;
        let result = async {
            let on: Vec<i64> = client
                .query_one(
                    "WITH on_ AS MATERIALIZED (
                       SELECT o, s, n FROM unnest($2::int8[], $3::text[], $4::text[]) AS t(o, s, n)
                       WHERE to_regclass('pgtier.w' || o) IS NOT NULL
                         AND pg_sequence_last_value(('pgtier.w' || o)::regclass) = 2),
                     sent AS (SELECT pg_notify($1, 'u' || json_agg(json_build_array(s, n))::text)
                              FROM on_ HAVING count(*) > 0)
                     SELECT coalesce((SELECT array_agg(o) FROM on_), '{}'), (SELECT count(*) FROM sent)",
                    &[&channel, &oids, &schemas, &names],
                )
                .await?
                .get(0);
            if !on.is_empty() {
                client
                    .query(
                        "SELECT setval(('pgtier.w' || o)::regclass, 1) FROM unnest($1::int8[]) AS o",
                        &[&on],
                    )
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(on.len())
        }
        .await;
        client
            .query(
                "SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k",
                &[&keys],
            )
            .await?;
        done += result?;
    }
    Ok(done)
}

/// Remove everything `install` and `keyed::register` created.
pub async fn uninstall(client: &Client) -> Result<usize, tokio_postgres::Error> {
    let mut names = vec![TRIGGER, REPLICA_TRIGGER];
    names.extend(KEYED_TRIGGERS);
    let rows = client
        .query(
            "SELECT DISTINCT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = ANY($1::text[]::name[]) AND NOT t.tgisinternal",
            &[&names],
        )
        .await?;
    for row in &rows {
        let rel: String = row.get(0);
        let drops: String = names
            .iter()
            .map(|t| format!("DROP TRIGGER IF EXISTS {t} ON {rel};"))
            .collect();
        client.batch_execute(&drops).await?;
    }
    match client
        .batch_execute(
            "DROP EVENT TRIGGER IF EXISTS pgtier_ddl; DROP EVENT TRIGGER IF EXISTS pgtier_drop;",
        )
        .await
    {
        Ok(()) => {}
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {}
        Err(e) => return Err(e),
    }
    client
        .batch_execute("DROP SCHEMA IF EXISTS pgtier CASCADE")
        .await?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_matching() {
        let all = Scope::default();
        assert!(all.covers("public", "t"));
        let s = Scope {
            schemas: vec!["app".into()],
            tables: vec![],
        };
        assert!(s.covers("app", "t") && !s.covers("public", "t"));
        let t = Scope {
            schemas: vec![],
            tables: vec!["public.a".into(), "b".into()],
        };
        assert!(t.covers("public", "a") && !t.covers("x", "a") && t.covers("x", "b"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("We\"ird"), "\"We\"\"ird\"");
    }
}
