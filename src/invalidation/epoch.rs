//! Authenticated L2 epochs. Every role that can connect to the database can
//! NOTIFY the invalidation channel, and an epoch notification resets every
//! instance's L2 table versions: a forged one, or a genuine one replayed, would
//! put the versions back where they were before later writes, and the L2 keys
//! of that time (holding pre-write results) would be looked up again.
//!
//! So an epoch is signed with the deployment's L2 signing key over (database,
//! channel, counter, epoch), and `counter` is a transaction id the sender took
//! from Postgres just before sending: transaction ids only grow, so an
//! instance accepts an epoch only if its counter is above every counter it
//! accepted before and not below its own latest (taken after its LISTEN, so no
//! genuine epoch from before that can be mistaken for a fresh one). Instances
//! see the same notifications in the same order, so once they accept the same
//! epoch they stay in step; until then they merely use different keys (L2
//! misses, never a stale hit). Without a signing key there is no L2, and epochs
//! are ignored.

use std::sync::atomic::{AtomicU64, Ordering};

use super::payload::Epoch;
use crate::signing::{from_hex, to_hex, Signer};

const DOMAIN: &[u8] = b"pgtier-l2-epoch-v1";

fn parts<'a>(database: &'a str, channel: &'a str, c: &'a [u8; 8], e: &'a [u8; 8]) -> [&'a [u8]; 5] {
    [DOMAIN, database.as_bytes(), channel.as_bytes(), c, e]
}

pub fn sign(signer: &Signer, database: &str, channel: &str, counter: u64, epoch: u64) -> Epoch {
    let (c, e) = (counter.to_le_bytes(), epoch.to_le_bytes());
    Epoch {
        counter,
        epoch,
        tag: to_hex(&signer.tag(&parts(database, channel, &c, &e))),
    }
}

pub fn verify(signer: &Signer, database: &str, channel: &str, epoch: &Epoch) -> bool {
    let (c, e) = (epoch.counter.to_le_bytes(), epoch.epoch.to_le_bytes());
    from_hex(&epoch.tag).is_some_and(|tag| signer.verify(&parts(database, channel, &c, &e), &tag))
}

/// The lowest counter an epoch may carry to be accepted; `u64::MAX` while the
/// listener is (re)connecting and has not taken its own counter yet.
pub struct Floor(AtomicU64);

impl Default for Floor {
    fn default() -> Self {
        Floor(AtomicU64::new(u64::MAX))
    }
}

impl Floor {
    /// Accept nothing until `open` (the listener is down).
    pub fn close(&self) {
        self.0.store(u64::MAX, Ordering::Release);
    }

    /// Our own counter, taken after LISTEN: accept epochs from it on.
    pub fn open(&self, own: u64) {
        self.0.store(own, Ordering::Release);
    }

    /// Whether an authenticated epoch with `counter` moves forward; if so,
    /// nothing at or below it is accepted afterwards. Only the applier calls this.
    pub fn advance(&self, counter: u64) -> bool {
        let floor = self.0.load(Ordering::Acquire);
        if floor == u64::MAX || counter < floor || counter == u64::MAX {
            return false;
        }
        self.0.store(counter + 1, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_signed_for_one_database_and_channel() {
        let s = Signer::new(&[3u8; 32]);
        let e = sign(&s, "db", "ch", 100, 42);
        assert!(verify(&s, "db", "ch", &e));
        assert!(!verify(&s, "db2", "ch", &e));
        assert!(!verify(&s, "db", "ch2", &e));
        assert!(!verify(&Signer::new(&[4u8; 32]), "db", "ch", &e));
        let mut moved = e.clone();
        moved.counter = 101;
        assert!(!verify(&s, "db", "ch", &moved));
        let mut other = e.clone();
        other.epoch = 43;
        assert!(!verify(&s, "db", "ch", &other));
        let unsigned = Epoch {
            counter: 0,
            epoch: 42,
            tag: String::new(),
        };
        assert!(!verify(&s, "db", "ch", &unsigned));
    }

    #[test]
    fn counters_only_move_forward() {
        let f = Floor::default();
        assert!(!f.advance(5), "nothing before our own counter is known");
        f.open(10);
        assert!(!f.advance(9), "older than our own: maybe a replay");
        assert!(f.advance(10), "our own");
        assert!(!f.advance(10), "the same again: a replay");
        assert!(f.advance(12));
        assert!(!f.advance(11));
        f.close();
        assert!(!f.advance(100));
    }
}
