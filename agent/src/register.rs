//! Self-registration's agent side (docs/registration.md): who this member
//! is. Its cluster ID is the UID of its `kube-system` namespace (as
//! Clusternet's): stable for the cluster's life and the same for every agent
//! in it, so the host can tell a second registration of the same cluster.
//! Without `--name` the agent asks to join as [`derived_name`] of it.
//!
//! The rest rides on what is there: the bootstrap token goes in `config`
//! while the agent has no token ([`crate::run`]), and the token the proxy
//! hands over is kept like a rotated one ([`crate::handed`]).

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube_client::api::Api;
use tunnel::wire::AgentConfig;

use crate::backoff::Backoff;

/// The namespace whose UID is the cluster ID.
const ID_NAMESPACE: &str = "kube-system";

/// The name an agent without `--name` asks for: `cluster-` and the ID's
/// first 8 characters.
pub fn derived_name(cluster_id: &str) -> String {
    let short: String = cluster_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    format!("cluster-{}", short.to_ascii_lowercase())
}

/// Read the cluster ID through the member credentials of `member`.
pub async fn cluster_id(member: &AgentConfig) -> Result<String, String> {
    let client = crate::handed::member_client(member).map_err(|e| e.to_string())?;
    let api: Api<Namespace> = Api::all(client);
    let ns = api.get(ID_NAMESPACE).await.map_err(|e| {
        format!(
            "cannot read namespace {ID_NAMESPACE} of the member cluster (its UID is the cluster \
             ID): {e}; give the agent get on it (config/agent/registration-rbac.yaml)"
        )
    })?;
    ns.metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("namespace {ID_NAMESPACE} has no UID"))
}

/// [`cluster_id`], retried with the backoff (the member's API server may be
/// starting too) until it answers.
pub async fn cluster_id_retrying(member: &AgentConfig, max_interval: Duration) -> String {
    let mut backoff = Backoff::new(max_interval);
    loop {
        match cluster_id(member).await {
            Ok(id) => return id,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, "cannot read the cluster ID, retrying in {delay:?}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_name_is_the_ids_first_8() {
        assert_eq!(
            derived_name("0A1B2C3D-0000-4000-8000-000000000000"),
            "cluster-0a1b2c3d"
        );
        assert_eq!(derived_name("ab-cd"), "cluster-abcd");
    }
}
