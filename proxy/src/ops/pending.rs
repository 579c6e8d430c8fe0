//! Pending handshakes: connections a port has accepted but not yet let in
//! (the agents' port: until the agent is admitted; the clients' HTTPS doors:
//! until the TLS handshake is done). Each costs a task, buffers and an fd
//! while whoever is on the other end says nothing, so they are capped per
//! source address (`--max-pending-handshakes-per-source`) and in all
//! (`--max-pending-handshakes`). A connection over a cap is closed at once,
//! counted in `tower_refused_connections_total{door,reason}` and logged at
//! warn (at most once a second, with how many more were refused since), so
//! a flood neither fills the fd table nor the log. The handshake deadlines
//! (10 s) free the slots of those who connect and stay silent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::handshakes::Runner;
use super::metrics::Metrics;

/// `--max-pending-handshakes`'s default.
pub const DEFAULT_TOTAL: usize = 1024;
/// `--max-pending-handshakes-per-source`'s default.
pub const DEFAULT_PER_SOURCE: usize = 128;
/// At most one refusal warning per this long; the others are counted into it.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// The caps (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: DEFAULT_TOTAL,
            per_source: DEFAULT_PER_SOURCE,
        }
    }
}

/// Why a connection was closed before it was let in, as
/// `tower_refused_connections_total`'s `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source has `--max-pending-handshakes-per-source` pending.
    PendingPerSource,
    /// The port's doors have `--max-pending-handshakes` pending.
    PendingTotal,
    /// It did not finish its handshake (headers, TLS, SSH and `config`) in time.
    HandshakeTimeout,
    /// It sent something that is not the protocol (HTTP, TLS, websocket, SSH).
    BadHandshake,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::PendingPerSource => "pending_per_source",
            Refusal::PendingTotal => "pending_total",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::BadHandshake => "bad_handshake",
        }
    }
}

/// The pending handshakes of a set of doors (one for the agents' port, one
/// shared by the clients' HTTPS doors).
pub struct Pending {
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Where the handshakes run ([`super::handshakes`]; the clients' doors).
    runner: Runner,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    warned_at: Option<Instant>,
    suppressed: u64,
}

/// One pending handshake; dropping it frees its slot.
pub struct Permit {
    pending: Arc<Pending>,
    source: IpAddr,
}

impl Pending {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::running_on(Runner::default(), limits, metrics)
    }

    /// The same, with the handshakes run by `runner`.
    pub fn running_on(runner: Runner, limits: Limits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metrics,
            runner,
            state: Mutex::new(State::default()),
        })
    }

    /// Where these handshakes run.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// A slot for a connection from `source` at `door`, or the refusal
    /// (counted and logged here; the caller closes the connection).
    pub fn enter(self: &Arc<Self>, source: IpAddr, door: &'static str) -> Option<Permit> {
        let refusal = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let from_source = state.by_source.get(&source).copied().unwrap_or(0);
            if self.limits.per_source > 0 && from_source >= self.limits.per_source {
                Some((Refusal::PendingPerSource, self.limits.per_source))
            } else if self.limits.total > 0 && state.total >= self.limits.total {
                Some((Refusal::PendingTotal, self.limits.total))
            } else {
                state.total += 1;
                *state.by_source.entry(source).or_insert(0) += 1;
                None
            }
        };
        let Some((refusal, limit)) = refusal else {
            return Some(Permit {
                pending: self.clone(),
                source,
            });
        };
        self.refused(door, refusal);
        if let Some(suppressed) = self.may_warn() {
            let flag = match refusal {
                Refusal::PendingPerSource => "--max-pending-handshakes-per-source",
                _ => "--max-pending-handshakes",
            };
            tracing::warn!(door, %source, limit, flag, refused_since_last_warning = suppressed,
                "too many pending handshakes: connection closed (raise {flag} if this source is legitimate)");
        }
        None
    }

    /// Count a connection closed at `door` for `refusal`.
    pub fn refused(&self, door: &'static str, refusal: Refusal) {
        self.metrics.refused(door, refusal.reason());
    }

    /// `Some(refusals not logged since the last warning)` when a warning may
    /// be logged now.
    fn may_warn(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match state.warned_at {
            Some(at) if now.duration_since(at) < WARN_EVERY => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.warned_at = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }

    /// Pending handshakes now: in all, and from `source`.
    #[cfg(test)]
    pub fn count(&self, source: IpAddr) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (
            state.total,
            state.by_source.get(&source).copied().unwrap_or(0),
        )
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.pending.state.lock().unwrap_or_else(|e| e.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                state.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_source_over_its_cap_is_refused_others_are_not() {
        let metrics = Arc::new(Metrics::new());
        let pending = Pending::new(
            Limits {
                total: 10,
                per_source: 3,
            },
            metrics,
        );
        let held: Vec<_> = (0..3).map(|_| pending.enter(ip(2), "agents")).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(pending.enter(ip(2), "agents").is_none());
        let other = pending.enter(ip(1), "agents");
        assert!(other.is_some());
        assert_eq!(pending.count(ip(2)), (4, 3));
        drop(held);
        assert_eq!(pending.count(ip(2)), (1, 0));
        assert!(pending.enter(ip(2), "agents").is_some());
    }

    #[test]
    fn the_total_cap_holds_across_sources_and_zero_means_none() {
        let metrics = Arc::new(Metrics::new());
        let pending = Pending::new(
            Limits {
                total: 2,
                per_source: 0,
            },
            metrics.clone(),
        );
        let a = pending.enter(ip(1), "agents");
        let b = pending.enter(ip(2), "agents");
        assert!(a.is_some() && b.is_some());
        assert!(pending.enter(ip(3), "agents").is_none());
        drop(a);
        assert!(pending.enter(ip(3), "agents").is_some());
        let text = crate::ops::metrics::render(&metrics, &[]);
        assert!(
            text.contains(
                "tower_refused_connections_total{door=\"agents\",reason=\"pending_total\"} 1"
            ),
            "{text}"
        );
    }
}
