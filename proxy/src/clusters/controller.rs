//! The controller: kube-rs's `Controller` over Cluster resources (and the
//! `mc-<name>` Services, mapped to their Cluster by label), woken also by
//! session changes, by other replicas' holder changes and by a new leader;
//! each wake-up runs [`super::reconcile::reconcile`]. Its watch of the
//! Clusters also tells [`forget_deleted`] which ones are gone, whose sessions
//! and ports it closes (the controller never sees deletions).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use super::crd::Cluster;
use super::damp::Damper;
use super::reconcile::{Context, Ha, error_policy, reconcile};
use super::status::Kick;
use super::store::{CrStore, Names};
use super::{Options, Ports};
use crate::agents::registry::Registry;
use crate::ha::leader::Leadership;
use crate::identity::ca::Ca;
use crate::identity::names::{CLUSTER_LABEL, MANAGED_BY, MANAGER};
use crate::ops::metrics::Metrics;

/// Passes running at once. Unbounded, 10,000 Clusters at start meant 10,000
/// passes, each with its own HTTP/1.1 connection (and TLS handshake) to the
/// kube-apiserver, which then queued or refused most of them (priority and
/// fairness): the proxy's memory grew and few clusters got through. The API
/// round trips bound a pass, so a few dozen keep the kube-apiserver busy.
const PASSES: u16 = 32;

/// What [`forget_deleted`] learns from the controller's watch of Clusters.
enum Seen {
    /// A re-list begins.
    Relist,
    /// A Cluster of the re-list.
    Listed(String),
    /// The re-list is complete.
    ListDone,
    Deleted(String),
}

impl Seen {
    fn of(event: &watcher::Event<Cluster>) -> Option<Seen> {
        Some(match event {
            watcher::Event::Init => Seen::Relist,
            watcher::Event::InitApply(c) => Seen::Listed(c.name_any()),
            watcher::Event::InitDone => Seen::ListDone,
            watcher::Event::Delete(c) => Seen::Deleted(c.name_any()),
            watcher::Event::Apply(_) => return None,
        })
    }
}

/// Close the sessions and ports of Clusters that disappear. The controller
/// never sees deletions (it reconciles objects that exist), so this follows
/// its watch; after a re-list it also sweeps clusters deleted meanwhile.
/// (It had a watch of its own: every Cluster sent twice by the kube-apiserver
/// and decoded twice here, 20,000 objects at the start of 10,000 clusters.)
async fn forget_deleted<P: Ports>(
    mut seen: mpsc::UnboundedReceiver<Seen>,
    registry: Registry,
    ports: Arc<P>,
) {
    let mut listed = HashSet::new();
    let forget = |name: String| {
        let registry = registry.clone();
        let ports = ports.clone();
        async move {
            registry
                .revoke(&name, None, "the cluster was deleted")
                .await;
            ports.close(&name).await;
        }
    };
    while let Some(event) = seen.recv().await {
        match event {
            Seen::Deleted(name) => {
                tracing::info!(cluster = %name, "cluster deleted: closing its sessions and ports");
                forget(name).await;
            }
            Seen::Relist => listed.clear(),
            Seen::Listed(name) => _ = listed.insert(name),
            Seen::ListDone => {
                for name in registry.clusters() {
                    if !listed.contains(&name) {
                        forget(name).await;
                    }
                }
            }
        }
    }
}

/// What the workflow needs from the rest of the proxy, built before it.
pub struct Deps<P> {
    pub client: Client,
    pub registry: Registry,
    pub ca: Arc<Ca>,
    pub ports: Arc<P>,
    pub options: Options,
    pub ha: Option<Ha>,
    pub kick: Kick,
    pub metrics: Arc<Metrics>,
}

/// The running controller.
pub struct Running<P> {
    /// The registry's view of the Clusters: admit agents with it.
    pub clusters: Arc<CrStore<P>>,
    /// The controller's cache of Clusters.
    pub store: Store<Cluster>,
    /// True once that cache has synced.
    pub synced: tokio::sync::watch::Receiver<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Start the controller.
pub fn start<P: Ports>(deps: Deps<P>) -> Running<P> {
    let Deps {
        client,
        registry,
        ca,
        ports,
        options,
        ha,
        kick,
        metrics,
    } = deps;
    let api: Api<Cluster> = Api::all(client.clone());
    let services: Api<Service> = Api::namespaced(client.clone(), &options.namespace);
    // `owns` would map a Service to a *namespaced* ref of its cluster-scoped
    // owner, a second queue key racing the Cluster's own; map by label instead.
    // One watch of the Clusters feeds the controller's cache, its passes and
    // [`forget_deleted`].
    let (store, writer) = reflector::store();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let clusters_watch = reflector(writer, watcher(api, watcher::Config::default()))
        .inspect(move |event| match event {
            Ok(event) => {
                if let Some(seen) = Seen::of(event) {
                    _ = seen_tx.send(seen);
                }
            }
            // The controller retries with its backoff; the deletions' own
            // watch said so, and a host outage should still show here.
            Err(e) => tracing::warn!(error = %e, "watching clusters failed, retrying"),
        })
        .applied_objects();
    let controller = Controller::for_stream(clusters_watch, store.clone())
        .with_config(ControllerConfig::default().concurrency(PASSES))
        .watches(
            services,
            watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGER}")),
            |svc: Service| {
                let name = svc.labels().get(CLUSTER_LABEL)?;
                Some(ObjectRef::new(name))
            },
        );
    let synced = super::readiness::watch_sync(store.clone());
    let (trigger, triggers) = mpsc::unbounded_channel();
    let recorder = super::events::recorder(client.clone());
    let names = Names::default();
    let owners = ha.as_ref().map(|h| h.owners.clone());
    let handoff = kick.handoff().clone();
    let status_path = kick.status_path().clone();
    let clusters = Arc::new(CrStore {
        store: store.clone(),
        names: names.clone(),
        recorder: recorder.clone(),
        trigger,
        ports: ports.clone(),
        options: options.clone(),
        owners: owners.clone(),
        kick,
        damper: Arc::default(),
        synced: synced.clone(),
    });
    let ctx = Arc::new(Context {
        client,
        store: store.clone(),
        registry: registry.clone(),
        ca,
        ports: ports.clone(),
        options,
        recorder,
        names,
        reserved: Mutex::default(),
        written: Mutex::default(),
        services_left: Default::default(),
        leading_since: Mutex::default(),
        handoff,
        status_path,
        leader: ha
            .as_ref()
            .map_or_else(Leadership::always, |h| h.leader.clone()),
        owners,
        metrics,
    });
    let deletions = tokio::spawn(forget_deleted(seen_rx, registry, ports));
    // A CA rotation step: every cluster's certificates and kubeconfig again.
    let rotations = futures_util::stream::unfold(ctx.ca.subscribe(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let task = tokio::spawn(async move {
        let controller = controller
            .reconcile_on(stream_of(triggers))
            .reconcile_all_on(rotations);
        let controller = match ha {
            Some(Ha {
                leader, changes, ..
            }) => {
                // Another replica's agent came or went: the leader re-counts,
                // damped as this replica's own sessions' changes are.
                let changes = stream_of(damped(changes)).map(|c| ObjectRef::new(&c));
                // A new leader makes its first pass over every cluster.
                let elected = futures_util::stream::unfold(leader, |mut leader| async move {
                    loop {
                        if leader.changed().await {
                            return Some(((), leader));
                        }
                    }
                });
                controller.reconcile_on(changes).reconcile_all_on(elected)
            }
            None => controller,
        };
        controller
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {})
            .await;
        deletions.abort();
    });
    Running {
        clusters,
        store,
        synced,
        task,
    }
}

/// `changes`, each cluster's passed on at once, then at most once a
/// [`super::damp::INTERVAL`] while they go on, the last always.
fn damped(mut changes: mpsc::UnboundedReceiver<String>) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let damper = Arc::new(Damper::default());
    tokio::spawn(async move {
        while let Some(cluster) = changes.recv().await {
            let tx = tx.clone();
            damper.follow(&cluster.clone(), move || _ = tx.send(cluster));
        }
    });
    rx
}

fn stream_of<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clusters::damp::INTERVAL;

    #[tokio::test(start_paused = true)]
    async fn another_replicas_changes_are_damped_per_cluster() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut passes = damped(rx);
        let start = tokio::time::Instant::now();
        for cluster in ["alpha", "alpha", "alpha", "beta"] {
            tx.send(cluster.to_string()).unwrap();
        }
        assert_eq!(passes.recv().await.as_deref(), Some("alpha"));
        assert_eq!(passes.recv().await.as_deref(), Some("beta"));
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);
        // alpha's two more: one pass, when the interval ends.
        assert_eq!(passes.recv().await.as_deref(), Some("alpha"));
        assert_eq!(start.elapsed(), INTERVAL);
        drop(tx);
        assert_eq!(passes.recv().await, None, "nothing more");
    }
}
