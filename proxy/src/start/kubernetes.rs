//! The Cluster-resource workflow's start: the host cluster's client, the
//! proxy's identity from its Secret, HA (holder records, the peer port, the
//! leader election), the cluster ports, the controllers and the status
//! refresher, in that order; then the agents' port ([`super::agents`]).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use kube::runtime::reflector::ObjectRef;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agents::admission::Gate;
use crate::clusters::refusals::RefusalEvents;
use crate::clusters::{controller, events, reconcile, status};
use crate::config::HaConfig;
use crate::ha::leader::Leadership;
use crate::ha::owners::Owners;
use crate::ha::peers::Peers;
use crate::identity::host_keys::HostKeys;
use crate::identity::secret;
use crate::ops::metrics::Metrics;
use crate::people;
use crate::registration;
use crate::registration::admit::Registrar;
use crate::serve::aggregated;
use crate::serve::listener::Relay;
use crate::serve::ports::ListenerPorts;

use super::agents::{Background, serve_agents};
use super::{Core, host_key_from_file, hub_services};

/// The host cluster's client: `--kubeconfig`, else the pod's service account.
async fn client(
    kubeconfig: Option<(std::path::PathBuf, Box<kube::config::Kubeconfig>)>,
) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some((path, kubeconfig)) => {
            kube::Config::from_custom_kubeconfig(*kubeconfig, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {} is unusable", path.display()))?
        }
        None => kube::Config::incluster().context(
            "not running in a pod: give --kubeconfig for the host cluster, or --clusters-file to run without Kubernetes",
        )?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// The Cluster-resource workflow: identity from the Secret (or flags), HA,
/// the cluster ports, the controller, the status refresher.
pub(super) async fn with_kubernetes(
    mut core: Core,
    kubeconfig: Option<(std::path::PathBuf, Box<kube::config::Kubeconfig>)>,
) -> anyhow::Result<()> {
    let client = client(kubeconfig).await?;
    let config = &mut core.config;
    let namespace = config.clusters.namespace.clone();
    let flag_ca = config.ca.take();
    let identity = secret::load_or_create(client.clone(), &namespace, flag_ca.is_none())
        .await
        .with_context(|| format!("the proxy's Secret {namespace}/{}", secret::SECRET_NAME))?;
    // A --host-key file is not rotated through the Secret.
    let host_keys = match config.host_key_given {
        true => Arc::new(HostKeys::new(
            host_key_from_file(config)?,
            None,
            config.keepalive,
        )),
        false => {
            let keys = Arc::new(HostKeys::new(
                identity.host_key,
                identity.host_key_next.as_ref(),
                config.keepalive,
            ));
            // Runs as long as the process: it only reads the Secret.
            keys
        }
    };
    let ca_in_secret = flag_ca.is_none();
    let ca = Arc::new(
        flag_ca
            .or(identity.ca)
            .ok_or_else(|| anyhow::anyhow!("no CA: give --ca-cert and --ca-key"))?,
    );
    core.metrics.set_cert_expiry("", "ca", ca.not_after());
    // The signing CA's expiry in /metrics follows the rotation's switch.
    let (metrics, rotating) = (core.metrics.clone(), (*ca).clone());
    drop(tokio::spawn(async move {
        let mut steps = rotating.subscribe();
        while steps.changed().await.is_ok() {
            metrics.set_cert_expiry("", "ca", rotating.not_after());
        }
    }));
    // Runs as long as the process: it only reads the Secret and follows its
    // rotations (docs/ca-rotation.md).
    drop(tokio::spawn(crate::identity::watch::follow(
        client.clone(),
        namespace.clone(),
        (!core.config.host_key_given).then(|| host_keys.clone()),
        ca_in_secret.then(|| (*ca).clone()),
    )));

    let stop = CancellationToken::new();
    let ha = match &core.config.ha {
        Some(ha) => Some(start_ha(ha, &client, &ca, &namespace, &core, &stop).await?),
        None => None,
    };
    core.relay = ha.as_ref().map(|h| h.peers.clone() as Arc<dyn Relay>);
    let shared = core.shared();
    let ports = Arc::new(ListenerPorts::new(
        ca.clone(),
        core.config.bind,
        shared.clone(),
    ));
    let door_ca = ca.clone();
    let (kick, kicks) = status::Kick::new();
    let mut tasks = Vec::new();
    let mut ha_parts = None;
    if let Some(ha) = ha {
        tasks.push(tokio::spawn(ha.peers.clone().serve(
            ha.peer_listener,
            ports.clone(),
            stop.clone(),
        )));
        tasks.push(ha.leader_task);
        let registry = core.registry.clone();
        let live = move || registry.live_clusters();
        tasks.push(tokio::spawn(ha.owners.clone().run(live, stop.clone())));
        ha_parts = Some((
            reconcile::Ha {
                leader: ha.leader,
                owners: ha.owners.clone(),
                changes: ha.changes,
            },
            ha.owners,
        ));
    } else {
        // One replica: its Lease alone says it still serves its clusters.
        let (lease, _) = Owners::new(client.clone(), &namespace, &core.config.replica, "");
        tasks.push(tokio::spawn(lease.renew_only(stop.clone())));
    }
    let (ha, owners) = ha_parts.unzip();
    // The CSR signer writes as the leader, as the Cluster controller does.
    let leader = ha
        .as_ref()
        .map_or_else(Leadership::always, |h| h.leader.clone());
    tasks.push(tokio::spawn(show_leadership(
        leader.clone(),
        core.metrics.clone(),
        stop.clone(),
    )));
    // The kube-runtime controllers run as long as the serving does, and are
    // stopped before the runtime goes: a reconcile task the runtime's
    // shutdown cancels under a running controller panics in kube-runtime
    // (`JoinError::Cancelled` unwrapped; tests/faults.rs saw it on SIGTERM).
    // The CSR one only answers CertificateSigningRequests, the registration
    // one registration requests.
    let csr = people::csr::start(client.clone(), ca.clone(), leader.clone());
    let registrations = registration::controller::start(client.clone(), leader.clone());
    let running = controller::start(controller::Deps {
        client: client.clone(),
        registry: core.registry.clone(),
        ca,
        ports,
        options: core.config.clusters.clone(),
        ha,
        kick,
        metrics: core.metrics.clone(),
    });
    let refusals = RefusalEvents::new(events::recorder(client.clone()), running.store.clone());
    // Runs as long as the process: it only reads and writes status.
    drop(status::start(
        kicks,
        client.clone(),
        running.store.clone(),
        core.dialer.clone(),
        leader,
        core.config.clusters.status_update_frequency,
    ));
    if let Some(options) = &core.config.aggregated {
        let store = running.store.clone();
        let clusters: aggregated::handler::Lookup = Arc::new(move |name: &str| {
            let obj = store.get(&ObjectRef::new(name))?;
            let off = obj
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(aggregated::handler::IMPERSONATE_ANNOTATION))
                .is_some_and(|v| v.trim() == "false");
            Some(aggregated::handler::ClusterView { impersonate: !off })
        });
        aggregated::start(
            options,
            core.config.bind,
            client.clone(),
            &door_ca,
            shared.clone(),
            clusters,
            stop.clone(),
        )
        .await
        .with_context(|| {
            format!(
                "cannot serve the aggregated API on port {} (--aggregated-api-port)",
                options.port
            )
        })?;
    }
    let ready = Arc::new(AtomicBool::new(false));
    let mut synced = running.synced.clone();
    let marked = ready.clone();
    tokio::spawn(async move {
        if synced.wait_for(|s| *s).await.is_ok() {
            marked.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let gate = Gate::new(core.registry.clone(), running.clusters, hub_services(&core))
        .with_registrar(Arc::new(Registrar::new(client.clone())));
    let background = Background {
        owners,
        stop,
        tasks,
    };
    let mut clusters_task = running.task;
    let served = tokio::select! {
        served = serve_agents(
            &core,
            gate,
            host_keys,
            ready,
            Some(door_ca),
            Some(background),
            Some(Arc::new(refusals)),
        ) => served,
        _ = &mut clusters_task => anyhow::bail!("the Cluster controller stopped"),
    };
    for task in [clusters_task, csr, registrations] {
        task.abort();
        // Cancelled (or already ended): either way it is gone.
        let _ = task.await;
    }
    served
}

/// The HA pieces, started before the ports (which relay through `peers`).
struct HaStarted {
    owners: Arc<Owners>,
    changes: tokio::sync::mpsc::UnboundedReceiver<String>,
    peers: Arc<Peers>,
    peer_listener: TcpListener,
    leader: Leadership,
    leader_task: JoinHandle<()>,
}

/// `--leader-elect`: the holder records, the peer port, the leader election.
async fn start_ha(
    ha: &HaConfig,
    client: &kube::Client,
    ca: &crate::identity::ca::Ca,
    namespace: &str,
    core: &Core,
    stop: &CancellationToken,
) -> anyhow::Result<HaStarted> {
    let (owners, changes) = Owners::new(client.clone(), namespace, &ha.replica, &ha.peer_address);
    let peers = Arc::new(
        Peers::new(
            ca,
            owners.clone(),
            &ha.peer_address,
            core.client_pending.clone(),
        )
        .context("the peer port's certificate")?,
    );
    let peer_bind = std::net::SocketAddr::new(core.config.bind, ha.peer_port);
    let peer_listener = TcpListener::bind(peer_bind)
        .await
        .with_context(|| format!("cannot listen on the peer port {peer_bind} (--peer-port)"))?;
    tracing::info!(replica = %ha.replica, addr = %peer_listener.local_addr()?,
        peer_address = %ha.peer_address, "peer port listening");
    let (leader, leader_task) = Leadership::elect(
        client.clone(),
        namespace,
        &ha.replica,
        ha.lease_duration,
        stop.clone(),
    )
    .await
    .context("leader election (Lease tower)")?;
    Ok(HaStarted {
        owners,
        changes,
        peers,
        peer_listener,
        leader,
        leader_task,
    })
}

/// Keeps `tower_leader` equal to this replica's leadership, for the "no
/// leader" alert.
async fn show_leadership(mut leader: Leadership, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        metrics.leader.set(i64::from(leader.is_leader()));
        tokio::select! {
            () = stop.cancelled() => break,
            _ = leader.changed() => {}
        }
    }
    metrics.leader.set(0);
}
