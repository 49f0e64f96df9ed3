//! Cache hits per table, counted where a hit is served, so the announce policy
//! (`watch_policy::Benefit`) can weigh what a table's cached reads save its
//! readers against what announcing its writes costs its writers.
//!
//! One relaxed add per table the entry read: no allocation, no lock. Tables
//! share buckets by oid; a collision only makes a table look more read than it
//! is (it stays announced a little longer), never less.

use std::sync::atomic::{AtomicU64, Ordering};

const BUCKETS: usize = 4096;

pub struct TableHits {
    counts: Box<[AtomicU64]>,
}

impl Default for TableHits {
    fn default() -> Self {
        TableHits {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl TableHits {
    /// A cached result that read these tables (oids) was served.
    #[inline]
    pub fn count(&self, tables: &[u32]) {
        for t in tables {
            self.counts[*t as usize % BUCKETS].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hits served so far on results that read this table.
    pub fn get(&self, table: u32) -> u64 {
        self.counts[table as usize % BUCKETS].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_table_of_a_hit() {
        let h = TableHits::default();
        h.count(&[7, 9]);
        h.count(&[7]);
        assert_eq!((h.get(7), h.get(9), h.get(8)), (2, 1, 0));
    }
}
