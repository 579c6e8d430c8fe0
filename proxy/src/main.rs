//! `proxy`: runs in the host cluster. Agents dial in over websocket + SSH; the
//! proxy authenticates each by its cluster's token and opens `kubesphere`
//! channels back through the tunnel to reach the member's API servers.
//!
//! Layout: [`agents`] is the agents' HTTP port, [`registry`] knows who is
//! connected, [`controller`] runs Tower's workflow on `Cluster` resources
//! ([`crd`]), [`ports`] and [`listener`] serve each connected cluster over
//! HTTPS with certificates from [`ca`], [`secret`] keeps the proxy's identity in
//! the host cluster, [`forward`] is a raw TCP port per cluster. The SSH and
//! websocket details live in the shared `tunnel` crate.
//!
//! Two modes: with `--clusters-file` the proxy needs no Kubernetes (tokens come
//! from the file; for tests and debugging); otherwise it watches Cluster
//! resources through `--kubeconfig` or its in-cluster service account.

mod agents;
mod ca;
mod controller;
mod crd;
mod forward;
mod leader;
mod listener;
mod member_info;
mod metrics;
mod owners;
mod peers;
mod ports;
mod readiness;
mod registry;
mod secret;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::TcpListener;

use registry::{Registry, StaticClusters};

/// Tower proxy: accepts agents of member clusters and proxies to them.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Flags {
    /// Address to listen on for agents.
    #[arg(long, default_value = "0.0.0.0")]
    host: String,
    /// Port to listen on for agents (websocket), /health and /version.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// CA certificate that signs per-cluster listener and client certificates.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert.
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Kubeconfig of the host cluster (empty: in-cluster config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Address agents use to reach this proxy (shown in agent manifests).
    #[arg(long)]
    publish_service_address: Option<String>,
    /// Run as one of several replicas: a leader (Lease <namespace>/tower)
    /// writes to the host cluster, every replica serves agents and clients,
    /// and relays clients to the replica that has their cluster's agent.
    #[arg(long, default_value_t = false)]
    leader_elect: bool,
    /// How long the leader's Lease lasts without renewal (renewed halfway).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    /// This replica's name among replicas (default: the pod's name).
    #[arg(long, env = "POD_NAME")]
    replica_id: Option<String>,
    /// Port other replicas relay clients through (mutual TLS), with --leader-elect.
    #[arg(long, default_value_t = 8443)]
    peer_port: u16,
    /// HOST:PORT other replicas reach this one at (default: $POD_IP:--peer-port).
    #[arg(long)]
    peer_address: Option<String>,
    /// On SIGTERM: how long agents and running requests get to move to
    /// another replica before the last tunnels are closed.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// OpenSSH private key for the SSH host key; created on first start.
    /// Default: <data-dir>/ssh_host_ed25519_key.
    #[arg(long)]
    host_key: Option<PathBuf>,
    /// Directory for state kept across restarts (the SSH host key).
    #[arg(long, default_value = "/var/lib/tower")]
    data_dir: PathBuf,
    /// How often the proxy pings each agent; a session is dropped after 3
    /// periods without a word from its agent.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    keepalive: Duration,
    /// Endpoints and kubeconfigs point at https://HOST:<cluster port> instead of
    /// the mc-<name> Service's ClusterIP (a proxy running outside the cluster).
    #[arg(long)]
    advertise_address: Option<String>,
    /// Namespace of the mc-<name> Services and of the proxy's Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubesphere-system")]
    namespace: String,
    /// Ports for the clusters' kube API listeners, FIRST-LAST; the ks-apiserver
    /// port of each is 10000 higher.
    #[arg(long, default_value = "16000-16999", value_parser = parse_port_range)]
    cluster_ports: std::ops::Range<u16>,
    /// Labels of the proxy's pods, selected by the mc-<name> Services.
    #[arg(long, default_value = "app=tower")]
    service_selector: String,
    /// JSON file mapping cluster names to agent tokens, e.g. {"alpha": "<token>"}:
    /// run without Kubernetes (no Cluster resources, no per-cluster listeners).
    #[arg(long)]
    clusters_file: Option<PathBuf>,
    /// Raw TCP port to a cluster's kube-apiserver through its tunnel: NAME=ADDR
    /// (repeatable). For debugging and measurements.
    #[arg(long = "forward", value_parser = parse_forward)]
    forwards: Vec<(String, SocketAddr)>,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 2m or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} is not a duration like 30s, 2m or 500ms")),
    }
    .and_then(|d| {
        if d.is_zero() {
            Err("duration must be > 0".to_string())
        } else {
            Ok(d)
        }
    })
}

fn parse_port_range(s: &str) -> Result<std::ops::Range<u16>, String> {
    let bad = || format!("{s:?} is not a port range like 16000-16999");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if a == 0 || b < a || b > 55535 {
        return Err(format!(
            "{s:?}: need 0 < FIRST <= LAST <= 55535 (the ks port adds 10000)"
        ));
    }
    Ok(a..b + 1)
}

fn parse_selector(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    s.split(',')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| {
                    anyhow::anyhow!("--service-selector {s:?}: expected KEY=VALUE[,KEY=VALUE]")
                })
        })
        .collect()
}

fn parse_forward(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=ADDR, e.g. alpha=127.0.0.1:7443"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in --forward is not an IP:PORT address"))?;
    Ok((name.to_string(), addr))
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,russh=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    init_logging(&flags.log_format);

    if flags.ca_cert.is_some() != flags.ca_key.is_some() {
        bail!("--ca-cert and --ca-key go together: give both or neither");
    }
    match flags.clusters_file.clone() {
        Some(path) => {
            let json = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read --clusters-file {}", path.display()))?;
            let store = StaticClusters::from_json(&json)
                .map_err(|e| anyhow::anyhow!("--clusters-file {}: {e}", path.display()))?;
            let host_key = host_key_from_file(&flags)?;
            let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
            serve_agents(&flags, Registry::new(store), host_key, ready, None).await
        }
        None => run_with_kubernetes(flags).await,
    }
}

fn host_key_from_file(flags: &Flags) -> anyhow::Result<russh::keys::PrivateKey> {
    let key_path = flags
        .host_key
        .clone()
        .unwrap_or_else(|| flags.data_dir.join("ssh_host_ed25519_key"));
    tunnel::ssh::load_or_create_host_key(&key_path)
        .context("set --host-key to a writable path, or --data-dir to a writable directory")
}

/// The Cluster-resource workflow: identity from the Secret (or flags), the
/// controller, the per-cluster listeners.
async fn run_with_kubernetes(flags: Flags) -> anyhow::Result<()> {
    let config = match &flags.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {} is unusable", path.display()))?
        }
        None => kube::Config::incluster().context(
            "not running in a pod: give --kubeconfig for the host cluster, or --clusters-file to run without Kubernetes",
        )?,
    };
    let client = kube::Client::try_from(config).context("cannot build a Kubernetes client")?;

    let flag_ca = match (&flags.ca_cert, &flags.ca_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            Some(ca::Ca::load(&read(cert)?, &read(key)?).context("--ca-cert/--ca-key")?)
        }
        _ => None,
    };
    let identity = secret::load_or_create(client.clone(), &flags.namespace, flag_ca.is_none())
        .await
        .with_context(|| {
            format!(
                "the proxy's Secret {}/{}",
                flags.namespace,
                secret::SECRET_NAME
            )
        })?;
    let host_key = match flags.host_key {
        Some(_) => host_key_from_file(&flags)?,
        None => identity.host_key,
    };
    let ca = Arc::new(
        flag_ca
            .or(identity.ca)
            .ok_or_else(|| anyhow::anyhow!("no CA: give --ca-cert and --ca-key"))?,
    );

    metrics::METRICS.set_cert_expiry("", "ca", ca.not_after());
    let bind: std::net::IpAddr = flags
        .host
        .parse()
        .with_context(|| format!("--host {:?} must be an IP address", flags.host))?;
    let ports = Arc::new(ports::ListenerPorts::new(ca.clone(), bind));
    let stop = tokio_util::sync::CancellationToken::new();
    let (ha, ha_tasks) = if flags.leader_elect {
        let (ha, tasks) = start_ha(&flags, &client, &ca, &ports, bind, &stop).await?;
        (Some(ha), tasks)
    } else {
        (None, Vec::new())
    };
    let owners = ha.as_ref().map(|h: &controller::Ha| h.owners.clone());
    let options = controller::Options {
        namespace: flags.namespace.clone(),
        advertise_address: flags.advertise_address.clone(),
        selector: parse_selector(&flags.service_selector)?,
        ports: flags.cluster_ports.clone(),
        bind_host: flags.host.clone(),
    };
    let running = controller::start(client.clone(), ca, ports.clone(), options, ha);
    member_info::start(client, running.store.clone(), running.registry.clone());
    let _ = ports.registry.set(running.registry.clone());
    let ha = owners.map(|owners| {
        let registry = running.registry.clone();
        let live = move || {
            let mut clusters = registry.clusters();
            clusters.retain(|c| registry.live(c) > 0);
            clusters
        };
        let mut tasks = ha_tasks;
        tasks.push(tokio::spawn(owners.clone().run(live, stop.clone())));
        HaTasks {
            owners,
            stop: stop.clone(),
            tasks,
        }
    });
    let controller_task = running.task;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    spawn_ready(running.store, ready.clone());
    tokio::select! {
        served = serve_agents(&flags, running.registry, host_key, ready, ha) => served,
        _ = controller_task => anyhow::bail!("the Cluster controller stopped"),
    }
}

fn spawn_ready(
    store: kube::runtime::reflector::Store<crd::Cluster>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    tokio::spawn(readiness::mark_when_synced(store, ready));
}

/// The HA pieces, stopped once this replica has drained.
struct HaTasks {
    owners: Arc<owners::Owners>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `--leader-elect`: this replica's identity, the leader election, the
/// holder records and the peer port.
async fn start_ha(
    flags: &Flags,
    client: &kube::Client,
    ca: &Arc<ca::Ca>,
    ports: &Arc<ports::ListenerPorts>,
    bind: std::net::IpAddr,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<(controller::Ha, Vec<tokio::task::JoinHandle<()>>)> {
    let replica = match &flags.replica_id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .context("--leader-elect needs a replica name: set --replica-id or POD_NAME")?,
    };
    let peer_address = match &flags.peer_address {
        Some(a) => a.clone(),
        None => {
            let host = std::env::var("POD_IP")
                .ok()
                .filter(|ip| !ip.is_empty())
                .or_else(|| (!bind.is_unspecified()).then(|| bind.to_string()))
                .context("--leader-elect needs --peer-address (or POD_IP, or a specific --host)")?;
            controller::endpoint("tcp", &host, flags.peer_port)
                .trim_start_matches("tcp://")
                .to_string()
        }
    };
    let (owners, changes) =
        owners::Owners::new(client.clone(), &flags.namespace, &replica, &peer_address);
    let peers = Arc::new(
        peers::Peers::new(ca, owners.clone(), &peer_address)
            .context("the peer port's certificate")?,
    );
    let _ = ports.relay.set(peers.clone() as Arc<dyn listener::Relay>);
    let peer_bind = std::net::SocketAddr::new(bind, flags.peer_port);
    let peer_listener = TcpListener::bind(peer_bind)
        .await
        .with_context(|| format!("cannot listen on the peer port {peer_bind} (--peer-port)"))?;
    tracing::info!(replica = %replica, addr = %peer_listener.local_addr()?, %peer_address, "peer port listening");
    let peer_task = tokio::spawn(peers.serve(peer_listener, ports.clone(), stop.clone()));
    let (leader, leader_task) = leader::Leadership::elect(
        client.clone(),
        &flags.namespace,
        &replica,
        flags.leader_elect_lease_duration,
        stop.clone(),
    )
    .await
    .context("leader election (Lease tower)")?;
    Ok((
        controller::Ha {
            leader,
            owners,
            changes,
        },
        vec![peer_task, leader_task],
    ))
}

/// The agents' port (and any --forward ports) until SIGTERM or SIGINT.
async fn serve_agents<S: registry::ClusterStore>(
    flags: &Flags,
    registry: Registry<S>,
    host_key: russh::keys::PrivateKey,
    ready: Arc<std::sync::atomic::AtomicBool>,
    ha: Option<HaTasks>,
) -> anyhow::Result<()> {
    tracing::info!(
        fingerprint = %tunnel::ssh::fingerprint(host_key.public_key()),
        "SSH host key (agents pin it with --proxy-host-key-fingerprint)"
    );
    let endpoint = Arc::new(agents::Endpoint {
        registry: registry.clone(),
        ssh: Arc::new(tunnel::ssh::server_config(host_key, flags.keepalive)),
        ready,
    });
    for (cluster, addr) in &flags.forwards {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --forward {cluster}={addr}"))?;
        let bound = listener.local_addr()?;
        tracing::info!(%cluster, addr = %bound, "forward listening");
        tokio::spawn(forward::run(listener, cluster.clone(), registry.clone()));
    }
    let addr = format!("{}:{}", flags.host, flags.port);
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--host, --port)"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening for agents");
    agents::run(listener, endpoint.clone(), shutdown_signal()).await;
    // No new agents from here on (the port is closed).
    endpoint
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(ha) = &ha {
        ha.owners.set_draining().await;
    }
    let moved = |cluster: &str| {
        ha.as_ref()
            .is_none_or(|ha| ha.owners.owner(cluster).is_some())
    };
    drain(&registry, flags.shutdown_grace, moved).await;
    // Agents hear why and reconnect at once (to another replica, if any)
    // instead of waiting for their keepalive to notice a dead socket.
    tracing::info!("shutting down: closing agent sessions");
    registry
        .close_all("the proxy is shutting down, reconnect")
        .await;
    if let Some(ha) = ha {
        ha.stop.cancel();
        let finished = futures_util::future::join_all(ha.tasks);
        if tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .is_err()
        {
            tracing::warn!("leases not released within 5 s; they expire by themselves");
        }
    }
    Ok(())
}

/// Ask every agent to move to another replica, wait until they have
/// (`moved`) and no request, upgraded stream or relay is in progress here,
/// then return so the caller closes what is left. Tunnels of agents that
/// cannot be asked (Go Tower agents) are closed as soon as nothing is in
/// progress. `grace` bounds the wait.
async fn drain<S: registry::ClusterStore>(
    registry: &Registry<S>,
    grace: Duration,
    moved: impl Fn(&str) -> bool,
) {
    if registry.total_live() == 0 {
        return;
    }
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(sessions = registry.total_live(), grace = ?grace, "draining: asking agents to move to another replica");
    let (asked, legacy) = registry.drain_all().await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let idle = listener::in_flight() == 0;
        if idle {
            for session in legacy.iter().filter(|s| !s.is_closed()) {
                session.close("the proxy is shutting down, reconnect").await;
            }
        }
        if registry.total_live() == 0 || (idle && asked.iter().all(|c| moved(c))) {
            tracing::info!("drained: agents moved, nothing in progress");
            return;
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(sessions = registry.total_live(), in_flight = listener::in_flight(), "grace period over: closing what is left");
                return;
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn forwards() {
        assert_eq!(
            parse_forward("alpha=127.0.0.1:7443"),
            Ok(("alpha".to_string(), "127.0.0.1:7443".parse().unwrap()))
        );
        assert!(parse_forward("alpha").unwrap_err().contains("NAME=ADDR"));
        assert!(
            parse_forward("alpha=nohost")
                .unwrap_err()
                .contains("IP:PORT")
        );
    }
}
