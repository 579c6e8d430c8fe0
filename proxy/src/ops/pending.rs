//! Pending handshakes: connections a port has accepted but not yet let in
//! (the agents' port: until the agent is admitted; the clients' HTTPS doors:
//! until the TLS handshake is done). Each costs a task, buffers and an fd
//! while whoever is on the other end says nothing, so they are capped per
//! source address (`--max-pending-handshakes-per-source`) and in all
//! (`--max-pending-handshakes`). A connection over a cap is closed at once,
//! counted in `tower_refused_connections_total{door,reason}` and logged at
//! warn (each source at most once a second, a few lines a second in all,
//! with how many more were refused since: [`super::warnings`]), so a flood
//! neither fills the fd table nor the log. The handshake deadlines
//! (10 s) free the slots of those who connect and stay silent. The clients'
//! doors also pace each source's handshakes ([`super::rate`]): a permit says
//! when its handshake may start.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::handshakes::Runner;
use super::metrics::Metrics;
use super::rate::PerSource;
use super::warnings::Warnings;

/// `--max-pending-handshakes`'s default.
pub const DEFAULT_TOTAL: usize = 1024;
/// `--max-pending-handshakes-per-source`'s default.
pub const DEFAULT_PER_SOURCE: usize = 128;

/// The caps (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_source: usize,
    /// Handshakes a source may start per second (the clients' doors only).
    pub rate_per_source: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: DEFAULT_TOTAL,
            per_source: DEFAULT_PER_SOURCE,
            rate_per_source: super::rate::DEFAULT_PER_SECOND,
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
    /// Its source starts handshakes faster than
    /// `--max-handshakes-per-source-per-second`, and its turn was too far.
    HandshakeRate,
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
            Refusal::HandshakeRate => "handshake_rate",
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
    /// `None`: no rate.
    rate: Option<PerSource>,
    warnings: Warnings,
}

impl State {
    /// `source`'s turn for a handshake arriving `now`: `None` when it may
    /// start at once (or there is no rate), the refusal when it is too far.
    fn turn(&mut self, source: IpAddr, now: Instant) -> Result<Option<Instant>, Refusal> {
        let Some(rate) = self.rate.as_mut() else {
            return Ok(None);
        };
        let start = rate.turn(source, now).ok_or(Refusal::HandshakeRate)?;
        Ok(Some(start).filter(|at| *at > now))
    }
}

/// One pending handshake; dropping it frees its slot.
pub struct Permit {
    pending: Arc<Pending>,
    source: IpAddr,
    /// When its handshake may start (its source's rate); `None`: now.
    start: Option<Instant>,
}

impl Permit {
    /// When its handshake may start: `None` now, else the turn its source's
    /// rate gave it (the handshake waits for it within its deadline).
    pub fn start(&self) -> Option<Instant> {
        self.start
    }
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
            state: Mutex::new(State {
                rate: PerSource::new(limits.rate_per_source),
                ..State::default()
            }),
        })
    }

    /// Where these handshakes run.
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// A slot for a connection from `source` at `door`, or the refusal
    /// (counted and logged here; the caller closes the connection). Its
    /// handshake starts at [`Permit::start`] (the source's rate).
    pub fn enter(self: &Arc<Self>, source: IpAddr, door: &'static str) -> Option<Permit> {
        self.admit(source, door, true)
    }

    /// The same without the rate, for the doors whose every client comes
    /// from one address: the HA peer port (another replica relays all its
    /// clients) and the aggregated API port (the host's kube-apiservers).
    pub fn enter_unrated(self: &Arc<Self>, source: IpAddr, door: &'static str) -> Option<Permit> {
        self.admit(source, door, false)
    }

    /// Only the rate, for a connection this replica relays whole to another
    /// (which terminates its TLS, unrated, and holds its slot there): when
    /// it may be relayed (`Some(None)`: now), or `None` when its turn is too
    /// far (counted and logged here; the caller closes it).
    pub fn turn(&self, source: IpAddr, door: &'static str) -> Option<Option<Instant>> {
        let turn = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.turn(source, Instant::now())
        };
        turn.map_err(|refusal| self.refuse(source, door, refusal))
            .ok()
    }

    fn admit(self: &Arc<Self>, source: IpAddr, door: &'static str, rated: bool) -> Option<Permit> {
        let decided = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let from_source = state.by_source.get(&source).copied().unwrap_or(0);
            if self.limits.per_source > 0 && from_source >= self.limits.per_source {
                Err(Refusal::PendingPerSource)
            } else if self.limits.total > 0 && state.total >= self.limits.total {
                Err(Refusal::PendingTotal)
            } else {
                let start = if rated {
                    state.turn(source, Instant::now())
                } else {
                    Ok(None)
                };
                if start.is_ok() {
                    state.total += 1;
                    *state.by_source.entry(source).or_insert(0) += 1;
                }
                start
            }
        };
        match decided {
            Ok(start) => Some(Permit {
                pending: self.clone(),
                source,
                start,
            }),
            Err(refusal) => {
                self.refuse(source, door, refusal);
                None
            }
        }
    }

    /// Count and log (each source at most once a second) a connection refused at a cap.
    fn refuse(&self, source: IpAddr, door: &'static str, refusal: Refusal) {
        let (limit, flag, what) = match refusal {
            Refusal::PendingPerSource => (
                self.limits.per_source,
                "--max-pending-handshakes-per-source",
                "too many pending handshakes",
            ),
            Refusal::HandshakeRate => (
                self.limits.rate_per_source as usize,
                "--max-handshakes-per-source-per-second",
                "too many handshakes from one source per second",
            ),
            _ => (
                self.limits.total,
                "--max-pending-handshakes",
                "too many pending handshakes",
            ),
        };
        self.refused(door, refusal);
        if let Some(suppressed) = self.may_warn(source) {
            tracing::warn!(door, %source, limit, flag, refused_since_last_warning = suppressed,
                "{what}: connection closed (raise {flag} if this source is legitimate)");
        }
    }

    /// Count a connection closed at `door` for `refusal`.
    pub fn refused(&self, door: &'static str, refusal: Refusal) {
        self.metrics.refused(door, refusal.reason());
    }

    /// `Some(refusals not logged since the last warning)` when refusing
    /// `source` now gets a warn line.
    fn may_warn(&self, source: IpAddr) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.warnings.due(source, Instant::now())
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
    use crate::ops::test_ip as ip;

    #[test]
    fn a_source_over_its_cap_is_refused_others_are_not() {
        let metrics = Arc::new(Metrics::new());
        let pending = Pending::new(
            Limits {
                total: 10,
                per_source: 3,
                rate_per_source: 0,
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
                rate_per_source: 0,
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

    #[test]
    fn a_source_over_its_rate_waits_its_turn_then_is_refused_unrated_doors_are_not() {
        let metrics = Arc::new(Metrics::new());
        let pending = Pending::new(
            Limits {
                total: 0,
                per_source: 0,
                rate_per_source: 10,
            },
            metrics.clone(),
        );
        // One second's burst starts at once, the next 50 (5 s) wait their turn.
        let held: Vec<_> = (0..60)
            .map(|_| pending.enter(ip(9), "cluster").expect("a slot"))
            .collect();
        assert!(held[..10].iter().all(|p| p.start().is_none()));
        assert!(held[10..].iter().all(|p| p.start().is_some()));
        assert!(held[10].start() < held[11].start());
        assert!(pending.enter(ip(9), "cluster").is_none());
        // Another source, and the doors without a rate, are not held back.
        assert!(
            pending
                .enter(ip(1), "cluster")
                .is_some_and(|p| p.start().is_none())
        );
        assert!(
            pending
                .enter_unrated(ip(9), "peer")
                .is_some_and(|p| p.start().is_none())
        );
        // A relayed connection takes only its turn, from the same bucket.
        assert!(pending.turn(ip(9), "cluster").is_none());
        assert_eq!(pending.turn(ip(2), "cluster"), Some(None));
        let text = crate::ops::metrics::render(&metrics, &[]);
        assert!(
            text.contains(
                "tower_refused_connections_total{door=\"cluster\",reason=\"handshake_rate\"} 2"
            ),
            "{text}"
        );
    }
}
