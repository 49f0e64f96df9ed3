//! Installing and removing the change-capture triggers.
//!
//! One plpgsql function and one statement-level trigger per table
//! (`AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT`). The
//! payload is a trigger argument fixed at install time: the table plus its
//! inheritance family, so the trigger does no catalog work per statement and a
//! write through a parent or straight into a partition reaches both. Where the
//! role may create event triggers, DDL is announced too; otherwise the listener
//! notices it by re-reading the catalog periodically.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::catalog::Catalog;
use super::payload::Payload;

pub const TRIGGER: &str = "pgtier_notify";

/// Which tables to cover; empty lists mean every user table.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub schemas: Vec<String>,
    /// `name` or `schema.name`.
    pub tables: Vec<String>,
}

impl Scope {
    fn covers(&self, schema: &str, name: &str) -> bool {
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
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn function_sql(channel: &str) -> String {
    let ch = quote_literal(channel);
    format!(
        "CREATE SCHEMA IF NOT EXISTS pgtier;
CREATE OR REPLACE FUNCTION pgtier.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $pgtier$
BEGIN
  PERFORM pg_notify({ch}, TG_ARGV[0]);
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
CREATE EVENT TRIGGER pgtier_drop ON sql_drop EXECUTE FUNCTION pgtier.on_ddl();"
    )
}

/// The CREATE TRIGGER statement for one table.
pub fn trigger_sql(catalog: &Catalog, oid: u32) -> Option<String> {
    let r = catalog.get(oid)?;
    let family: Vec<(String, String)> = catalog
        .family(oid)
        .into_iter()
        .filter_map(|o| catalog.get(o).map(|m| (m.schema.clone(), m.name.clone())))
        .collect();
    let payload = Payload::write_payload(&family);
    Some(format!(
        "CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {}.{} \
         FOR EACH STATEMENT EXECUTE FUNCTION pgtier.notify_change({})",
        quote_ident(&r.schema),
        quote_ident(&r.name),
        quote_literal(&payload)
    ))
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
) -> Result<Report, tokio_postgres::Error> {
    client.batch_execute(&function_sql(channel)).await?;
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
    for r in &catalog.relations {
        if !matches!(r.kind, b'r' | b'p') || !scope.covers(&r.schema, &r.name) {
            continue;
        }
        if only_missing && r.has_trigger {
            continue;
        }
        if let Some(sql) = trigger_sql(&catalog, r.oid) {
            client.batch_execute(&sql).await?;
            tables += 1;
        }
    }
    Ok(Report {
        tables,
        event_triggers,
    })
}

/// Remove everything `install` created.
pub async fn uninstall(client: &Client) -> Result<usize, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE t.tgname = $1 AND NOT t.tgisinternal",
            &[&TRIGGER],
        )
        .await?;
    for row in &rows {
        let rel: String = row.get(0);
        client
            .batch_execute(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {rel}"))
            .await?;
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
