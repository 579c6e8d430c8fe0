//! `proxy`: runs in the host cluster. Agents dial in over websocket + SSH; the
//! proxy authenticates each by its cluster's token and opens `kubesphere`
//! channels back through the tunnel to reach the member's API servers.
//!
//! Layout: [`agents`] is the agents' HTTP port, [`registry`] knows who is
//! connected, [`forward`] is a raw TCP port per cluster. The SSH and websocket
//! details live in the shared `tunnel` crate.

mod agents;
mod forward;
mod registry;

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
    /// JSON file mapping cluster names to agent tokens, e.g. {"alpha": "<token>"}.
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
    let store = match &flags.clusters_file {
        Some(path) => {
            let json = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --clusters-file {}", path.display()))?;
            StaticClusters::from_json(&json)
                .map_err(|e| anyhow::anyhow!("--clusters-file {}: {e}", path.display()))?
        }
        None => StaticClusters::default(),
    };

    let key_path = flags
        .host_key
        .clone()
        .unwrap_or_else(|| flags.data_dir.join("ssh_host_ed25519_key"));
    let host_key = tunnel::ssh::load_or_create_host_key(&key_path)
        .context("set --host-key to a writable path, or --data-dir to a writable directory")?;
    tracing::info!(
        fingerprint = %tunnel::ssh::fingerprint(host_key.public_key()),
        path = %key_path.display(),
        "SSH host key (agents pin it with --proxy-host-key-fingerprint)"
    );

    let registry = Registry::new(store);
    let endpoint = Arc::new(agents::Endpoint {
        registry: registry.clone(),
        ssh: Arc::new(tunnel::ssh::server_config(host_key, flags.keepalive)),
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
    tracing::info!("shutting down");
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
