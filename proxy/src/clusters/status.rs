//! What the Cluster status tells a user about a connected member, learnt
//! through the tunnel: the member's Kubernetes version (`/version`) and node
//! count (a LIST of nodes with `limit=1`: the item plus
//! `metadata.remainingItemCount`), asked with the agent's own credentials like
//! any request on the cluster's port, through [`MemberDialer`]; the agent's
//! version (the User-Agent of its websocket upgrade, carried by its session:
//! `tower-agent/<version>` for ours, whatever a Go agent sends for theirs);
//! its last heartbeat; when the client certificate of the published
//! kubeconfig expires.
//!
//! Written to `status.kubernetesVersion` and `status.nodeCount`
//! (KubeSphere's fields) and `status.agentVersion`, `status.lastHeartbeatTime`,
//! `status.certificateExpirationTime` (ours, declared in our CRD and so in
//! its kubesphere-compat variant too), on connect and every [`REFRESH`],
//! by the replica that holds an agent session of the cluster.
//!
//! Writes are merge patches of only the fields that changed. The heartbeat is
//! coarse on purpose: it is written only when the stored one is at least
//! [`HEARTBEAT_GRANULARITY`] old, so a connected, unchanged cluster costs one
//! status write every one to two minutes, not one per keepalive.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::header;
use hyper_util::rt::TokioIo;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tunnel::server::Session;

use super::crd::{Cluster, ClusterStatus};
use super::kubeconfig;
use crate::member::{MemberDialer, ReachError, Target};

/// How often a connected member is asked again.
pub const REFRESH: Duration = Duration::from_secs(60);
/// The stored heartbeat moves only when it is at least this old.
pub const HEARTBEAT_GRANULARITY: Duration = Duration::from_secs(60);
/// A probe (dial, TLS, two requests) that takes longer than this is given up.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// The answers are small; anything bigger is not what we asked for.
const MAX_BODY: usize = 1 << 20;

/// Why a member could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Reach(#[from] ReachError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("GET {path}: {detail}")]
    Answer { path: &'static str, detail: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// What the member said.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub git_version: String,
    pub nodes: i64,
}

/// Asks for a cluster's status to be refreshed now (a session came or went,
/// a kubeconfig was written). Cheap to clone.
#[derive(Clone)]
pub struct Kick(mpsc::UnboundedSender<String>);

/// The other end of a [`Kick`], for [`start`].
pub struct Kicks(mpsc::UnboundedReceiver<String>);

impl Kicks {
    /// The next cluster to refresh.
    pub async fn recv(&mut self) -> Option<String> {
        self.0.recv().await
    }
}

impl Kick {
    pub fn new() -> (Self, Kicks) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), Kicks(rx))
    }

    /// Refresh `cluster`'s status soon (dropped once the refresher is gone).
    pub fn notify(&self, cluster: &str) {
        let _ = self.0.send(cluster.to_string());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's version as it introduced itself.
fn agent_version(session: &Session) -> String {
    let ua = session.user_agent();
    match (ua.is_empty(), session.config().version.is_empty()) {
        (false, _) => ua.to_string(),
        (true, false) => session.config().version.clone(),
        (true, true) => "unknown".to_string(),
    }
}

/// The versions of all of a cluster's agents, sorted and deduplicated: the
/// same set of sessions always gives the same text (no flapping writes
/// during a rolling update with two agent versions).
fn agent_versions(sessions: &[Session]) -> String {
    let versions: std::collections::BTreeSet<String> = sessions.iter().map(agent_version).collect();
    versions.into_iter().collect::<Vec<_>>().join(", ")
}

/// Ask the member's kube-apiserver, through one of its agents, for its
/// version and node count.
pub async fn probe(dialer: &MemberDialer, cluster: &str) -> Result<Member, ProbeError> {
    let reached = dialer.reach(cluster, Target::KubeApiserver).await?;
    let prepared = reached.access;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(reached.stream)).await?;
    let conn = tokio::spawn(conn);
    let host = prepared.address.clone();
    let mut get = async |path: &'static str| -> Result<Value, ProbeError> {
        let mut req = Request::get(path)
            .header(header::HOST, &host)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("tower-proxy/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &prepared.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Answer {
                path,
                detail: e.to_string(),
            })?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ProbeError::Answer {
                path,
                detail: e.to_string(),
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(ProbeError::Answer {
                path,
                detail: format!("HTTP {status}"),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ProbeError::Answer {
            path,
            detail: format!("not JSON: {e}"),
        })
    };
    let version = get("/version").await?;
    let nodes = get("/api/v1/nodes?limit=1").await?;
    conn.abort();
    let git_version = version["gitVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let listed = nodes["items"].as_array().map_or(0, Vec::len) as i64;
    let remaining = nodes["metadata"]["remainingItemCount"]
        .as_i64()
        .unwrap_or(0);
    Ok(Member {
        git_version,
        nodes: listed + remaining,
    })
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .ok()
        .and_then(|t| t.round(jiff::Unit::Second).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

/// What to observe for one cluster right now.
pub struct Observed {
    pub member: Option<Member>,
    pub agent_version: String,
    pub heartbeat: SystemTime,
    pub now: SystemTime,
}

/// The status fields to write: only those that differ from `current`; the
/// heartbeat only once the stored one is [`HEARTBEAT_GRANULARITY`] old, or
/// along with another change.
pub fn status_patch(
    current: &ClusterStatus,
    kubeconfig: &str,
    seen: &Observed,
) -> serde_json::Map<String, Value> {
    let mut patch = serde_json::Map::new();
    if let Some(m) = &seen.member {
        if !m.git_version.is_empty()
            && current.kubernetes_version.as_deref() != Some(&m.git_version)
        {
            patch.insert("kubernetesVersion".into(), json!(m.git_version));
        }
        if current.node_count != Some(m.nodes) {
            patch.insert("nodeCount".into(), json!(m.nodes));
        }
    }
    if current.agent_version.as_deref() != Some(seen.agent_version.as_str()) {
        patch.insert("agentVersion".into(), json!(seen.agent_version));
    }
    if let Some(expiry) = kubeconfig::read(kubeconfig)
        .and_then(|k| k.cert_not_after)
        .map(rfc3339)
        && current.certificate_expiration_time.as_deref() != Some(expiry.as_str())
    {
        patch.insert("certificateExpirationTime".into(), json!(expiry));
    }
    let stored = current.last_heartbeat_time.as_deref().and_then(parse_time);
    let due = stored.is_none_or(|t| {
        seen.now
            .duration_since(t)
            .is_ok_and(|age| age >= HEARTBEAT_GRANULARITY)
    });
    let newer = stored.is_none_or(|t| seen.heartbeat > t);
    if newer && (due || !patch.is_empty()) {
        patch.insert("lastHeartbeatTime".into(), json!(rfc3339(seen.heartbeat)));
    }
    patch
}

/// Refreshes connected clusters' status on a [`Kick`] and every [`REFRESH`].
pub fn start(
    mut kicks: Kicks,
    client: Client,
    store: Store<Cluster>,
    dialer: MemberDialer,
) -> tokio::task::JoinHandle<()> {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let names = tokio::select! {
                Some(name) = kicks.recv() => vec![name],
                _ = tick.tick() => dialer.registry().clusters(),
                else => return,
            };
            for name in names {
                // One refresh per cluster at a time; a kick meanwhile is
                // covered by the next tick.
                if !lock(&running).insert(name.clone()) {
                    continue;
                }
                let (client, store, dialer, running) = (
                    client.clone(),
                    store.clone(),
                    dialer.clone(),
                    running.clone(),
                );
                tokio::spawn(async move {
                    refresh(&client, &store, &dialer, &name).await;
                    lock(&running).remove(&name);
                });
            }
        }
    })
}

async fn refresh(client: &Client, store: &Store<Cluster>, dialer: &MemberDialer, name: &str) {
    let Some(session) = dialer.pick(name) else {
        return;
    };
    let Some(cluster) = store.get(&ObjectRef::new(name)) else {
        return;
    };
    if !cluster.is_served() {
        return;
    }
    let member = match tokio::time::timeout(PROBE_TIMEOUT, probe(dialer, name)).await {
        Ok(Ok(m)) => Some(m),
        Ok(Err(e)) => {
            tracing::warn!(cluster = %name, error = %e, "cannot read the member's version and nodes");
            None
        }
        Err(_) => {
            let e = ProbeError::Timeout(PROBE_TIMEOUT);
            tracing::warn!(cluster = %name, error = %e, "cannot read the member's version and nodes");
            None
        }
    };
    // The store may have moved on while we asked.
    let cluster = store.get(&ObjectRef::new(name)).unwrap_or(cluster);
    let sessions = dialer.registry().sessions(name);
    let seen = Observed {
        member,
        agent_version: agent_versions(&sessions),
        heartbeat: sessions
            .iter()
            .map(Session::last_heartbeat)
            .max()
            .unwrap_or_else(|| session.last_heartbeat()),
        now: SystemTime::now(),
    };
    if sessions.is_empty() {
        // Gone while we asked: nothing current to report.
        return;
    }
    let current = cluster.status.clone().unwrap_or_default();
    let patch = status_patch(&current, &cluster.spec.connection.kubeconfig, &seen);
    if patch.is_empty() {
        return;
    }
    let fields: Vec<String> = patch.keys().cloned().collect();
    let body = json!({ "status": patch });
    let api: Api<Cluster> = Api::all(client.clone());
    let written = match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        // KubeSphere's own CRD has no status subresource: status is part of the object.
        Err(kube::Error::Api(e)) if e.code == 404 => api
            .patch(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map(|_| ()),
        other => other.map(|_| ()),
    };
    match written {
        Ok(()) => tracing::debug!(cluster = %cluster.name_any(), ?fields, "member status updated"),
        Err(e) => tracing::warn!(cluster = %name, error = %e, "cannot write the member status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(now: SystemTime, heartbeat: SystemTime) -> Observed {
        Observed {
            member: Some(Member {
                git_version: "v1.34.1".into(),
                nodes: 3,
            }),
            agent_version: "tower-agent/0.1.0".into(),
            heartbeat,
            now,
        }
    }

    #[test]
    fn writes_only_what_changed_and_a_coarse_heartbeat() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let first = status_patch(&ClusterStatus::default(), "", &observed(t0, t0));
        assert_eq!(first["kubernetesVersion"], "v1.34.1");
        assert_eq!(first["nodeCount"], 3);
        assert_eq!(first["agentVersion"], "tower-agent/0.1.0");
        assert_eq!(first["lastHeartbeatTime"], "2027-01-15T08:00:00Z");
        let stored: ClusterStatus = serde_json::from_value(Value::Object(first)).expect("a status");
        // Pings every few seconds change nothing for a minute...
        let later = t0 + Duration::from_secs(59);
        assert!(status_patch(&stored, "", &observed(later, later)).is_empty());
        // ...then the heartbeat moves, alone.
        let later = t0 + Duration::from_secs(60);
        let beat = status_patch(&stored, "", &observed(later, later));
        assert_eq!(beat.keys().collect::<Vec<_>>(), ["lastHeartbeatTime"]);
        // A real change goes out at once, with the freshest heartbeat.
        let later = t0 + Duration::from_secs(10);
        let mut seen = observed(later, later);
        seen.member = Some(Member {
            git_version: "v1.34.1".into(),
            nodes: 4,
        });
        let changed = status_patch(&stored, "", &seen);
        assert_eq!(changed["nodeCount"], 4);
        assert!(changed.contains_key("lastHeartbeatTime"));
        // A member that could not be asked keeps its last known facts.
        seen.member = None;
        assert!(status_patch(&stored, "", &seen).is_empty());
    }
}
