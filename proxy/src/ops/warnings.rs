//! Which refused connections get a warn line: each source is named at most
//! once per [`EVERY`], and at most [`BURST`] lines go out per [`EVERY`] in
//! all. The refusals not logged are counted into the next line.
//!
//! One budget for everyone (one line a second) let a source that kept being
//! refused hide the next one: a second attacker arriving within the first
//! one's second was never named. Per source, every attacker is named within
//! a second of its first refusal; the burst cap keeps a spread-out flood
//! (many sources) from turning into a line per source.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A source is named at most once this often.
pub const EVERY: Duration = Duration::from_secs(1);
/// Lines per [`EVERY`], all sources together.
pub const BURST: usize = 8;

/// The decision, without I/O: `due` says whether a refusal is logged.
#[derive(Debug, Default)]
pub struct Warnings {
    /// Sources named within the last [`EVERY`] (at most [`BURST`]).
    named: HashMap<IpAddr, Instant>,
    /// Start of the current window, and lines logged in it.
    window: Option<(Instant, usize)>,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

impl Warnings {
    /// A refusal of `source` at `now`: `Some(n)` when it gets a line, `n`
    /// being the refusals (any source) not logged since the last line.
    pub fn due(&mut self, source: IpAddr, now: Instant) -> Option<u64> {
        self.named
            .retain(|_, at| now.saturating_duration_since(*at) < EVERY);
        let (start, lines) = match self.window {
            Some((start, n)) if now.saturating_duration_since(start) < EVERY => (start, n),
            _ => (now, 0),
        };
        if self.named.contains_key(&source) || lines >= BURST {
            self.window = Some((start, lines));
            self.unlogged += 1;
            return None;
        }
        self.window = Some((start, lines + 1));
        self.named.insert(source, now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_ip as ip;

    #[test]
    fn a_second_source_is_named_while_the_first_is_quiet() {
        let (mut w, t) = (Warnings::default(), Instant::now());
        assert_eq!(w.due(ip(2), t), Some(0));
        for i in 1..=500 {
            assert_eq!(w.due(ip(2), t + Duration::from_millis(i)), None);
        }
        // Before: one line a second for everyone, and .3 went unnamed.
        assert_eq!(w.due(ip(3), t + Duration::from_millis(600)), Some(500));
        assert_eq!(w.due(ip(3), t + Duration::from_millis(700)), None);
        // A second later each source is named again, with what it missed.
        assert_eq!(w.due(ip(2), t + EVERY), Some(1));
        assert_eq!(w.due(ip(3), t + Duration::from_millis(1700)), Some(0));
    }

    #[test]
    fn many_sources_get_at_most_a_burst_of_lines_a_second() {
        let (mut w, t) = (Warnings::default(), Instant::now());
        let logged = (0..=255u8).filter(|&i| w.due(ip(i), t).is_some()).count();
        assert_eq!(logged, BURST);
        assert!(w.named.len() <= BURST);
        // The next window logs again and says how many were not.
        assert_eq!(w.due(ip(9), t + EVERY), Some(256 - BURST as u64));
        assert!(
            w.named.len() <= BURST,
            "only the last second's names are kept"
        );
    }
}
