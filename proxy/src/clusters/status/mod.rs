//! What the Cluster status tells a user about a connected member, learnt
//! through the tunnel, by the replica that holds an agent session of the
//! cluster, on connect and every `--cluster-status-update-frequency`
//! ([`DEFAULT_FREQUENCY`]):
//! - from the member's kube-apiserver ([`probe`]), asked with the agent's own
//!   credentials: its Kubernetes version and node count (KubeSphere's
//!   `status.kubernetesVersion`, `status.nodeCount`) and whether `/healthz`,
//!   `/readyz`, `/livez` answer 200 (Clusternet's `status.healthz`,
//!   `status.readyz`, `status.livez`);
//! - from the agent's session: its version (`status.agentVersion`, the
//!   User-Agent of its websocket upgrade), its `GOOS/GOARCH`
//!   (`status.platform`, from its `config`), its last heartbeat
//!   (`status.lastHeartbeatTime`) and the tunnel's round trip
//!   (`status.tunnelRTT`);
//! - when the client certificate of the published kubeconfig expires
//!   (`status.certificateExpirationTime`).
//!
//! Fields other than KubeSphere's are ours, declared in our CRD and so in its
//! kubesphere-compat variant too. Writes are merge patches of only what
//! changed ([`patch`], [`health`]): an unchanged cluster costs no write
//! however often it is asked; the replica's Lease stands for the liveness of
//! every cluster it serves. What a refresh learns right after a connect
//! goes out with the leader's conditions when it can ([`handoff`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tunnel::server::Session;

pub mod handoff;
pub mod health;
pub mod patch;
pub mod probe;

use self::handoff::{Handoff, Left, Offer};
use self::health::Health;
use self::patch::Observed;
use self::probe::{ProbeError, probe};
use super::crd::{Cluster, StatusPath};
use crate::ha::leader::Leadership;
use crate::member::MemberDialer;

/// `--cluster-status-update-frequency`'s default: how often a connected
/// member was always asked again (Clusternet's default is 10 s; ours keeps
/// today's load on members and tunnels).
pub const DEFAULT_FREQUENCY: Duration = Duration::from_secs(60);
/// A probe (dial, TLS, five requests) that takes longer than this is given
/// up; its health counts as [`Health::DOWN`].
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a refresh waits for a new session's first round trip.
const FIRST_RTT_WAIT: Duration = Duration::from_millis(500);
/// Refreshes running at once: a fleet connecting kicks every cluster at
/// once, and each refresh is a probe and one or two API requests (each its
/// own connection to the kube-apiserver while in flight).
const REFRESHES: usize = 32;

/// Asks for a cluster's status to be refreshed now (a session came or
/// went). Cheap to clone.
#[derive(Clone)]
pub struct Kick {
    tx: mpsc::UnboundedSender<String>,
    handoff: Handoff,
    status_path: Arc<StatusPath>,
}

/// The other end of a [`Kick`], for [`start`].
pub struct Kicks {
    rx: mpsc::UnboundedReceiver<String>,
    handoff: Handoff,
    status_path: Arc<StatusPath>,
}

impl Kicks {
    /// The next cluster to refresh.
    pub async fn recv(&mut self) -> Option<String> {
        self.rx.recv().await
    }
}

impl Kick {
    pub fn new() -> (Self, Kicks) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handoff = Handoff::default();
        let status_path = Arc::new(StatusPath::default());
        let kicks = Kicks {
            rx,
            handoff: handoff.clone(),
            status_path: status_path.clone(),
        };
        (
            Self {
                tx,
                handoff,
                status_path,
            },
            kicks,
        )
    }

    /// Refresh `cluster`'s status soon (dropped once the refresher is gone);
    /// the leader's next pass may write what it finds ([`handoff`]).
    pub fn notify(&self, cluster: &str) {
        self.handoff.expect(cluster);
        let _ = self.tx.send(cluster.to_string());
    }

    /// Where the refreshes that follow kicks leave what they observed.
    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    /// Whether status writes go to the subresource, shared with the passes.
    pub fn status_path(&self) -> &Arc<StatusPath> {
        &self.status_path
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

/// Said once, when the status changes with it; every refresh of every
/// unreachable member was 10,000 warnings a minute at 10,000 clusters.
fn warn_unread(
    cluster: &str,
    error: Option<&str>,
    patch: &serde_json::Map<String, serde_json::Value>,
) {
    let Some(error) = error else { return };
    match patch.is_empty() {
        false => tracing::warn!(%cluster, %error, "cannot read the member's version and nodes"),
        true => tracing::debug!(%cluster, %error, "member still unreadable"),
    }
}

/// What a refresh needs.
#[derive(Clone)]
struct Refresher {
    client: Client,
    store: Store<Cluster>,
    dialer: MemberDialer,
    handoff: Handoff,
    status_path: Arc<StatusPath>,
    /// Only the leader's passes take what a refresh leaves.
    leader: Leadership,
}

/// Refreshes connected clusters' status on a [`Kick`] and every `frequency`.
pub fn start(
    mut kicks: Kicks,
    client: Client,
    store: Store<Cluster>,
    dialer: MemberDialer,
    leader: Leadership,
    frequency: Duration,
) -> tokio::task::JoinHandle<()> {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(REFRESHES));
    let refresher = Refresher {
        client,
        store,
        dialer,
        handoff: kicks.handoff.clone(),
        status_path: kicks.status_path.clone(),
        leader,
    };
    tokio::spawn(async move {
        // Not at once: at a start the sessions' kicks ask (a first tick
        // racing them made every refresh of a fleet a tick's, and the
        // kicks were dropped as running).
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + frequency, frequency);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A kick follows a change of ours (a session, a kubeconfig) that
            // the cache may not have yet under load: that refresh reads the
            // Cluster from the API. Ticks read the cache.
            let (names, fresh) = tokio::select! {
                Some(name) = kicks.recv() => (vec![name], true),
                _ = tick.tick() => (refresher.dialer.registry().clusters(), false),
                else => return,
            };
            for name in names {
                // One refresh per cluster at a time; a kick meanwhile is
                // covered by the next tick.
                if !lock(&running).insert(name.clone()) {
                    continue;
                }
                let (refresher, running, gate) = (refresher.clone(), running.clone(), gate.clone());
                tokio::spawn(async move {
                    // Before taking a slot: an agent slow to answer holds
                    // no other cluster's turn.
                    refresher.first_rtt(&name).await;
                    if let Ok(_turn) = gate.acquire().await {
                        refresher.refresh(&name, fresh).await;
                    }
                    lock(&running).remove(&name);
                });
            }
        }
    })
}

/// The Cluster from the API when `fresh`, else from the cache.
async fn current(
    client: &Client,
    store: &Store<Cluster>,
    name: &str,
    fresh: bool,
) -> Option<Arc<Cluster>> {
    if !fresh {
        return store.get(&ObjectRef::new(name));
    }
    let api: Api<Cluster> = Api::all(client.clone());
    match api.get_opt(name).await {
        Ok(c) => c.map(Arc::new),
        Err(e) => {
            tracing::debug!(cluster = %name, error = %e, "reading the Cluster failed; using the cache");
            store.get(&ObjectRef::new(name))
        }
    }
}

impl Refresher {
    /// Probe the member and write what changed; after a kick (`fresh`), on
    /// the leader, what it saw is left for the pass that follows the change.
    async fn refresh(&self, name: &str, fresh: bool) {
        let Some(seen) = self.observe(name).await else {
            return;
        };
        if !self.leader.is_leader() {
            // No pass of ours takes it: nothing is left behind.
            self.handoff.discard(name);
            return self.write(name, seen, fresh).await;
        }
        let offer = match fresh {
            true => self.handoff.offer(name, seen),
            false => self.handoff.periodic(name, seen),
        };
        if let Offer::Write(seen) = offer {
            self.write(name, seen, fresh).await;
        }
    }

    /// Until the cluster's first round trip is back (taken on admission):
    /// a probe that fails at once (no credentials) would otherwise report
    /// no RTT, and a later write would carry it alone.
    async fn first_rtt(&self, name: &str) {
        if let Some(session) = self.dialer.pick(name) {
            session.first_rtt(FIRST_RTT_WAIT).await;
        }
    }

    /// What the member and its sessions say now; None when nothing
    /// current can be said (no session, not served).
    async fn observe(&self, name: &str) -> Option<Left> {
        let dialer = &self.dialer;
        let session = dialer.pick(name)?;
        let cluster = self.store.get(&ObjectRef::new(name))?;
        if !cluster.is_served() {
            return None;
        }
        let probed = tokio::time::timeout(PROBE_TIMEOUT, probe(dialer, name))
            .await
            .unwrap_or(Err(ProbeError::Timeout(PROBE_TIMEOUT)));
        let (health, member) = match probed {
            Ok(p) => (Some(p.health), p.member),
            // The session went away while we asked: nothing to say of the member.
            Err(ProbeError::Reach(e)) if e.is_transient() => (None, Err(ProbeError::Reach(e))),
            // The tunnel is fine: the member's kube-apiserver is not.
            Err(e) => (Some(Health::DOWN), Err(e)),
        };
        let unread = member.as_ref().err().map(ToString::to_string);
        let sessions = dialer.registry().sessions(name);
        // Gone while we asked: nothing current to report.
        if sessions.is_empty() {
            return None;
        }
        let observed = Observed {
            member: member.ok(),
            health,
            agent_version: agent_versions(&sessions),
            platform: health::platforms(sessions.iter().map(|s| s.config().platform.as_str())),
            // The freshest session's: the one whose agent spoke last.
            rtt: sessions
                .iter()
                .max_by_key(|s| s.last_heartbeat())
                .and_then(Session::rtt),
            heartbeat: sessions
                .iter()
                .map(Session::last_heartbeat)
                .max()
                .unwrap_or_else(|| session.last_heartbeat()),
        };
        Some(Left { observed, unread })
    }

    /// Write what changed against the Cluster as it is now (from the API
    /// when `fresh`: the change that kicked us may not be cached yet).
    async fn write(&self, name: &str, seen: Left, fresh: bool) {
        let Some(cluster) = current(&self.client, &self.store, name, fresh).await else {
            return;
        };
        let current = cluster.status.clone().unwrap_or_default();
        let patch = seen.patch(name, &current, &cluster.spec.connection.kubeconfig);
        if patch.is_empty() {
            return;
        }
        let fields: Vec<String> = patch.keys().cloned().collect();
        let body = json!({ "status": patch });
        let written = super::crd::patch_status(&self.client, &self.status_path, name, &body).await;
        match written {
            Ok(_) => {
                tracing::debug!(cluster = %cluster.name_any(), ?fields, "member status updated")
            }
            Err(e) => tracing::warn!(cluster = %name, error = %e, "cannot write the member status"),
        }
    }
}
