//! The listener: one task per cached database, holding a dedicated connection
//! with `LISTEN` (whose notifications the `applier` applies), watching its own
//! health, watching and unwatching tables, and keeping the catalog current.
//! While it is not connected and caught up, the database is served without
//! the cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use metrics::{counter, gauge};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::applier::Applier;
use super::control::{self, ControlTarget};
use super::epoch;
use super::fingerprint::Tracked;
use super::keyed;
use super::logical::{self, conn::ReplConn, publication, register, stream};
use super::payload::Payload;
use super::poll;
use super::probe_fences;
use super::settle;
use super::triggers::{self, Scope};
use super::watch_policy::Holdoff;
use super::DbState;
use crate::cache::Cache;
use crate::signing::Signer;

mod upkeep;

/// How often roles (and, without event triggers, privileges) are compared: no
/// event trigger reports a role membership change, so this is how long one
/// can go unnoticed. The query reads a few small catalogs.
const ROLE_POLL: Duration = Duration::from_millis(250);

#[derive(Clone, Debug)]
pub struct Settings {
    pub channel: String,
    pub instance: u64,
    pub check_interval: Duration,
    pub rescan_interval: Duration,
    pub auto_install: bool,
    pub scope: Scope,
    pub eager_watch: bool,
    /// Stop announcing writes to a table whose announced writes earn fewer
    /// hits each than this, until a read wants it cached again (`None`: never;
    /// `invalidation.unwatch_on_write`, `min_hits_per_write`).
    pub min_hits_per_write: Option<f64>,
    /// Invalidate reads by key where they select by key.
    pub key_level: bool,
    /// The L2 signing key: signs and checks epoch notifications. None: no L2,
    /// and no epoch is sent or accepted.
    pub signer: Option<Signer>,
    /// `invalidation.source = "logical"`: writes come from a replication
    /// stream instead of triggers and NOTIFY.
    pub logical: Option<logical::Settings>,
    /// `invalidation.source = "poll"`: triggers append to pgtier's change
    /// table, read at this interval (see `poll`).
    pub poll: Option<Duration>,
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
    /// Checksums of privileges, roles and the like from the last look.
    pub tracked: std::sync::Mutex<Tracked>,
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
        let (tx, rx) = mpsc::unbounded_channel::<control::Incoming>();
        let probe_tx = tx.downgrade();
        // Notifications take effect here, one by one as the connection delivers
        // them, never queued behind this loop's own queries (health checks,
        // watching tables, catalog scans can each take a while under load).
        // Only the slow follow-up of DDL goes on to the loop.
        let (ddl_tx, mut ddl_rx) = mpsc::unbounded_channel::<()>();
        let (unwatch_tx, mut unwatch_rx) = mpsc::unbounded_channel::<Vec<u32>>();
        let mut tasks = Vec::new();
        // With the logical source, the stream's feed reports DDL (and ends the
        // session by dropping `ddl_tx`); nothing is ever unwatched.
        let (mut feed_ddl, mut _no_unwatch) = (None, None);
        // The logical stream's visibility check, to see it is still running
        // once the database is up (see below).
        let mut settle_alive = None;
        let listen = if self.settings.logical.is_none() {
            let applier = Applier::new(
                self.db.clone(),
                self.cache.clone(),
                self.settings.channel.clone(),
                self.settings.instance,
                self.settings.signer.clone(),
                self.settings.min_hits_per_write,
                unwatch_tx,
            );
            tasks.push(tokio::spawn(applier.run(rx, ddl_tx)));
            Some(tx)
        } else {
            feed_ddl = Some(ddl_tx);
            _no_unwatch = Some(unwatch_tx);
            None
        };
        let (client, driver) = control::connect(&self.target, &self.tls, self.ssl, listen).await?;
        // Postgres delivers notifications only while the listening backend is
        // idle: catalog scans and table watching run on a second connection so
        // they never hold a notification back.
        let (work, work_driver) = control::connect(&self.target, &self.tls, self.ssl, None).await?;
        tasks.extend([driver, work_driver]);
        let mut guard = AbortOnDrop(tasks);
        // Dropped before `guard` (declared after it): the database is down
        // before the aborted tasks drop the fences they hold, so released
        // sessions bypass the cache.
        let _down = DownOnDrop(self.db.clone());
        let s = &self.settings;
        let channel = format!("\"{}\"", s.channel.replace('"', "\"\""));
        let client = Arc::new(client);
        // A failed fence probe ends the session like a failed health check.
        let (probe_failed, mut probe_lost) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let mut probe_failed = Some(probe_failed);
        if s.logical.is_none() {
            client.batch_execute(&format!("LISTEN {channel}")).await?;
            let version: String = client
                .query_one("SHOW server_version_num", &[])
                .await?
                .get(0);
            let usable = version
                .parse::<i32>()
                .is_ok_and(|v| v >= probe_fences::MIN_SERVER_VERSION);
            if s.poll.is_some() && !usable {
                anyhow::bail!("invalidation.source = \"poll\" needs PostgreSQL 15 or later (server_version_num {version})");
            }
            self.db.probe_fences.set_usable(usable);
        }
        let probing = s.logical.is_none() && s.poll.is_none();
        if let Some(failed) = probing.then(|| probe_failed.take()).flatten() {
            let (client, db) = (client.clone(), self.db.clone());
            let (fences, probe_tx) = (db.probe_fences.clone(), probe_tx.clone());
            guard.0.push(tokio::spawn(async move {
                let down = || db.go_down();
                if let Err(e) = probe_fences::run(client, fences, down, probe_tx).await {
                    let _ = failed.send(e);
                }
            }));
        }
        if let Ok(mut t) = self.tracked.lock() {
            t.refused.clear();
            t.global = None;
        }
        if s.auto_install {
            let n = self.install_missing(&work).await?;
            if n > 0 {
                tracing::info!(database = %self.db.name, tables = n, "installed invalidation triggers");
            }
        }
        if let Some(l) = &s.logical {
            if !publication::exists(&work, &l.publication).await? {
                anyhow::bail!(
                    "publication \"{}\" does not exist: run `pgtier install-triggers --invalidation-source logical` \
                     (or set invalidation.auto_install)",
                    l.publication
                );
            }
            // Every transaction committing after this is streamed: entries
            // filled from the new epoch on cannot miss one.
            // Its own connection: a snapshot read must not queue behind the
            // listener's catalog work.
            let (visibility, driver) =
                control::connect(&self.target, &self.tls, self.ssl, None).await?;
            guard.0.push(driver);
            let (settle_tx, settle_rx) = tokio::sync::mpsc::unbounded_channel();
            let check = s.check_interval;
            settle_alive = Some(settle_tx.clone());
            let db = self.db.clone();
            guard.0.push(tokio::spawn(async move {
                if let Err(e) = settle::run(visibility, db.clone(), settle_rx, check).await {
                    tracing::warn!(database = %db.name, error = format!("{e:#}"), "visibility check of the logical stream ended");
                }
            }));
            let mut conn = ReplConn::connect(&self.target, &l.tls, l.ssl).await?;
            stream::start(&mut conn, &l.publication).await?;
            let feed = stream::Feed {
                db: self.db.clone(),
                cache: self.cache.clone(),
                prefix: s.channel.clone(),
                instance: s.instance,
                signer: s.signer.clone(),
                ddl: feed_ddl
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("no DDL channel"))?,
                settle: settle_tx,
            };
            let db = self.db.clone();
            guard.0.push(tokio::spawn(async move {
                let name = db.name.clone();
                let r = feed.run(conn).await;
                // At once, not when the listener loop next looks (it may be
                // reading the catalog): writes may be going unseen already.
                db.go_down();
                if let Err(e) = r {
                    tracing::warn!(database = %name, error = format!("{e:#}"), "logical replication stream lost");
                }
            }));
        }
        self.reload_catalog(&work).await?;
        self.poll_global(&work).await?;
        self.db.watches.forget();
        // Column sets are registered afresh after a reconnect: the triggers or
        // their registry may have changed while nobody listened.
        self.db.keys.forget();
        self.db
            .keys
            .enabled
            .store(s.key_level, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut w) = self.eagerly_watched.lock() {
            w.clear();
        }
        if s.logical.is_some() {
            self.watch_covered(None);
        } else if s.eager_watch {
            self.watch_all(&work).await?;
        }
        if let Some((interval, failed)) = s.poll.and_then(|i| Some((i, probe_failed.take()?))) {
            let (pc, pc_driver) = control::connect(&self.target, &self.tls, self.ssl, None).await?;
            guard.0.push(pc_driver);
            let cursor = poll::Cursor::start(&pc).await.map_err(|e| {
                e.context("reading pgtier.changes: run `pgtier install-triggers --invalidation-source poll` (or set invalidation.auto_install)")
            })?;
            let poller = poll::Poller {
                client: pc,
                listening: client.clone(),
                fences: self.db.probe_fences.clone(),
                applier: probe_tx.clone(),
                interval,
                timeout: s.check_interval,
            };
            let db = self.db.clone();
            guard.0.push(tokio::spawn(async move {
                if let Err(e) = poller.run(cursor, || db.go_down()).await {
                    let _ = failed.send(e);
                }
            }));
        }
        // Entries filled before now may have missed notifications: a new epoch.
        self.db.come_up();
        // A visibility check that stopped during the set-up took the database
        // down before `come_up`; what it held is released, so the stream must
        // not be trusted. (One that stops later takes it down itself.)
        if settle_alive.as_ref().is_some_and(|t| t.is_closed()) {
            self.db.go_down();
            anyhow::bail!("the logical stream's visibility check stopped");
        }
        // Put every instance's L2 versions back in step (ours included: L2 is
        // used for this database once our own epoch notification comes back).
        if let Some(signer) = &s.signer {
            // A transaction id taken after LISTEN (or after the stream started):
            // every epoch sent before it carries a smaller one (see `epoch`).
            let counter: i64 = client.query_one("SELECT txid_current()", &[]).await?.get(0);
            let counter = counter as u64;
            self.db.epoch_floor.open(counter);
            let e = epoch::sign(
                signer,
                &self.db.name,
                &s.channel,
                counter,
                super::Invalidation::random(),
            );
            if s.logical.is_some() {
                // Every stream sees it at the same place among the writes.
                self.announce(&work, &Payload::epoch(&e)).await?;
            } else {
                client
                    .batch_execute(&format!("NOTIFY {channel}, '{}'", Payload::epoch(&e)))
                    .await?;
            }
        }
        connected.set(1.0);
        tracing::info!(database = %self.db.name, target = %self.target.display, "invalidation listener connected");

        let mut check = tokio::time::interval(s.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(s.rescan_interval);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut roles = tokio::time::interval(ROLE_POLL);
        roles.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        roles.tick().await;
        let mut watching = futures_util::stream::FuturesUnordered::new();
        let mut in_flight = std::collections::HashSet::new();
        // Registrations run as tasks of their own: one holds the table's switch
        // lock while it waits for writers, and an unwatch awaited by this loop
        // waits for that lock, so a registration polled only by this loop
        // would never finish (found with writers running from the start).
        let mut keying = tokio::task::JoinSet::new();
        let mut keys_in_flight = std::collections::HashSet::new();
        let mut holdoff = Holdoff::default();
        let mut sent = register::Sent::default();
        loop {
            tokio::select! {
                biased;
                lost = &mut probe_lost => {
                    return Err(lost.unwrap_or_else(|_| anyhow::anyhow!("fence probe ended")).context("fence probe"));
                }
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
                    self.db.watches.hold_off(holdoff.deadlines());
                    self.unwatch(&work, oids).await?;
                }
                _ = check.tick() => {
                    // A dead connection must be noticed within seconds, not when
                    // TCP gives up.
                    let both = async {
                        client.simple_query("SELECT 1").await?;
                        if s.logical.is_none() {
                            return self.same_announce(&work).await;
                        }
                        work.simple_query("SELECT 1").await?;
                        Ok(())
                    };
                    match tokio::time::timeout(s.check_interval, both).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => anyhow::bail!("health check timed out"),
                    }
                }
                _ = self.db.watches.wanted.notified(), if s.logical.is_some() => {
                    // Every published table is streamed: watching is only
                    // knowing it is covered.
                    self.watch_covered(Some(self.db.watches.take_requests()));
                    // The stream carries every changed row, but a column set
                    // is live only once its registration comes through it, on
                    // every instance alike (see `logical::register`).
                    register::send(&work, &self.db, s.signer.as_ref(), &s.channel, &mut sent).await;
                }
                _ = self.db.watches.wanted.notified(), if s.logical.is_none() => {
                    let mut wanted = self.db.watches.take_requests();
                    wanted.retain(|o| !in_flight.contains(o) && holdoff.may_watch(*o));
                    // Each table's watch waits on its own writers, side by side
                    // with the others: one long writer must hold up no other table.
                    for oid in wanted {
                        in_flight.insert(oid);
                        let ticket = self.db.watches.ticket();
                        let work = &work;
                        watching.push(async move {
                            let r = triggers::watch(work, &[oid], Duration::from_secs(5)).await;
                            (oid, ticket, r)
                        });
                    }
                    // Column sets that reads by key want reported by writes.
                    for (oid, cols) in self.db.keys.take_requests() {
                        if !keys_in_flight.insert((oid, cols.clone())) {
                            continue;
                        }
                        let channel = s.channel.clone();
                        let catalog = self.db.catalog.load_full();
                        let (target, tls, ssl) = (self.target.clone(), self.tls.clone(), self.ssl);
                        // On a connection of its own: registering is a
                        // transaction, and statements of other work (watches)
                        // pipelined on a shared connection would land inside
                        // it, or a second registration's COMMIT end it early.
                        keying.spawn(async move {
                            let r = async {
                                let (conn, driver) = control::connect(&target, &tls, ssl, None).await?;
                                let _driver = AbortOnDrop(vec![driver]);
                                keyed::register(&conn, &channel, &catalog, oid, &cols, Duration::from_secs(5)).await
                            }
                            .await;
                            (oid, cols, r)
                        });
                    }
                }
                Some(done) = keying.join_next(), if !keying.is_empty() => {
                    let Ok((oid, cols, r)) = done else {
                        // A registration task panicked: let every set be asked for again.
                        keys_in_flight.clear();
                        continue;
                    };
                    keys_in_flight.remove(&(oid, cols.clone()));
                    match r {
                        Ok(true) => {
                            tracing::debug!(database = %self.db.name, oid, ?cols, "writes report keys");
                            self.db.keys.mark_live(oid, cols);
                        }
                        Ok(false) => {
                            tracing::info!(database = %self.db.name, oid, ?cols, "reads by key stay table-level for now");
                        }
                        // Reads stay table-level; the next read asks again.
                        Err(e) => {
                            tracing::warn!(database = %self.db.name, oid, ?cols, error = %e, "could not register a key column set");
                        }
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
                        let marked = self.db.watches.mark(&now, ticket);
                        holdoff.watched(&marked);
                        tracing::debug!(database = %self.db.name, tables = marked.len(), "watching tables");
                    }
                }
                _ = rescan.tick() => self.after_ddl(&work).await?,
                _ = roles.tick() => {
                    if self.poll_global(&work).await? {
                        self.after_ddl(&work).await?;
                    }
                }
            }
        }
    }
}

struct DownOnDrop(Arc<DbState>);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        self.0.go_down();
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
