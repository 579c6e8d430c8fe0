//! `/metrics` in the Prometheus/OpenMetrics text format.
//!
//! Event counters and histograms live in a [`Metrics`] handle that is passed to
//! whoever counts (the registry, the listeners, the controller) and bumped
//! where things happen; gauges that describe the present (sessions, open
//! streams, bytes per cluster, the sessions' write queues) are read from the session registry at scrape
//! time ([`ClusterStats`]), so they can never drift from the truth.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    pub cluster: String,
    /// `serving` (the cluster port's certificate), `client` (the kubeconfig's), `ca`.
    pub kind: String,
}

/// A CONNECT door (`tls` or `unix`) and the cluster a stream went to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DoorLabel {
    pub door: String,
    pub cluster: String,
}

/// A CONNECT door, the cluster and why it refused (`unknown_cluster`,
/// `no_agent`, `not_allowed`, `dial_failed`, `timeout`, `bad_request`, ...).
/// `cluster` is empty until the request is known to be for a cluster the
/// proxy serves: a name that comes from whoever knocks never becomes a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    pub door: String,
    pub cluster: String,
    pub reason: String,
}

/// A CONNECT door, a cluster and a direction (`to_member`, `from_member`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DoorBytesLabel {
    pub door: String,
    pub cluster: String,
    pub direction: String,
}

/// A cluster and a hub service its agent reached (pull mode).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubLabel {
    pub cluster: String,
    pub service: String,
}

/// A cluster whose hub channel was refused, and why (`not_published`,
/// `not_opted_in`, `dial_failed`). No service label: the name comes from the agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubRefusalLabel {
    pub cluster: String,
    pub reason: String,
}

/// A hub stream's cluster, service and direction (`to_hub`, `from_hub`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HubBytesLabel {
    pub cluster: String,
    pub service: String,
    pub direction: String,
}

/// A door (`agents`, `cluster`, `access`, `aggregated`) and why it closed a
/// connection before letting it in ([`crate::ops::pending::Refusal`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub door: String,
    pub reason: String,
}

/// One cluster's line in /metrics, read from the registry at scrape time.
pub struct ClusterStats {
    pub cluster: String,
    pub sessions: usize,
    pub streams: usize,
    pub received: u64,
    pub sent: u64,
    /// Bytes in the sessions' write queues, not yet written to the agents.
    pub write_queued: u64,
    /// Sessions whose write queue is full and whose connection takes no more.
    pub stalled: usize,
}

/// The proxy's event metrics. One per process, shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    /// Agent sessions admitted, per cluster.
    pub connects: Family<ClusterLabel, Counter>,
    /// Agents refused (wrong token or unknown cluster). No cluster label: the
    /// name comes from whoever knocks.
    pub auth_failures: Counter,
    /// Time to response headers of requests on the clusters' ports.
    pub request_seconds: Family<ClusterLabel, Histogram>,
    /// Expiry of certificates, as Unix seconds.
    pub cert_expiry: Family<CertLabel, Gauge<f64, AtomicU64>>,
    /// Sessions admitted for a cluster that had one before (in this process).
    pub reconnects: Family<ClusterLabel, Counter>,
    /// Client connections relayed to the replica with the cluster's agent (HA).
    pub relayed: Family<ClusterLabel, Counter>,
    /// Streams opened through the CONNECT doors.
    pub connect_streams: Family<DoorLabel, Counter>,
    /// CONNECT requests refused, by reason.
    pub connect_refusals: Family<RefusalLabel, Counter>,
    /// Bytes through the CONNECT doors' streams, counted when a stream ends.
    pub connect_bytes: Family<DoorBytesLabel, Counter>,
    /// Hub streams opened by agents (pull mode).
    pub hub_streams: Family<HubLabel, Counter>,
    /// Hub channels refused, by reason.
    pub hub_refusals: Family<HubRefusalLabel, Counter>,
    /// Bytes through hub streams, counted when a stream ends.
    pub hub_bytes: Family<HubBytesLabel, Counter>,
    /// Audit records dropped because the writer was behind.
    pub audit_dropped: Counter,
    /// Connections closed before they were let in, per door and reason.
    pub refused_connections: Family<RefusedLabel, Counter>,
    /// 1 while this replica writes to the host cluster (it leads, or runs
    /// alone), else 0: summed over replicas, what a "no leader" alert reads.
    pub leader: Gauge,
    /// Time request bodies waited for their client's turn, per cluster.
    pub paced_seconds: Family<ClusterLabel, Counter<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = prometheus_client::registry::Registry::with_prefix("tower");
        let connects = Family::<ClusterLabel, Counter>::default();
        registry.register(
            "agent_connects",
            "Agent sessions admitted",
            connects.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "agent_auth_failures",
            "Agents refused for a wrong name or token",
            auth_failures.clone(),
        );
        let request_seconds = Family::<ClusterLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "request_duration_seconds",
            "Time to response headers of requests through a cluster's port",
            request_seconds.clone(),
        );
        let cert_expiry = Family::<CertLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When a certificate the proxy issued or uses expires",
            cert_expiry.clone(),
        );
        let reconnects = Family::<ClusterLabel, Counter>::default();
        registry.register(
            "agent_reconnects",
            "Agent sessions admitted for a cluster that had a session before",
            reconnects.clone(),
        );
        let relayed = Family::<ClusterLabel, Counter>::default();
        registry.register(
            "relayed_connections",
            "Client connections relayed to the proxy replica with the cluster's agent",
            relayed.clone(),
        );
        let connect_streams = Family::<DoorLabel, Counter>::default();
        registry.register(
            "connect_streams",
            "Streams opened through a CONNECT door, per door and cluster",
            connect_streams.clone(),
        );
        let connect_refusals = Family::<RefusalLabel, Counter>::default();
        registry.register(
            "connect_refusals",
            "CONNECT requests refused, per door, cluster (empty until known) and reason",
            connect_refusals.clone(),
        );
        let connect_bytes = Family::<DoorBytesLabel, Counter>::default();
        registry.register(
            "connect_bytes",
            "Bytes through CONNECT streams that ended, per door, cluster and direction",
            connect_bytes.clone(),
        );
        let hub_streams = Family::<HubLabel, Counter>::default();
        registry.register(
            "hub_streams",
            "Hub streams opened by agents (pull mode), per cluster and service",
            hub_streams.clone(),
        );
        let hub_refusals = Family::<HubRefusalLabel, Counter>::default();
        registry.register(
            "hub_refusals",
            "Hub channels refused, per cluster and reason",
            hub_refusals.clone(),
        );
        let hub_bytes = Family::<HubBytesLabel, Counter>::default();
        registry.register(
            "hub_bytes",
            "Bytes through hub streams that ended, per cluster, service and direction",
            hub_bytes.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit log records dropped because the writer was behind",
            audit_dropped.clone(),
        );
        let refused_connections = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections closed before they were let in (hostile or broken peers), per door and reason",
            refused_connections.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the one writing to the host cluster",
            leader.clone(),
        );
        let paced_seconds = Family::<ClusterLabel, Counter<f64, AtomicU64>>::default();
        registry.register(
            "request_body_paced_seconds",
            "Time request bodies waited for their client's turn (--request-body-rate-per-source), per cluster",
            paced_seconds.clone(),
        );
        Metrics {
            registry,
            paced_seconds,
            refused_connections,
            leader,
            audit_dropped,
            hub_streams,
            hub_refusals,
            hub_bytes,
            connect_streams,
            connect_refusals,
            connect_bytes,
            reconnects,
            relayed,
            connects,
            auth_failures,
            request_seconds,
            cert_expiry,
        }
    }

    /// Count a connection `door` closed before letting it in, for `reason`.
    pub fn refused(&self, door: &str, reason: &str) {
        self.refused_connections
            .get_or_create(&RefusedLabel {
                door: door.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn cluster(cluster: &str) -> ClusterLabel {
        ClusterLabel {
            cluster: cluster.to_string(),
        }
    }

    pub fn hub_service(cluster: &str, service: &str) -> HubLabel {
        HubLabel {
            cluster: cluster.to_string(),
            service: service.to_string(),
        }
    }

    pub fn hub_refusal(cluster: &str, reason: &str) -> HubRefusalLabel {
        HubRefusalLabel {
            cluster: cluster.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn count_hub_bytes(&self, cluster: &str, service: &str, to_hub: u64, from_hub: u64) {
        for (direction, n) in [("to_hub", to_hub), ("from_hub", from_hub)] {
            self.hub_bytes
                .get_or_create(&HubBytesLabel {
                    cluster: cluster.to_string(),
                    service: service.to_string(),
                    direction: direction.to_string(),
                })
                .inc_by(n);
        }
    }

    /// A request body of `cluster` waited `time` for its client's turn.
    pub fn paced(&self, cluster: &str, time: Duration) {
        self.paced_seconds
            .get_or_create(&Self::cluster(cluster))
            .inc_by(time.as_secs_f64());
    }

    pub fn observe_request(&self, cluster: &str, elapsed: Duration) {
        self.request_seconds
            .get_or_create(&Self::cluster(cluster))
            .observe(elapsed.as_secs_f64());
    }

    pub fn set_cert_expiry(&self, cluster: &str, kind: &str, not_after: SystemTime) {
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.cert_expiry
            .get_or_create(&CertLabel {
                cluster: cluster.to_string(),
                kind: kind.to_string(),
            })
            .set(secs);
    }
}

/// One metric family written by hand: its HELP and TYPE lines, then one
/// sample per (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let sample = if kind == "counter" {
        format!("{name}_total")
    } else {
        name.to_string()
    };
    for (labels, value) in samples {
        let _ = writeln!(out, "{sample}{{{labels}}} {value}");
    }
}

/// Everything, in the OpenMetrics text format: the registry's `stats`, then
/// the event metrics.
pub fn render(metrics: &Metrics, stats: &[ClusterStats]) -> String {
    let mut out = String::new();
    let per_cluster = |value: fn(&ClusterStats) -> u64| -> Vec<(String, u64)> {
        stats
            .iter()
            .map(|s| (format!("cluster=\"{}\"", s.cluster), value(s)))
            .collect()
    };
    family(
        &mut out,
        "tower_agent_sessions",
        "gauge",
        "Live agent sessions per cluster.",
        &per_cluster(|s| s.sessions as u64),
    );
    family(
        &mut out,
        "tower_streams_open",
        "gauge",
        "Streams open through the tunnel per cluster.",
        &per_cluster(|s| s.streams as u64),
    );
    family(
        &mut out,
        "tower_agent_write_queue_bytes",
        "gauge",
        "Bytes queued for agents' connections and not yet written out, per cluster.",
        &per_cluster(|s| s.write_queued),
    );
    family(
        &mut out,
        "tower_agent_stalled_sessions",
        "gauge",
        "Agent sessions whose write queue is full and whose connection takes no more (the agent does not read), per cluster.",
        &per_cluster(|s| s.stalled as u64),
    );
    let bytes: Vec<(String, u64)> = stats
        .iter()
        .flat_map(|s| {
            [
                (
                    format!("cluster=\"{}\",direction=\"from_agent\"", s.cluster),
                    s.received,
                ),
                (
                    format!("cluster=\"{}\",direction=\"to_agent\"", s.cluster),
                    s.sent,
                ),
            ]
        })
        .collect();
    family(
        &mut out,
        "tower_tunnel_bytes",
        "counter",
        "Bytes through the tunnel per cluster and direction.",
        &bytes,
    );
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &metrics.registry) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    out
}
