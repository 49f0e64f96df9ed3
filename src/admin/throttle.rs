//! Failed admin-console logins, counted per client address: after a few
//! failures an address is refused for a while without a password check, so the
//! console's passwords cannot be guessed at the speed of SCRAM.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures an address may have within one window before it is refused.
const MAX_FAILURES: u32 = 5;
/// How long failures are remembered (and an address stays refused).
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond that the oldest windows are forgotten
/// first, so memory stays bounded whatever the number of addresses.
const MAX_ADDRESSES: usize = 4096;

#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl LoginThrottle {
    /// Whether `addr` may attempt a login now.
    pub fn allowed(&self, addr: IpAddr) -> bool {
        self.allowed_at(addr, Instant::now())
    }

    /// Record a failed login from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        self.failed_at(addr, Instant::now())
    }

    fn allowed_at(&self, addr: IpAddr, now: Instant) -> bool {
        let Ok(map) = self.failures.lock() else {
            return false;
        };
        match map.get(&addr) {
            Some(&(since, n)) => now.duration_since(since) >= WINDOW || n < MAX_FAILURES,
            None => true,
        }
    }

    fn failed_at(&self, addr: IpAddr, now: Instant) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&addr) {
            map.retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
            if map.len() >= MAX_ADDRESSES {
                if let Some(oldest) = map.iter().min_by_key(|(_, (s, _))| *s).map(|(a, _)| *a) {
                    map.remove(&oldest);
                }
            }
        }
        let slot = map.entry(addr).or_insert((now, 0));
        if now.duration_since(slot.0) >= WINDOW {
            *slot = (now, 0);
        }
        slot.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_repeated_failures_until_the_window_passes() {
        let t = LoginThrottle::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES {
            assert!(t.allowed_at(a, now));
            t.failed_at(a, now);
        }
        assert!(!t.allowed_at(a, now + Duration::from_secs(1)));
        assert!(t.allowed_at(b, now), "other addresses are unaffected");
        assert!(t.allowed_at(a, now + WINDOW));
    }

    #[test]
    fn tracked_addresses_are_bounded() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            t.failed_at(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(t.failures.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
