//! A cached result: the encoded backend messages, ready to be written as they are.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Estimated bytes per entry beyond its payload: the moka node and its
/// bookkeeping, the `Arc<Entry>`, the key and the `Bytes` headers. Counted in the
/// L1 weight so `l1.max_bytes` bounds real memory, not just payload
/// (`benches/entry_memory.rs` measures it: about 530 bytes).
pub const ENTRY_OVERHEAD: usize = 512;

#[derive(Debug)]
pub struct Entry {
    /// RowDescription ('T'), when the filling request asked for it. A simple
    /// query's result always has one.
    pub row_desc: Option<Bytes>,
    /// DataRow messages and the CommandComplete that ends them.
    pub rows: Bytes,
    /// Served as fresh until then; between then and `stale_until` it may be served
    /// stale while one refresh runs.
    pub fresh_until: Instant,
    pub stale_until: Instant,
    /// Statement shape (pg_query fingerprint) for per-shape statistics.
    pub shape: u64,
    /// Listener epoch and table generations (slot, generation) at the time the
    /// filling query was sent: the entry is valid while they are all unchanged.
    pub epoch: u64,
    pub deps: Box<[(u32, u64)]>,
    /// Oids of the tables it read, for the per-table hit counts that decide
    /// whether their writes stay announced (shared, not copied, per fill).
    pub tables: Arc<[u32]>,
    /// Hits served from it, counted up to the warming threshold only (past it
    /// the hit path just reads it): an entry that reached it is warmed after
    /// its invalidation (`invalidation::warm`).
    pub hits: AtomicU32,
}

impl Entry {
    pub fn new(
        row_desc: Option<Bytes>,
        rows: Bytes,
        ttl: Duration,
        swr: Duration,
        shape: u64,
        epoch: u64,
        deps: Box<[(u32, u64)]>,
    ) -> Entry {
        let now = Instant::now();
        Entry {
            row_desc,
            rows,
            fresh_until: now + ttl,
            stale_until: now + ttl + swr,
            shape,
            epoch,
            deps,
            tables: Arc::default(),
            hits: AtomicU32::new(0),
        }
    }

    /// The tables it read (see `tables`).
    pub fn reading(mut self, tables: Arc<[u32]>) -> Entry {
        self.tables = tables;
        self
    }

    /// Count a hit toward the warming threshold `after` (0: warming off); true
    /// for the one hit that makes the entry hot.
    #[inline]
    pub fn hit(&self, after: u32) -> bool {
        after != 0
            && self.hits.load(Ordering::Relaxed) < after
            && self.hits.fetch_add(1, Ordering::Relaxed) + 1 == after
    }

    pub fn payload_len(&self) -> usize {
        self.rows.len() + self.row_desc.as_ref().map_or(0, |b| b.len())
    }

    /// Weight in the L1 memory bound.
    pub fn weight(&self) -> u32 {
        let deps = self.deps.len() * 16;
        (self.payload_len() + ENTRY_OVERHEAD + deps).min(u32::MAX as usize) as u32
    }

    pub fn lifetime(&self) -> Duration {
        self.stale_until.saturating_duration_since(Instant::now())
    }
}
