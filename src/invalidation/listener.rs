//! The listener: one task per cached database, holding a dedicated connection
//! with `LISTEN`, applying invalidations in batches, watching its own health, and
//! keeping the catalog current. While it is not connected and caught up, the
//! database is served without the cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{counter, gauge, histogram};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::catalog::Catalog;
use super::control::{self, ControlTarget};
use super::payload::{Payload, QualifiedName};
use super::triggers::{self, Scope};
use super::DbState;
use crate::cache::Cache;

static CATALOG_VERSION: AtomicU64 = AtomicU64::new(1);

#[derive(Clone, Debug)]
pub struct Settings {
    pub channel: String,
    pub instance: u64,
    pub check_interval: Duration,
    pub rescan_interval: Duration,
    pub auto_install: bool,
    pub scope: Scope,
    pub eager_watch: bool,
}

pub struct Listener {
    pub db: Arc<DbState>,
    pub target: ControlTarget,
    pub tls: MakeRustlsConnect,
    pub ssl: SslMode,
    pub settings: Settings,
    pub cache: Arc<Cache>,
}

#[async_trait]
impl BackgroundService for Listener {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let db = self.db.name.clone();
        let connected = gauge!("pgtier_listener_connected", "database" => db.clone());
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.session(&connected) => r,
                _ = shutdown.changed() => return,
            };
            self.db.go_down();
            connected.set(0.0);
            counter!("pgtier_listener_reconnects_total", "database" => db.clone()).increment(1);
            match result {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    database = %db, target = %self.target.display, error = format!("{e:#}"),
                    "invalidation listener lost; serving this database without the cache until it is back"
                ),
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

impl Listener {
    async fn session(&self, connected: &metrics::Gauge) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::unbounded_channel::<AsyncMessage>();
        // Notifications take effect here, one by one as the connection delivers
        // them, never queued behind this loop's own queries (health checks,
        // watching tables, catalog scans can each take a while under load).
        // Only the slow follow-up of DDL goes on to the loop.
        let (ddl_tx, mut ddl_rx) = mpsc::unbounded_channel::<()>();
        let applier = tokio::spawn(Applier::new(self).run(rx, ddl_tx));
        let (client, driver) =
            control::connect(&self.target, &self.tls, self.ssl, Some(tx)).await?;
        // Postgres delivers notifications only while the listening backend is
        // idle: catalog scans and table watching run on a second connection so
        // they never hold a notification back.
        let (work, work_driver) = control::connect(&self.target, &self.tls, self.ssl, None).await?;
        let _guard = AbortOnDrop(vec![driver, work_driver, applier]);
        let s = &self.settings;
        let channel = format!("\"{}\"", s.channel.replace('"', "\"\""));
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        if s.auto_install {
            let r = triggers::install(&work, &s.channel, &s.scope, true).await?;
            if r.tables > 0 {
                tracing::info!(database = %self.db.name, tables = r.tables, "installed invalidation triggers");
            }
        }
        self.reload_catalog(&work).await?;
        self.db.forget_watches();
        if s.eager_watch {
            self.watch_all(&work).await?;
        }
        // Entries filled before now may have missed notifications: a new epoch.
        self.db.come_up();
        // Put every instance's L2 versions back in step (ours included: L2 is
        // used for this database once our own epoch notification comes back).
        let epoch = super::Invalidation::random();
        client
            .batch_execute(&format!("NOTIFY {channel}, '{}'", Payload::epoch(epoch)))
            .await?;
        connected.set(1.0);
        tracing::info!(database = %self.db.name, target = %self.target.display, "invalidation listener connected");

        let mut check = tokio::time::interval(s.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(s.rescan_interval);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        loop {
            tokio::select! {
                biased;
                ddl = ddl_rx.recv() => {
                    if ddl.is_none() {
                        anyhow::bail!("connection closed");
                    }
                    // Everything DDL asks for is done once for all queued.
                    while ddl_rx.try_recv().is_ok() {}
                    self.after_ddl(&work).await?;
                }
                _ = check.tick() => {
                    // A dead connection must be noticed within seconds, not when
                    // TCP gives up.
                    let both = async {
                        client.simple_query("SELECT 1").await?;
                        work.simple_query("SELECT 1").await
                    };
                    match tokio::time::timeout(s.check_interval, both).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => anyhow::bail!("health check timed out"),
                    }
                }
                _ = self.db.watch_wanted.notified() => {
                    let wanted = self.db.take_watch_requests();
                    if !wanted.is_empty() {
                        let now = triggers::watch(&work, &wanted, Duration::from_secs(5)).await?;
                        if now.is_empty() {
                            tracing::info!(
                                database = %self.db.name,
                                "tables not watched yet (a long-running transaction, or triggers to reinstall)"
                            );
                        } else {
                            tracing::debug!(database = %self.db.name, tables = now.len(), "watching tables");
                            self.db.mark_watched(&now);
                        }
                    }
                }
                _ = rescan.tick() => {
                    self.reload_catalog(&work).await?;
                    if s.auto_install && self.missing_triggers() {
                        triggers::install(&work, &s.channel, &s.scope, true).await?;
                        self.reload_catalog(&work).await?;
                    }
                    if s.eager_watch {
                        self.watch_all(&work).await?;
                    }
                }
            }
        }
    }

    /// The catalog side of DDL: re-read it, put triggers on new tables, watch them.
    async fn after_ddl(&self, client: &Client) -> anyhow::Result<()> {
        self.reload_catalog(client).await?;
        if self.settings.auto_install && self.missing_triggers() {
            triggers::install(client, &self.settings.channel, &self.settings.scope, true).await?;
            self.reload_catalog(client).await?;
        }
        if self.settings.eager_watch {
            self.watch_all(client).await?;
        }
        Ok(())
    }

    /// Watch every table that has a trigger (eager mode).
    async fn watch_all(&self, client: &Client) -> anyhow::Result<()> {
        let oids: Vec<u32> = self
            .db
            .catalog
            .load()
            .relations
            .iter()
            .filter(|r| r.has_trigger)
            .map(|r| r.oid)
            .collect();
        if !oids.is_empty() {
            let now = triggers::watch(client, &oids, Duration::from_secs(5)).await?;
            self.db.mark_watched(&now);
        }
        Ok(())
    }

    /// Tables in scope that have no trigger yet (created since the last install).
    fn missing_triggers(&self) -> bool {
        self.db.catalog.load().relations.iter().any(|r| {
            matches!(r.kind, b'r' | b'p')
                && !r.has_trigger
                && self.settings.scope.covers(&r.schema, &r.name)
        })
    }

    /// Re-read the catalog and invalidate relations that changed under us
    /// (renamed, dropped, altered, lost their trigger): this also covers DDL
    /// made where no event trigger reports it.
    async fn reload_catalog(&self, client: &Client) -> anyhow::Result<()> {
        let version = CATALOG_VERSION.fetch_add(1, Ordering::Relaxed);
        let new = Catalog::load(client, version).await?;
        let old = self.db.catalog.load();
        let mut changed: Vec<QualifiedName> = Vec::new();
        for r in &old.relations {
            let same = new.get(r.oid).is_some_and(|n| {
                n.schema == r.schema
                    && n.name == r.name
                    && n.shape == r.shape
                    && n.has_trigger == r.has_trigger
            });
            if !same {
                changed.push((r.schema.clone(), r.name.clone()));
                if let Some(n) = new.get(r.oid) {
                    changed.push((n.schema.clone(), n.name.clone()));
                }
            }
        }
        if !changed.is_empty() {
            tracing::debug!(database = %self.db.name, ?changed, "catalog changed");
            self.db.invalidate(&changed);
            self.cache.clear_descriptions();
        }
        self.db.set_catalog(new);
        Ok(())
    }
}

/// Applies notifications the moment they arrive, in stream order: the L2
/// versions every instance derives depend on exactly that order, and a fence
/// completes only after everything received before it has taken effect.
struct Applier {
    db: Arc<DbState>,
    cache: Arc<Cache>,
    channel: String,
    instance: u64,
    invalidations: metrics::Counter,
    notifications: metrics::Counter,
    lag: metrics::Histogram,
    lag_last: metrics::Gauge,
}

impl Applier {
    fn new(l: &Listener) -> Applier {
        let name = l.db.name.clone();
        Applier {
            db: l.db.clone(),
            cache: l.cache.clone(),
            channel: l.settings.channel.clone(),
            instance: l.settings.instance,
            invalidations: counter!("pgtier_invalidations_total", "database" => name.clone()),
            notifications: counter!("pgtier_invalidation_notifications_total", "database" => name.clone()),
            lag: histogram!("pgtier_listener_lag_seconds", "database" => name.clone()),
            lag_last: gauge!("pgtier_listener_lag_last_seconds", "database" => name),
        }
    }

    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<AsyncMessage>,
        ddl: mpsc::UnboundedSender<()>,
    ) {
        while let Some(m) = rx.recv().await {
            let AsyncMessage::Notification(note) = m else {
                continue;
            };
            if note.channel() != self.channel {
                continue;
            }
            let at = Instant::now();
            self.notifications.increment(1);
            let mut schema_changed = false;
            match Payload::parse(note.payload()) {
                Some(Payload::Write(t)) => {
                    self.db.invalidate(&t);
                    self.invalidations.increment(t.len() as u64);
                }
                Some(Payload::Ddl(t)) => {
                    self.db.invalidate(&t);
                    self.invalidations.increment(t.len() as u64);
                    self.cache.clear_descriptions();
                    schema_changed = true;
                }
                Some(Payload::Fence { instance, seq }) if instance == self.instance => {
                    self.db.complete_fence(seq)
                }
                Some(Payload::Fence { .. }) => {}
                Some(Payload::Epoch(e)) => self.db.set_l2_epoch(e),
                all @ (Some(Payload::All) | None) => {
                    if all.is_none() {
                        tracing::warn!(
                            payload = note.payload(),
                            "unreadable invalidation payload; invalidating the whole database"
                        );
                    }
                    self.db.invalidate_all();
                    self.invalidations.increment(1);
                    self.cache.clear_descriptions();
                }
            }
            let lag = at.elapsed().as_secs_f64();
            self.lag.record(lag);
            self.lag_last.set(lag);
            if schema_changed && ddl.send(()).is_err() {
                return;
            }
        }
    }
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
