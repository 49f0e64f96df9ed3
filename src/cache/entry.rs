//! A cached result: the encoded backend messages, ready to be written as they are.

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::sql::TableRef;

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
    /// Tables the result depends on, for invalidation.
    pub tables: Box<[TableRef]>,
}

impl Entry {
    pub fn new(
        row_desc: Option<Bytes>,
        rows: Bytes,
        ttl: Duration,
        swr: Duration,
        shape: u64,
        tables: Box<[TableRef]>,
    ) -> Entry {
        let now = Instant::now();
        Entry {
            row_desc,
            rows,
            fresh_until: now + ttl,
            stale_until: now + ttl + swr,
            shape,
            tables,
        }
    }

    pub fn payload_len(&self) -> usize {
        self.rows.len() + self.row_desc.as_ref().map_or(0, |b| b.len())
    }

    /// Weight in the L1 memory bound.
    pub fn weight(&self) -> u32 {
        let tables: usize = self.tables.iter().map(|t| t.name.len() + 48).sum();
        (self.payload_len() + ENTRY_OVERHEAD + tables).min(u32::MAX as usize) as u32
    }

    pub fn lifetime(&self) -> Duration {
        self.stale_until.saturating_duration_since(Instant::now())
    }
}
