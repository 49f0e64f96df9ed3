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

type Timed = (Instant, AsyncMessage);

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
        // Stamp each message as it arrives, for the lag figure.
        let (timed_tx, mut timed_rx) = mpsc::unbounded_channel::<Timed>();
        let stamper = tokio::spawn(async move {
            let mut rx = rx;
            while let Some(m) = rx.recv().await {
                if timed_tx.send((Instant::now(), m)).is_err() {
                    break;
                }
            }
        });
        let (client, driver) =
            control::connect(&self.target, &self.tls, self.ssl, Some(tx)).await?;
        let _guard = AbortOnDrop(vec![driver, stamper]);
        let s = &self.settings;
        let channel = format!("\"{}\"", s.channel.replace('"', "\"\""));
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        if s.auto_install {
            let r = triggers::install(&client, &s.channel, &s.scope, true).await?;
            if r.tables > 0 {
                tracing::info!(database = %self.db.name, tables = r.tables, "installed invalidation triggers");
            }
        }
        self.reload_catalog(&client).await?;
        self.db.forget_watches();
        if s.eager_watch {
            self.watch_all(&client).await?;
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
        let mut batch: Vec<Timed> = Vec::with_capacity(64);
        loop {
            tokio::select! {
                biased;
                first = timed_rx.recv() => {
                    let Some(first) = first else {
                        anyhow::bail!("connection closed");
                    };
                    // Coalesce everything already queued into one batch.
                    batch.push(first);
                    while batch.len() < 10_000 {
                        match timed_rx.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    self.apply(&client, &mut batch).await?;
                }
                _ = check.tick() => {
                    // A dead connection must be noticed within seconds, not when
                    // TCP gives up.
                    match tokio::time::timeout(s.check_interval, client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => anyhow::bail!("health check timed out"),
                    }
                }
                _ = self.db.watch_wanted.notified() => {
                    let wanted = self.db.take_watch_requests();
                    if !wanted.is_empty() {
                        let now = triggers::watch(&client, &wanted, Duration::from_secs(5)).await?;
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
                    self.reload_catalog(&client).await?;
                    if s.auto_install && self.missing_triggers() {
                        triggers::install(&client, &s.channel, &s.scope, true).await?;
                        self.reload_catalog(&client).await?;
                    }
                    if s.eager_watch {
                        self.watch_all(&client).await?;
                    }
                }
            }
        }
    }

    async fn apply(&self, client: &Client, batch: &mut Vec<Timed>) -> anyhow::Result<()> {
        let db = &self.db;
        let mut invalidated = 0u64;
        let mut ddl = false;
        let mut all = false;
        let mut fences = Vec::new();
        let mut oldest: Option<Instant> = None;
        let n = batch.len();
        // Applied one notification at a time, in stream order: the L2 versions
        // every instance derives depend on exactly that sequence.
        for (at, m) in batch.drain(..) {
            let AsyncMessage::Notification(note) = m else {
                continue;
            };
            if note.channel() != self.settings.channel {
                continue;
            }
            oldest = Some(oldest.map_or(at, |o: Instant| o.min(at)));
            match Payload::parse(note.payload()) {
                Some(Payload::Write(t)) => {
                    db.invalidate(&t);
                    invalidated += t.len() as u64;
                }
                Some(Payload::Ddl(t)) => {
                    db.invalidate(&t);
                    invalidated += t.len() as u64;
                    ddl = true;
                }
                Some(Payload::All) => {
                    db.invalidate_all();
                    all = true;
                }
                Some(Payload::Fence { instance, seq }) if instance == self.settings.instance => {
                    fences.push(seq)
                }
                Some(Payload::Fence { .. }) => {}
                Some(Payload::Epoch(e)) => db.set_l2_epoch(e),
                None => {
                    tracing::warn!(
                        payload = note.payload(),
                        "unreadable invalidation payload; invalidating the whole database"
                    );
                    db.invalidate_all();
                    all = true;
                }
            }
        }
        if invalidated > 0 || all {
            counter!("pgtier_invalidations_total", "database" => db.name.clone())
                .increment(invalidated.max(1));
        }
        counter!("pgtier_invalidation_notifications_total", "database" => db.name.clone())
            .increment(n as u64);
        if let Some(o) = oldest {
            let lag = o.elapsed().as_secs_f64();
            histogram!("pgtier_listener_lag_seconds", "database" => db.name.clone()).record(lag);
            gauge!("pgtier_listener_lag_last_seconds", "database" => db.name.clone()).set(lag);
        }
        // Fences complete only after everything received before them is applied.
        for seq in fences {
            db.complete_fence(seq);
        }
        if ddl || all {
            self.cache.clear_descriptions();
            if ddl {
                self.reload_catalog(client).await?;
                if self.settings.auto_install && self.missing_triggers() {
                    triggers::install(client, &self.settings.channel, &self.settings.scope, true)
                        .await?;
                    self.reload_catalog(client).await?;
                }
                if self.settings.eager_watch {
                    self.watch_all(client).await?;
                }
            }
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

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}
