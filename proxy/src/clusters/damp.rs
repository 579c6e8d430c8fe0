//! A flapping agent's session changes, damped. Each change of a cluster's
//! sessions is followed up by a reconcile pass and a status refresh (a probe
//! of the member, a write of the Cluster and an Event when a condition
//! flips): a valid agent that reconnects in a loop cost two of each per
//! session, most of what it cost everyone else (docs/reliability.md).
//!
//! So a cluster's first change is followed up at once (a connect's
//! `AgentAvailable` is not held back), and the changes within [`INTERVAL`] of
//! the last follow-up are followed up once, when the interval ends: that
//! trailing follow-up sees the sessions as they are then, so the status
//! never stays behind the last change by more than the interval.
//!
//! [`Damper::change`] only decides, with the time given; [`Damper::follow`]
//! runs a follow-up as it says ([`super::store`] for this replica's
//! sessions, [`super::controller`] for the leader's passes after another
//! replica's).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// At most one follow-up per cluster in this time.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What to do about a change ([`Damper::change`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Follow it up now.
    Now,
    /// Follow it up at this time, then tell [`Damper::fired`].
    At(Instant),
    /// A follow-up is already due: it covers this change too.
    Covered,
}

/// A cluster's last follow-up, and whether one is due.
struct Entry {
    last: Instant,
    due: bool,
}

/// Per cluster, when its session changes were last followed up.
pub struct Damper {
    interval: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Default for Damper {
    fn default() -> Self {
        Self::new(INTERVAL)
    }
}

impl Damper {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            entries: Mutex::default(),
        }
    }

    /// `cluster`'s sessions changed at `now`.
    pub fn change(&self, cluster: &str, now: Instant) -> Step {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let step = match entries.get_mut(cluster) {
            Some(entry) if entry.due => Step::Covered,
            Some(entry) if now < entry.last + self.interval => {
                entry.due = true;
                Step::At(entry.last + self.interval)
            }
            _ => {
                entries.insert(
                    cluster.to_string(),
                    Entry {
                        last: now,
                        due: false,
                    },
                );
                Step::Now
            }
        };
        self.prune(&mut entries, now);
        step
    }

    /// Runs `follow_up` for a change of `cluster` now: at once, when the
    /// interval ends (a task on the current runtime), or not at all when
    /// one is due already.
    pub fn follow(self: &Arc<Self>, cluster: &str, follow_up: impl FnOnce() + Send + 'static) {
        let at = match self.change(cluster, Instant::now()) {
            Step::Now => return follow_up(),
            Step::Covered => return,
            Step::At(at) => at,
        };
        // A session that ends as its runtime shuts down has none to wait
        // on: followed up at once, and nothing left due.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.fired(cluster, Instant::now());
            return follow_up();
        };
        let (damper, cluster) = (self.clone(), cluster.to_string());
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            damper.fired(&cluster, Instant::now());
            follow_up();
        });
    }

    /// The follow-up [`Step::At`] asked for ran at `now`.
    pub fn fired(&self, cluster: &str, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(
            cluster.to_string(),
            Entry {
                last: now,
                due: false,
            },
        );
    }

    /// Clusters whose interval is over are as good as never seen: forgotten
    /// once they are more than half of what is kept (so at most twice the
    /// clusters that changed within an interval are, and pruning is rare).
    fn prune(&self, entries: &mut HashMap<String, Entry>, now: Instant) {
        if entries.len() < 64 || !entries.len().is_multiple_of(64) {
            return;
        }
        let over = |e: &Entry| !e.due && now >= e.last + self.interval;
        if entries.values().filter(|e| over(e)).count() * 2 > entries.len() {
            entries.retain(|_, e| !over(e));
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_first_change_and_one_after_a_quiet_interval_go_at_once() {
        let d = Damper::new(1000 * MS);
        let t0 = Instant::now();
        assert_eq!(d.change("alpha", t0), Step::Now);
        assert_eq!(d.change("beta", t0), Step::Now, "each cluster its own");
        assert_eq!(d.change("alpha", t0 + 1000 * MS), Step::Now);
        assert_eq!(d.change("alpha", t0 + 5000 * MS), Step::Now);
    }

    #[test]
    fn changes_within_the_interval_are_followed_up_once_when_it_ends() {
        let d = Damper::new(1000 * MS);
        let t0 = Instant::now();
        assert_eq!(d.change("alpha", t0), Step::Now);
        assert_eq!(d.change("alpha", t0 + 100 * MS), Step::At(t0 + 1000 * MS));
        assert_eq!(d.change("alpha", t0 + 200 * MS), Step::Covered);
        assert_eq!(d.change("alpha", t0 + 999 * MS), Step::Covered);
        d.fired("alpha", t0 + 1001 * MS);
        // A flap that goes on: one follow-up per interval, counted from the
        // trailing one.
        assert_eq!(d.change("alpha", t0 + 1100 * MS), Step::At(t0 + 2001 * MS));
        assert_eq!(d.change("alpha", t0 + 1500 * MS), Step::Covered);
        d.fired("alpha", t0 + 2001 * MS);
        assert_eq!(d.change("alpha", t0 + 3001 * MS), Step::Now);
    }

    #[test]
    fn clusters_long_quiet_are_forgotten() {
        let d = Damper::new(1000 * MS);
        let t0 = Instant::now();
        for i in 0..63 {
            assert_eq!(d.change(&format!("c{i}"), t0), Step::Now);
        }
        assert_eq!(d.change("c0", t0 + 10 * MS), Step::At(t0 + 1000 * MS));
        assert_eq!(d.kept(), 63);
        // The 64th: c1..c62 are over; c0 is due, c63 within its interval.
        assert_eq!(d.change("c63", t0 + 1500 * MS), Step::Now);
        assert_eq!(d.kept(), 2);
        assert_eq!(d.change("c0", t0 + 1500 * MS), Step::Covered);
        assert_eq!(d.change("c63", t0 + 1600 * MS), Step::At(t0 + 2500 * MS));
        assert_eq!(d.change("c5", t0 + 1600 * MS), Step::Now);
        // 64 within their interval: none forgotten.
        for i in 100..162 {
            d.change(&format!("c{i}"), t0 + 1600 * MS);
        }
        assert_eq!(d.kept(), 65);
    }
}
