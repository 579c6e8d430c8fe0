//! Which replica serves which cluster, when several proxy replicas run
//! (`--leader-elect`).
//!
//! Agents connect to any replica. Each replica keeps a Lease
//! `tower-replica-<id>` renewed (its heartbeat), with its peer address and
//! whether it is draining in annotations. While it has a live session of a
//! cluster it records itself as the holder of the Lease `tower-cluster-<name>`;
//! that Lease is written only when its holder changes, so steady state costs
//! one write per replica per [`RENEW`], not one per cluster. A claim is
//! written at once (the others relay to the holder); a release waits
//! [`RELEASE_GRACE`] without a session, so an agent that reconnects in a loop
//! costs one claim, not a claim and a release per session. A holder counts
//! while its replica Lease is fresh; a replica that has a session takes over a
//! cluster whose holder died or is draining.
//!
//! Every replica watches these Leases: a client connection for a cluster this
//! replica has no session of is relayed to the holder ([`super::peers`]), and
//! the leader counts the cluster as available while it has a live holder.
//! Freshness compares the Lease's renewTime with this replica's clock, so the
//! replicas' clocks must agree to within a few seconds (as for Kubernetes'
//! own leader election).
//!
//! Without `--leader-elect` the proxy keeps only its own `tower-replica-<id>`
//! Lease ([`Owners::renew_only`]): the Cluster status has no periodic
//! heartbeat, so that Lease is what says the proxy still maintains it
//! (docs/health.md).
//!
//! `records.rs` writes this replica's Leases; `view.rs` keeps the view of
//! everyone's from the watch; this file holds the state and runs both.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::identity::names::{CLUSTER_LABEL, MANAGED_BY, MANAGER};

mod records;
mod view;

/// A replica's heartbeat Lease is renewed this often...
pub const RENEW: Duration = Duration::from_secs(5);
/// ...and counts as dead this long after its last renewal.
pub const REPLICA_LEASE: Duration = Duration::from_secs(15);
/// How long this replica keeps holding a cluster it has no session of
/// before it releases the Lease: the interval a cluster's session changes
/// are damped by (`crate::clusters::damp::INTERVAL`). Meanwhile the other
/// replicas still relay that cluster's clients here.
pub const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// `replica` or `cluster`.
const ROLE_LABEL: &str = "tower.kubesphere.io/lease";
pub const PEER_ANNOTATION: &str = "tower.kubesphere.io/peer-address";
pub const DRAINING_ANNOTATION: &str = "tower.kubesphere.io/draining";

/// The Lease recording who serves `cluster`. Lease names have the same rules
/// as Cluster names; a name too long for the prefix is cut and made unique
/// with a hash.
pub fn cluster_lease_name(cluster: &str) -> String {
    const PREFIX: &str = "tower-cluster-";
    let name = format!("{PREFIX}{cluster}");
    if name.len() <= 253 {
        return name;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cluster.hash(&mut h);
    let head: String = cluster.chars().take(200).collect();
    format!("{PREFIX}{head}-{:016x}", h.finish())
}

fn replica_lease_name(replica: &str) -> String {
    format!("tower-replica-{replica}")
}

/// The replica serving a cluster, as another replica sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub replica: String,
    pub peer_address: String,
    pub draining: bool,
}

#[derive(Clone, Debug)]
struct Replica {
    peer_address: String,
    draining: bool,
    renewed: Option<Timestamp>,
    duration: Duration,
}

impl Replica {
    fn alive(&self, now: Timestamp) -> bool {
        self.renewed.is_some_and(|t| {
            let age = now.duration_since(t);
            age.as_secs_f64() < self.duration.as_secs_f64()
        })
    }
}

#[derive(Default)]
struct State {
    replicas: HashMap<String, Replica>,
    /// cluster -> holder replica (only Leases with a holder).
    holders: HashMap<String, String>,
    /// Replicas alive at the last check, to notice deaths (no event for those).
    alive: HashSet<String>,
    /// Clusters this replica holds without a session here, since when.
    gone: HashMap<String, tokio::time::Instant>,
}

/// Of the clusters this replica holds (`held`), those to release now: the
/// ones without a session here (`live`) for [`RELEASE_GRACE`], all of them
/// when `draining`. `gone` remembers since when each has had none; returns
/// also when the next one falls due.
fn due_releases(
    held: &[String],
    live: &[String],
    gone: &mut HashMap<String, tokio::time::Instant>,
    now: tokio::time::Instant,
    draining: bool,
) -> (Vec<String>, Option<tokio::time::Instant>) {
    // Sets, not slices: a replica may hold thousands of clusters.
    let live: HashSet<&str> = live.iter().map(String::as_str).collect();
    let without: HashSet<&str> = held
        .iter()
        .map(String::as_str)
        .filter(|c| !live.contains(c))
        .collect();
    gone.retain(|c, _| without.contains(c.as_str()));
    let mut due = Vec::new();
    let mut next = None::<tokio::time::Instant>;
    for cluster in held.iter().filter(|c| without.contains(c.as_str())) {
        let since = *gone.entry(cluster.clone()).or_insert(now);
        let at = since + RELEASE_GRACE;
        if draining || at <= now {
            due.push(cluster.clone());
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    (due, next)
}

impl State {
    /// The clusters `replica` holds.
    fn held_by(&self, replica: &str) -> Vec<String> {
        self.holders
            .iter()
            .filter(|(_, h)| *h == replica)
            .map(|(c, _)| c.clone())
            .collect()
    }
}

/// This replica's view of who serves what; see the module docs.
pub struct Owners {
    api: Api<Lease>,
    me: String,
    peer_address: String,
    state: Mutex<State>,
    draining: AtomicBool,
    /// Sessions changed here: claim or release now.
    wake: Notify,
    /// Clusters whose availability may have changed (for the leader).
    changes: mpsc::UnboundedSender<String>,
}

impl Owners {
    /// `me` is this replica's id (its pod name), `peer_address` where other
    /// replicas reach its peer port. The receiver yields names of clusters
    /// whose holder changed.
    pub fn new(
        client: Client,
        namespace: &str,
        me: &str,
        peer_address: &str,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (changes, rx) = mpsc::unbounded_channel();
        let owners = Arc::new(Self {
            api: Api::namespaced(client, namespace),
            me: me.to_string(),
            peer_address: peer_address.to_string(),
            state: Mutex::default(),
            draining: AtomicBool::new(false),
            wake: Notify::new(),
            changes,
        });
        (owners, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Another live replica recorded as serving `cluster`, if any.
    pub fn owner(&self, cluster: &str) -> Option<Owner> {
        let state = self.lock();
        let holder = state.holders.get(cluster)?;
        if *holder == self.me {
            return None;
        }
        let replica = state.replicas.get(holder)?;
        replica.alive(Timestamp::now()).then(|| Owner {
            replica: holder.clone(),
            peer_address: replica.peer_address.clone(),
            draining: replica.draining,
        })
    }

    /// Where a new client connection for `cluster` should go: `None` to serve
    /// it here. A draining replica sends clients on to the replica its agents
    /// moved to.
    pub fn relay_target(&self, cluster: &str, local_sessions: usize) -> Option<String> {
        let draining = self.draining.load(Ordering::Relaxed);
        if local_sessions > 0 && !draining {
            return None;
        }
        let owner = self.owner(cluster)?;
        if local_sessions > 0 && owner.draining {
            return None;
        }
        Some(owner.peer_address)
    }

    /// Sessions were added or ended here.
    pub fn sessions_changed(&self) {
        self.wake.notify_one();
    }

    /// This replica is shutting down: tell the others now.
    pub async fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        if let Err(e) = self.heartbeat().await {
            tracing::warn!(error = %e, "could not mark this replica as draining");
        }
        self.wake.notify_one();
    }

    /// Keep the view current and this replica's records written until `stop`,
    /// then release what this replica holds. `live` lists the clusters with a
    /// live session here.
    pub async fn run(
        self: Arc<Self>,
        live: impl Fn() -> Vec<String> + Send + 'static,
        stop: CancellationToken,
    ) {
        let watch = {
            let owners = self.clone();
            let config = watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGER}"));
            let api = self.api.clone();
            async move {
                let mut events = watcher(api, config).boxed();
                let mut seen = Vec::new();
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::Apply(l)) => owners.apply(&l),
                        Ok(watcher::Event::Delete(l)) => owners.forget(&l),
                        Ok(watcher::Event::Init) => seen.clear(),
                        Ok(watcher::Event::InitApply(l)) => seen.push(l),
                        Ok(watcher::Event::InitDone) => {
                            {
                                let mut state = owners.lock();
                                state.replicas.clear();
                                state.holders.clear();
                            }
                            for l in seen.drain(..) {
                                owners.apply(&l);
                            }
                            owners.wake.notify_one();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watching leases failed, retrying");
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                    }
                }
            }
        };
        let watch = tokio::spawn(watch);
        let mut tick = tokio::time::interval(RENEW);
        // When the next held-back release falls due.
        let mut next_release = None;
        loop {
            let release_due = async {
                match next_release {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.heartbeat().await {
                        tracing::warn!(error = %e, "could not renew this replica's lease");
                    }
                    self.check_deaths();
                }
                () = self.wake.notified() => {}
                () = release_due => {}
            }
            next_release = self.sync(&live()).await;
        }
        watch.abort();
        self.release_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_stay_valid() {
        assert_eq!(cluster_lease_name("alpha"), "tower-cluster-alpha");
        let long = "a".repeat(250);
        let name = cluster_lease_name(&long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(name, cluster_lease_name(&"a".repeat(251)));
    }

    #[test]
    fn a_release_waits_out_the_grace_unless_draining() {
        let t0 = tokio::time::Instant::now();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (held, mut gone) = (names(&["a", "b"]), HashMap::new());
        // b's session ended: held back, due after the grace.
        let (due, next) = due_releases(&held, &names(&["a"]), &mut gone, t0, false);
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + RELEASE_GRACE));
        // b is back within the grace (an agent reconnecting): nothing to do,
        // and its clock starts again when it goes next.
        let back = t0 + RELEASE_GRACE / 2;
        let (due, next) = due_releases(&held, &names(&["a", "b"]), &mut gone, back, false);
        assert!(due.is_empty() && next.is_none() && gone.is_empty());
        let again = t0 + RELEASE_GRACE;
        let (due, _) = due_releases(&held, &names(&["a"]), &mut gone, again, false);
        assert!(due.is_empty());
        // Gone for the whole grace: released.
        let later = again + RELEASE_GRACE;
        let (due, next) = due_releases(&held, &names(&["a"]), &mut gone, later, false);
        assert_eq!((due, next), (names(&["b"]), None));
        // Draining: at once.
        let mut gone = HashMap::new();
        let (due, _) = due_releases(&held, &[], &mut gone, t0, true);
        assert_eq!(due.len(), 2);
    }

    #[test]
    fn replicas_expire() {
        let now = Timestamp::now();
        let r = Replica {
            peer_address: String::new(),
            draining: false,
            renewed: Some(now),
            duration: Duration::from_secs(15),
        };
        assert!(r.alive(now));
        let later = now + Duration::from_secs(16);
        assert!(!r.alive(later));
        assert!(!Replica { renewed: None, ..r }.alive(now));
    }
}
