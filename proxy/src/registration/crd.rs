//! The `ClusterRegistrationRequest` custom resource
//! (`cluster.kubesphere.io/v1alpha1`, cluster-scoped, short name `clsrr` as
//! Clusternet's): one per member cluster ID, named [`request_name`], so a
//! cluster that registers again finds its first request.
//!
//! Not in `tower.kubesphere.io`: the proxy serves an aggregated API there
//! (`docs/aggregated-api.md`), which would shadow a CRD of that group.
//!
//! People decide with one field: `spec.decision` `Approved` or `Denied`
//! (`kubectl patch clsrr NAME --type=merge -p '{"spec":{"decision":"Approved"}}'`).
//! The proxy writes `status` (through `/status`): the phase shown by
//! `kubectl get clsrr`, the Cluster it made or re-used, and why.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `spec` of a ClusterRegistrationRequest: what the agent asked for, and the
/// person's (or the auto-approve annotation's) decision.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "cluster.kubesphere.io",
    version = "v1alpha1",
    kind = "ClusterRegistrationRequest",
    plural = "clusterregistrationrequests",
    shortname = "clsrr",
    status = "RequestStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct RequestSpec {
    /// The member's `kube-system` namespace UID.
    #[serde(rename = "clusterID", default)]
    pub cluster_id: String,
    /// The Cluster name the agent asked for (its `--name`, or derived).
    #[serde(default)]
    pub cluster_name: String,
    /// The id part of the bootstrap token used (never the secret part).
    #[serde(rename = "bootstrapTokenID", default)]
    pub bootstrap_token_id: String,
    /// The agent's version, as it said in its `config`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_version: String,
    /// `Approved` or `Denied`; empty (or anything else) is pending.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decision: String,
}

/// `status` of a ClusterRegistrationRequest, written by the proxy's leader.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestStatus {
    /// `Pending`, `Approved` or `Denied`.
    #[serde(default)]
    pub phase: String,
    /// The Cluster created or re-used for this cluster ID (once approved).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster: String,
    /// What happens next, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Label on the Clusters made by registration: the member's cluster ID, so
/// that a second registration re-uses the Cluster rather than making a twin.
pub const CLUSTER_ID_LABEL: &str = "tower.kubesphere.io/cluster-id";
/// Annotation on those Clusters naming the request that made them.
pub const REQUEST_ANNOTATION: &str = "tower.kubesphere.io/registration-request";

/// The request of a cluster ID (one per member cluster).
pub fn request_name(cluster_id: &str) -> String {
    format!("tower-{cluster_id}")
}
