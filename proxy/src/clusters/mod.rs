//! The clusters' workflow: Tower's on `cluster.kubesphere.io` Cluster
//! resources ([`crd`]).
//!
//! For every Cluster with `joinFederation: true` and `connection.type: proxy`
//! the leader makes the world match:
//! - a token (64 hex chars from the OS CSPRNG) when `spec.connection.token` is empty;
//! - a kube API port and a ks-apiserver port (+10000) that no other Cluster uses
//!   and that are free on this host;
//! - Service `<namespace>/mc-<name>` (6443 -> kube port, 80 -> ks port), owned by
//!   the Cluster, re-created if deleted, a LoadBalancer when exposed ([`service`]);
//!   with `--cluster-ports none` neither ports nor Service, the path form instead
//!   ([`PathForm`]);
//! - `kubernetesAPIEndpoint` / `kubesphereAPIEndpoint` (`--advertise-address`, or
//!   the Service's ClusterIP), IPv6-safe;
//! - while an agent is connected: the cluster's ports open and a kubeconfig for
//!   its HTTPS port in `spec.connection.kubeconfig` ([`kubeconfig`]);
//! - conditions `Initialized`, `AgentAvailable`, `ExternalAccessReady`, and
//!   Events when they change;
//! - what the member says about itself in the status ([`status`]);
//! - after a restart or failover, nothing for a Cluster whose agent has not
//!   come back yet, for up to 40 s ([`comeback`]);
//! - a new token on request, the previous one working for a grace period
//!   while connected agents are handed the new one ([`rotation`] decides,
//!   [`rotate`] writes and tells).
//!
//! [`decide`] holds every decision as a pure function; [`reconcile`] gathers
//! the facts, asks [`decide`], and writes; [`controller`] runs it when a
//! Cluster, its Service or its sessions change (at most once a second per
//! cluster while its agent flaps: [`damp`]). [`store`] is the registry's view
//! of the Clusters (tokens, and the ports opened before an agent hears success).

pub mod comeback;
pub mod controller;
pub mod crd;
pub mod damp;
pub mod decide;
pub mod events;
pub mod kubeconfig;
pub mod readiness;
pub mod reconcile;
pub mod refusals;
pub mod rotate;
pub mod rotation;
pub mod service;
pub mod status;
pub mod store;

pub use crate::serve::ports::Ports;

/// Settings of the workflow.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace of the `mc-<name>` Services.
    pub namespace: String,
    /// Endpoints point here instead of the Service's ClusterIP (proxy outside the cluster).
    pub advertise_address: Option<String>,
    /// Labels selecting the proxy's pods, for the `mc-<name>` Services.
    pub selector: Vec<(String, String)>,
    /// Kube API ports are taken from here; the ks port is +10000.
    pub ports: std::ops::Range<u16>,
    /// Address the listeners bind to, for the "is it free" check.
    pub bind_host: String,
    /// `--cluster-ports none`: no ports and no Service per cluster (`ports`
    /// is unused); kubeconfigs point at the path form.
    pub path_form: Option<PathForm>,
    /// `--cluster-status-update-frequency`: how often connected members'
    /// status is refreshed ([`status`]).
    pub status_update_frequency: std::time::Duration,
}

/// Where kubeconfigs point with `--cluster-ports none`: the path form of
/// `--access-port` ([`crate::serve::access`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathForm {
    /// `--advertise-address`, else the host of `--publish-service-address`.
    pub address: String,
    /// `--access-port`.
    pub port: u16,
}

impl PathForm {
    /// The `server` of `cluster`'s kubeconfig.
    pub fn server(&self, cluster: &str) -> String {
        crate::serve::access::path::server(&self.address, self.port, cluster)
    }
}
