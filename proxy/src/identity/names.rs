//! How the proxy marks what it writes in the host cluster.

/// Field manager of our server-side applies, and the value of [`MANAGED_BY`].
pub const MANAGER: &str = "tower-proxy";
/// Label on the Services and Leases we manage.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label naming the Cluster an object belongs to (mc-<name> Services,
/// cluster Leases).
pub const CLUSTER_LABEL: &str = "cluster.kubesphere.io/name";

/// What Kubernetes allows as a Cluster's name (a DNS subdomain: lower-case
/// letters, digits, `-` and `.`, starting and ending with a letter or digit,
/// at most 253): safe in a file name and in a URL path segment.
pub fn is_cluster_name(name: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    name.len() <= 253
        && edge(name.as_bytes().first())
        && edge(name.as_bytes().last())
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}
