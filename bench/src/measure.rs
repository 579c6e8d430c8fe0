//! Summaries of repeated measurements: [`Stat`] is the median, min and max of
//! several runs; [`Measure`] collects one value per run; [`percentile`] reads a
//! latency distribution within one run.

use std::time::Duration;

use serde::Serialize;

/// Median, min and max of the runs of one figure.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stat {
    /// Summarise `values` (at least one).
    pub fn of(values: &[f64]) -> Stat {
        assert!(!values.is_empty(), "a Stat needs at least one value");
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            median,
            min: v[0],
            max: v[n - 1],
            runs: n,
        }
    }
}

/// One value per run, summarised at the end.
#[derive(Clone, Debug, Default)]
pub struct Measure {
    values: Vec<f64>,
}

impl Measure {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, value: f64) {
        self.values.push(value);
    }

    pub fn stat(&self) -> Option<Stat> {
        (!self.values.is_empty()).then(|| Stat::of(&self.values))
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    // (the epsilon keeps 0.999 * 1000 from rounding up to 1000)
    let rank = ((p / 100.0) * samples.len() as f64 - 1e-9).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Microseconds, for latency figures.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// MiB/s for `bytes` moved in `elapsed`.
pub fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_of_odd_and_even() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut v, 50.0), Duration::from_micros(500));
        assert_eq!(percentile(&mut v, 99.0), Duration::from_micros(990));
        assert_eq!(percentile(&mut v, 99.9), Duration::from_micros(999));
        assert_eq!(percentile(&mut v, 100.0), Duration::from_micros(1000));
    }
}
