//! How the proxy marks what it writes in the host cluster.

/// Field manager of our server-side applies, and the value of [`MANAGED_BY`].
pub const MANAGER: &str = "tower-proxy";
/// Label on the Services and Leases we manage.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming the Cluster an object belongs to (mc-<name> Services,
/// cluster Leases).
pub const CLUSTER_LABEL: &str = "cluster.kubesphere.io/name";
