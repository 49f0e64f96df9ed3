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

pub struct L1 {
    cache: Cache<Key, Arc<Entry>>,
}

impl L1 {
    pub fn new(max_bytes: u64) -> L1 {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &Key, v: &Arc<Entry>| v.weight())
            .expire_after(EntryExpiry)
            .build();
        L1 { cache }
    }

    #[inline]
    pub fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: Key, entry: Arc<Entry>) {
        self.cache.insert(key, entry);
    }

    pub fn remove(&self, key: &Key) {
        self.cache.invalidate(key);
    }

    pub fn clear(&self) {
        self.cache.invalidate_all();
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Weighted size (payload plus overhead) as moka accounts it.
    pub fn weighted_bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Let moka apply pending evictions now (tests and stats want exact figures).
    pub fn sync(&self) {
        self.cache.run_pending_tasks();
    }

    pub fn iter(&self) -> impl Iterator<Item = (Arc<Key>, Arc<Entry>)> + '_ {
        self.cache.iter()
    }
}
