//! Table generations: one counter per slot, tables hashed into slots. A
//! cached entry records the generations of the tables it read; a write bumps
//! the table's slot, and the entry is dead from that moment on.
//!
//! A slot can also be held unsettled: bumped for a commit that other sessions
//! may not see yet (the logical source learns of a commit from its WAL record,
//! which can come before the commit is visible). A result read meanwhile may
//! predate the commit although it was planned after the bump, so it is not
//! stored until the commit is seen visible and the slot released.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Number of generation counters. Tables hash into them; a collision only means
/// that a write to one table also invalidates another's entries.
pub const SLOTS: usize = 1 << 16;

/// Per-table generation counters, shared by all databases.
pub struct Generations {
    slots: Box<[AtomicU64]>,
    /// Commits bumped into each slot that are not known visible yet.
    unsettled: Box<[AtomicU32]>,
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            unsettled: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl Generations {
    pub fn slot(database: &str, schema: &str, table: &str) -> u32 {
        use xxhash_rust::xxh3::Xxh3;
        let mut h = Xxh3::new();
        for part in [database, schema, table] {
            h.update(&(part.len() as u32).to_le_bytes());
            h.update(part.as_bytes());
        }
        (h.digest() % SLOTS as u64) as u32
    }

    /// The slot of changes to a table as a whole (TRUNCATE, DDL, a write that
    /// reports no keys): reads of it by key depend on this one, not on the
    /// table slot every write bumps. Table names hold no NUL byte.
    pub fn whole_slot(database: &str, schema: &str, table: &str) -> u32 {
        Self::slot(database, schema, &format!("{table}\0whole"))
    }

    /// The slot of one key of a table: these values in these columns.
    pub fn key_slot(
        database: &str,
        schema: &str,
        table: &str,
        cols: &[&str],
        values: &[&str],
    ) -> u32 {
        use xxhash_rust::xxh3::Xxh3;
        let mut h = Xxh3::new();
        h.update(b"key\0");
        h.update(&(cols.len() as u32).to_le_bytes());
        for part in [database, schema, table]
            .into_iter()
            .chain(cols.iter().copied())
        {
            h.update(&(part.len() as u32).to_le_bytes());
            h.update(part.as_bytes());
        }
        for v in values {
            h.update(&(v.len() as u32).to_le_bytes());
            h.update(v.as_bytes());
        }
        (h.digest() % SLOTS as u64) as u32
    }

    /// The slot of a relation name in any schema: results that name it without
    /// a schema depend on it, so a relation of that name appearing (created,
    /// renamed, moved to another schema) anywhere invalidates them. No schema is
    /// empty, so it is no table's slot.
    pub fn name_slot(database: &str, name: &str) -> u32 {
        Self::slot(database, "", name)
    }

    /// The slot of the database's functions, operators, casts and role
    /// settings: every result depends on it, and changes to them bump it.
    pub fn routines_slot(database: &str) -> u32 {
        Self::slot(database, "", "")
    }

    #[inline]
    pub fn get(&self, slot: u32) -> u64 {
        self.slots[slot as usize % SLOTS].load(Ordering::Acquire)
    }

    pub fn bump(&self, slot: u32) {
        self.slots[slot as usize % SLOTS].fetch_add(1, Ordering::AcqRel);
    }

    /// Hold `slot` unsettled. Before the bump it goes with: whoever reads
    /// the bumped generation (acquire) then sees it held.
    pub fn hold(&self, slot: u32) {
        self.unsettled[slot as usize % SLOTS].fetch_add(1, Ordering::AcqRel);
    }

    /// One commit held in `slot` is visible now.
    pub fn release(&self, slot: u32) {
        let held = &self.unsettled[slot as usize % SLOTS];
        // Never below zero, whatever a caller does twice.
        let _ = held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether a commit not yet known visible was bumped into any of these.
    pub fn any_held(&self, slots: impl IntoIterator<Item = u32>) -> bool {
        slots
            .into_iter()
            .any(|s| self.unsettled[s as usize % SLOTS].load(Ordering::Acquire) > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::Generations;

    #[test]
    fn a_held_slot_is_held_until_each_hold_is_released() {
        let g = Generations::default();
        assert!(!g.any_held([7, 8]));
        g.hold(7);
        g.hold(7);
        g.bump(7);
        assert!(g.any_held([8, 7]));
        assert!(!g.any_held([8]));
        g.release(7);
        assert!(g.any_held([7]), "one commit still unsettled");
        g.release(7);
        g.release(7);
        assert!(!g.any_held([7]));
        g.hold(7);
        assert!(g.any_held([7]), "a release too many left no credit");
    }
}
