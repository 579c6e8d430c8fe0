//! The `Cluster` custom resource (`cluster.kubesphere.io/v1alpha1`), as far as
//! the proxy reads it. KubeSphere owns most of it: the proxy writes only the
//! fields it owns, with merge patches (see [`super::reconcile`]), so fields
//! missing here survive untouched.

use kube::CustomResource;
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

/// A merge patch of a Cluster's status, through the status subresource; on
/// KubeSphere's own CRD, which has none (404), as part of the object.
pub async fn patch_status(
    api: &kube::Api<Cluster>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<Cluster, kube::Error> {
    use kube::api::{Patch, PatchParams};
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 404 => {
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
        }
        other => other,
    }
}
