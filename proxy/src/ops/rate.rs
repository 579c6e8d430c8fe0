//! Handshakes per source per second (`--max-handshakes-per-source-per-second`).
//!
//! The pending caps ([`super::pending`]) bound how many handshakes one
//! source holds at once, not how fast it may start them: a client that
//! finishes each TLS handshake and opens the next costs the proxy a
//! handshake's CPU each time (about a quarter of a millisecond), and 2,000
//! of them in two seconds take most of a core from everyone else. So each
//! source gets a rate: a burst of one second's worth at once, then one per
//! `1 / rate`. A connection over it is not refused at once but waits its turn
//! (holding its pending slot, within its handshake deadline), so a burst from
//! a NAT'd office is slowed rather than cut; one that would wait longer than
//! [`MAX_WAIT`] is refused.
//!
//! The bucket is a GCRA (the "virtual scheduling" form of a token bucket):
//! per source only the time its next handshake would be due, forgotten once
//! that is past, so the table holds only sources seen in the last seconds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// `--max-handshakes-per-source-per-second`'s default.
pub const DEFAULT_PER_SECOND: u32 = 100;
/// The longest a connection waits for its turn; later ones are refused.
/// Half the clients' 10 s TLS handshake deadline: the turn leaves time for
/// the handshake itself.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// How often sources whose turn is past are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// The handshake rate of every source.
pub struct PerSource {
    /// Between two handshakes of one source, once its burst is spent.
    interval: Duration,
    /// One second's worth of `interval`s.
    burst: Duration,
    /// Per source: when its bucket is full again (GCRA's theoretical
    /// arrival time); absent or past: full.
    due: HashMap<IpAddr, Instant>,
    pruned_at: Option<Instant>,
}

impl PerSource {
    /// `per_second` handshakes per source (0: no rate, `None`).
    pub fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            interval: Duration::from_secs(1) / per_second,
            burst: Duration::from_secs(1),
            due: HashMap::new(),
            pruned_at: None,
        })
    }

    /// When a handshake from `source` arriving at `now` may start (`now` or
    /// later), taking its turn; `None` when that would be more than
    /// [`MAX_WAIT`] away (nothing taken: the caller refuses it).
    pub fn turn(&mut self, source: IpAddr, now: Instant) -> Option<Instant> {
        self.prune(now);
        let due = self.due.get(&source).map_or(now, |d| (*d).max(now)) + self.interval;
        let start = due.checked_sub(self.burst).map_or(now, |s| s.max(now));
        if start > now + MAX_WAIT {
            return None;
        }
        self.due.insert(source, due);
        Some(start)
    }

    fn prune(&mut self, now: Instant) {
        forget_full(&mut self.due, &mut self.pruned_at, now);
    }

    /// Sources remembered now.
    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.due.len()
    }
}

/// Forget the buckets of `due` that are full again (at most once a second:
/// the table stays small and a flood of sources does not make each
/// arrival walk it). Shared with [`super::uploads`].
pub(super) fn forget_full<K>(
    due: &mut HashMap<K, Instant>,
    pruned_at: &mut Option<Instant>,
    now: Instant,
) {
    if pruned_at.is_some_and(|at| now.duration_since(at) < PRUNE_EVERY) {
        return;
    }
    *pruned_at = Some(now);
    due.retain(|_, due| *due > now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_ip as ip;

    #[test]
    fn a_burst_of_one_second_then_one_per_interval_then_refused() {
        let mut rate = PerSource::new(10).expect("a rate");
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(rate.turn(ip(9), t0), Some(t0));
        }
        // Past the burst: one every 100 ms, queued.
        assert_eq!(rate.turn(ip(9), t0), Some(t0 + Duration::from_millis(100)));
        assert_eq!(rate.turn(ip(9), t0), Some(t0 + Duration::from_millis(200)));
        // Another source has its own bucket.
        assert_eq!(rate.turn(ip(1), t0), Some(t0));
        // Queued up to MAX_WAIT (5 s = 50 turns), then refused without
        // taking a turn.
        for k in 3..=50u32 {
            assert_eq!(
                rate.turn(ip(9), t0),
                Some(t0 + Duration::from_millis(100) * k)
            );
        }
        assert_eq!(rate.turn(ip(9), t0), None);
        assert_eq!(rate.turn(ip(9), t0), None);
        // Time passes: the queue drains at the rate.
        let later = t0 + Duration::from_millis(150);
        assert_eq!(
            rate.turn(ip(9), later),
            Some(t0 + Duration::from_millis(5100))
        );
    }

    #[test]
    fn a_quiet_source_gets_its_burst_back_and_is_forgotten() {
        let mut rate = PerSource::new(4).expect("a rate");
        let t0 = Instant::now();
        for _ in 0..6 {
            rate.turn(ip(9), t0);
        }
        assert_eq!(rate.sources(), 1);
        // 1.5 s after its last turn's due time, the bucket is full again.
        let later = t0 + Duration::from_secs(3);
        for _ in 0..4 {
            assert_eq!(rate.turn(ip(1), later), Some(later));
        }
        assert_eq!(rate.sources(), 1, "ip(9) forgotten, ip(1) remembered");
        for _ in 0..4 {
            assert_eq!(rate.turn(ip(9), later), Some(later));
        }
        assert_ne!(rate.turn(ip(9), later), Some(later));
    }

    #[test]
    fn zero_means_no_rate() {
        assert!(PerSource::new(0).is_none());
    }
}
