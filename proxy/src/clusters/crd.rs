//! The `Cluster` custom resource (`cluster.kubesphere.io/v1alpha1`), as far as
//! the proxy reads it. KubeSphere owns most of it: the proxy writes only the
//! fields it owns, with merge patches (see [`super::reconcile`]), so fields
//! missing here survive untouched.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResource, Resource};
use serde::{Deserialize, Serialize};

/// `spec` of a Cluster.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize)]
#[kube(
    group = "cluster.kubesphere.io",
    version = "v1alpha1",
    kind = "Cluster",
    status = "ClusterStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    #[serde(default)]
    pub join_federation: bool,
    #[serde(default)]
    pub enable: bool,
    #[serde(default, rename = "externalKubeAPIEnabled")]
    pub external_kube_api_enabled: bool,
    #[serde(default)]
    pub connection: Connection,
}

/// `spec.connection`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default, rename = "kubernetesAPIEndpoint")]
    pub kubernetes_api_endpoint: String,
    #[serde(default, rename = "kubesphereAPIEndpoint")]
    pub kubesphere_api_endpoint: String,
    #[serde(default, rename = "externalKubernetesAPIEndpoint")]
    pub external_kubernetes_api_endpoint: String,
    /// base64 in JSON, like Go's []byte.
    #[serde(default)]
    pub kubeconfig: String,
    #[serde(default)]
    pub token: String,
    #[serde(default, rename = "kubernetesAPIServerPort")]
    pub kubernetes_api_server_port: i32,
    #[serde(default, rename = "kubesphereAPIServerPort")]
    pub kubesphere_api_server_port: i32,
}

/// `status` of a Cluster: the conditions, and what [`super::status`]
/// reports (KubeSphere's `kubernetesVersion` and `nodeCount`, and ours).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expiration_time: Option<String>,
    /// The member kube-apiserver's `/healthz`, `/readyz`, `/livez` answered
    /// 200 through the tunnel; absent while no agent is connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthz: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readyz: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub livez: Option<bool>,
    /// The agent's `GOOS/GOARCH`, e.g. `linux/amd64` (ours send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The tunnel's round trip, a Go duration (`850µs`).
    #[serde(default, rename = "tunnelRTT", skip_serializing_if = "Option::is_none")]
    pub tunnel_rtt: Option<String>,
}

/// One entry of `status.conditions`, as KubeSphere writes it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// `connection.type` of clusters reached through this proxy.
pub const CONNECTION_PROXY: &str = "proxy";

impl Cluster {
    /// Tower serves clusters that join the federation through a proxy connection.
    pub fn is_served(&self) -> bool {
        self.spec.join_federation && self.spec.connection.kind == CONNECTION_PROXY
    }
}

/// How long a look at API discovery holds: a CRD changed meanwhile (the
/// status subresource added or taken away) is seen within this.
const LOOK_HOLDS: Duration = Duration::from_secs(60);

/// Whether the Cluster CRD has the status subresource. Ours has; KubeSphere's
/// own has not: there a write to the subresource is a 404 and the status goes
/// with the object, so with that known a pass writes spec and status in one
/// request, where it took three (the 404 and two patches). Asked of API
/// discovery (readable by every authenticated user) at most once a minute.
#[derive(Default)]
pub struct StatusPath(Mutex<Option<(bool, Instant)>>);

impl StatusPath {
    /// True when the status subresource exists, or when discovery cannot
    /// tell (the write's 404 fallback covers that).
    pub async fn subresource(&self, client: &Client) -> bool {
        if let Some((has, at)) = *self.lock()
            && at.elapsed() < LOOK_HOLDS
        {
            return has;
        }
        let api_version = format!("{}/{}", Cluster::group(&()), Cluster::version(&()));
        let has = match client.list_api_group_resources(&api_version).await {
            Ok(list) => list.resources.iter().any(|r| r.name == "clusters/status"),
            Err(e) => {
                tracing::debug!(error = %e, "API discovery failed: trying the status subresource");
                true
            }
        };
        self.learn(has);
        has
    }

    /// What a write found out.
    pub fn learn(&self, has: bool) {
        *self.lock() = Some((has, Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(bool, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A merge patch of a Cluster's status: through the status subresource, or
/// as part of the object where the CRD has none (KubeSphere's; a 404 from
/// the subresource says so too).
pub async fn patch_status(
    client: &Client,
    path: &StatusPath,
    name: &str,
    patch: &serde_json::Value,
) -> Result<Cluster, kube::Error> {
    let api: Api<Cluster> = Api::all(client.clone());
    let params = PatchParams::default();
    if !path.subresource(client).await {
        let patched = api.patch(name, &params, &Patch::Merge(patch)).await?;
        if !dropped(patch, &patched) {
            return Ok(patched);
        }
        // The CRD gained the subresource since discovery was asked.
        path.learn(true);
    }
    match api.patch_status(name, &params, &Patch::Merge(patch)).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let patched = api.patch(name, &params, &Patch::Merge(patch)).await?;
            path.learn(false);
            Ok(patched)
        }
        other => other,
    }
}

/// Whether a patch of the object dropped the conditions it wrote: where the
/// CRD has the status subresource, the object's own writes leave the status
/// as it was. Only the conditions are compared (every pass that changes
/// them sends them whole); other status fields are not checked.
pub fn dropped(patch: &serde_json::Value, patched: &Cluster) -> bool {
    let Some(sent) = patch.pointer("/status/conditions") else {
        return false;
    };
    let conditions = patched.status.as_ref().map(|s| &s.conditions);
    serde_json::to_value(conditions.cloned().unwrap_or_default())
        .ok()
        .as_ref()
        != Some(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_conditions(conditions: Vec<Condition>) -> Cluster {
        let mut c = Cluster::new("alpha", ClusterSpec::default());
        c.status = Some(ClusterStatus {
            conditions,
            ..Default::default()
        });
        c
    }

    fn available(status: &str) -> Condition {
        Condition {
            kind: "AgentAvailable".into(),
            status: status.into(),
            last_transition_time: Some("2026-12-05T07:00:00Z".into()),
            reason: "AgentConnected".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_write_that_kept_its_conditions_was_not_dropped() {
        let patch = json!({"status": {"conditions": [available("True")]}});
        assert!(!dropped(&patch, &with_conditions(vec![available("True")])));
    }

    #[test]
    fn a_write_whose_conditions_did_not_land_was_dropped() {
        let patch = json!({"status": {"conditions": [available("True")]}});
        assert!(dropped(&patch, &with_conditions(vec![available("False")])));
        assert!(dropped(
            &patch,
            &Cluster::new("alpha", ClusterSpec::default())
        ));
    }

    #[test]
    fn a_write_without_conditions_is_not_judged() {
        let patch = json!({"status": {"healthz": true}});
        assert!(!dropped(
            &patch,
            &Cluster::new("alpha", ClusterSpec::default())
        ));
    }
}
