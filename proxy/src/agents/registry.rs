//! Which agents are connected, per cluster: every live session (several at
//! once: rolling restarts, HA agents), the token each was admitted with, and
//! the bytes of those that ended. Who may join is decided by
//! [`super::admission::Gate`]; reaching a member through a session is
//! [`crate::member::MemberDialer`]'s job.
//!
//! The registry depends on nothing but the metrics, so it is built first and
//! handed to everything that needs sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;
use tunnel::server::Session;

use crate::ops::metrics::{ClusterStats, Metrics};

/// Live sessions by cluster name. Cheap to clone; clones share the sessions.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Arc<Metrics>,
    sessions: Mutex<HashMap<String, Vec<Entry>>>,
    /// Bytes (received, sent) of sessions that have ended, per cluster.
    ended_bytes: Mutex<HashMap<String, (u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Bumped whenever a session is registered or removed.
    changes: tokio::sync::watch::Sender<u64>,
    /// Each session registered, for what each one must be told once.
    joins: tokio::sync::broadcast::Sender<Joined>,
}

/// A session just registered: its registry id, cluster and session.
pub type Joined = (u64, String, Session);

/// Joins a slow follower of [`Registry::joins`] may fall behind by before it
/// is told it lagged (and looks at every session instead).
const JOINS_KEPT: usize = 4096;

struct Entry {
    id: u64,
    session: Session,
    /// The token this session was admitted with: a changed token revokes it.
    token: String,
    /// It was handed the cluster's current token (or asked, if it cannot be told).
    told: bool,
    /// Its agent stored a new token and connects again with it: this tunnel
    /// only finishes its streams, new ones go to another session if any.
    retiring: bool,
}

/// Constant-time token comparison.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                metrics,
                sessions: Mutex::default(),
                ended_bytes: Mutex::default(),
                next_id: Default::default(),
                changes: tokio::sync::watch::Sender::new(0),
                joins: tokio::sync::broadcast::Sender::new(JOINS_KEPT),
            }),
        }
    }

    /// Wakes when a session is registered or removed (for what follows the
    /// set of connected clusters, e.g. the per-cluster Unix sockets).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Every session registered from now on. Reacting to each join instead
    /// of scanning every session at each change: with 10,000 agents
    /// connecting, that scan was a sixth of the proxy's CPU.
    pub fn joins(&self) -> tokio::sync::broadcast::Receiver<Joined> {
        self.inner.joins.subscribe()
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The metrics this registry counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Register an admitted `session` of `cluster`; returns its id for
    /// [`Registry::remove`].
    pub(super) fn insert(&self, cluster: &str, session: Session, token: String) -> u64 {
        let id = self
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sessions = lock(&self.inner.sessions);
        let list = sessions.entry(cluster.to_string()).or_default();
        let again = !list.is_empty() || lock(&self.inner.ended_bytes).contains_key(cluster);
        let label = Metrics::cluster(cluster);
        if again {
            self.inner.metrics.reconnects.get_or_create(&label).inc();
        }
        // No one following the joins is not an error.
        let _ = self
            .inner
            .joins
            .send((id, cluster.to_string(), session.clone()));
        list.push(Entry {
            id,
            session,
            token,
            told: false,
            retiring: false,
        });
        tracing::debug!(%cluster, sessions = list.len(), "session registered");
        self.inner.metrics.connects.get_or_create(&label).inc();
        drop(sessions);
        self.changed();
        id
    }

    /// Forget session `id` of `cluster`; returns how many are left.
    pub(super) fn remove(&self, cluster: &str, id: u64) -> usize {
        let mut sessions = lock(&self.inner.sessions);
        let left = match sessions.get_mut(cluster) {
            Some(list) => {
                for gone in list.iter().filter(|e| e.id == id) {
                    let (r, s) = gone.session.bytes();
                    let mut ended = lock(&self.inner.ended_bytes);
                    let total = ended.entry(cluster.to_string()).or_default();
                    total.0 += r;
                    total.1 += s;
                }
                list.retain(|e| e.id != id);
                list.len()
            }
            None => 0,
        };
        if left == 0 {
            sessions.remove(cluster);
        }
        drop(sessions);
        self.changed();
        left
    }

    /// Per cluster: live sessions, open streams, bytes so far, what waits in
    /// the sessions' write queues (for /metrics).
    pub fn stats(&self) -> Vec<ClusterStats> {
        let sessions = lock(&self.inner.sessions);
        let ended = lock(&self.inner.ended_bytes);
        let mut names: Vec<&String> = sessions.keys().chain(ended.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|cluster| {
                let live = sessions.get(cluster).map(Vec::as_slice).unwrap_or_default();
                let open = || live.iter().filter(|e| !e.session.is_closed());
                let (mut received, mut sent) = ended.get(cluster).copied().unwrap_or_default();
                for e in live {
                    let (r, s) = e.session.bytes();
                    received += r;
                    sent += s;
                }
                ClusterStats {
                    cluster: cluster.clone(),
                    sessions: open().count(),
                    streams: live.iter().map(|e| e.session.load()).sum(),
                    received,
                    sent,
                    // A closed session's queue is not written any more.
                    write_queued: open().map(|e| e.session.write_queue_bytes() as u64).sum(),
                    stalled: open().filter(|e| e.session.write_stalled()).count(),
                }
            })
            .collect()
    }

    /// Live sessions of `cluster`.
    pub fn live(&self, cluster: &str) -> usize {
        lock(&self.inner.sessions)
            .get(cluster)
            .map_or(0, |l| l.iter().filter(|e| !e.session.is_closed()).count())
    }

    /// Whether an agent of `cluster` was connected to this process at some
    /// point (it may be gone now).
    pub fn seen(&self, cluster: &str) -> bool {
        lock(&self.inner.sessions).contains_key(cluster)
            || lock(&self.inner.ended_bytes).contains_key(cluster)
    }

    /// Clusters with at least one registered session.
    pub fn clusters(&self) -> Vec<String> {
        lock(&self.inner.sessions).keys().cloned().collect()
    }

    /// Clusters with at least one live session.
    pub fn live_clusters(&self) -> Vec<String> {
        let mut clusters = self.clusters();
        clusters.retain(|c| self.live(c) > 0);
        clusters
    }

    /// Close the sessions of `cluster` not admitted with `token` (all of them
    /// for `None`: the cluster was deleted or is no longer served).
    pub async fn revoke(&self, cluster: &str, token: Option<&str>, reason: &str) -> usize {
        self.revoke_unless(
            cluster,
            |t| token.is_some_and(|k| tokens_match(k, t)),
            reason,
        )
        .await
    }

    /// Close the sessions of `cluster` whose admission token `keep` refuses
    /// (e.g. the current token, or the previous one during its grace).
    pub async fn revoke_unless(
        &self,
        cluster: &str,
        keep: impl Fn(&str) -> bool,
        reason: &str,
    ) -> usize {
        let stale: Vec<Session> = lock(&self.inner.sessions)
            .get(cluster)
            .map(|list| {
                list.iter()
                    .filter(|e| !keep(&e.token))
                    .map(|e| e.session.clone())
                    .collect()
            })
            .unwrap_or_default();
        for session in &stale {
            tracing::info!(%cluster, peer = session.peer(), %reason, "closing agent session");
            session.close(reason).await;
        }
        stale.len()
    }

    /// Live sessions of `cluster` admitted with another token than `current`
    /// that were not handed it yet, with their ids for [`Registry::retoken`];
    /// they count as handed from now on (each agent is told once per session).
    pub fn to_tell(&self, cluster: &str, current: &str) -> Vec<(u64, Session)> {
        let mut sessions = lock(&self.inner.sessions);
        let Some(list) = sessions.get_mut(cluster) else {
            return Vec::new();
        };
        list.iter_mut()
            .filter(|e| !e.told && !e.session.is_closed() && !tokens_match(current, &e.token))
            .map(|e| {
                e.told = true;
                (e.id, e.session.clone())
            })
            .collect()
    }

    /// Session `id` of `cluster` counts as admitted with `token` from now on:
    /// its agent confirmed it stored that token (it reconnects with it, and
    /// this tunnel only serves its last streams: [`Registry::pick`] prefers
    /// the others).
    pub fn retoken(&self, cluster: &str, id: u64, token: &str) {
        if let Some(e) = lock(&self.inner.sessions)
            .get_mut(cluster)
            .and_then(|l| l.iter_mut().find(|e| e.id == id))
        {
            e.token = token.to_string();
            e.retiring = true;
        }
    }

    /// Close every session, telling agents why (they reconnect, e.g. to another replica).
    pub async fn close_all(&self, reason: &str) {
        for cluster in self.clusters() {
            self.revoke(&cluster, None, reason).await;
        }
    }

    /// Live sessions of all clusters.
    pub fn total_live(&self) -> usize {
        lock(&self.inner.sessions)
            .values()
            .flatten()
            .filter(|e| !e.session.is_closed())
            .count()
    }

    /// Ask every agent to connect again elsewhere, keeping its tunnel until
    /// it is closed (this replica is draining). Returns the clusters of the
    /// agents that were asked, and the sessions whose agents do not know the
    /// request (Go Tower agents).
    pub async fn drain_all(&self) -> (Vec<String>, Vec<Session>) {
        let sessions: Vec<(String, Session)> = lock(&self.inner.sessions)
            .iter()
            .flat_map(|(c, l)| l.iter().map(|e| (c.clone(), e.session.clone())))
            .collect();
        let asks = sessions.into_iter().map(|(c, s)| async move {
            let understood = s.drain().await;
            (c, s, understood)
        });
        let (mut asked, mut legacy) = (Vec::new(), Vec::new());
        for (cluster, session, understood) in futures_util::future::join_all(asks).await {
            if understood {
                asked.push(cluster);
            } else {
                legacy.push(session);
            }
        }
        (asked, legacy)
    }

    /// The least busy live session of `cluster`, one that is not retiring
    /// (its agent moves to a new token) if there is one.
    pub fn pick(&self, cluster: &str) -> Option<Session> {
        lock(&self.inner.sessions)
            .get(cluster)?
            .iter()
            .filter(|e| !e.session.is_closed())
            .min_by_key(|e| (e.retiring, e.session.load()))
            .map(|e| e.session.clone())
    }

    /// Every live session of `cluster` (for its status: versions, heartbeat).
    pub fn sessions(&self, cluster: &str) -> Vec<Session> {
        lock(&self.inner.sessions)
            .get(cluster)
            .map(|l| l.iter().filter(|e| !e.session.is_closed()))
            .into_iter()
            .flatten()
            .map(|e| e.session.clone())
            .collect()
    }

    /// Every live session with its registry id (unique for the process's
    /// life, unlike [`Session::id`]) and cluster.
    pub fn all_sessions(&self) -> Vec<(u64, String, Session)> {
        lock(&self.inner.sessions)
            .iter()
            .flat_map(|(cluster, list)| {
                list.iter()
                    .filter(|e| !e.session.is_closed())
                    .map(|e| (e.id, cluster.clone(), e.session.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "ab"));
        assert!(!tokens_match("abc", ""));
    }
}
