//! Which tables this instance has watched (their writes are announced, so
//! reads of them may be cached), which ones reads are waiting for, and which
//! ones the announce policy holds off for now.
//!
//! Reads consult this on every miss, so the common answers are lock-free: the
//! watched set and the hold-offs are swapped whole when they change (rarely),
//! and a read of a table that is already asked for, or held off, neither takes
//! the request lock for long nor wakes the listener again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

#[derive(Default)]
struct Book {
    seq: u64,
    unwatched_at: HashMap<u32, u64>,
}

pub struct Watches {
    watched: ArcSwap<HashSet<u32>>,
    /// Serialises changes to `watched` (the applier and the listener loop both
    /// make them) and remembers when each table was last unwatched, so a watch
    /// that an unwatch overtook does not take effect.
    book: Mutex<Book>,
    /// Tables a read wanted cached but that are not watched yet.
    requests: Mutex<HashSet<u32>>,
    /// Wakes the listener when `requests` gains a table.
    pub wanted: tokio::sync::Notify,
    /// Until when the listener will not watch a table again (see
    /// `watch_policy::Holdoff`); reads do not ask for those meanwhile.
    held_off: ArcSwap<HashMap<u32, Instant>>,
    /// Moves whenever tables become watched: verdicts that found a table
    /// unwatched are kept only as long as it has not moved.
    version: AtomicU64,
}

impl Default for Watches {
    fn default() -> Watches {
        Watches {
            watched: ArcSwap::from_pointee(HashSet::new()),
            book: Mutex::new(Book::default()),
            requests: Mutex::new(HashSet::new()),
            wanted: tokio::sync::Notify::new(),
            held_off: ArcSwap::from_pointee(HashMap::new()),
            version: AtomicU64::new(0),
        }
    }
}

impl Watches {
    /// Whether every one of these tables is watched.
    #[inline]
    pub fn all_watched(&self, tables: &[u32]) -> bool {
        let watched = self.watched.load();
        tables.iter().all(|t| watched.contains(t))
    }

    pub fn watched(&self) -> arc_swap::Guard<Arc<HashSet<u32>>> {
        self.watched.load()
    }

    #[inline]
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// A read wants these tables cached: ask the listener to watch those that
    /// are not watched, not held off and not asked for already.
    pub fn request(&self, tables: &[u32]) {
        let watched = self.watched.load();
        let held = self.held_off.load();
        let mut now = None;
        let mut fresh = false;
        let Ok(mut req) = self.requests.lock() else {
            return;
        };
        for t in tables.iter().filter(|t| !watched.contains(t)) {
            if let Some(until) = held.get(t) {
                if *now.get_or_insert_with(Instant::now) < *until {
                    continue;
                }
            }
            fresh |= req.insert(*t);
        }
        drop(req);
        if fresh {
            self.wanted.notify_one();
        }
    }

    /// Tables requested since the last call.
    pub fn take_requests(&self) -> Vec<u32> {
        self.requests
            .lock()
            .map(|mut r| r.drain().collect())
            .unwrap_or_default()
    }

    /// The listener's hold-offs, published whole (they change only when a
    /// table is switched off).
    pub fn hold_off(&self, until: HashMap<u32, Instant>) {
        self.held_off.store(Arc::new(until));
    }

    /// Stop caching these tables here; returns those that were watched. With
    /// `always`, a watch of them now in progress will not take effect either.
    pub fn stop(&self, oids: impl IntoIterator<Item = u32>, always: bool) -> Vec<u32> {
        let Ok(mut book) = self.book.lock() else {
            return Vec::new();
        };
        let mut set = (**self.watched.load()).clone();
        book.seq += 1;
        let seq = book.seq;
        let mut was = Vec::new();
        for oid in oids {
            let removed = set.remove(&oid);
            if removed {
                was.push(oid);
            }
            if removed || always {
                book.unwatched_at.insert(oid, seq);
            }
        }
        if !was.is_empty() {
            self.watched.store(Arc::new(set));
        }
        was
    }

    /// Taken before a watch starts; see `mark`.
    pub fn ticket(&self) -> u64 {
        self.book.lock().map(|b| b.seq).unwrap_or(0)
    }

    /// Record tables as watched by a watch that began at `ticket`. Tables
    /// unwatched since the ticket are left out: the watch may have been
    /// switched off behind it.
    pub fn mark(&self, oids: &[u32], ticket: u64) -> Vec<u32> {
        let Ok(book) = self.book.lock() else {
            return Vec::new();
        };
        let ok: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| book.unwatched_at.get(o).is_none_or(|at| *at <= ticket))
            .collect();
        let mut set = (**self.watched.load()).clone();
        set.extend(ok.iter().copied());
        self.watched.store(Arc::new(set));
        self.version.fetch_add(1, Ordering::AcqRel);
        ok
    }

    /// After reconnecting, watches are re-established on demand.
    pub fn forget(&self) {
        if let Ok(_book) = self.book.lock() {
            self.watched.store(Arc::new(HashSet::new()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::time::Duration;

    #[test]
    fn reads_of_held_off_or_already_requested_tables_wake_the_listener_once() {
        let w = Watches::default();
        w.request(&[1, 2]);
        w.request(&[1, 2]);
        // One permit for both reads: the second found its tables asked for.
        assert!(w.wanted.notified().now_or_never().is_some(), "woken");
        assert!(
            w.wanted.notified().now_or_never().is_none(),
            "no second wake-up"
        );
        let mut got = w.take_requests();
        got.sort_unstable();
        assert_eq!(got, vec![1, 2]);

        let later = Instant::now() + Duration::from_secs(60);
        w.hold_off(HashMap::from([(1, later), (2, Instant::now())]));
        w.request(&[1, 2]);
        assert_eq!(
            w.take_requests(),
            vec![2],
            "1 is held off, 2's hold-off is over"
        );

        let v = w.version();
        assert_eq!(w.mark(&[3], w.ticket()), vec![3]);
        assert!(w.version() > v, "a new watch moves the version");
        w.request(&[3]);
        assert!(
            w.take_requests().is_empty(),
            "watched tables are not asked for"
        );
    }
}
