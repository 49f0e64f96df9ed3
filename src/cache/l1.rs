//! The in-process tier: a moka cache bounded by bytes, entries expiring on their
//! own rule's TTL (plus stale-while-revalidate window).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

use super::entry::Entry;
use super::key::Key;

struct EntryExpiry;

impl Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _: &Key, v: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(v.lifetime())
    }

    fn expire_after_update(
        &self,
        _: &Key,
        v: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.lifetime())
    }
}

type Store = Cache<Key, Arc<Entry>>;

/// The moka cache behind an atomic pointer, so a reload can change its memory
/// bound (by starting an empty cache) without stopping readers.
pub struct L1 {
    cache: arc_swap::ArcSwap<Store>,
    /// False when sized to 0 (L2 only): skip moka entirely rather than insert
    /// every L2 hit only for it to be evicted at once.
    enabled: std::sync::atomic::AtomicBool,
}

fn build(max_bytes: u64) -> Store {
    Cache::builder()
        .max_capacity(max_bytes)
        .weigher(|_k: &Key, v: &Arc<Entry>| v.weight())
        .expire_after(EntryExpiry)
        .build()
}

impl L1 {
    pub fn new(max_bytes: u64) -> L1 {
        L1 {
            cache: arc_swap::ArcSwap::from_pointee(build(max_bytes)),
            enabled: (max_bytes > 0).into(),
        }
    }

    /// Start over with a new memory bound (entries are dropped).
    pub fn resize(&self, max_bytes: u64) {
        self.cache.store(Arc::new(build(max_bytes)));
        self.enabled
            .store(max_bytes > 0, std::sync::atomic::Ordering::Release);
    }

    #[inline]
    fn enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.cache.load().policy().max_capacity().unwrap_or(0)
    }

    #[inline]
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        if !self.enabled() {
            return None;
        }
        self.cache.load().get(key)
    }

    pub fn insert(&self, key: Key, entry: Arc<Entry>) {
        if self.enabled() {
            self.cache.load().insert(key, entry);
        }
    }

    pub fn remove(&self, key: &Key) {
        self.cache.load().invalidate(key);
    }

    pub fn clear(&self) {
        self.cache.load().invalidate_all();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.load().entry_count()
    }

    /// Weighted size (payload plus overhead) as moka accounts it.
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.load().weighted_size()
    }

    /// Let moka apply pending evictions now (tests and stats want exact figures).
    pub fn sync(&self) {
        self.cache.load().run_pending_tasks();
    }

    /// Every entry (for the admin console).
    pub fn entries(&self) -> Vec<(Arc<Key>, Arc<Entry>)> {
        self.cache.load().iter().collect()
    }
}
