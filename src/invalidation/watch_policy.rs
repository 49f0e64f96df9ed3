//! When a table's writes stop and start being announced. Announcing costs
//! writers (Postgres serialises notifying commits, and key-reporting triggers
//! read their transition tables); it pays off only through the hits on the
//! table's cached reads. `Benefit` weighs the two per table and unwatches a
//! table whose announced writes earn too few hits; one unwatched again soon
//! after each watch waits longer each time before it is watched again
//! (`Holdoff`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::payload::QualifiedName;

/// Announced writes and cache hits per table over a window of `WINDOW`.
///
/// A table is announced as long as each announced write earns at least
/// `min_hits_per_write` hits on results that read it (counted by this
/// instance). Tables written fewer than `MIN_WRITES` times in a window are
/// never judged: their announcements cost writers little. A write-only table
/// (no hit at all) is judged at `MIN_WRITES`; others once the window has
/// lasted `SPAN`, so entries filled after a watch have time to be hit.
pub(super) struct Benefit {
    tables: HashMap<QualifiedName, Window>,
    min_hits_per_write: f64,
}

struct Window {
    start: Instant,
    writes: u32,
    hits_at_start: u64,
    /// What the table's reads depended on when the window started (the
    /// key-level version): once reads by key become keyed, the hits and
    /// writes from before say nothing about what announcing earns now.
    regime: u64,
}

const WINDOW: Duration = Duration::from_secs(1);
const SPAN: Duration = Duration::from_millis(250);
const MIN_WRITES: u32 = 20;
const PLENTY: u32 = 100;

impl Benefit {
    pub(super) fn new(min_hits_per_write: f64) -> Benefit {
        Benefit {
            tables: HashMap::new(),
            min_hits_per_write,
        }
    }

    /// A write to `table` was announced at `now`, and results that read it
    /// have been hit `hits` times so far under `regime`: is announcing it
    /// worth less than it costs? Once it says so, the table's window starts
    /// over.
    pub(super) fn not_worth(
        &mut self,
        table: &QualifiedName,
        hits: u64,
        regime: u64,
        now: Instant,
    ) -> bool {
        if self.tables.len() > 100_000 {
            self.tables.clear();
        }
        let fresh = Window {
            start: now,
            writes: 0,
            hits_at_start: hits,
            regime,
        };
        let w = self.tables.entry(table.clone()).or_insert(fresh);
        let mut elapsed = now.saturating_duration_since(w.start);
        if elapsed > WINDOW || w.regime != regime {
            *w = Window {
                start: now,
                writes: 0,
                hits_at_start: hits,
                regime,
            };
            elapsed = Duration::ZERO;
        }
        w.writes += 1;
        if w.writes < MIN_WRITES {
            return false;
        }
        let earned = hits.saturating_sub(w.hits_at_start);
        // Plenty of writes are evidence enough: a table written thousands of
        // times a second is judged within tens of milliseconds, not after
        // paying SPAN's worth of notifying commits.
        let judged = earned == 0 || elapsed >= SPAN || w.writes >= PLENTY;
        let poor = (earned as f64) < self.min_hits_per_write * f64::from(w.writes);
        if judged && poor {
            // Debug only: notifications already queued after a switch-off are
            // judged too; the applier logs the switch-offs that take effect.
            tracing::debug!(
                schema = %table.0,
                table = %table.1,
                writes = w.writes,
                hits = earned,
                over_ms = elapsed.as_millis() as u64,
                "announced writes earn too few hits"
            );
            self.tables.remove(table);
            return true;
        }
        false
    }
}

/// How long a table that was just unwatched waits before it may be watched
/// again. A table not worth announcing would otherwise cycle: every read
/// watches it, `Benefit` unwatches it a fraction of a second later, and
/// writers pay for notifications during each watch. When a watch ends within
/// `SHORT_WATCH`, the table's hold-off doubles (up to `MAX_HOLDOFF`; reads
/// meanwhile go to Postgres); a watch that lasts longer clears it, so a table
/// whose workload changed is cached again at the next read.
#[derive(Default)]
pub(super) struct Holdoff {
    tables: HashMap<u32, HoldoffState>,
}

struct HoldoffState {
    watched_at: Instant,
    wait: Duration,
    until: Instant,
}

// A table is judged on at least 250 ms of its load: one found not worth
// announcing is not worth watching again a moment later.
const MIN_HOLDOFF: Duration = Duration::from_secs(1);
const MAX_HOLDOFF: Duration = Duration::from_secs(30);
const SHORT_WATCH: Duration = Duration::from_secs(5);

impl Holdoff {
    pub(super) fn may_watch(&self, oid: u32) -> bool {
        self.tables
            .get(&oid)
            .is_none_or(|t| Instant::now() >= t.until)
    }

    /// Until when each held-off table waits (for reads, so they do not ask).
    pub(super) fn deadlines(&self) -> HashMap<u32, Instant> {
        let now = Instant::now();
        self.tables
            .iter()
            .filter(|(_, t)| t.until > now)
            .map(|(o, t)| (*o, t.until))
            .collect()
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
            // A table watched eagerly at start-up has no entry: its watch
            // counts as short (it was found not worth announcing), or it would
            // be watched again at once.
            let t = self.tables.entry(*o).or_insert(HoldoffState {
                watched_at: now,
                wait: Duration::ZERO,
                until: now,
            });
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
        for _ in 0..8 {
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
        // A table watched without a record (eagerly, at start-up) is held off too.
        h.unwatched(&[2]);
        assert!(!h.may_watch(2));
    }

    #[test]
    fn tables_are_announced_while_their_hits_pay_for_their_writes() {
        let t = ("public".to_string(), "t".to_string());
        let start = Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        // A write-only table is judged as soon as it has enough writes.
        let mut b = Benefit::new(5.0);
        let verdicts: Vec<bool> = (0..MIN_WRITES)
            .map(|i| b.not_worth(&t, 0, 0, ms(i.into())))
            .collect();
        assert_eq!(verdicts.iter().filter(|v| **v).count(), 1);
        assert!(verdicts[MIN_WRITES as usize - 1], "the last write decides");
        // Ten hits per write against a bar of five: announced however often written.
        let mut b = Benefit::new(5.0);
        assert!((0..1000u64).all(|i| !b.not_worth(&t, 100 + 10 * i, 0, ms(i))));
        // Two hits per write: judged once the window has lasted SPAN, not before.
        let mut b = Benefit::new(5.0);
        let first = (0..1000u64).find(|i| b.not_worth(&t, 2 * i, 0, ms(*i * 10)));
        assert_eq!(first, Some(SPAN.as_millis() as u64 / 10));
        // ... or once it has had plenty of writes.
        let mut b = Benefit::new(5.0);
        let first = (0..1000u64).find(|i| b.not_worth(&t, 2 * i, 0, ms(*i)));
        assert_eq!(first, Some(u64::from(PLENTY) - 1));
        // A new regime (reads became keyed) starts the window over.
        let mut b = Benefit::new(5.0);
        assert!((0..19u64).all(|i| !b.not_worth(&t, 0, 0, ms(i))));
        assert!(
            !b.not_worth(&t, 0, 1, ms(19)),
            "twenty writes, but one under the new regime"
        );
        // Written rarely: never judged, hits or not.
        let mut b = Benefit::new(5.0);
        assert!((0..100u64).all(|i| !b.not_worth(&t, 0, 0, ms(i * 100))));
    }
}
