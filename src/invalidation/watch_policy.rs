//! When a table's writes stop and start being announced: a table written in
//! quick succession is unwatched (`WriteRates`), and one unwatched right after
//! each watch waits longer each time before it is watched again (`Holdoff`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::payload::QualifiedName;

/// Announced writes per table over a short window: a table written faster than
/// `HOT_WRITES` per `HOT_WINDOW` is worth unwatching; one written now and then
/// stays watched (and cached between its writes).
#[derive(Default)]
pub(super) struct WriteRates {
    tables: HashMap<QualifiedName, (Instant, u32)>,
}

const HOT_WRITES: u32 = 5;
const HOT_WINDOW: Duration = Duration::from_millis(100);

impl WriteRates {
    pub(super) fn hot(&mut self, tables: &[QualifiedName], now: Instant) -> bool {
        if self.tables.len() > 100_000 {
            self.tables.clear();
        }
        let mut hot = false;
        for t in tables {
            let (start, n) = self.tables.entry(t.clone()).or_insert((now, 0));
            if now.duration_since(*start) > HOT_WINDOW {
                *start = now;
                *n = 0;
            }
            *n += 1;
            hot |= *n >= HOT_WRITES;
        }
        hot
    }
}

/// How long a table that was just unwatched waits before it may be watched
/// again. A table written soon after each watch (a counter, a queue) would
/// otherwise cycle: every read watches it, the next write unwatches it, and
/// writers pay for a notification each time while its entries live a few
/// milliseconds. When a watch ends within `SHORT_WATCH`, the table's hold-off
/// doubles (up to `MAX_HOLDOFF`; reads meanwhile go to Postgres); a watch that
/// lasts longer clears it, so tables written now and then are cached again at
/// the next read.
#[derive(Default)]
pub(super) struct Holdoff {
    tables: HashMap<u32, HoldoffState>,
}

struct HoldoffState {
    watched_at: Instant,
    wait: Duration,
    until: Instant,
}

const MIN_HOLDOFF: Duration = Duration::from_millis(10);
const MAX_HOLDOFF: Duration = Duration::from_secs(2);
const SHORT_WATCH: Duration = Duration::from_millis(100);

impl Holdoff {
    pub(super) fn may_watch(&self, oid: u32) -> bool {
        self.tables
            .get(&oid)
            .is_none_or(|t| Instant::now() >= t.until)
    }

    pub(super) fn watched(&mut self, oids: &[u32]) {
        let now = Instant::now();
        for o in oids {
            let t = self.tables.entry(*o).or_insert(HoldoffState {
                watched_at: now,
                wait: Duration::ZERO,
                until: now,
            });
            t.watched_at = now;
        }
    }

    pub(super) fn unwatched(&mut self, oids: &[u32]) {
        let now = Instant::now();
        for o in oids {
            let Some(t) = self.tables.get_mut(o) else {
                continue;
            };
            if now.duration_since(t.watched_at) < SHORT_WATCH {
                t.wait = (t.wait * 2).clamp(MIN_HOLDOFF, MAX_HOLDOFF);
                t.until = now + t.wait;
            } else {
                self.tables.remove(o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_written_right_after_each_watch_are_held_off_longer_each_time() {
        let mut h = Holdoff::default();
        assert!(h.may_watch(1), "never watched: no hold-off");
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            h.watched(&[1]);
            h.unwatched(&[1]);
            let t = &h.tables[&1];
            assert!(t.wait >= last && t.wait <= MAX_HOLDOFF);
            last = t.wait;
        }
        assert_eq!(last, MAX_HOLDOFF);
        assert!(!h.may_watch(1));
        // A watch that lasted clears it.
        let t = h.tables.get_mut(&1).map(|t| {
            t.watched_at = Instant::now() - SHORT_WATCH * 2;
        });
        assert!(t.is_some());
        h.unwatched(&[1]);
        assert!(h.may_watch(1));
        // Unwatches of tables this instance never watched change nothing.
        h.unwatched(&[2]);
        assert!(h.may_watch(2));
    }

    #[test]
    fn only_tables_written_in_quick_succession_are_hot() {
        let mut r = WriteRates::default();
        let t = vec![("public".to_string(), "t".to_string())];
        let start = Instant::now();
        // One write every 30 ms: never five within a window.
        for i in 0..20 {
            assert!(!r.hot(&t, start + Duration::from_millis(30 * i)));
        }
        let later = start + Duration::from_secs(10);
        let hot: Vec<bool> = (0..5)
            .map(|i| r.hot(&t, later + Duration::from_millis(i)))
            .collect();
        assert_eq!(hot, [false, false, false, false, true]);
    }
}
