//! Which agents are connected, per cluster, and who may connect.
//!
//! A [`ClusterStore`] answers "what is this cluster's token?" (a static file in
//! this version; Cluster custom resources later). The [`Registry`] checks an
//! agent's name and token against it in constant time, keeps every live session
//! per cluster (several at once: rolling restarts, HA agents), and dials through
//! the least busy one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;
use tunnel::server::{Admission, DialError, Session, TunnelStream};
use tunnel::wire::UNAUTHORIZED;

/// Where cluster tokens come from, and who hears about sessions.
pub trait ClusterStore: Send + Sync + 'static {
    /// The token agents of `cluster` must present, if the cluster exists.
    fn token(&self, cluster: &str) -> Option<String>;

    /// After the token check, before the agent hears success: e.g. bind the
    /// cluster's listeners. An error rejects the agent with that reason.
    fn on_connect(&self, _cluster: &str) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// An agent claiming `cluster` was refused (wrong token, unknown cluster).
    fn on_reject(&self, _cluster: &str, _reason: &str) {}

    /// A session of `cluster` was added or has ended.
    fn on_change(&self, _cluster: &str) {}
}

/// Clusters and tokens fixed at start, e.g. from `--clusters-file`.
#[derive(Default)]
pub struct StaticClusters(HashMap<String, String>);

impl StaticClusters {
    /// Parse `{"alpha": "<token>", ...}`.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let map: HashMap<String, String> = serde_json::from_str(json)
            .map_err(|e| format!("expected a JSON object of cluster name to token: {e}"))?;
        if let Some(name) = map.iter().find(|(_, t)| t.is_empty()).map(|(n, _)| n) {
            return Err(format!("cluster {name:?} has an empty token"));
        }
        Ok(Self(map))
    }
}

impl ClusterStore for StaticClusters {
    fn token(&self, cluster: &str) -> Option<String> {
        self.0.get(cluster).cloned()
    }
}

/// The member services an agent advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `KubernetesSvcHost`: the member's kube-apiserver.
    Kubernetes,
    /// `KubeSphereSvcHost`: the member's ks-apiserver.
    KubeSphere,
}

/// Why a request for a cluster could not be sent through its tunnel.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no agent of cluster {0:?} is connected")]
    NoSession(String),
    #[error(transparent)]
    Dial(#[from] DialError),
}

/// One cluster's line in /metrics.
pub struct ClusterStats {
    pub cluster: String,
    pub sessions: usize,
    pub streams: usize,
    pub received: u64,
    pub sent: u64,
}

/// Live sessions by cluster name. Cheap to clone; clones share the sessions.
pub struct Registry<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Registry<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    store: S,
    sessions: Mutex<HashMap<String, Vec<Entry>>>,
    /// Bytes (received, sent) of sessions that have ended, per cluster.
    ended_bytes: Mutex<HashMap<String, (u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Entry {
    id: u64,
    session: Session,
    /// The token this session was admitted with: a changed token revokes it.
    token: String,
}

/// Keeps a session registered; dropping it (the connection ended) removes it.
pub struct Registration<S: ClusterStore> {
    registry: Registry<S>,
    cluster: String,
    id: u64,
}

impl<S: ClusterStore> Drop for Registration<S> {
    fn drop(&mut self) {
        let left = self.registry.remove(&self.cluster, self.id);
        tracing::info!(cluster = %self.cluster, sessions_left = left, "agent disconnected");
        self.registry.inner.store.on_change(&self.cluster);
    }
}

impl<S: ClusterStore> Registry<S> {
    pub fn new(store: S) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                sessions: Mutex::default(),
                ended_bytes: Mutex::default(),
                next_id: Default::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, cluster: &str, id: u64) -> usize {
        let mut sessions = self.lock();
        let left = match sessions.get_mut(cluster) {
            Some(list) => {
                for gone in list.iter().filter(|e| e.id == id) {
                    let (r, s) = gone.session.bytes();
                    let mut ended = self
                        .inner
                        .ended_bytes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
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
        left
    }

    /// Per cluster: live sessions, open streams, bytes so far (for /metrics).
    pub fn stats(&self) -> Vec<ClusterStats> {
        let sessions = self.lock();
        let ended = self
            .inner
            .ended_bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = sessions.keys().chain(ended.keys()).collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|cluster| {
                let live = sessions.get(cluster).map(Vec::as_slice).unwrap_or_default();
                let (mut received, mut sent) = ended.get(cluster).copied().unwrap_or_default();
                for e in live {
                    let (r, s) = e.session.bytes();
                    received += r;
                    sent += s;
                }
                ClusterStats {
                    cluster: cluster.clone(),
                    sessions: live.iter().filter(|e| !e.session.is_closed()).count(),
                    streams: live.iter().map(|e| e.session.load()).sum(),
                    received,
                    sent,
                }
            })
            .collect()
    }

    /// Live sessions of `cluster`.
    pub fn live(&self, cluster: &str) -> usize {
        self.lock()
            .get(cluster)
            .map_or(0, |l| l.iter().filter(|e| !e.session.is_closed()).count())
    }

    /// Clusters with at least one registered session.
    pub fn clusters(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Close the sessions of `cluster` not admitted with `token` (all of them
    /// for `None`: the cluster was deleted or is no longer served).
    pub async fn revoke(&self, cluster: &str, token: Option<&str>, reason: &str) -> usize {
        let stale: Vec<Session> = self
            .lock()
            .get(cluster)
            .map(|list| {
                list.iter()
                    .filter(|e| token.is_none_or(|t| !tokens_match(t, &e.token)))
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

    /// Close every session, telling agents why (they reconnect, e.g. to another replica).
    pub async fn close_all(&self, reason: &str) {
        for cluster in self.clusters() {
            self.revoke(&cluster, None, reason).await;
        }
    }

    /// Live sessions of all clusters.
    pub fn total_live(&self) -> usize {
        self.lock()
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
        let sessions: Vec<(String, Session)> = self
            .lock()
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

    /// The least busy live session of `cluster`.
    pub fn pick(&self, cluster: &str) -> Option<Session> {
        self.lock()
            .get(cluster)?
            .iter()
            .filter(|e| !e.session.is_closed())
            .min_by_key(|e| e.session.load())
            .map(|e| e.session.clone())
    }

    /// Every live session of `cluster` (for its status: versions, heartbeat).
    pub fn sessions(&self, cluster: &str) -> Vec<Session> {
        self.lock()
            .get(cluster)
            .map(|l| l.iter().filter(|e| !e.session.is_closed()))
            .into_iter()
            .flatten()
            .map(|e| e.session.clone())
            .collect()
    }

    /// Open a stream to `upstream` through `cluster`'s least busy session; if
    /// that session died meanwhile, try the next.
    pub async fn dial(
        &self,
        cluster: &str,
        upstream: Upstream,
    ) -> Result<TunnelStream, RouteError> {
        let mut last = None;
        for _ in 0..3 {
            let Some(session) = self.pick(cluster) else {
                break;
            };
            let config = session.config();
            let target = match upstream {
                Upstream::Kubernetes => config.kubernetes_svc_host.clone(),
                Upstream::KubeSphere => config.kubesphere_svc_host.clone(),
            };
            match session.dial(&target).await {
                Ok(stream) => return Ok(stream),
                Err(DialError::Closed) => last = Some(DialError::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(
            || RouteError::NoSession(cluster.to_string()),
            RouteError::from,
        ))
    }
}

fn tokens_match(expected: &str, given: &str) -> bool {
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

impl<S: ClusterStore> Admission for Registry<S> {
    type Guard = Registration<S>;

    async fn admit(&self, session: Session) -> Result<Self::Guard, String> {
        let config = session.config();
        let cluster = config.name.clone();
        // Same answer for unknown cluster and wrong token: don't reveal which.
        let expected = self.inner.store.token(&cluster).unwrap_or_default();
        if expected.is_empty() || !tokens_match(&expected, &config.token) {
            self.inner.store.on_reject(&cluster, "wrong token");
            crate::metrics::METRICS.auth_failures.inc();
            return Err(UNAUTHORIZED.to_string());
        }
        self.inner.store.on_connect(&cluster).await?;
        let id = self
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sessions = self.lock();
        let list = sessions.entry(cluster.clone()).or_default();
        let again = !list.is_empty()
            || self
                .inner
                .ended_bytes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&cluster);
        if again {
            crate::metrics::METRICS
                .reconnects
                .get_or_create(&crate::metrics::Metrics::cluster(&cluster))
                .inc();
        }
        list.push(Entry {
            id,
            session,
            token: expected,
        });
        tracing::debug!(%cluster, sessions = list.len(), "session registered");
        drop(sessions);
        self.inner.store.on_change(&cluster);
        crate::metrics::METRICS
            .connects
            .get_or_create(&crate::metrics::Metrics::cluster(&cluster))
            .inc();
        Ok(Registration {
            registry: self.clone(),
            cluster,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_clusters_file() {
        let store = StaticClusters::from_json(r#"{"alpha":"t1"}"#).unwrap();
        assert_eq!(store.token("alpha").as_deref(), Some("t1"));
        assert_eq!(store.token("beta"), None);
        let err = StaticClusters::from_json("[1]").err().unwrap();
        assert!(err.contains("JSON object"), "{err}");
        let err = StaticClusters::from_json(r#"{"a":""}"#).err().unwrap();
        assert!(err.contains("empty token"), "{err}");
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "ab"));
        assert!(!tokens_match("abc", ""));
    }
}
