//! Waiting between connection attempts.
//!
//! Exponential from 1 s (doubling) up to `--max-retry-interval`, with "equal
//! jitter": each wait is drawn uniformly from the upper half of the current step,
//! `[step/2, step]`. The jitter spreads the reconnects of many agents after a
//! proxy restart (a thundering herd otherwise hits the new proxy in lockstep); the
//! lower bound keeps a wait from collapsing to zero, which full jitter allows.
//! The step goes back to 1 s once a tunnel is established.

use std::time::Duration;

/// First step.
pub const INITIAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Backoff {
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// `max`: the cap, `--max-retry-interval`.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            step: INITIAL.min(max),
        }
    }

    /// The next wait; the step doubles for the one after.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// Start again from the first step (after a success).
    pub fn reset(&mut self) {
        self.step = INITIAL.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let max = Duration::from_secs(120);
        let mut backoff = Backoff::new(max);
        let mut step = INITIAL;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} outside [{:?}, {step:?}]",
                step / 2
            );
            assert!(delay <= max);
            step = (step * 2).min(max);
        }
        // Capped: the last waits are all within [max/2, max].
        assert_eq!(step, max);
        let delay = backoff.next_delay();
        assert!(delay >= max / 2 && delay <= max);
    }

    #[test]
    fn jitter_varies() {
        let mut backoff = Backoff::new(Duration::from_secs(3600));
        for _ in 0..10 {
            backoff.next_delay();
        }
        let delays: std::collections::HashSet<_> = (0..5).map(|_| backoff.next_delay()).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new(Duration::from_secs(120));
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL);
    }

    #[test]
    fn a_tiny_cap_is_respected() {
        let mut backoff = Backoff::new(Duration::from_millis(300));
        for _ in 0..5 {
            assert!(backoff.next_delay() <= Duration::from_millis(300));
        }
    }
}
