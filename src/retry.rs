//! The one retry policy of the runtime: capped exponential backoff with full jitter.
//!
//! Owns how long a loop waits before trying again after a failure it expects to pass
//! (a database or broker that is unreachable, a connection to reopen, a work batch to write
//! again). The n-th consecutive failure waits a uniformly random time up to
//! `min(cap, base · 2^(n-1))`: growing, so an outage is not hammered ten times a second, and
//! random, so the instances and streams that failed together do not retry together.
//!
//! It must not decide *whether* to retry (the caller knows what is transient) nor sleep itself.
//! Failed messages in the store are not timed here: their next attempt is the store's
//! (`store.backoff_base_ms`, `store.backoff_max_ms`), the same on every backend.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Capped exponential backoff with full jitter, counting consecutive failures.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// A policy whose first wait is at most `base` and no wait exceeds `cap`.
    pub(crate) fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// Counts one more failure and answers how long to wait before the next try.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jittered(self.ceiling(self.failures))
    }

    /// The failures counted since the last success.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts again from `base`.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// The longest wait after `failures` consecutive failures: base · 2^(failures-1), capped.
    pub(crate) fn ceiling(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .unwrap_or(self.cap)
            .min(self.cap)
    }
}

/// A uniformly random duration in `[ceiling / 16, ceiling]`: full jitter, with a small floor so
/// that a loop never retries at once.
fn jittered(ceiling: Duration) -> Duration {
    let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
    // std's hasher keys are random per thread and change with every `RandomState`: enough
    // randomness to spread retries, with no extra dependency.
    let random = RandomState::new().build_hasher().finish();
    let floor = nanos / 16;
    Duration::from_nanos(floor + random % (nanos - floor + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_and_stay_within_their_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings: Vec<u64> = (1..=8).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(5));
        for n in 1..=40 {
            let d = b.next_delay();
            let ceiling = b.ceiling(n);
            assert!(d <= ceiling && d >= ceiling / 16, "{d:?} for failure {n}");
        }
        assert_eq!(b.failures(), 40);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn waits_are_spread_not_equal() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let waits: std::collections::BTreeSet<Duration> = (0..50).map(|_| b.next_delay()).collect();
        assert!(waits.len() > 40, "full jitter spreads the waits: {waits:?}");
    }
}
