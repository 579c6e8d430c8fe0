//! Refused CONNECT targets as Events on the Cluster, so whoever runs the
//! member sees in `kubectl describe cluster` that something tried to reach
//! an address its agent does not allow (or could not reach).
//!
//! One client retrying in a loop must not turn into a write per attempt on
//! the host kube-apiserver: at most one Event per cluster per [`EVERY`]
//! ([`Limiter`], a pure decision), and the next one says how many refusals
//! it stands for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};

use super::crd::Cluster;
use super::events::{Recorder, publish};
use crate::serve::connect::TargetRefusals;
use crate::serve::connect::request::Refusal;

/// At most one refused-target Event per cluster this often.
pub const EVERY: Duration = Duration::from_secs(60);
/// The Event's reason, for `kubectl get events --field-selector reason=...`.
pub const REASON: &str = "ConnectRefused";
/// Event notes are capped by the API (1 KiB); a target or reason longer than
/// this is cut.
const NOTE_MAX: usize = 1000;
/// Past this many clusters remembered, deleted ones are forgotten.
const FORGET_ABOVE: usize = 1024;

/// Which refusals become an Event: the first for a cluster, then one per
/// window. Knows only clusters it was asked about.
#[derive(Debug)]
pub struct Limiter {
    every: Duration,
    /// Per cluster: when the last Event went out, refusals since.
    last: HashMap<String, (Instant, u64)>,
}

impl Limiter {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: HashMap::new(),
        }
    }

    /// A refusal for `cluster` at `now`: `Some(n)` if an Event is due, `n`
    /// being the refusals it did not report since the last one.
    pub fn admit(&mut self, cluster: &str, now: Instant) -> Option<u64> {
        match self.last.get_mut(cluster) {
            Some((at, quiet)) if now.saturating_duration_since(*at) < self.every => {
                *quiet += 1;
                None
            }
            Some((at, quiet)) => {
                let since = std::mem::take(quiet);
                *at = now;
                Some(since)
            }
            None => {
                self.last.insert(cluster.to_string(), (now, 0));
                Some(0)
            }
        }
    }

    /// Forget clusters that are gone (called with what still exists).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last.retain(|cluster, _| keep(cluster));
    }
}

/// The note of a refused-target Event.
pub fn note(door: &str, target: &str, refusal: &Refusal, unreported: u64) -> String {
    let mut note = format!(
        "CONNECT to {target} through the {door} door refused ({}): {}",
        refusal.reason, refusal.message
    );
    if unreported > 0 {
        note.push_str(&format!(
            " ({unreported} more refusals since the last such event)"
        ));
    }
    if note.len() > NOTE_MAX {
        let mut cut = NOTE_MAX;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    note
}

/// [`TargetRefusals`] as Warning Events on the Cluster in the controller's
/// cache. Clusters without a Cluster resource get none.
pub struct RefusalEvents {
    recorder: Recorder,
    clusters: Store<Cluster>,
    limiter: Mutex<Limiter>,
}

impl RefusalEvents {
    pub fn new(recorder: Recorder, clusters: Store<Cluster>) -> Self {
        Self {
            recorder,
            clusters,
            limiter: Mutex::new(Limiter::new(EVERY)),
        }
    }
}

impl TargetRefusals for RefusalEvents {
    fn refused(&self, cluster: &str, door: &str, target: &str, refusal: &Refusal) {
        let Some(object) = self.clusters.get(&ObjectRef::new(cluster)) else {
            return;
        };
        let due = {
            let Ok(mut limiter) = self.limiter.lock() else {
                return;
            };
            if limiter.last.len() > FORGET_ABOVE {
                limiter.retain(|c| self.clusters.get(&ObjectRef::new(c)).is_some());
            }
            limiter.admit(cluster, Instant::now())
        };
        let Some(unreported) = due else {
            return;
        };
        let note = note(door, target, refusal, unreported);
        // The door answers its client now; the Event is written behind it.
        publish(&self.recorder, &object, EventType::Warning, REASON, note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_cluster_per_window_counting_the_rest() {
        let start = Instant::now();
        let mut limiter = Limiter::new(EVERY);
        assert_eq!(limiter.admit("alpha", start), Some(0));
        for i in 1..=5 {
            let at = start + Duration::from_secs(i);
            assert_eq!(limiter.admit("alpha", at), None);
        }
        // Another cluster has its own window.
        assert_eq!(
            limiter.admit("beta", start + Duration::from_secs(3)),
            Some(0)
        );
        // After the window: an Event that stands for the five quiet ones.
        assert_eq!(limiter.admit("alpha", start + EVERY), Some(5));
        assert_eq!(limiter.admit("alpha", start + EVERY), None);
        assert_eq!(
            limiter.admit("alpha", start + EVERY + EVERY),
            Some(1),
            "the window restarts at each Event"
        );
    }

    #[test]
    fn gone_clusters_are_forgotten() {
        let now = Instant::now();
        let mut limiter = Limiter::new(EVERY);
        limiter.admit("alpha", now);
        limiter.admit("beta", now);
        limiter.retain(|c| c == "beta");
        assert_eq!(limiter.admit("alpha", now), Some(0), "alpha starts over");
        assert_eq!(limiter.admit("beta", now), None);
    }

    #[test]
    fn notes_name_target_door_and_reason_and_fit_an_event() {
        let refusal = Refusal::new(403, "not_allowed", "allow it with --allow-dial");
        let n = note("tls", "10.0.0.1:22", &refusal, 0);
        assert_eq!(
            n,
            "CONNECT to 10.0.0.1:22 through the tls door refused (not_allowed): allow it with --allow-dial"
        );
        assert!(
            note("unix", "a:1", &refusal, 7)
                .ends_with("(7 more refusals since the last such event)")
        );
        let long = Refusal::new(502, "dial_failed", "é".repeat(2000));
        assert!(note("tls", "a:1", &long, 0).len() <= NOTE_MAX);
    }
}
