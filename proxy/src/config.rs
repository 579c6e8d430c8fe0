//! Command-line flags and their checking, in one place.
//!
//! [`Flags`] is what clap parses: Go Tower v0.2.1's proxy flags (`--ca-cert`,
//! `--ca-key`, `--host`, `--port`, `--kubeconfig`, `--publish-service-address`,
//! `--leader-elect` and its timings, klog's `--v` and friends), in Go's pflag
//! syntax (`--leader-elect=true`, `--v=4`, `-v 4`), plus ours. [`Flags::check`]
//! turns them into a [`Config`] in which every value has been checked (files
//! read, CA parsed, selector and addresses parsed) before the proxy touches the
//! network, so a bad flag stops it at once with a message naming the flag.
//!
//! This file holds the flags, the checked [`Config`] and the value parsers
//! clap calls; [`check`] the checks, [`pod_ip`] the address other replicas
//! reach this one at.

mod check;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use tunnel::cli::{KlogFlags, LogFormat, go_bool, parse_go_duration};

use crate::agents::store::StaticClusters;
use crate::clusters::Options as ClusterOptions;
use crate::identity::ca::Ca;

pub use check::publish_url;

/// Tower proxy: accepts agents of member clusters and proxies to them.
#[derive(Parser, Debug)]
// pflag takes the last of a repeated flag; so do we (`args_override_self`).
#[command(name = "proxy", version, about, args_override_self = true)]
pub struct Flags {
    /// Address to listen on for agents.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on for agents (websocket), /health and /version.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// CA certificate that signs per-cluster listener and client certificates.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert.
    #[arg(long, value_name = "FILE")]
    pub ca_key: Option<PathBuf>,
    /// Kubeconfig of the host cluster (empty: in-cluster config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The address agents dial to reach this proxy, HOST[:PORT] or a URL, as
    /// in Tower: logged at start as the agents' --proxy-server.
    #[arg(long, value_name = "ADDRESS")]
    pub publish_service_address: Option<String>,
    /// Run as one of several replicas: a leader (Lease <namespace>/tower)
    /// writes to the host cluster, every replica serves agents and clients,
    /// and relays clients to the replica that has their cluster's agent.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          default_value = "false", action = ArgAction::Set, value_parser = go_bool,
          value_name = "BOOL")]
    pub leader_elect: bool,
    /// How long the leader's Lease lasts without renewal (renewed halfway).
    #[arg(long, default_value = "30s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub leader_elect_lease_duration: Duration,
    /// Go Tower's renew deadline. Accepted; ours renews at half the lease.
    #[arg(long, value_parser = parse_go_duration, value_name = "DURATION")]
    pub leader_elect_renew_deadline: Option<Duration>,
    /// Go Tower's retry period. Accepted; ours renews at half the lease.
    #[arg(long, value_parser = parse_go_duration, value_name = "DURATION")]
    pub leader_elect_retry_period: Option<Duration>,
    /// This replica's name among replicas (default: the pod's name).
    #[arg(long, env = "POD_NAME")]
    pub replica_id: Option<String>,
    /// Port other replicas relay clients through (mutual TLS), with --leader-elect.
    #[arg(long, default_value_t = 8443)]
    pub peer_port: u16,
    /// HOST:PORT other replicas reach this one at (default: $POD_IP:--peer-port).
    #[arg(long)]
    pub peer_address: Option<String>,
    /// On SIGTERM: how long agents and running requests get to move to
    /// another replica before the last tunnels are closed.
    #[arg(long, default_value = "25s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub shutdown_grace: Duration,
    /// OpenSSH private key for the SSH host key; created on first start.
    /// Default: <data-dir>/ssh_host_ed25519_key.
    #[arg(long, value_name = "FILE")]
    pub host_key: Option<PathBuf>,
    /// Directory for state kept across restarts (the SSH host key).
    #[arg(long, default_value = "/var/lib/tower", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// How often the proxy pings each agent; a session is dropped after 3
    /// periods without a word from its agent.
    #[arg(long, default_value = "30s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub keepalive: Duration,
    /// How often the status of each connected cluster is refreshed through
    /// its tunnel (health, version, nodes, RTT); written only when it
    /// changed. Default 1m.
    #[arg(long, value_parser = parse_go_duration, value_name = "DURATION")]
    pub cluster_status_update_frequency: Option<Duration>,
    /// Endpoints and kubeconfigs point at https://HOST:<cluster port> instead of
    /// the mc-<name> Service's ClusterIP (a proxy running outside the cluster).
    #[arg(long, value_name = "HOST")]
    pub advertise_address: Option<String>,
    /// Namespace of the mc-<name> Services and of the proxy's Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubesphere-system")]
    pub namespace: String,
    /// Ports for the clusters' kube API listeners, FIRST-LAST; the ks-apiserver
    /// port of each is 10000 higher. `none`: no port and no Service per
    /// cluster; kubeconfigs point at the path form of --access-port.
    #[arg(long, default_value = "16000-16999", value_parser = ClusterPorts::parse,
          value_name = "FIRST-LAST|none")]
    pub cluster_ports: ClusterPorts,
    /// The proxy's own HTTPS port serving every cluster at
    /// /clusters/<name>/... to client certificates issued for that cluster
    /// (the path form). Off when not given.
    #[arg(long, value_name = "PORT")]
    pub access_port: Option<u16>,
    /// Labels of the proxy's pods, selected by the mc-<name> Services.
    #[arg(
        long,
        default_value = "app=tower",
        value_name = "KEY=VALUE[,KEY=VALUE]"
    )]
    pub service_selector: String,
    /// JSON file mapping cluster names to agent tokens, e.g. {"alpha": "<token>"}:
    /// run without Kubernetes (no Cluster resources, no per-cluster listeners).
    #[arg(long, value_name = "FILE")]
    pub clusters_file: Option<PathBuf>,
    /// Raw TCP port to a cluster's kube-apiserver through its tunnel: NAME=ADDR
    /// (repeatable). For debugging and measurements.
    #[arg(long = "forward", value_parser = parse_forward, value_name = "NAME=IP:PORT")]
    pub forwards: Vec<(String, SocketAddr)>,
    /// HTTP CONNECT port with mutual TLS (client certificates of the proxy
    /// CA): `CONNECT host:port` reaches host:port through a member's tunnel,
    /// as its agent's --allow-dial allows; `CONNECT <cluster>:443` its
    /// kube-apiserver. 0 picks a free port.
    #[arg(long, value_name = "PORT")]
    pub connect_port: Option<u16>,
    /// Directory for one HTTP CONNECT Unix socket per connected cluster,
    /// <cluster>.sock (mode 0660; no TLS): for a kube-apiserver's egress
    /// selector, or local clients.
    #[arg(long, value_name = "DIR")]
    pub connect_socket_dir: Option<PathBuf>,
    /// Pull mode: publish a service on the hub's side to agents under NAME
    /// (repeatable), e.g. hub-api=kubernetes.default.svc:443. A cluster opts in
    /// with the annotation tower.kubesphere.io/hub-services: NAME[,NAME].
    #[arg(long = "hub-service", value_parser = crate::agents::hub::parse_flag, value_name = "NAME=HOST:PORT")]
    pub hub_services: Vec<(String, String)>,
    /// Audit log: one JSON line per request and stream through the clusters'
    /// ports, the CONNECT doors and hub channels, appended to FILE (created
    /// 0600), or - for stdout. Never a token, a query or a body.
    #[arg(long, value_parser = crate::ops::audit::Destination::parse, value_name = "FILE")]
    pub audit_log: Option<crate::ops::audit::Destination>,
    /// Serve the aggregated API tower.kubesphere.io/v1alpha1 on PORT (HTTPS,
    /// behind the host kube-apiserver: clusters/<name>/proxy reaches a member
    /// as the host's RBAC allows, the caller impersonated) and register its
    /// APIService. Off when absent.
    #[arg(long, value_name = "PORT")]
    pub aggregated_api_port: Option<u16>,
    /// The Service in front of --aggregated-api-port that the APIService
    /// names (port 443). Default: <--namespace>/tower-api.
    #[arg(long, value_parser = crate::serve::aggregated::parse_service, value_name = "NAMESPACE/NAME")]
    pub aggregated_api_service: Option<(String, String)>,
    /// Connections the agents' port may hold before they are let in (until
    /// the agent is admitted), and apart from it the clients' HTTPS doors
    /// (until the TLS handshake is done); more are closed at once. 0: no cap.
    #[arg(long, default_value_t = crate::ops::pending::DEFAULT_TOTAL, value_name = "N")]
    pub max_pending_handshakes: usize,
    /// The same per source address: one host cannot take every slot. Behind a
    /// load balancer or ingress that hides the agents' addresses, raise it
    /// to --max-pending-handshakes (or 0: no cap per source).
    #[arg(long, default_value_t = crate::ops::pending::DEFAULT_PER_SOURCE, value_name = "N")]
    pub max_pending_handshakes_per_source: usize,
    /// TLS handshakes one source address may start per second at the
    /// clients' HTTPS doors (cluster ports, --access-port, --connect-port):
    /// a burst of this many at once, then one per 1/N s; a connection over
    /// it waits its turn (up to 5 s, else it is closed). Not the agents'
    /// port, the peer port or --aggregated-api-port. Raise it when many
    /// clients share one address (NAT); 0: no rate.
    #[arg(long, default_value_t = crate::ops::rate::DEFAULT_PER_SECOND, value_name = "N")]
    pub max_handshakes_per_source_per_second: u32,
    /// Request-body bytes one client (a source address and user) may send
    /// to the members per second, after --request-body-burst-per-source at
    /// once; a body over it waits its turn (the client's upload slows, it is
    /// not cut). On the cluster ports, --access-port and
    /// --aggregated-api-port; not responses, exec/attach/port-forward/cp
    /// streams or the CONNECT door. A count like 8Mi; 0: no rate.
    #[arg(long, default_value = "8Mi", value_parser = tunnel::cli::parse_bytes, value_name = "BYTES")]
    pub request_body_rate_per_source: u64,
    /// Request-body bytes one client may send at once before
    /// --request-body-rate-per-source paces it (a count like 32Mi).
    #[arg(long, default_value = "32Mi", value_parser = tunnel::cli::parse_bytes, value_name = "BYTES")]
    pub request_body_burst_per_source: u64,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// Where cluster tokens come from.
pub enum Mode {
    /// `--clusters-file`: no Kubernetes.
    File(StaticClusters),
    /// Cluster resources, through `--kubeconfig` (or in-cluster when `None`).
    Kubernetes {
        kubeconfig: Option<(PathBuf, Box<kube::config::Kubeconfig>)>,
    },
}

/// `--leader-elect`'s settings.
pub struct HaConfig {
    pub replica: String,
    pub lease_duration: Duration,
    pub peer_port: u16,
    /// Where other replicas reach this one (`host:port`).
    pub peer_address: String,
}

/// Checked configuration: everything the proxy needs, validated.
pub struct Config {
    pub mode: Mode,
    /// The agents' port.
    pub bind: IpAddr,
    pub port: u16,
    /// From `--ca-cert`/`--ca-key`; `None`: the CA kept in the proxy's Secret.
    pub ca: Option<Ca>,
    /// `--publish-service-address` as the URL agents give as `--proxy-server`.
    pub publish_url: Option<String>,
    pub ha: Option<HaConfig>,
    /// This replica's name: `--replica-id`, POD_NAME or the host name
    /// (`proxy` when none); names its Lease `tower-replica-<name>`.
    pub replica: String,
    pub shutdown_grace: Duration,
    pub host_key: PathBuf,
    /// `--host-key` given explicitly (else the Secret's key wins in Kubernetes mode).
    pub host_key_given: bool,
    pub keepalive: Duration,
    pub clusters: ClusterOptions,
    pub forwards: Vec<(String, SocketAddr)>,
    pub connect_port: Option<u16>,
    pub connect_socket_dir: Option<PathBuf>,
    /// `--hub-service`: published name to address.
    pub hub_services: BTreeMap<String, String>,
    /// `--audit-log`, opened; `None`: off.
    pub audit_log: Option<crate::ops::audit::Output>,
    /// `--access-port`: the path form; `None`: off.
    pub access: Option<crate::serve::access::Options>,
    /// `--aggregated-api-port`; `None`: off.
    pub aggregated: Option<crate::serve::aggregated::Options>,
    /// `--max-pending-handshakes`, `--max-pending-handshakes-per-source`,
    /// `--max-handshakes-per-source-per-second`.
    pub pending: crate::ops::pending::Limits,
    /// `--request-body-rate-per-source` and `--request-body-burst-per-source`.
    pub uploads: crate::ops::uploads::Limits,
}

/// `--cluster-ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterPorts {
    /// A port pair per cluster from this range (the ks port +10000).
    Range(Range<u16>),
    /// `none`: only the path form (`--access-port`).
    None,
}

impl ClusterPorts {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            range => parse_port_range(range).map(Self::Range),
        }
    }
}

impl Flags {
    /// Flags accepted for Go Tower's sake that change nothing here, for one
    /// note in the start-up log.
    pub fn without_effect(&self) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.leader_elect_renew_deadline.is_some() {
            flags.push("--leader-elect-renew-deadline");
        }
        if self.leader_elect_retry_period.is_some() {
            flags.push("--leader-elect-retry-period");
        }
        flags
    }
}

fn parse_port_range(s: &str) -> Result<Range<u16>, String> {
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

fn parse_forward(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=ADDR, e.g. alpha=127.0.0.1:7443"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} in --forward is not an IP:PORT address"))?;
    Ok((name.to_string(), addr))
}

pub mod pod_ip;
#[cfg(test)]
mod tests;
