//! Applying notifications: each one takes effect the moment the listening
//! connection delivers it (generations bumped, fences completed, epochs
//! checked), never queued behind the listener loop's own queries.

use std::sync::Arc;
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use super::control::Incoming;
use super::epoch;
use super::payload::{Payload, QualifiedName};
use super::watch_policy::Benefit;
use super::DbState;
use crate::cache::Cache;
use crate::signing::Signer;

/// Applies notifications the moment they arrive, in stream order: the L2
/// versions every instance derives depend on exactly that order, and a fence
/// completes only after everything received before it has taken effect.
pub(super) struct Applier {
    db: Arc<DbState>,
    /// Where written tables go to be unwatched (kept open even when that is
    /// off: the loop takes a closed channel for a lost connection).
    unwatch: mpsc::UnboundedSender<Vec<u32>>,
    /// How many hits each announced write must earn (`None`: tables are never
    /// unwatched for their writes).
    min_hits_per_write: Option<f64>,
    cache: Arc<Cache>,
    channel: String,
    instance: u64,
    signer: Option<Signer>,
    /// Control notifications refused as forged or replayed.
    rejected_epoch: metrics::Counter,
    rejected_fence: metrics::Counter,
    invalidations: metrics::Counter,
    key_invalidations: metrics::Counter,
    notifications: metrics::Counter,
    lag: metrics::Histogram,
    lag_last: metrics::Gauge,
}

impl Applier {
    /// The applier of `db`'s notifications on `channel`: fences of `instance`
    /// are completed, epochs checked with `signer`; written tables whose hits
    /// do not pay for their announcements go to `unwatch`.
    pub(super) fn new(
        db: Arc<DbState>,
        cache: Arc<Cache>,
        channel: String,
        instance: u64,
        signer: Option<Signer>,
        min_hits_per_write: Option<f64>,
        unwatch: mpsc::UnboundedSender<Vec<u32>>,
    ) -> Applier {
        let name = db.name.clone();
        Applier {
            db,
            unwatch,
            min_hits_per_write,
            cache,
            channel,
            instance,
            signer,
            rejected_epoch: counter!("pgtier_control_notifications_rejected_total", "database" => name.clone(), "kind" => "epoch"),
            rejected_fence: counter!("pgtier_control_notifications_rejected_total", "database" => name.clone(), "kind" => "fence"),
            invalidations: counter!("pgtier_invalidations_total", "database" => name.clone(), "level" => "table"),
            key_invalidations: counter!("pgtier_invalidations_total", "database" => name.clone(), "level" => "key"),
            notifications: counter!("pgtier_invalidation_notifications_total", "database" => name.clone()),
            lag: histogram!("pgtier_listener_lag_seconds", "database" => name.clone()),
            lag_last: gauge!("pgtier_listener_lag_last_seconds", "database" => name),
        }
    }

    /// Announced writes to `tables`: stop caching here at once the ones whose
    /// announcements cost writers more than their hits save readers, and have
    /// the listener loop switch their announcing off. False once that loop is
    /// gone.
    fn weigh(&self, benefit: &mut Option<Benefit>, tables: &[QualifiedName], at: Instant) -> bool {
        let Some(benefit) = benefit else {
            return true;
        };
        let catalog = self.db.catalog.load();
        let regime = self
            .db
            .keys
            .version
            .load(std::sync::atomic::Ordering::Acquire);
        let poor: Vec<QualifiedName> = tables
            .iter()
            .filter(|t| {
                let hits = catalog
                    .oid_of(&t.0, &t.1)
                    .map_or(0, |o| self.db.hits.get(o));
                benefit.not_worth(t, hits, regime, at)
            })
            .cloned()
            .collect();
        if poor.is_empty() {
            return true;
        }
        let oids = self.db.stop_watching(&poor, false);
        if oids.is_empty() {
            return true;
        }
        tracing::info!(
            database = %self.db.name,
            tables = ?poor,
            "announced writes earn too few hits: switching their announcing off"
        );
        self.unwatch.send(oids).is_ok()
    }

    pub(super) async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<Incoming>,
        ddl: mpsc::UnboundedSender<()>,
    ) {
        let mut benefit = self.min_hits_per_write.map(Benefit::new);
        while let Some(m) = rx.recv().await {
            let m = match m {
                Incoming::Probed(fences) => {
                    // Everything received before the probe has taken effect.
                    for f in fences {
                        let _ = f.send(());
                    }
                    continue;
                }
                m => m,
            };
            let payload = match &m {
                Incoming::Message(AsyncMessage::Notification(n)) if n.channel() == self.channel => {
                    n.payload()
                }
                // A row of the change table (source "poll"): what a trigger
                // would have sent, trusted as little.
                Incoming::Polled(p) => p.as_str(),
                _ => continue,
            };
            let at = Instant::now();
            self.notifications.increment(1);
            let mut schema_changed = false;
            match Payload::parse(payload) {
                Some(Payload::Write(t)) => {
                    self.db.invalidate(&t);
                    self.invalidations.increment(t.len() as u64);
                    if !self.weigh(&mut benefit, &t, at) {
                        return;
                    }
                    self.db.warm_tables(&self.cache, &t);
                }
                Some(Payload::Keys(table, sets)) => {
                    // Each write kills only its own keys, so a table read by key
                    // earns hits between writes to the same keys; it is weighed
                    // like any other.
                    self.db.invalidate_keys(&table, &sets);
                    let keys: usize = sets.iter().map(|(_, t)| t.len()).sum();
                    self.key_invalidations.increment(keys as u64);
                    if !self.weigh(&mut benefit, std::slice::from_ref(&table), at) {
                        return;
                    }
                    self.db.warm_keys(&self.cache, &table, &sets);
                }
                Some(Payload::Unwatch(t)) => {
                    self.db.unwatch(&t);
                    self.invalidations.increment(t.len() as u64);
                }
                Some(Payload::Ddl(t)) => {
                    if t.is_empty() {
                        // DDL on something that is not a relation: a function,
                        // operator, cast, type or schema may have changed.
                        self.db.invalidate_routines();
                    }
                    self.db.invalidate(&t);
                    self.invalidations.increment(t.len() as u64);
                    self.cache.clear_descriptions();
                    schema_changed = true;
                }
                Some(Payload::Fence {
                    instance,
                    seq,
                    nonce,
                }) if instance == self.instance => {
                    if !self.db.complete_fence(seq, nonce) {
                        self.rejected_fence.increment(1);
                    }
                }
                Some(Payload::Fence { .. }) => {}
                Some(Payload::Epoch(e)) => {
                    let genuine = self
                        .signer
                        .as_ref()
                        .is_some_and(|s| epoch::verify(s, &self.db.name, &self.channel, &e));
                    if genuine && self.db.epoch_floor.advance(e.counter) {
                        self.db.set_l2_epoch(e.epoch, e.counter);
                    } else {
                        // Forged, replayed, or from an instance with another
                        // key: our versions stay as they are.
                        self.rejected_epoch.increment(1);
                    }
                }
                all @ (Some(Payload::All) | None) => {
                    if all.is_none() {
                        // Any role may send one: bounded, so it cannot fill the log.
                        let payload: String = payload.chars().take(100).collect();
                        tracing::warn!(
                            payload,
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
