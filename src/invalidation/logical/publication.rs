//! The publication the logical source streams: created and filled by `pgtier
//! install-triggers` (and, with `auto_install`, by the listener for tables
//! created later), dropped by `uninstall-triggers`. It lists tables one by
//! one, and only those with a replica identity: a table without one in a
//! publication that publishes UPDATE and DELETE would make those statements
//! fail for the application.

use std::collections::HashSet;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::invalidation::catalog::Catalog;
use crate::invalidation::triggers::Scope;

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// What `sync` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub created: bool,
    /// Tables added now.
    pub added: usize,
    /// Tables in scope left out: no replica identity (schema.name).
    pub no_identity: Vec<String>,
    /// Tables the role may not add (it must own them).
    pub refused: Vec<u32>,
}

/// Plain tables (partitions included) in user schemas that are logged and not
/// yet in the publication, with whether their replica identity lets UPDATE
/// and DELETE be published.
const CANDIDATES: &str = "
SELECT c.oid::int8, n.nspname::text, c.relname::text,
       c.relreplident = 'f'
       OR (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i
                                             WHERE i.indrelid = c.oid AND i.indisreplident))
       OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i
                                             WHERE i.indrelid = c.oid AND i.indisprimary))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtier')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_publication_tables t
                  WHERE t.pubname = $1 AND t.schemaname = n.nspname AND t.tablename = c.relname)";

/// Create the publication if it is missing and add the tables of `scope` that
/// are not in it yet; `skip` are tables refused before (not tried again).
pub async fn sync(
    client: &Client,
    publication: &str,
    scope: &Scope,
    skip: &HashSet<u32>,
) -> Result<Report, tokio_postgres::Error> {
    let mut report = Report::default();
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} WITH (publish = 'insert, update, delete, truncate')",
                ident(publication)
            ))
            .await?;
        report.created = true;
    }
    for row in client.query(CANDIDATES, &[&publication]).await? {
        let oid = row.get::<_, i64>(0) as u32;
        let (schema, name): (String, String) = (row.get(1), row.get(2));
        if skip.contains(&oid) || !scope.covers(&schema, &name) {
            continue;
        }
        if !row.get::<_, bool>(3) {
            report.no_identity.push(format!("{schema}.{name}"));
            continue;
        }
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}.{}",
            ident(publication),
            ident(&schema),
            ident(&name)
        );
        match client.batch_execute(&sql).await {
            Ok(()) => report.added += 1,
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                report.refused.push(oid)
            }
            // Dropped or renamed meanwhile: the next sync sees it as it is.
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(report)
}

/// Drop the publication (uninstall); whether it existed.
pub async fn drop(client: &Client, publication: &str) -> Result<bool, tokio_postgres::Error> {
    let existed = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            ident(publication)
        ))
        .await?;
    Ok(existed)
}

/// Which relations the stream reports every change of: tables in the
/// publication without a row filter, when it publishes all four kinds of
/// change. None if the publication does not exist.
const COVERED: &str = "
SELECT c.oid::int8
FROM pg_publication p
JOIN pg_publication_tables t ON t.pubname = p.pubname
JOIN pg_namespace n ON n.nspname = t.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
WHERE p.pubname = $1 AND p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate
  AND to_jsonb(t) ->> 'rowfilter' IS NULL";

/// Whether the publication exists.
pub async fn exists(client: &Client, publication: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some())
}

/// Mark the relations whose writes the stream reports as announced (the
/// catalog's `has_trigger`, which is what makes a relation cacheable): the
/// published tables, and partitioned tables (they hold no rows; a read of one
/// is cacheable once all its partitions are). Nothing else.
pub async fn mark_covered(
    client: &Client,
    publication: &str,
    catalog: &mut Catalog,
) -> Result<(), tokio_postgres::Error> {
    let covered: HashSet<u32> = client
        .query(COVERED, &[&publication])
        .await?
        .iter()
        .map(|r| r.get::<_, i64>(0) as u32)
        .collect();
    for r in &mut catalog.relations {
        r.has_trigger = match r.kind {
            b'r' => covered.contains(&r.oid),
            b'p' => true,
            _ => false,
        };
        // No trigger identity to track: a relation leaving the publication
        // shows as `has_trigger` turning false.
        r.trigger_oid = 0;
    }
    Ok(())
}
