//! The listener's work on the catalog and the triggers: re-reading the
//! catalog after DDL, watching and unwatching tables, installing what is
//! missing, and announcing through the channel (or the stream).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::counter;
use tokio_postgres::Client;

use super::Listener;
use crate::invalidation::catalog::Catalog;
use crate::invalidation::fingerprint;
use crate::invalidation::logical::publication;
use crate::invalidation::payload::Payload;
use crate::invalidation::triggers;

static CATALOG_VERSION: AtomicU64 = AtomicU64::new(1);

impl Listener {
    /// The catalog side of DDL: re-read it, put triggers on new tables, watch them.
    pub(super) async fn after_ddl(&self, client: &Client) -> anyhow::Result<()> {
        self.reload_catalog(client).await?;
        if self.settings.logical.is_some() {
            if self.settings.auto_install
                && self.missing_triggers()
                && self.install_missing(client).await? > 0
            {
                self.reload_catalog(client).await?;
            }
            self.watch_covered(None);
            return Ok(());
        }
        if self.settings.auto_install && self.missing_triggers() {
            self.install_missing(client).await?;
            self.reload_catalog(client).await?;
        }
        if self.settings.eager_watch {
            self.watch_all(client).await?;
        }
        Ok(())
    }

    /// Watch every table that has a trigger and was not watched eagerly before
    /// (eager mode).
    pub(super) async fn watch_all(&self, client: &Client) -> anyhow::Result<()> {
        let oids: Vec<u32> = {
            let done = self
                .eagerly_watched
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            self.db
                .catalog
                .load()
                .relations
                .iter()
                .filter(|r| r.has_trigger && !done.contains(&r.oid))
                .map(|r| r.oid)
                .collect()
        };
        if !oids.is_empty() {
            let ticket = self.db.watches.ticket();
            let now = triggers::watch(client, &oids, Duration::from_secs(5)).await?;
            let now = self.db.watches.mark(&now, ticket);
            if let Ok(mut done) = self.eagerly_watched.lock() {
                done.extend(now);
            }
        }
        Ok(())
    }

    /// Logical source: mark these tables (or every one) watched where the
    /// stream covers them. Nothing to wait for: the stream reports every
    /// change of a published table committed since it started.
    pub(super) fn watch_covered(&self, only: Option<Vec<u32>>) {
        let catalog = self.db.catalog.load();
        let oids: Vec<u32> = match only {
            Some(o) => o
                .into_iter()
                .filter(|o| catalog.get(*o).is_some_and(|r| r.has_trigger))
                .collect(),
            None => catalog
                .relations
                .iter()
                .filter(|r| r.has_trigger)
                .map(|r| r.oid)
                .collect(),
        };
        if !oids.is_empty() {
            let ticket = self.db.watches.ticket();
            self.db.watches.mark(&oids, ticket);
        }
    }

    /// Switch announcing off for tables written in quick succession (see
    /// `Applier`), and tell every instance. Run inline in the loop, never
    /// beside a watch of ours on the same connection (see `triggers::unwatch`).
    pub(super) async fn unwatch(&self, client: &Client, mut oids: Vec<u32>) -> anyhow::Result<()> {
        oids.sort_unstable();
        oids.dedup();
        let catalog = self.db.catalog.load();
        let tables: Vec<(u32, String, String)> = oids
            .iter()
            .filter_map(|o| {
                catalog
                    .get(*o)
                    .map(|r| (*o, r.schema.clone(), r.name.clone()))
            })
            .collect();
        if !tables.is_empty() {
            let n = triggers::unwatch(client, &self.settings.channel, &tables).await?;
            counter!("pgtier_unwatches_total", "database" => self.db.name.clone())
                .increment(n as u64);
        }
        Ok(())
    }

    /// Tables in scope that have no trigger yet (created since the last install)
    /// and that the role has not been refused.
    pub(super) fn missing_triggers(&self) -> bool {
        let Ok(tracked) = self.tracked.lock() else {
            return false;
        };
        self.db.catalog.load().relations.iter().any(|r| {
            matches!(r.kind, b'r' | b'p')
                && !r.has_trigger
                && !tracked.refused.contains(&r.oid)
                && self.settings.scope.covers(&r.schema, &r.name)
        })
    }

    /// Install triggers where they are missing (with the logical source: add
    /// tables to the publication); returns how many tables got them.
    pub(super) async fn install_missing(&self, client: &Client) -> anyhow::Result<usize> {
        let s = &self.settings;
        if let Some(l) = &s.logical {
            let skip = match self.tracked.lock() {
                Ok(t) => t.refused.iter().copied().collect(),
                Err(_) => anyhow::bail!("poisoned"),
            };
            let r = publication::sync(client, &l.publication, &s.scope, &skip).await?;
            if let Ok(mut t) = self.tracked.lock() {
                t.refused.extend(r.refused);
            }
            return Ok(r.added);
        }
        // Never switch another pgtier's source under it (only the
        // install-triggers command does, on purpose).
        self.same_announce(client).await?;
        let r = triggers::install(client, &s.channel, &s.scope, true, s.poll.is_some()).await?;
        if let Ok(mut t) = self.tracked.lock() {
            t.refused.extend(r.refused);
        }
        Ok(r.tables)
    }

    /// `pgtier.announce` sends writes where this pgtier reads them (or does
    /// not exist yet): with another source's, it would hear of none.
    pub(super) async fn same_announce(&self, client: &Client) -> anyhow::Result<()> {
        let poll = self.settings.poll.is_some();
        match triggers::announce_mode(client).await? {
            Some(m) if m != poll => anyhow::bail!(
                "pgtier.announce in {} serves invalidation.source = \"{}\", this pgtier uses \"{}\": \
                 every pgtier of a database must use the same source \
                 (`pgtier install-triggers --invalidation-source ...` switches the database)",
                self.db.name,
                if m { "poll" } else { "notify" },
                if poll { "poll" } else { "notify" },
            ),
            _ => Ok(()),
        }
    }

    /// Tell every pgtier (this one included) through the channel.
    pub(super) async fn announce(&self, client: &Client, payload: &str) -> anyhow::Result<()> {
        if self.settings.logical.is_some() {
            // Into the stream, where every change is applied in commit order.
            client
                .execute(
                    "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)",
                    &[&self.settings.channel, &payload],
                )
                .await?;
            return Ok(());
        }
        client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&self.settings.channel, &payload],
            )
            .await?;
        Ok(())
    }

    /// Compare roles (and, without event triggers, privileges) with the last
    /// look. A change may let any role see more or less of anything, so every
    /// entry of this database goes. Returns whether privileges changed (the
    /// catalog should be re-read).
    pub(super) async fn poll_global(&self, client: &Client) -> anyhow::Result<bool> {
        let last = match self.tracked.lock() {
            Ok(t) => t.global.clone(),
            Err(_) => anyhow::bail!("poisoned"),
        };
        let now = fingerprint::global(client, last.as_ref()).await?;
        if let Ok(mut t) = self.tracked.lock() {
            t.global = Some(now.clone());
        }
        let Some(before) = last else {
            return Ok(false);
        };
        if !before.changed(&now) {
            return Ok(false);
        }
        tracing::debug!(database = %self.db.name, "roles or privileges changed");
        self.db.invalidate_local_all();
        self.cache.clear_descriptions();
        self.announce(client, "*").await?;
        Ok(before.access != now.access)
    }

    /// Re-read the catalog and invalidate relations that changed under us
    /// (renamed, dropped, altered, lost their trigger, privileges, row
    /// security, view definitions, partitions, inheritance): this also covers
    /// DDL made where no event trigger reports it.
    pub(super) async fn reload_catalog(&self, client: &Client) -> anyhow::Result<()> {
        let version = CATALOG_VERSION.fetch_add(1, Ordering::Relaxed);
        // One snapshot for all of it: DDL committed half-way through a read
        // would otherwise land in the checksums but not in the catalog, and
        // the next read (which that DDL's notification asks for) would see no
        // difference and kill nothing.
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let read = async {
            let mut catalog = Catalog::load(client, version).await?;
            if let Some(l) = &self.settings.logical {
                publication::mark_covered(client, &l.publication, &mut catalog).await?;
            }
            let fp = fingerprint::relations(client).await?;
            Ok::<_, tokio_postgres::Error>((catalog, fp))
        }
        .await;
        client.batch_execute("COMMIT").await?;
        let (new, new_fp) = read?;
        let old = self.db.catalog.load();
        let changes = match self.tracked.lock() {
            // The first read of a session has nothing to compare with (its
            // epoch is new anyway).
            Ok(_) if old.version == 0 => Default::default(),
            Ok(t) => fingerprint::compare(&old, &t.relations, &new, &new_fp),
            Err(_) => anyhow::bail!("poisoned"),
        };
        // A table whose trigger went or was replaced must be watched afresh
        // (named as the old catalog knows it, before it is replaced).
        self.db.stop_watching(&changes.triggers, true);
        // New resolutions before the entries go: a fill that resolved against
        // the old catalog either took its snapshot before the bumps below, or
        // is killed by the notification after them.
        // Functions, operators, casts or role settings (not tied to a relation).
        let routines_changed =
            old.version != 0 && new.routines.fingerprint != old.routines.fingerprint;
        self.db.set_catalog(new);
        if let Ok(mut t) = self.tracked.lock() {
            t.relations = new_fp;
        }
        if !changes.names.is_empty() {
            tracing::debug!(database = %self.db.name, changed = ?changes.names, "catalog changed");
            self.db.invalidate_local(&changes.names);
            self.cache.clear_descriptions();
            // Every pgtier applies it at the same point of the stream (L2).
            self.announce(client, &Payload::ddl_payload(&changes.names))
                .await?;
        }
        if routines_changed {
            tracing::debug!(database = %self.db.name, "functions, operators, casts or role settings changed");
            self.db.invalidate_routines_local();
            self.cache.clear_descriptions();
            // `d[]`: DDL on no relation, which every pgtier applies to the
            // routines slot at the same point of the stream.
            self.announce(client, &Payload::ddl_payload(&[])).await?;
        }
        Ok(())
    }
}
