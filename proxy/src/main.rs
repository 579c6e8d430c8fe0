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
mod listener;
mod member_info;
mod metrics;
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
    /// Elect a leader among replicas for writes to the host cluster.
    #[arg(long, default_value_t = false)]
    leader_elect: bool,
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
            serve_agents(&flags, Registry::new(store), host_key, ready).await
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
    let options = controller::Options {
        namespace: flags.namespace.clone(),
        advertise_address: flags.advertise_address.clone(),
        selector: parse_selector(&flags.service_selector)?,
        ports: flags.cluster_ports.clone(),
        bind_host: flags.host.clone(),
    };
    let running = controller::start(client.clone(), ca, ports.clone(), options);
    member_info::start(client, running.store.clone(), running.registry.clone());
    let _ = ports.registry.set(running.registry.clone());
    let controller_task = running.task;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(readiness::mark_when_synced(running.store, ready.clone()));
    tokio::select! {
        served = serve_agents(&flags, running.registry, host_key, ready) => served,
        _ = controller_task => anyhow::bail!("the Cluster controller stopped"),
    }
}

/// The agents' port (and any --forward ports) until SIGTERM or SIGINT.
async fn serve_agents<S: registry::ClusterStore>(
    flags: &Flags,
    registry: Registry<S>,
    host_key: russh::keys::PrivateKey,
    ready: Arc<std::sync::atomic::AtomicBool>,
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
    agents::run(listener, endpoint, shutdown_signal()).await;
    // Agents hear why and reconnect at once (to another replica, if any)
    // instead of waiting for their keepalive to notice a dead socket.
    tracing::info!("shutting down: closing agent sessions");
    registry
        .close_all("the proxy is shutting down, reconnect")
        .await;
    Ok(())
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
