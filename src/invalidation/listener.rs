//! The listener: one task per cached database, holding a dedicated connection
//! with `LISTEN`, applying invalidations in batches, watching its own health, and
//! keeping the catalog current. While it is not connected and caught up, the
//! database is served without the cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
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
    /// Stop announcing writes to a table written in quick succession until a
    /// read wants it cached again (`invalidation.unwatch_on_write`).
    pub unwatch_on_write: bool,
}

/// How long a lost listener keeps retrying every 100 ms before backing off.
const FAST_RETRY: Duration = Duration::from_secs(5);

pub struct Listener {
    pub db: Arc<DbState>,
    /// Tables eager mode has watched once: a rescan watches only newcomers, so
    /// a table that was unwatched waits for a read to want it again.
    pub eagerly_watched: std::sync::Mutex<std::collections::HashSet<u32>>,
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
        let mut down_since: Option<Instant> = None;
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
                down_since = None;
            }
            let since = *down_since.get_or_insert_with(Instant::now);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            // A restart takes Postgres away for a second or two: retrying at the
            // first pace for a few seconds brings the cache back (and /ready to
            // 200) within 0.1 s of Postgres; only a longer outage backs off.
            if since.elapsed() > FAST_RETRY {
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
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
        let (unwatch_tx, mut unwatch_rx) = mpsc::unbounded_channel::<Vec<u32>>();
        let applier = tokio::spawn(Applier::new(self, unwatch_tx).run(rx, ddl_tx));
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
        if let Ok(mut w) = self.eagerly_watched.lock() {
            w.clear();
        }
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
        let mut watching = futures_util::stream::FuturesUnordered::new();
        let mut in_flight = std::collections::HashSet::new();
        let mut holdoff = Holdoff::default();
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
                oids = unwatch_rx.recv() => {
                    let Some(mut oids) = oids else {
                        anyhow::bail!("connection closed");
                    };
                    while let Ok(more) = unwatch_rx.try_recv() {
                        oids.extend(more);
                    }
                    holdoff.unwatched(&oids);
                    self.unwatch(&work, oids).await?;
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
                    let mut wanted = self.db.take_watch_requests();
                    wanted.retain(|o| !in_flight.contains(o) && holdoff.may_watch(*o));
                    // Each table's watch waits on its own writers, side by side
                    // with the others: one long writer must hold up no other table.
                    for oid in wanted {
                        in_flight.insert(oid);
                        let ticket = self.db.watch_ticket();
                        let work = &work;
                        watching.push(async move {
                            let r = triggers::watch(work, &[oid], Duration::from_secs(5)).await;
                            (oid, ticket, r)
                        });
                    }
                }
                Some((oid, ticket, r)) = watching.next(), if !watching.is_empty() => {
                    in_flight.remove(&oid);
                    let now = r?;
                    if now.is_empty() {
                        tracing::info!(
                            database = %self.db.name,
                            "tables not watched yet (a long-running writer, or triggers to reinstall)"
                        );
                    } else {
                        let marked = self.db.mark_watched(&now, ticket);
                        holdoff.watched(&marked);
                        tracing::debug!(database = %self.db.name, tables = marked.len(), "watching tables");
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

    /// Watch every table that has a trigger and was not watched eagerly before
    /// (eager mode).
    async fn watch_all(&self, client: &Client) -> anyhow::Result<()> {
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
            let ticket = self.db.watch_ticket();
            let now = triggers::watch(client, &oids, Duration::from_secs(5)).await?;
            let now = self.db.mark_watched(&now, ticket);
            if let Ok(mut done) = self.eagerly_watched.lock() {
                done.extend(now);
            }
        }
        Ok(())
    }

    /// Switch announcing off for tables written in quick succession (see
    /// `Applier`), and tell every instance. Run inline in the loop, never
    /// beside a watch of ours on the same connection (see `triggers::unwatch`).
    async fn unwatch(&self, client: &Client, mut oids: Vec<u32>) -> anyhow::Result<()> {
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
                    && n.trigger_oid == r.trigger_oid
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
            // A table whose trigger went or was replaced must be watched afresh.
            self.db.unwatch(&changed);
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
    /// Where written tables go to be unwatched (kept open even when that is
    /// off: the loop takes a closed channel for a lost connection).
    unwatch: mpsc::UnboundedSender<Vec<u32>>,
    unwatch_on_write: bool,
    cache: Arc<Cache>,
    channel: String,
    instance: u64,
    invalidations: metrics::Counter,
    notifications: metrics::Counter,
    lag: metrics::Histogram,
    lag_last: metrics::Gauge,
}

impl Applier {
    fn new(l: &Listener, unwatch: mpsc::UnboundedSender<Vec<u32>>) -> Applier {
        let name = l.db.name.clone();
        Applier {
            db: l.db.clone(),
            unwatch,
            unwatch_on_write: l.settings.unwatch_on_write,
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
        let mut rates = WriteRates::default();
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
                    if self.unwatch_on_write && rates.hot(&t, at) {
                        // Each of these writes pays the notify lock while the
                        // entries it kills hardly live: stop caching the tables
                        // here at once, and have the loop switch announcing off.
                        let oids = self.db.stop_watching(&t, false);
                        if !oids.is_empty() && self.unwatch.send(oids).is_err() {
                            return;
                        }
                    }
                }
                Some(Payload::Unwatch(t)) => {
                    self.db.unwatch(&t);
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

/// Announced writes per table over a short window: a table written faster than
/// `HOT_WRITES` per `HOT_WINDOW` is worth unwatching; one written now and then
/// stays watched (and cached between its writes).
#[derive(Default)]
struct WriteRates {
    tables: std::collections::HashMap<QualifiedName, (Instant, u32)>,
}

const HOT_WRITES: u32 = 5;
const HOT_WINDOW: Duration = Duration::from_millis(100);

impl WriteRates {
    fn hot(&mut self, tables: &[QualifiedName], now: Instant) -> bool {
        if self.tables.len() > 100_000 {
            self.tables.clear();
        }
        let mut hot = false;
        for t in tables {
            let (start, n) = self.tables.entry(t.clone()).or_insert((now, 0));
            if now.duration_since(*start) > HOT_WINDOW {
                *start = now;
                *n = 0;
            }
            *n += 1;
            hot |= *n >= HOT_WRITES;
        }
        hot
    }
}

/// How long a table that was just unwatched waits before it may be watched
/// again. A table written soon after each watch (a counter, a queue) would
/// otherwise cycle: every read watches it, the next write unwatches it, and
/// writers pay for a notification each time while its entries live a few
/// milliseconds. When a watch ends within `SHORT_WATCH`, the table's hold-off
/// doubles (up to `MAX_HOLDOFF`; reads meanwhile go to Postgres); a watch that
/// lasts longer clears it, so tables written now and then are cached again at
/// the next read.
#[derive(Default)]
struct Holdoff {
    tables: std::collections::HashMap<u32, HoldoffState>,
}

struct HoldoffState {
    watched_at: Instant,
    wait: Duration,
    until: Instant,
}

const MIN_HOLDOFF: Duration = Duration::from_millis(10);
const MAX_HOLDOFF: Duration = Duration::from_secs(2);
const SHORT_WATCH: Duration = Duration::from_millis(100);

impl Holdoff {
    fn may_watch(&self, oid: u32) -> bool {
        self.tables
            .get(&oid)
            .is_none_or(|t| Instant::now() >= t.until)
    }

    fn watched(&mut self, oids: &[u32]) {
        let now = Instant::now();
        for o in oids {
            let t = self.tables.entry(*o).or_insert(HoldoffState {
                watched_at: now,
                wait: Duration::ZERO,
                until: now,
            });
            t.watched_at = now;
        }
    }

    fn unwatched(&mut self, oids: &[u32]) {
        let now = Instant::now();
        for o in oids {
            let Some(t) = self.tables.get_mut(o) else {
                continue;
            };
            if now.duration_since(t.watched_at) < SHORT_WATCH {
                t.wait = (t.wait * 2).clamp(MIN_HOLDOFF, MAX_HOLDOFF);
                t.until = now + t.wait;
            } else {
                self.tables.remove(o);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_written_right_after_each_watch_are_held_off_longer_each_time() {
        let mut h = Holdoff::default();
        assert!(h.may_watch(1), "never watched: no hold-off");
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            h.watched(&[1]);
            h.unwatched(&[1]);
            let t = &h.tables[&1];
            assert!(t.wait >= last && t.wait <= MAX_HOLDOFF);
            last = t.wait;
        }
        assert_eq!(last, MAX_HOLDOFF);
        assert!(!h.may_watch(1));
        // A watch that lasted clears it.
        let t = h.tables.get_mut(&1).map(|t| {
            t.watched_at = Instant::now() - SHORT_WATCH * 2;
        });
        assert!(t.is_some());
        h.unwatched(&[1]);
        assert!(h.may_watch(1));
        // Unwatches of tables this instance never watched change nothing.
        h.unwatched(&[2]);
        assert!(h.may_watch(2));
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn only_tables_written_in_quick_succession_are_hot() {
        let mut r = WriteRates::default();
        let t = vec![("public".to_string(), "t".to_string())];
        let start = Instant::now();
        // One write every 30 ms: never five within a window.
        for i in 0..20 {
            assert!(!r.hot(&t, start + Duration::from_millis(30 * i)));
        }
        let later = start + Duration::from_secs(10);
        let hot: Vec<bool> = (0..5)
            .map(|i| r.hot(&t, later + Duration::from_millis(i)))
            .collect();
        assert_eq!(hot, [false, false, false, false, true]);
    }
}
