//! The first status after an agent connects, in one write instead of two.
//!
//! A connect starts two things at once: the leader's pass, which writes the
//! conditions (`AgentAvailable=True`), and a refresh, which probes the member
//! and writes what it says of itself. Written apart, that is two writes of
//! the Cluster per connect: 10,000 of each at a fleet's start, a quarter of
//! everything the host apiserver is asked then. So the refresh leaves what it
//! observed here, and the pass writes it with the conditions:
//! - a session change marks the cluster [`Handoff::expect`];
//! - the refresh that follows hands its observation over
//!   ([`Handoff::offer`]) while a pass is still to come, and writes it itself
//!   once the pass has gone by;
//! - the pass takes it ([`Handoff::take`]), waiting for a probe in flight at
//!   most until [`PASS_WAIT`] after the change: at a fleet's start the probes
//!   run ahead of the passes (a pass waits its turn behind thousands of
//!   writes), and one connect's probe is a few requests through the tunnel.
//!
//! A periodic refresh while a change's pass is still to come leaves its
//! observation too ([`Handoff::periodic`]); one no pass took within
//! [`PENDING`] (leadership moved meanwhile) the next periodic refresh writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::patch::{Observed, status_patch};
use crate::clusters::crd::ClusterStatus;

/// How long after a session change a pass waits for the probe that change
/// started; past it the conditions go out alone (a slow or unreachable
/// member is not a reason to hold `AgentAvailable` back).
pub const PASS_WAIT: Duration = Duration::from_secs(1);

/// How long after a change its pass may still come: a periodic refresh
/// leaves its observation for it until then.
pub const PENDING: Duration = Duration::from_secs(300);

/// What a refresh observed, for the pass to write.
pub struct Left {
    pub observed: Observed,
    /// Why the member's version and nodes could not be read, if so.
    pub unread: Option<String>,
}

impl Left {
    /// The status fields to write with the pass's: only what changed,
    /// against the status the pass is about to update.
    pub fn patch(
        &self,
        cluster: &str,
        current: &ClusterStatus,
        kubeconfig: &str,
    ) -> Map<String, Value> {
        let patch = status_patch(current, kubeconfig, &self.observed);
        super::warn_unread(cluster, self.unread.as_deref(), &patch);
        patch
    }
}

enum Entry {
    /// A session changed then; its refresh has not reported yet.
    Expected { at: Instant, ready: Arc<Notify> },
    /// The refresh reported; the pass for the change then has not come yet.
    Left { at: Instant, left: Left },
}

/// What [`Handoff::offer`] did with an observation.
pub enum Offer {
    /// Left for the pass: nothing to write.
    Left,
    /// No pass is coming for it: write it.
    Write(Left),
}

/// Shared by the store (session changes), the refresher and the passes.
#[derive(Clone, Default)]
pub struct Handoff(Arc<Mutex<HashMap<String, Entry>>>);

impl Handoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session of `cluster` came or went: a pass and a refresh follow.
    pub fn expect(&self, cluster: &str) {
        let mut map = self.lock();
        match map.get_mut(cluster) {
            // An observation not yet taken stays: the pass writes it, and the
            // new refresh's replaces it if it comes first.
            Some(Entry::Left { at, .. }) => *at = Instant::now(),
            // A pass may be waiting on it already.
            Some(Entry::Expected { at, .. }) => *at = Instant::now(),
            None => {
                map.insert(
                    cluster.to_string(),
                    Entry::Expected {
                        at: Instant::now(),
                        ready: Arc::default(),
                    },
                );
            }
        }
    }

    /// A refresh that followed a session change reports.
    pub fn offer(&self, cluster: &str, left: Left) -> Offer {
        offer_in(&mut self.lock(), cluster, left)
    }

    /// A periodic refresh on the leader reports. While a pass is still to
    /// come for a change less than [`PENDING`] ago it takes this newer
    /// observation: at a fleet's start the passes run minutes behind the
    /// connects, and a tick writing every cluster then doubled the writes.
    /// Older, no pass is coming (leadership moved meanwhile): write it.
    pub fn periodic(&self, cluster: &str, left: Left) -> Offer {
        let mut map = self.lock();
        let pending = matches!(
            map.get(cluster),
            Some(Entry::Expected { at, .. } | Entry::Left { at, .. }) if at.elapsed() < PENDING
        );
        if !pending {
            map.remove(cluster);
            return Offer::Write(left);
        }
        offer_in(&mut map, cluster, left)
    }

    /// The pass about to write `cluster`'s status takes what its refresh
    /// observed, waiting for a probe in flight until [`PASS_WAIT`] after the
    /// change. None: the refresh writes it itself.
    pub async fn take(&self, cluster: &str) -> Option<Left> {
        let (deadline, ready) = {
            let mut map = self.lock();
            match map.remove(cluster)? {
                Entry::Left { left, .. } => return Some(left),
                Entry::Expected { at, ready } => {
                    let deadline = at + PASS_WAIT;
                    if Instant::now() >= deadline {
                        tracing::debug!(%cluster, "no probe result to write with the conditions");
                        return None;
                    }
                    map.insert(
                        cluster.to_string(),
                        Entry::Expected {
                            at,
                            ready: ready.clone(),
                        },
                    );
                    (deadline, ready)
                }
            }
        };
        // A notify between the unlock and here is kept as a permit.
        let _ = tokio::time::timeout_at(deadline, ready.notified()).await;
        match self.lock().remove(cluster)? {
            Entry::Left { left, .. } => Some(left),
            // Given up: the refresh finds no entry and writes itself.
            Entry::Expected { .. } => {
                tracing::debug!(%cluster, "the probe is slower than the pass waits");
                None
            }
        }
    }

    /// The pass's write failed (a conflict): what it took goes back for
    /// its retry, unless a newer observation came meanwhile.
    pub fn restore(&self, cluster: &str, left: Left) {
        let mut map = self.lock();
        if !matches!(map.get(cluster), Some(Entry::Left { .. })) {
            let at = Instant::now();
            map.insert(cluster.to_string(), Entry::Left { at, left });
        }
    }

    /// No pass of ours will take what is left (a follower, a cluster no
    /// longer served).
    pub fn discard(&self, cluster: &str) {
        self.lock().remove(cluster);
    }
}

/// [`Handoff::offer`] under a lock already held.
fn offer_in(map: &mut HashMap<String, Entry>, cluster: &str, left: Left) -> Offer {
    match map.remove(cluster) {
        Some(Entry::Expected { at, ready }) => {
            map.insert(cluster.to_string(), Entry::Left { at, left });
            ready.notify_one();
            Offer::Left
        }
        Some(Entry::Left { at, .. }) => {
            map.insert(cluster.to_string(), Entry::Left { at, left });
            Offer::Left
        }
        // The pass went by (it took nothing or gave up waiting).
        None => Offer::Write(left),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn left(agent: &str) -> Left {
        Left {
            observed: Observed {
                member: None,
                health: None,
                agent_version: agent.into(),
                platform: None,
                rtt: None,
                heartbeat: SystemTime::UNIX_EPOCH,
            },
            unread: None,
        }
    }

    fn agent(left: &Option<Left>) -> Option<&str> {
        left.as_ref().map(|l| l.observed.agent_version.as_str())
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_done_before_the_pass_rides_with_it() {
        let h = Handoff::default();
        h.expect("a");
        assert!(matches!(h.offer("a", left("v1")), Offer::Left));
        // However late the pass comes (a fleet's start): it is there.
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(agent(&h.take("a").await), Some("v1"));
        // Taken once.
        assert!(h.take("a").await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_pass_waits_for_a_probe_in_flight() {
        let h = Handoff::default();
        h.expect("a");
        let pass = tokio::spawn({
            let h = h.clone();
            async move { h.take("a").await }
        });
        tokio::time::advance(PASS_WAIT / 2).await;
        assert!(matches!(h.offer("a", left("v1")), Offer::Left));
        let taken = pass.await.expect("the pass");
        assert_eq!(agent(&taken), Some("v1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_probe_is_written_by_its_refresh() {
        let h = Handoff::default();
        h.expect("a");
        let started = Instant::now();
        assert!(h.take("a").await.is_none());
        assert_eq!(started.elapsed(), PASS_WAIT);
        // The pass went by: the refresh writes.
        assert!(matches!(h.offer("a", left("v1")), Offer::Write(_)));
        // A pass long after its change does not wait at all.
        h.expect("b");
        tokio::time::advance(PASS_WAIT * 2).await;
        let started = Instant::now();
        assert!(h.take("b").await.is_none());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(matches!(h.offer("b", left("v1")), Offer::Write(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_change_nothing_is_kept() {
        let h = Handoff::default();
        assert!(matches!(h.offer("a", left("v1")), Offer::Write(_)));
        assert!(h.take("a").await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_newest_observation_wins_and_survives_a_conflict() {
        let h = Handoff::default();
        h.expect("a");
        assert!(matches!(h.offer("a", left("v1")), Offer::Left));
        // Another change before the pass: the observation stays, the next
        // refresh's replaces it.
        h.expect("a");
        assert!(matches!(h.offer("a", left("v2")), Offer::Left));
        let taken = h.take("a").await.expect("an observation");
        assert_eq!(taken.observed.agent_version, "v2");
        // The write conflicted: back for the retry.
        h.restore("a", taken);
        assert_eq!(agent(&h.take("a").await), Some("v2"));
        // Nothing of ours will take it: dropped.
        h.expect("a");
        assert!(matches!(h.offer("a", left("v3")), Offer::Left));
        h.discard("a");
        assert!(h.take("a").await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_before_the_pass_leaves_its_observation_for_it() {
        let h = Handoff::default();
        // A fleet's start: the tick comes before the change's pass.
        h.expect("a");
        assert!(matches!(h.periodic("a", left("v1")), Offer::Left));
        tokio::time::advance(Duration::from_secs(90)).await;
        assert!(matches!(h.periodic("a", left("v2")), Offer::Left));
        assert_eq!(agent(&h.take("a").await), Some("v2"));
        // No change pending: the tick writes.
        assert!(matches!(h.periodic("a", left("v3")), Offer::Write(_)));
        // A change whose pass never came (leadership moved): written once
        // it is PENDING old, and nothing stays behind.
        h.expect("b");
        assert!(matches!(h.offer("b", left("v1")), Offer::Left));
        tokio::time::advance(PENDING).await;
        assert!(matches!(h.periodic("b", left("v2")), Offer::Write(_)));
        assert!(h.take("b").await.is_none());
    }
}
