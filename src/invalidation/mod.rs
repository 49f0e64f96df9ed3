//! Invalidation through Postgres LISTEN/NOTIFY: triggers report writes, one
//! listener per cached database applies them, and cached entries carry the
//! generations of the tables they read, so an entry is dead the moment any of
//! those generations moves.
//!
//! Generations make invalidation O(1) and race-free: a fill snapshots the
//! generations before its query runs and stores the snapshot in the entry, so a
//! result computed before a write can never be served after the write's
//! notification, however the fill and the notification interleave.
//!
//! For the shared L2, every instance must agree on table versions without
//! talking to each other. Postgres delivers notifications to every listener in
//! the same (commit) order, so each instance derives a table's L2 version by
//! hashing forward once per notification since the last epoch notification
//! (`e...`, sent by any instance when its listener (re)connects, signed and
//! never rewound: see `epoch`). Instances at the same point of the stream
//! compute the same L2 keys; a version that has moved on never maps back to an
//! older key.

mod applier;
pub mod catalog;
pub mod commands;
pub mod control;
pub mod epoch;
pub mod fingerprint;
pub mod generations;
pub mod hits;
pub mod key_deps;
pub mod keyed;
pub mod listener;
pub mod logical;
pub mod lsn_fences;
pub mod payload;
pub mod poll;
pub mod probe_fences;
pub mod settle;
pub mod triggers;
pub mod warm;
mod watch_policy;
pub mod watches;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::oneshot;

use crate::bypass::BypassReason;
use crate::cache::Decision;
use catalog::Catalog;
pub use generations::Generations;
use generations::SLOTS;
pub use payload::Payload;

/// The listener epoch and the (slot, generation) pairs a fill depends on.
pub type ReadAt = (u64, Box<[(u32, u64)]>);

/// What a cacheable statement depends on in one database.
#[derive(Debug)]
pub struct Resolved {
    /// Generation slots of every table the result reads.
    pub slots: Box<[u32]>,
    /// The tables whose writes must be announced for the result to be cached
    /// (shared with the entries filled from it, which count their hits on them).
    pub tables: Arc<[u32]>,
    /// Catalog version the resolution was made against.
    pub catalog_version: u64,
    /// Key-level version it was made against (see `key_deps`).
    pub keys_version: u64,
    /// For a read by key whose column set is live: how it depends on keys.
    pub key: Option<Arc<key_deps::KeyPlan>>,
    /// Why a lookup by key is left table-level for its columns or the catalog.
    pub key_fallback: Option<&'static str>,
}

/// A verdict kept for a statement text. One that found a table not watched
/// yet holds until a watch lands (`watches.version` moves), and says which
/// tables it waits for, so each read can ask for them (cheaply, see `watches`).
#[derive(Clone)]
struct Verdict {
    result: Arc<Result<Resolved, BypassReason>>,
    waiting: Option<(u64, Arc<[u32]>)>,
}

/// The invalidation state of one cached database.
pub struct DbState {
    pub name: String,
    live: AtomicBool,
    epoch: AtomicU64,
    pub catalog: ArcSwap<Catalog>,
    resolved: moka::sync::Cache<u128, Verdict>,
    /// Outstanding fences: seq -> (nonce, waiter).
    fences: Mutex<HashMap<u64, (u64, oneshot::Sender<()>)>>,
    next_fence: AtomicU64,
    /// Fences of the logical source: WAL positions the stream must pass.
    pub lsn_fences: lsn_fences::LsnFences,
    /// Fences of the NOTIFY source released by a probe of the listener.
    pub probe_fences: Arc<probe_fences::ProbeFences>,
    pub gens: Arc<Generations>,
    /// Tables this instance watches (writes to them are announced), and
    /// those reads are waiting for.
    pub watches: watches::Watches,
    /// L2 epoch from the last `e` notification; 0 until one is seen (no L2).
    l2_epoch: AtomicU64,
    /// Which epoch notifications may still be accepted.
    pub epoch_floor: epoch::Floor,
    /// L2 table versions per generation slot, advanced by each notification.
    l2_versions: Box<[AtomicU64]>,
    /// Key-level invalidation: which column sets writes report.
    pub keys: key_deps::KeyState,
    /// Hits per table, for the announce policy.
    pub hits: hits::TableHits,
    /// Hot entries to refresh after their invalidation, and the sessions
    /// that may run the refreshes.
    pub warm: warm::Warm,
}

impl DbState {
    fn new(name: String, gens: Arc<Generations>) -> DbState {
        DbState {
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            catalog: ArcSwap::from_pointee(Catalog::default()),
            resolved: moka::sync::Cache::new(50_000),
            fences: Mutex::new(HashMap::new()),
            next_fence: AtomicU64::new(1),
            lsn_fences: lsn_fences::LsnFences::default(),
            probe_fences: Arc::default(),
            gens,
            watches: watches::Watches::default(),
            l2_epoch: AtomicU64::new(0),
            epoch_floor: epoch::Floor::default(),
            l2_versions: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            keys: key_deps::KeyState::default(),
            hits: hits::TableHits::default(),
            warm: warm::Warm::new(&name),
            name,
        }
    }

    /// The listener is connected and caught up: entries may be served.
    #[inline]
    pub fn live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Stop serving (listener lost): nothing from before may be trusted.
    pub fn go_down(&self) {
        self.live.store(false, Ordering::Release);
        self.epoch_floor.close();
        self.l2_epoch.store(0, Ordering::Release);
        // Waiters for fences that will never arrive are released; their sessions
        // then see the database is down and bypass the cache.
        if let Ok(mut f) = self.fences.lock() {
            f.clear();
        }
        self.lsn_fences.clear();
        self.probe_fences.clear();
    }

    /// Resume after (re)connecting: a new epoch, so every entry filled before
    /// (which may have missed a notification) is dead.
    pub fn come_up(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.live.store(true, Ordering::Release);
    }

    /// Whether an entry filled under (`epoch`, `deps`) is still current.
    #[inline]
    pub fn valid(&self, epoch: u64, deps: &[(u32, u64)]) -> bool {
        self.live() && epoch == self.epoch() && deps.iter().all(|(s, g)| self.gens.get(*s) == *g)
    }

    /// Snapshot the generations a fill depends on, before its query runs; `None`
    /// if one of its tables is not watched any more (a watch is requested).
    ///
    /// The watch check comes after the snapshot: `unwatch` leaves the watched set
    /// before it bumps generations, so a snapshot that already sees the bump also
    /// sees the table gone, and one that does not is refused at insert time.
    pub fn snapshot(&self, resolved: &Resolved) -> Option<ReadAt> {
        self.snapshot_slots(resolved, &resolved.slots)
    }

    /// As `snapshot`, of these slots (a read by key: see `key_deps`).
    pub fn snapshot_slots(&self, resolved: &Resolved, slots: &[u32]) -> Option<ReadAt> {
        let epoch = self.epoch();
        let gens = slots.iter().map(|s| (*s, self.gens.get(*s))).collect();
        if self.watches.all_watched(&resolved.tables) {
            return Some((epoch, gens));
        }
        self.watches.request(&resolved.tables);
        None
    }

    /// These tables' writes are no longer announced: stop caching them, then
    /// kill their entries (in that order, see `snapshot`). Returns the oids this
    /// instance had been watching.
    pub fn unwatch(&self, tables: &[payload::QualifiedName]) -> Vec<u32> {
        let was = self.stop_watching(tables, true);
        // Every instance advances its L2 versions alike, watched here or not.
        self.invalidate(tables);
        was
    }

    /// Stop caching these tables here (no invalidation: the caller does that);
    /// returns the oids that were watched. With `always`, a watch of them now
    /// in progress will not take effect either (their announcing was switched
    /// off after it started).
    pub fn stop_watching(&self, tables: &[payload::QualifiedName], always: bool) -> Vec<u32> {
        let catalog = self.catalog.load();
        let oids = tables.iter().filter_map(|(s, n)| catalog.oid_of(s, n));
        self.watches.stop(oids, always)
    }

    pub fn invalidate(&self, tables: &[payload::QualifiedName]) {
        let mut slots = Vec::new();
        self.write_slots(tables, &mut slots);
        for s in slots {
            self.bump(s);
        }
    }

    /// A write that reported its keys: reads that scan the table, and reads of
    /// these keys, are dead; reads of other keys live on.
    pub fn invalidate_keys(&self, table: &payload::QualifiedName, sets: &[payload::KeySet]) {
        let mut slots = Vec::new();
        self.key_write_slots(table, sets, &mut slots);
        for s in slots {
            self.bump(s);
        }
    }

    /// A write to these tables was applied: warm the hot entries it killed.
    pub fn warm_tables(&self, cache: &crate::cache::Cache, tables: &[payload::QualifiedName]) {
        self.warm.tables(cache, &|e, d| self.valid(e, d), tables);
    }

    /// A write that reported keys was applied: warm the hot entries it killed.
    pub fn warm_keys(
        &self,
        cache: &crate::cache::Cache,
        table: &payload::QualifiedName,
        sets: &[payload::KeySet],
    ) {
        self.warm.keys(cache, &|e, d| self.valid(e, d), table, sets);
    }

    /// A function, operator, cast or role setting changed (or DDL that names no
    /// relation happened): every result may differ now.
    pub fn invalidate_routines(&self) {
        self.bump(Generations::routines_slot(&self.name));
    }

    /// Kill these tables' L1 entries here and now (and those that name them
    /// without a schema), ahead of the notification that does it everywhere
    /// (L2 versions move only with the stream).
    pub fn invalidate_local(&self, tables: &[payload::QualifiedName]) {
        for (schema, table) in tables {
            self.gens.bump(Generations::slot(&self.name, schema, table));
            self.gens
                .bump(Generations::whole_slot(&self.name, schema, table));
            self.gens.bump(Generations::name_slot(&self.name, table));
        }
    }

    /// As `invalidate_routines`, here and now, ahead of the notification.
    pub fn invalidate_routines_local(&self) {
        self.gens.bump(Generations::routines_slot(&self.name));
    }

    fn bump(&self, slot: u32) {
        // L2 version first: a reader that sees the new L1 generation must not
        // then compute the old L2 key.
        let v = &self.l2_versions[slot as usize % SLOTS];
        v.store(mix(v.load(Ordering::Acquire)), Ordering::Release);
        self.gens.bump(slot);
    }

    /// Kill every L1 entry of this database here and now, ahead of the `*`
    /// notification that does it everywhere.
    pub fn invalidate_local_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Everything in this database changed.
    pub fn invalidate_all(&self) {
        let e = self.l2_epoch.load(Ordering::Acquire);
        if e != 0 {
            self.l2_epoch.store(mix(e), Ordering::Release);
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// An accepted epoch notification: every instance restarts its L2 versions
    /// here. The counter is part of the epoch, so versions restarted from it
    /// never reproduce the keys of an earlier epoch.
    pub fn set_l2_epoch(&self, epoch: u64, counter: u64) {
        self.l2_epoch.store(0, Ordering::Release);
        // Release: a reader that sees a restarted version also sees the epoch
        // cleared above, and so refuses the key it was computing (`l2_key`).
        for v in self.l2_versions.iter() {
            v.store(0, Ordering::Release);
        }
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&epoch.to_le_bytes());
        b[8..].copy_from_slice(&counter.to_le_bytes());
        self.l2_epoch
            .store(xxhash_rust::xxh3::xxh3_64(&b) | 1, Ordering::Release);
    }

    /// The L2 key for a result with L1 key `key` that read `slots`, or None while
    /// this instance is not in step with the others.
    pub fn l2_key(&self, key: u128, slots: &[u32]) -> Option<u128> {
        let epoch = self.l2_epoch.load(Ordering::Acquire);
        if epoch == 0 || !self.live() {
            return None;
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&key.to_le_bytes());
        h.update(&epoch.to_le_bytes());
        for s in slots {
            h.update(
                &self.l2_versions[*s as usize % SLOTS]
                    .load(Ordering::Acquire)
                    .to_le_bytes(),
            );
        }
        // Versions read half-way through an epoch restart, under the old
        // epoch, could be an earlier key of that epoch.
        if self.l2_epoch.load(Ordering::Acquire) != epoch {
            return None;
        }
        Some(h.digest128())
    }

    pub fn set_catalog(&self, catalog: Catalog) {
        // A live column set belongs to a table, not to its oid: once the oid
        // is gone, or names a table with another `pgtier_notify` trigger (a
        // table dropped and its oid reused), the new table's writes report
        // only the sets registered for it, so reads by the old set must not
        // stay keyed (they would miss its writes).
        let old = self.catalog.load();
        self.keys
            .retain(|oid| match (old.get(oid), catalog.get(oid)) {
                (_, None) => false,
                (Some(was), Some(now)) => was.trigger_oid == now.trigger_oid,
                (None, Some(_)) => true,
            });
        self.catalog.store(Arc::new(catalog));
        self.resolved.invalidate_all();
    }

    /// Whether a write of rows to these tables cannot change anything cached
    /// here (see `Catalog::writes_reach_none`): such a write needs no fence.
    pub fn caches_none_of(&self, writes: &[crate::sql::TableRef]) -> bool {
        self.catalog
            .load()
            .writes_reach_none(writes, &self.watches.watched())
    }

    /// Whether these user functions are all IMMUTABLE in the current catalog.
    pub fn all_immutable(&self, functions: &[String]) -> bool {
        functions.is_empty() || self.catalog.load().all_immutable(functions)
    }

    /// Whether any of these calls may run a role's own code.
    pub fn any_user_defined(&self, functions: &[String]) -> bool {
        !functions.is_empty() && self.catalog.load().any_user_defined(functions)
    }

    /// Can a cacheable statement be cached in this database, and on what does
    /// its result depend? Decided against the current catalog, once per text.
    pub fn resolve(
        &self,
        text_hash: u128,
        decision: &Decision,
    ) -> Arc<Result<Resolved, BypassReason>> {
        let catalog = self.catalog.load();
        let keys_version = self.keys.version.load(Ordering::Acquire);
        // Read before the watched set: a watch landing in between leaves this
        // verdict behind the version, so it is made again next time.
        let watch_version = self.watches.version();
        let prior = self.resolved.get(&text_hash);
        // Its key fallback, counted already: once per statement and catalog,
        // not again each time a watch or a column set moves a version.
        let counted = prior.as_ref().and_then(|v| match v.result.as_ref() {
            Ok(r) if r.catalog_version == catalog.version => r.key_fallback,
            _ => None,
        });
        if let Some(v) = prior {
            match (v.result.as_ref(), &v.waiting) {
                (_, Some((at, tables))) if *at == watch_version => {
                    self.watches.request(tables);
                    return v.result;
                }
                (_, Some(_)) => {}
                (Ok(ok), None)
                    if ok.catalog_version != catalog.version || ok.keys_version != keys_version => {
                }
                _ => return v.result,
            }
        }
        let mut unwatched = Vec::new();
        let watched = self.watches.watched();
        let r = Arc::new(
            catalog
                .resolve(&self.name, decision, &watched, &mut unwatched)
                .map(|(slots, tables)| {
                    let mut key_fallback = None;
                    let key = match (
                        &decision.analysis.keys,
                        self.keys.enabled.load(Ordering::Relaxed),
                    ) {
                        (Ok(lookup), true) => key_deps::plan(
                            &self.name,
                            &catalog,
                            &self.keys,
                            lookup,
                            decision
                                .analysis
                                .read
                                .as_ref()
                                .map_or(&[][..], |r| r.tables.as_slice()),
                            &tables,
                            &mut key_fallback,
                        )
                        .map(Arc::new),
                        _ => None,
                    };
                    Resolved {
                        slots: slots.into_boxed_slice(),
                        tables: tables.into(),
                        catalog_version: catalog.version,
                        keys_version,
                        key,
                        key_fallback,
                    }
                }),
        );
        if let Ok(Resolved {
            key_fallback: Some(reason),
            ..
        }) = r.as_ref()
        {
            if counted != Some(*reason) {
                metrics::counter!("pgtier_key_fallbacks_total", "reason" => *reason).increment(1);
            }
        }
        drop(watched);
        if self.keys.take_pending_notice() {
            self.watches.wanted.notify_one();
        }
        let waiting = (!unwatched.is_empty()).then(|| {
            self.watches.request(&unwatched);
            (watch_version, unwatched.into())
        });
        self.resolved.insert(
            text_hash,
            Verdict {
                result: r.clone(),
                waiting,
            },
        );
        r
    }

    /// Register a fence; the listener completes it when the notification
    /// arrives. The nonce is random: sequence numbers can be guessed, and any
    /// role may NOTIFY the channel, but only this instance's own notification
    /// carries the nonce (returns seq, nonce, waiter).
    pub fn new_fence(&self) -> (u64, u64, oneshot::Receiver<()>) {
        let seq = self.next_fence.fetch_add(1, Ordering::Relaxed);
        let nonce = rand::random::<u64>() | 1;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut f) = self.fences.lock() {
            f.insert(seq, (nonce, tx));
        }
        (seq, nonce, rx)
    }

    /// Complete a fence; false if one is registered under `seq` with another
    /// nonce (a forged notification: the fence stays outstanding).
    pub fn complete_fence(&self, seq: u64, nonce: u64) -> bool {
        let Ok(mut f) = self.fences.lock() else {
            return true;
        };
        match f.get(&seq) {
            Some((n, _)) if *n != nonce => false,
            Some(_) => {
                let done = f.remove(&seq);
                drop(f);
                if let Some((_, tx)) = done {
                    let _ = tx.send(());
                }
                true
            }
            // Timed out and forgotten, or never ours.
            None => true,
        }
    }

    /// A fence of the logical source, whose position is not known yet (the
    /// session learns it from the server after its commit): seq, and the
    /// sender to hand to [`DbState::fence_at`] with it.
    pub fn new_lsn_fence(&self) -> (u64, oneshot::Sender<()>, oneshot::Receiver<()>) {
        let seq = self.next_fence.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        (seq, tx, rx)
    }

    /// Release `tx` once the stream has applied everything before `lsn`; at
    /// once (dropped) if the stream is down.
    pub fn fence_at(&self, seq: u64, lsn: u64, tx: oneshot::Sender<()>) {
        self.lsn_fences.wait(seq, lsn, tx, || self.live());
    }

    pub fn forget_fence(&self, seq: u64) {
        if let Ok(mut f) = self.fences.lock() {
            f.remove(&seq);
        }
    }
}

/// All cached databases of this pgtier instance.
pub struct Invalidation {
    pub instance: u64,
    pub channel: String,
    dbs: HashMap<String, Arc<DbState>>,
    pub gens: Arc<Generations>,
}

impl Invalidation {
    /// A fresh random number (epochs).
    pub fn random() -> u64 {
        rand::random::<u64>() | 1
    }

    pub fn new(databases: impl IntoIterator<Item = String>, channel: &str) -> Invalidation {
        let gens = Arc::new(Generations::default());
        let instance = rand::random::<u64>() >> 1;
        Invalidation {
            instance,
            channel: channel.to_string(),
            dbs: databases
                .into_iter()
                .map(|d| (d.clone(), Arc::new(DbState::new(d, gens.clone()))))
                .collect(),
            gens,
        }
    }

    pub fn db(&self, name: &str) -> Option<Arc<DbState>> {
        self.dbs.get(name).cloned()
    }

    pub fn databases(&self) -> impl Iterator<Item = &Arc<DbState>> {
        self.dbs.values()
    }
}

/// Advance an L2 version: deterministic, so every instance lands on the same value.
fn mix(v: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&v.to_le_bytes()) | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn db_with(tables: &[(u32, &str)]) -> DbState {
        let db = DbState::new("db".into(), Arc::new(Generations::default()));
        db.set_catalog(Catalog::build(1, relations(tables), HashSet::new()));
        db
    }

    fn relations(tables: &[(u32, &str)]) -> Vec<catalog::Relation> {
        tables
            .iter()
            .map(|(oid, name)| catalog::Relation {
                oid: *oid,
                schema: "public".into(),
                name: (*name).into(),
                kind: b'r',
                row_security: false,
                has_trigger: true,
                trigger_oid: oid + 1000,
                shape: String::new(),
                reads: Vec::new(),
                parents: Vec::new(),
                children: Vec::new(),
                columns: Vec::new(),
                side_effects: false,
            })
            .collect()
    }

    fn resolved(slots: &[u32], tables: &[u32]) -> Resolved {
        Resolved {
            slots: slots.into(),
            tables: tables.into(),
            catalog_version: 1,
            keys_version: 0,
            key: None,
            key_fallback: None,
        }
    }

    #[test]
    fn fills_need_every_table_watched_and_an_unwatch_kills_entries() {
        let db = db_with(&[(10, "a"), (11, "b")]);
        db.come_up();
        let slot = Generations::slot("db", "public", "a");
        let r = resolved(&[slot], &[10]);
        assert!(db.snapshot(&r).is_none(), "not watched yet");
        assert_eq!(
            db.watches.take_requests(),
            vec![10],
            "and a watch is asked for"
        );

        let ticket = db.watches.ticket();
        assert_eq!(db.watches.mark(&[10], ticket), vec![10]);
        let (epoch, deps) = db.snapshot(&r).expect("watched");
        assert!(db.valid(epoch, &deps));

        let was = db.unwatch(&[("public".into(), "a".into())]);
        assert_eq!(was, vec![10]);
        assert!(!db.valid(epoch, &deps), "an unwatch invalidates");
        assert!(db.snapshot(&r).is_none(), "and stops fills");
    }

    #[test]
    fn live_column_sets_go_with_their_table_not_its_oid() {
        let db = db_with(&[(10, "a"), (11, "b"), (12, "c")]);
        let id = || vec!["id".to_string()];
        for oid in [10, 11, 12] {
            db.keys.mark_live(oid, id());
        }
        let version = db.keys.version.load(Ordering::Acquire);
        // `a` is dropped and its oid reused by a new table (a new trigger);
        // `b` is dropped; `c` stays as it was.
        let mut next = relations(&[(10, "a"), (12, "c")]);
        next[0].trigger_oid += 1;
        db.set_catalog(Catalog::build(2, next, HashSet::new()));
        assert!(!db.keys.keyed(10), "the reused oid is not live");
        assert!(!db.keys.keyed(11), "the dropped table is not live");
        assert!(db.keys.is_live(12, &id()), "the same table stays live");
        assert!(db.keys.version.load(Ordering::Acquire) > version);
    }

    #[test]
    fn only_the_right_nonce_completes_a_fence() {
        let db = db_with(&[]);
        let (seq, nonce, mut done) = db.new_fence();
        assert!(!db.complete_fence(seq, nonce ^ 2), "forged");
        assert!(done.try_recv().is_err(), "still outstanding");
        assert!(db.complete_fence(seq, nonce));
        assert!(done.try_recv().is_ok());
        assert!(
            db.complete_fence(seq, nonce),
            "already done: nothing to refuse"
        );
    }

    #[test]
    fn a_watch_overtaken_by_an_unwatch_does_not_take_effect() {
        let db = db_with(&[(10, "a"), (11, "b")]);
        db.come_up();
        let ticket = db.watches.ticket();
        // The `u` for `a` is applied while the watch is still waiting.
        db.unwatch(&[("public".into(), "a".into())]);
        assert_eq!(db.watches.mark(&[10, 11], ticket), vec![11]);
        // A watch begun after it counts.
        let later = db.watches.ticket();
        assert_eq!(db.watches.mark(&[10], later), vec![10]);
        // A write seen here only stops caching the tables that were watched.
        assert_eq!(
            db.stop_watching(&[("public".into(), "a".into())], false),
            vec![10]
        );
        assert!(db
            .stop_watching(&[("public".into(), "a".into())], false)
            .is_empty());
    }
}
