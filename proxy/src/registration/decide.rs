//! Every registration decision, pure: from the request (and what the host
//! has) to what to do. [`super::admit`] and [`super::controller`] do the I/O.
//!
//! Two deciders: [`next`] for an agent at the door (its bootstrap token
//! already checked), [`step`] for the leader's controller, which is the only
//! one that creates Clusters. The door never waits for a person: a pending
//! request refuses the agent with the kubectl commands that let it in, and
//! the agent retries with its backoff. That keeps no session open for minutes
//! and survives any proxy restart in between.

use super::crd::{CLUSTER_ID_LABEL, ClusterRegistrationRequest, REQUEST_ANNOTATION, RequestStatus};
use crate::clusters::crd::CONNECTION_PROXY;
use crate::identity::names::is_cluster_name;

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Approved,
    Denied,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Approved => "Approved",
            Phase::Denied => "Denied",
        }
    }
}

/// `spec.decision`, exactly `Approved` or `Denied`; anything else waits.
pub fn phase(request: &ClusterRegistrationRequest) -> Phase {
    match request.spec.decision.as_str() {
        "Approved" => Phase::Approved,
        "Denied" => Phase::Denied,
        _ => Phase::Pending,
    }
}

/// Check what the agent says about itself: a name Kubernetes takes for a
/// Cluster (and its `mc-<name>` Service), a cluster ID fit for a label value.
pub fn check_identity(name: &str, cluster_id: &str) -> Result<(), String> {
    let label_value = |s: &str| {
        s.len() <= 63
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !label_value(cluster_id) {
        return Err(format!(
            "registration refused: cluster ID {cluster_id:?} is not a UID (lower-case letters, \
             digits and '-', at most 63); the agent sends its kube-system namespace's UID"
        ));
    }
    if !is_cluster_name(name) || name.len() > 63 {
        return Err(format!(
            "registration refused: {name:?} cannot name a Cluster (lower-case letters, digits, \
             '-' and '.', at most 63); start the agent with another --name"
        ));
    }
    Ok(())
}

/// What the door does with an agent whose bootstrap token is valid.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// No request for this cluster ID yet: create it, decided at once when
    /// the token auto-approves.
    Create { approved: bool },
    /// Pending, and the token auto-approves: approve it.
    Approve,
    /// Approved; the leader has not named its Cluster yet: wait a little.
    Wait,
    /// Approved, and the Cluster is this one: join as it.
    Join(String),
    /// Refuse with this text (the agent retries with its backoff).
    Refuse(String),
}

/// Decide for an agent asking to join as `name` with the valid bootstrap
/// token `token_id`. A request approved for another token is not this
/// token's to use unless this one approves by itself: otherwise any holder
/// of a Tower bootstrap token who knows a cluster ID would get its Cluster's
/// token without a person saying so.
pub fn next(
    request: Option<&ClusterRegistrationRequest>,
    name: &str,
    token_id: &str,
    auto_approve: bool,
) -> Next {
    let Some(request) = request else {
        return Next::Create {
            approved: auto_approve,
        };
    };
    let id = request.metadata.name.as_deref().unwrap_or_default();
    match phase(request) {
        Phase::Denied => Next::Refuse(format!(
            "registration refused: ClusterRegistrationRequest {id} was denied"
        )),
        Phase::Pending if auto_approve => Next::Approve,
        Phase::Pending => Next::Refuse(pending_text(id)),
        Phase::Approved if !auto_approve && request.spec.bootstrap_token_id != token_id => {
            Next::Refuse(format!(
                "registration refused: ClusterRegistrationRequest {id} was approved for \
                 bootstrap token {}, not this one; for a person to decide on this token, delete \
                 the request (kubectl delete clsrr {id}) and let the agent ask again",
                request.spec.bootstrap_token_id
            ))
        }
        Phase::Approved => match request.status.as_ref().map(|s| s.cluster.as_str()) {
            None | Some("") => Next::Wait,
            Some(cluster) if cluster != name => Next::Refuse(format!(
                "registration refused: this cluster ID is registered as Cluster {cluster}; \
                 start the agent with --name {cluster}"
            )),
            Some(cluster) => Next::Join(cluster.to_string()),
        },
    }
}

/// The refusal (and status message) of a pending request: what a person runs.
pub fn pending_text(request: &str) -> String {
    format!(
        "registration pending: ClusterRegistrationRequest {request} waits for approval \
         (kubectl get clsrr {request}; approve with kubectl patch clsrr {request} --type=merge \
         -p '{{\"spec\":{{\"decision\":\"Approved\"}}}}')"
    )
}

/// What the leader does for one request.
#[derive(Debug)]
pub enum Step {
    /// Make the status this (written only when it differs).
    Status(RequestStatus),
    /// Create this Cluster (JSON: only the fields that say something, as a
    /// person would write it; empty `byte` fields do not pass the CRD's
    /// schema), then come back.
    Create(serde_json::Value),
}

/// Decide for `request`; `labelled`: the Cluster already carrying its cluster
/// ID, if any; `name_taken`: a Cluster of the asked name exists (without it).
pub fn step(
    request: &ClusterRegistrationRequest,
    labelled: Option<&str>,
    name_taken: bool,
) -> Step {
    let id = request.metadata.name.as_deref().unwrap_or_default();
    let status = |phase: Phase, cluster: &str, message: String| {
        Step::Status(RequestStatus {
            phase: phase.as_str().to_string(),
            cluster: cluster.to_string(),
            message,
        })
    };
    match (phase(request), labelled) {
        (Phase::Pending, _) => status(Phase::Pending, "", pending_text(id)),
        (Phase::Denied, _) => status(
            Phase::Denied,
            "",
            "denied: no Cluster is made; delete this request to let the cluster ask again".into(),
        ),
        (Phase::Approved, Some(cluster)) => status(
            Phase::Approved,
            cluster,
            format!("Cluster {cluster} is this cluster's (label {CLUSTER_ID_LABEL})"),
        ),
        (Phase::Approved, None) if name_taken => status(
            Phase::Approved,
            "",
            format!(
                "a Cluster named {} exists for another cluster: delete it, or start the agent \
                 with another --name and delete this request",
                request.spec.cluster_name
            ),
        ),
        (Phase::Approved, None) => Step::Create(cluster_for(request)),
    }
}

/// The Cluster a request makes: served through this proxy (joinFederation,
/// connection type proxy), marked with the cluster ID and the request. The
/// Cluster controller gives it its token and ports.
pub fn cluster_for(request: &ClusterRegistrationRequest) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": {
            "name": request.spec.cluster_name,
            "labels": { CLUSTER_ID_LABEL: request.spec.cluster_id },
            "annotations": {
                REQUEST_ANNOTATION: request.metadata.name.as_deref().unwrap_or_default(),
            },
        },
        "spec": {
            "joinFederation": true,
            "enable": true,
            "connection": { "type": CONNECTION_PROXY },
        },
    })
}

#[cfg(test)]
mod tests;
