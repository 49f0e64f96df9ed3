//! Read-your-writes fences of the logical source, as WAL positions: a session
//! that committed a write waits until the stream has applied everything up to
//! a position at or after its commit record. The stream publishes how far it
//! has applied; fences at or below that are released in position order.
//!
//! Only positions from the server move `applied` (the end of an applied
//! Commit, or a keepalive's end of decoded WAL), so nothing written into the
//! stream (a forged logical message) can release one of these fences.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

/// No fence waits.
const NONE: u64 = u64::MAX;

#[derive(Debug)]
pub struct LsnFences {
    /// Everything before this WAL position has been applied by the stream.
    applied: AtomicU64,
    /// The smallest position a fence waits for (`NONE` if none): the stream
    /// takes the lock only once it has passed it.
    first: AtomicU64,
    /// (position, fence seq) -> waiter.
    waiting: Mutex<BTreeMap<(u64, u64), oneshot::Sender<()>>>,
}

impl Default for LsnFences {
    fn default() -> Self {
        LsnFences {
            applied: AtomicU64::new(0),
            first: AtomicU64::new(NONE),
            waiting: Mutex::new(BTreeMap::new()),
        }
    }
}

impl LsnFences {
    /// How far the stream has applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Wait for the stream to pass `lsn`: `tx` is sent to (or dropped, when
    /// `live` says the stream is gone) once it has. Released at once if the
    /// stream is already there.
    pub fn wait(&self, seq: u64, lsn: u64, tx: oneshot::Sender<()>, live: impl Fn() -> bool) {
        let Ok(mut w) = self.waiting.lock() else {
            return;
        };
        // Under the lock: `go_down` marks the stream gone before it takes the
        // lock to drop the waiters, so a fence added here is either seen
        // there or sees the stream gone.
        if !live() {
            return;
        }
        w.insert((lsn, seq), tx);
        if lsn < self.first.load(Ordering::SeqCst) {
            self.first.store(lsn, Ordering::SeqCst);
        }
        // The stream stores `applied` before it reads `first` (both SeqCst):
        // either it sees this fence's position, or this load sees its advance.
        let applied = self.applied.load(Ordering::SeqCst);
        self.release(&mut w, applied);
    }

    /// The stream has applied everything before `lsn`: release the fences
    /// it has passed, lowest first. Cheap when none waits that low.
    pub fn advance(&self, lsn: u64) {
        if lsn <= self.applied.load(Ordering::Relaxed) {
            return;
        }
        self.applied.store(lsn, Ordering::SeqCst);
        if self.first.load(Ordering::SeqCst) > lsn {
            return;
        }
        if let Ok(mut w) = self.waiting.lock() {
            let applied = self.applied.load(Ordering::SeqCst);
            self.release(&mut w, applied);
        }
    }

    fn release(&self, w: &mut BTreeMap<(u64, u64), oneshot::Sender<()>>, applied: u64) {
        while let Some(entry) = w.first_entry() {
            if entry.key().0 > applied {
                break;
            }
            let _ = entry.remove().send(());
        }
        let first = w.keys().next().map_or(NONE, |k| k.0);
        self.first.store(first, Ordering::SeqCst);
    }

    /// A fence that timed out.
    pub fn forget(&self, seq: u64, lsn: u64) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&(lsn, seq));
            let first = w.keys().next().map_or(NONE, |k| k.0);
            self.first.store(first, Ordering::SeqCst);
        }
    }

    /// The stream is gone: its waiters are released (their sessions then see
    /// the database down and bypass the cache), and a new stream starts from
    /// nothing.
    pub fn clear(&self) {
        if let Ok(mut w) = self.waiting.lock() {
            w.clear();
            self.first.store(NONE, Ordering::SeqCst);
        }
        self.applied.store(0, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.lock().map_or(0, |w| w.len())
    }
}

/// A `pg_lsn` in its text form (`16/B374D848`) as a position.
pub fn parse_lsn(text: &[u8]) -> Option<u64> {
    let slash = text.iter().position(|b| *b == b'/')?;
    let hex = |s: &[u8]| -> Option<u64> {
        if s.is_empty() || s.len() > 8 {
            return None;
        }
        s.iter().try_fold(0u64, |acc, b| {
            let d = (*b as char).to_digit(16)?;
            Some(acc << 4 | u64::from(d))
        })
    };
    Some(hex(&text[..slash])? << 32 | hex(&text[slash + 1..])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidation::{DbState, Generations};
    use std::sync::Arc;

    #[test]
    fn lsn_text_is_parsed_exactly() {
        assert_eq!(parse_lsn(b"0/0"), Some(0));
        assert_eq!(parse_lsn(b"16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn(b"FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"16",
            b"/1",
            b"1/",
            b"1/2/3",
            b"g/1",
            b"1/123456789",
            b"-1/0",
        ] {
            assert_eq!(parse_lsn(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn lsn_fences_complete_in_position_order_as_the_stream_passes_them() {
        let db = DbState::new("db".into(), Arc::new(Generations::default()));
        db.come_up();
        let mut rx: Vec<_> = [300u64, 100, 200, 200]
            .iter()
            .map(|lsn| {
                let (seq, tx, rx) = db.new_lsn_fence();
                db.fence_at(seq, *lsn, tx);
                rx
            })
            .collect();
        assert_eq!(db.lsn_fences.waiting(), 4);
        db.lsn_fences.advance(99);
        assert!(rx.iter_mut().all(|r| r.try_recv().is_err()), "none passed");
        db.lsn_fences.advance(200);
        let done: Vec<bool> = rx.iter_mut().map(|r| r.try_recv().is_ok()).collect();
        assert_eq!(done, [false, true, true, true], "100 and both 200s");
        // Positions never go back: an older keepalive releases nothing.
        db.lsn_fences.advance(150);
        assert_eq!(db.lsn_fences.applied(), 200);
        assert!(rx[0].try_recv().is_err());
        // A fence the stream has already passed is released at once.
        let (seq, tx, mut late) = db.new_lsn_fence();
        db.fence_at(seq, 180, tx);
        assert!(late.try_recv().is_ok());
        db.lsn_fences.advance(300);
        assert!(rx[0].try_recv().is_ok());
        assert_eq!(db.lsn_fences.waiting(), 0);
    }

    #[test]
    fn lsn_fences_are_released_when_the_stream_goes_and_forgotten_on_timeout() {
        let db = DbState::new("db".into(), Arc::new(Generations::default()));
        db.come_up();
        let (seq, tx, mut rx) = db.new_lsn_fence();
        db.fence_at(seq, 500, tx);
        let (seq2, tx2, _rx2) = db.new_lsn_fence();
        db.fence_at(seq2, 400, tx2);
        db.lsn_fences.forget(seq2, 400);
        assert_eq!(db.lsn_fences.waiting(), 1);
        db.go_down();
        assert!(
            matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "released, not passed"
        );
        assert_eq!(db.lsn_fences.applied(), 0, "a new stream starts over");
        // While down, a fence is not kept (nothing would release it).
        let (seq, tx, mut rx) = db.new_lsn_fence();
        db.fence_at(seq, 1, tx);
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(db.lsn_fences.waiting(), 0);
    }
}
