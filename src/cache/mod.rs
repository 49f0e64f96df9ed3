//! The result cache shared by all sessions: decisions per statement, the L1
//! tier, statement descriptions, and coalescing of concurrent misses.

pub mod entry;
pub mod key;
pub mod l1;
pub mod l2;
pub mod rules;
pub mod shapes;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::bypass::BypassReason;
use crate::config::Config;
use crate::sql::{self, Analysis, NotCacheable};

/// Hash of a statement text, the identity decisions are cached under.
pub fn text_hash(sql: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(sql)
}
pub use entry::Entry;
pub use key::{Key, Seed};
use l1::L1;
use rules::{Policy, Refusal, Rules};

/// Why a request was not served from or stored in the cache; the `reason` label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bypass {
    Statement(NotCacheable),
    Rule(Refusal),
}

impl Bypass {
    pub fn reason(&self) -> BypassReason {
        match self {
            Bypass::Statement(n) => n.reason(),
            Bypass::Rule(r) => r.reason(),
        }
    }
}

/// Everything pgtier decided about one statement text, computed once.
#[derive(Debug)]
pub struct Decision {
    pub analysis: Analysis,
    pub verdict: Result<Policy, Bypass>,
}

impl Decision {
    pub fn cacheable(&self) -> Option<&Policy> {
        self.verdict.as_ref().ok()
    }
}

/// Outcome of trying to become the one session that fills a key.
pub enum Claim {
    /// Go to Postgres and fill; dropping the lease wakes the waiters.
    Leader(FillLease),
    /// Another session is fetching this key: wait for it (bounded), then look again.
    Follower(Arc<Notify>),
}

type Inflight = Mutex<HashMap<Key, Arc<Notify>>>;

pub struct FillLease {
    key: Key,
    inflight: Arc<Inflight>,
}

impl Drop for FillLease {
    fn drop(&mut self) {
        let notify = match self.inflight.lock() {
            Ok(mut m) => m.remove(&self.key),
            Err(poisoned) => poisoned.into_inner().remove(&self.key),
        };
        if let Some(n) = notify {
            n.notify_waiters();
        }
    }
}

pub struct Cache {
    pub l1: L1,
    l2: arc_swap::ArcSwapOption<l2::L2>,
    /// Statement descriptions (ParameterDescription + RowDescription/NoData).
    descs: moka::sync::Cache<Key, Bytes>,
    decisions: moka::sync::Cache<u128, Arc<Decision>>,
    rules: ArcSwap<Rules>,
    inflight: Arc<Inflight>,
    max_entry_bytes: std::sync::atomic::AtomicUsize,
    coalesce_wait: ArcSwap<Duration>,
    system_catalogs: std::sync::atomic::AtomicBool,
    /// Hits that make an entry hot (warmed after its invalidation); 0: off.
    warm_after: std::sync::atomic::AtomicU32,
}

/// `cache.warm_after_hits`, or 0 when `cache.warm_hot_keys` is off.
fn warm_after(cfg: &Config) -> u32 {
    if cfg.cache.warm_hot_keys {
        cfg.cache.warm_after_hits.max(1)
    } else {
        0
    }
}

const DECISION_CAPACITY: u64 = 100_000;
const DESCRIBE_TTL: Duration = Duration::from_secs(600);

impl Cache {
    pub fn new(cfg: &Config) -> Cache {
        Cache {
            l1: L1::new(cfg.l1.max_bytes.0),
            l2: arc_swap::ArcSwapOption::from(l2::L2::new(&cfg.l2).map(Arc::new)),
            descs: moka::sync::Cache::builder()
                .max_capacity(16 << 20)
                .weigher(|_k: &Key, v: &Bytes| (v.len() + 64).min(u32::MAX as usize) as u32)
                .time_to_live(DESCRIBE_TTL)
                .build(),
            decisions: moka::sync::Cache::new(DECISION_CAPACITY),
            rules: ArcSwap::from_pointee(Rules::new(&cfg.cache)),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            max_entry_bytes: (cfg.cache.max_entry_bytes.0 as usize).into(),
            coalesce_wait: ArcSwap::from_pointee(cfg.cache.coalesce_wait.0),
            system_catalogs: cfg.cache.system_catalogs.into(),
            warm_after: warm_after(cfg).into(),
        }
    }

    /// The shared tier, if configured.
    pub fn l2(&self) -> Option<Arc<l2::L2>> {
        self.l2.load_full()
    }

    /// Apply a new configuration: rules change, so earlier decisions and entries
    /// made under the old ones are dropped; L1 is rebuilt if its bound changed,
    /// L2 reconnected if its settings did.
    pub fn reconfigure(&self, old: &Config, cfg: &Config) {
        if old.l1.max_bytes != cfg.l1.max_bytes {
            self.l1.resize(cfg.l1.max_bytes.0);
        }
        if serde_json::to_string(&old.l2).ok() != serde_json::to_string(&cfg.l2).ok() {
            self.l2.store(l2::L2::new(&cfg.l2).map(Arc::new));
        }
        use std::sync::atomic::Ordering;
        self.rules.store(Arc::new(Rules::new(&cfg.cache)));
        self.max_entry_bytes
            .store(cfg.cache.max_entry_bytes.0 as usize, Ordering::Relaxed);
        self.coalesce_wait
            .store(Arc::new(cfg.cache.coalesce_wait.0));
        self.system_catalogs
            .store(cfg.cache.system_catalogs, Ordering::Relaxed);
        self.warm_after.store(warm_after(cfg), Ordering::Relaxed);
        // Entries made under other rules (a table now `cache = false`, a longer
        // TTL) must not outlive them. Warming settings change no entry.
        let mut new = cfg.cache.clone();
        new.warm_hot_keys = old.cache.warm_hot_keys;
        new.warm_after_hits = old.cache.warm_after_hits;
        if serde_json::to_string(&old.cache).ok() != serde_json::to_string(&new).ok() {
            self.decisions.invalidate_all();
            self.l1.clear();
            self.descs.invalidate_all();
        }
    }

    pub fn has_public_rules(&self) -> bool {
        self.rules.load().has_public
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hits that make an entry hot, 0 when warming is off.
    #[inline]
    pub fn warm_after(&self) -> u32 {
        self.warm_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn coalesce_wait(&self) -> Duration {
        **self.coalesce_wait.load()
    }

    /// The decision for a statement text, parsing it only the first time.
    pub fn decide(&self, sql: &[u8]) -> Arc<Decision> {
        self.decide_hashed(xxhash_rust::xxh3::xxh3_128(sql), sql)
    }

    /// As [`Cache::decide`], with the text's hash already computed.
    pub fn decide_hashed(&self, h: u128, sql: &[u8]) -> Arc<Decision> {
        if let Some(d) = self.decisions.get(&h) {
            return d;
        }
        let d = Arc::new(self.decide_uncached(sql));
        self.decisions.insert(h, d.clone());
        d
    }

    fn decide_uncached(&self, sql: &[u8]) -> Decision {
        let text = String::from_utf8_lossy(sql);
        let analysis = sql::analyze(&text);
        let verdict = match &analysis.read {
            Err(NotCacheable::SystemCatalog)
                if self
                    .system_catalogs
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                // Re-check without the catalog restriction.
                self.rules
                    .load()
                    .decide(&text, analysis.fingerprint, &[], &[])
                    .map_err(Bypass::Rule)
            }
            Err(n) => Err(Bypass::Statement(n.clone())),
            // User functions are checked against the database's catalog later.
            Ok(read) => self
                .rules
                .load()
                .decide(&text, analysis.fingerprint, &read.tables, &read.ctes)
                .map_err(Bypass::Rule),
        };
        if let Ok(policy) = &verdict {
            shapes::remember(analysis.fingerprint, &text, policy, || {
                match &analysis.keys {
                    Ok(k) => {
                        let cols: Vec<&str> = k.columns.iter().map(|c| c.column.as_str()).collect();
                        // In a join, whose key: the other tables are table-level.
                        match k.joined {
                            true => format!("key ({}: {})", k.table, cols.join(", ")),
                            false => format!("key ({})", cols.join(", ")),
                        }
                    }
                    Err(why) => format!("table ({})", why.label()),
                }
            });
        }
        Decision { analysis, verdict }
    }

    /// Forget statement descriptions (after DDL: a table's shape may differ).
    pub fn clear_descriptions(&self) {
        self.descs.invalidate_all();
    }

    pub fn describe(&self, key: &Key) -> Option<Bytes> {
        self.descs.get(key)
    }

    pub fn store_describe(&self, key: Key, desc: Bytes) {
        self.descs.insert(key, desc);
    }

    /// Become the filler of `key`, or learn who is.
    pub fn claim(&self, key: Key) -> Claim {
        let mut map = match self.inflight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = map.get(&key) {
            return Claim::Follower(n.clone());
        }
        map.insert(key, Arc::new(Notify::new()));
        Claim::Leader(FillLease {
            key,
            inflight: self.inflight.clone(),
        })
    }

    /// Wait (bounded) until the miss another session is running for `key` ends.
    pub async fn wait_for(&self, notify: Arc<Notify>, key: Key) {
        let notified = notify.notified();
        // The leader may have finished between our claim and now.
        let still_running = match self.inflight.lock() {
            Ok(m) => m.contains_key(&key),
            Err(p) => p.into_inner().contains_key(&key),
        };
        if still_running {
            let _ = tokio::time::timeout(self.coalesce_wait(), notified).await;
        }
    }

    pub fn insert(&self, key: Key, entry: Entry) {
        self.l1.insert(key, Arc::new(entry));
    }
}
