//! Start, serve, stop: the proxy's parts built in dependency order, then
//! served until SIGTERM, then drained.
//!
//! Build order (nothing is filled in later): metrics, the audit log and the
//! session registry; the member dialer over the registry; with Kubernetes, the
//! proxy's identity, the HA pieces (replica records, the peer port, the
//! leader election), the cluster ports over the dialer, the CSR signer, the
//! registration controller, the Cluster controller over the ports, the status
//! refresher; last the admission gate (registry + the controller's view of the
//! Clusters + the registrar), the doors that ask
//! it which clusters exist (CONNECT, the access port) and the agents' port.
//!
//! Shutdown: the agents' port closes, readiness turns false, agents are asked
//! to move to another replica and in-flight requests get `--shutdown-grace`
//! to finish, then the remaining tunnels are closed with a reason and the
//! background tasks are stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use kube::runtime::reflector::ObjectRef;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agents::admission::Gate;
use crate::agents::drain::drain;
use crate::agents::endpoint::{self, Endpoint};
use crate::agents::hub::HubServices;
use crate::agents::registry::Registry;
use crate::agents::store::ClusterStore;
use crate::clusters::refusals::RefusalEvents;
use crate::clusters::{controller, events, reconcile, status};
use crate::config::{Config, HaConfig, Mode};
use crate::ha::leader::Leadership;
use crate::ha::owners::Owners;
use crate::ha::peers::Peers;
use crate::identity::ca::Ca;
use crate::identity::host_keys::HostKeys;
use crate::identity::secret;
use crate::member::MemberDialer;
use crate::ops::audit::Audit;
use crate::ops::handshakes::Runner;
use crate::ops::in_flight::InFlight;
use crate::ops::metrics::Metrics;
use crate::ops::pending::Pending;
use crate::ops::signals;
use crate::people;
use crate::registration;
use crate::registration::admit::Registrar;
use crate::serve::access::Access;
use crate::serve::aggregated;
use crate::serve::connect::{Door, Doors, TargetRefusals};
use crate::serve::listener::{Relay, Shared};
use crate::serve::ports::ListenerPorts;

/// What every mode shares.
struct Core {
    config: Config,
    registry: Registry,
    dialer: MemberDialer,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    audit: Audit,
    /// HA: the replicas that hold other clusters' agents.
    relay: Option<Arc<dyn Relay>>,
    /// The caps on clients' TLS handshakes in progress (every HTTPS door).
    client_pending: Arc<Pending>,
}

impl Core {
    /// What the doors that forward HTTP to members share.
    fn shared(&self) -> Shared {
        Shared {
            dialer: self.dialer.clone(),
            relay: self.relay.clone(),
            in_flight: self.in_flight.clone(),
            metrics: self.metrics.clone(),
            audit: self.audit.clone(),
            pending: self.client_pending.clone(),
        }
    }
}

/// Run the proxy until SIGTERM or SIGINT, then drain.
pub async fn run(mut config: Config, handshakes: Runner) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(metrics.clone());
    let dialer = MemberDialer::new(registry.clone());
    let mode = std::mem::replace(&mut config.mode, Mode::Kubernetes { kubeconfig: None });
    // Lines are flushed as they are written; at exit what is queued is
    // written before the process ends (`finish_audit`).
    let (audit, audit_writer) = match config.audit_log.take() {
        Some(output) => {
            let (audit, writer) = Audit::start(output, metrics.clone());
            (audit, Some(writer))
        }
        None => (Audit::Off, None),
    };
    let client_pending = Pending::running_on(handshakes, config.pending, metrics.clone());
    let core = Core {
        client_pending,
        config,
        registry,
        dialer,
        in_flight: InFlight::default(),
        metrics,
        audit,
        relay: None,
    };
    let audit = core.audit.clone();
    let served = serve_mode(core, mode).await;
    finish_audit(&audit, audit_writer).await;
    served
}

/// Write the audit records still queued, for at most a few seconds.
async fn finish_audit(audit: &Audit, writer: Option<tokio::task::JoinHandle<()>>) {
    audit.close();
    if let Some(writer) = writer
        && tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .is_err()
    {
        tracing::warn!("the audit log's last records were not written within 5s");
    }
}

async fn serve_mode(core: Core, mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::File(store) => {
            let mut core = core;
            let host_key = host_key_from_file(&core.config)?;
            let host_keys = Arc::new(HostKeys::new(host_key, None, core.config.keepalive));
            let gate = Gate::new(core.registry.clone(), Arc::new(store), hub_services(&core));
            let ready = Arc::new(AtomicBool::new(true));
            let ca = core.config.ca.take().map(Arc::new);
            serve_agents(&core, gate, host_keys, ready, ca, None, None).await
        }
        Mode::Kubernetes { kubeconfig } => with_kubernetes(core, kubeconfig).await,
    }
}

/// `--hub-service`, logged once: what agents may reach on this side.
fn hub_services(core: &Core) -> HubServices {
    for (service, addr) in &core.config.hub_services {
        tracing::info!(%service, %addr, "publishing hub service");
    }
    HubServices::new(
        core.config.hub_services.clone(),
        core.metrics.clone(),
        core.audit.clone(),
    )
}

fn host_key_from_file(config: &Config) -> anyhow::Result<russh::keys::PrivateKey> {
    tunnel::ssh::load_or_create_host_key(&config.host_key)
        .context("set --host-key to a writable path, or --data-dir to a writable directory")
}

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
async fn with_kubernetes(
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

/// Tasks stopped once this replica has drained.
struct Background {
    /// HA: this replica's holder records.
    owners: Option<Arc<Owners>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// The agents' port (and any --forward ports) until SIGTERM or SIGINT, then
/// the drain.
async fn serve_agents<S: ClusterStore>(
    core: &Core,
    gate: Gate<S>,
    host_keys: Arc<HostKeys>,
    ready: Arc<AtomicBool>,
    ca: Option<Arc<Ca>>,
    background: Option<Background>,
    report: Option<Arc<dyn TargetRefusals>>,
) -> anyhow::Result<()> {
    let config = &core.config;
    tracing::info!(
        fingerprint = %host_keys.fingerprint(),
        "SSH host key (agents pin it with --proxy-host-key-fingerprint)"
    );
    if let Some(url) = &config.publish_url {
        tracing::info!(proxy_server = %url, "agents dial this proxy with --proxy-server {url}");
    }
    let endpoint = Arc::new(Endpoint {
        gate: Arc::new(gate),
        metrics: core.metrics.clone(),
        ssh: host_keys.clone(),
        ready,
        pending: Pending::new(config.pending, core.metrics.clone()),
    });
    let ports_stop = CancellationToken::new();
    tokio::spawn(crate::ops::trim::run(ports_stop.clone()));
    tokio::spawn(crate::agents::announce::run(
        core.registry.clone(),
        host_keys,
        ports_stop.clone(),
    ));
    for (cluster, addr) in &config.forwards {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --forward {cluster}={addr}"))?;
        tracing::info!(%cluster, addr = %listener.local_addr()?, "forward listening");
        tokio::spawn(crate::serve::forward::run(
            listener,
            cluster.clone(),
            core.dialer.clone(),
            core.audit.clone(),
            ports_stop.clone(),
        ));
    }
    if config.connect_port.is_some() || config.connect_socket_dir.is_some() {
        let gate = endpoint.gate.clone();
        let door = Arc::new(Door {
            dialer: core.dialer.clone(),
            known: Arc::new(move |cluster: &str| gate.knows(cluster)),
            metrics: core.metrics.clone(),
            in_flight: core.in_flight.clone(),
            report,
            audit: core.audit.clone(),
            handshakes: core.client_pending.clone(),
        });
        let doors = Doors {
            port: config.connect_port,
            socket_dir: config.connect_socket_dir.clone(),
            bind: config.bind,
            advertise_address: config.clusters.advertise_address.clone(),
        };
        door.open(doors, ca.as_ref(), core.registry.clone(), &ports_stop)
            .await?;
    }
    if let Some(options) = &config.access {
        let gate = endpoint.gate.clone();
        let shared = core.shared();
        let known = Arc::new(move |cluster: &str| gate.knows(cluster));
        Arc::new(Access::new(shared, known, &ports_stop))
            .open(options, config.bind, ca.as_ref(), &ports_stop)
            .await?;
    }
    let addr = std::net::SocketAddr::new(config.bind, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--host, --port)"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening for agents");
    let agents = tokio::spawn(endpoint::run(
        listener,
        endpoint.clone(),
        ports_stop.clone(),
    ));
    signals::terminated().await;
    // No new agents from here on: the port closes with its accept loop.
    ports_stop.cancel();
    let _ = agents.await;
    endpoint.ready.store(false, Ordering::Relaxed);
    let owners = background.as_ref().and_then(|b| b.owners.clone());
    if let Some(owners) = &owners {
        owners.set_draining().await;
    }
    let moved = |cluster: &str| owners.as_ref().is_none_or(|o| o.owner(cluster).is_some());
    drain(
        &core.registry,
        &core.in_flight,
        config.shutdown_grace,
        moved,
    )
    .await;
    // Agents hear why and reconnect at once (to another replica, if any)
    // instead of waiting for their keepalive to notice a dead socket.
    tracing::info!("shutting down: closing agent sessions");
    core.registry
        .close_all("the proxy is shutting down, reconnect")
        .await;
    if let Some(background) = background {
        background.stop.cancel();
        let finished = futures_util::future::join_all(background.tasks);
        if tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .is_err()
        {
            tracing::warn!("background tasks not done within 5 s; leases expire by themselves");
        }
    }
    Ok(())
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
