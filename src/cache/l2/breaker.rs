//! The L2 circuit breaker: after repeated failures Redis is not asked at all
//! (a sick Redis then costs nothing), and one probe goes through per cooldown.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::gauge;

/// Opens after repeated failures so a sick Redis costs nothing; lets one probe
/// through after the cooldown.
pub(super) struct Breaker {
    failures: AtomicU32,
    /// When (ms since `origin`) the last counted failure was seen. Requests that
    /// were already in flight then fail for the same reason (one stall times out
    /// every pipelined request on the connection), so they do not count again.
    last_failure: AtomicU64,
    /// Milliseconds since `origin` until which the breaker is open; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    threshold: u32,
    cooldown: Duration,
    origin: Instant,
}

impl Breaker {
    pub(super) fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    pub(super) fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now_ms() < until {
            return false;
        }
        // Half-open: exactly one request probes.
        let probe = self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if probe {
            gauge!("pgtier_l2_breaker_state").set(2.0);
        }
        probe
    }

    pub(super) fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("Redis answers again; L2 back in use");
            gauge!("pgtier_l2_breaker_state").set(0.0);
        }
        self.probing.store(false, Ordering::Release);
    }

    /// A probe that never reached Redis: let the next request probe instead.
    pub(super) fn abandon_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// A request that started at `started` (see [`Breaker::now_ms`]) failed.
    /// Returns true when this failure (re)opens the breaker.
    pub(super) fn failure(&self, started: u64) -> bool {
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        let now = self.now_ms();
        let same_event = started < self.last_failure.load(Ordering::Acquire);
        if same_event && !was_probe {
            return false;
        }
        self.last_failure.fetch_max(now, Ordering::AcqRel);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold || was_probe {
            let until = now + self.cooldown.as_millis() as u64;
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(failures = n, "Redis failing; L2 bypassed (circuit open)");
            }
            gauge!("pgtier_l2_breaker_state").set(1.0);
            return true;
        }
        false
    }
}

impl Breaker {
    pub(super) fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            last_failure: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            threshold,
            cooldown,
            origin: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32) -> Breaker {
        let mut b = Breaker::new(threshold, Duration::from_secs(60));
        b.origin = Instant::now() - Duration::from_secs(1);
        b
    }

    #[test]
    fn one_stall_counts_once_however_many_requests_it_times_out() {
        let b = breaker(3);
        let before = b.now_ms() - 10;
        // eight pipelined requests, all in flight when the connection stalled
        assert!(!b.failure(before));
        for _ in 0..7 {
            assert!(
                !b.failure(before),
                "requests of the same stall opened the breaker"
            );
        }
        assert!(b.allow());
        // requests begun after each failure are independent evidence
        std::thread::sleep(Duration::from_millis(2));
        assert!(!b.failure(b.now_ms()));
        std::thread::sleep(Duration::from_millis(2));
        assert!(
            b.failure(b.now_ms()),
            "three independent failures must open it"
        );
        assert!(!b.allow());
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = breaker(2);
        assert!(!b.failure(b.now_ms()));
        b.success();
        std::thread::sleep(Duration::from_millis(2));
        assert!(!b.failure(b.now_ms()));
        assert!(b.allow());
    }
}
