//! The leader's side of registration: kube-rs's `Controller` over the
//! ClusterRegistrationRequests. For each, [`step`] decides; this writes:
//! the status `kubectl get clsrr` shows, and, once approved, the Cluster
//! (found first by its cluster-ID label, so a cluster registering again gets
//! its Cluster back instead of a twin). The Cluster controller
//! ([`crate::clusters`]) then gives the new Cluster its token, which the
//! door ([`super::admit`]) hands to the waiting agent.
//!
//! Only the leader writes (as the Cluster controller and the CSR signer);
//! a new leader goes over every request once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::crd::{CLUSTER_ID_LABEL, ClusterRegistrationRequest, RequestStatus};
use super::decide::{Step, step};
use crate::clusters::crd::Cluster;
use crate::ha::leader::Leadership;

/// Why a reconcile failed (retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("the Cluster to create is not an object: {0}")]
    Json(serde_json::Error),
}

struct Context {
    client: Client,
    leader: Leadership,
}

/// Run the controller until the process ends.
pub fn start(client: Client, leader: Leadership) -> tokio::task::JoinHandle<()> {
    let api: Api<ClusterRegistrationRequest> = Api::all(client.clone());
    let elected = leader.elections();
    let ctx = Arc::new(Context { client, leader });
    tokio::spawn(async move {
        Controller::new(api, watcher::Config::default())
            .reconcile_all_on(elected)
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                if let Err(kube::runtime::controller::Error::QueueError(e)) = result {
                    tracing::warn!(error = %e, "cannot watch ClusterRegistrationRequests: \
                        install the CRD (config/crd) and the proxy's RBAC (config/proxy)");
                }
            })
            .await;
    })
}

async fn reconcile(
    request: Arc<ClusterRegistrationRequest>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change());
    }
    let name = request.name_any();
    let clusters: Api<Cluster> = Api::all(ctx.client.clone());
    let selector = format!("{CLUSTER_ID_LABEL}={}", request.spec.cluster_id);
    let labelled = clusters
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .map(|c| c.name_any())
        .min();
    let name_taken = match labelled {
        Some(_) => false,
        None => clusters
            .get_opt(&request.spec.cluster_name)
            .await?
            .is_some(),
    };
    let status = match step(&request, labelled.as_deref(), name_taken) {
        Step::Status(status) => status,
        Step::Create(json) => {
            let cluster: DynamicObject = serde_json::from_value(json).map_err(Error::Json)?;
            let cluster_name = cluster.name_any();
            let dynamic: Api<DynamicObject> =
                Api::all_with(ctx.client.clone(), &ApiResource::erase::<Cluster>(&()));
            dynamic.create(&PostParams::default(), &cluster).await?;
            tracing::info!(request = %name, cluster = %cluster_name,
                cluster_id = %request.spec.cluster_id, "registration approved: Cluster created");
            // Decide again with the new Cluster: its status says so.
            match step(&request, Some(&cluster_name), false) {
                Step::Status(status) => status,
                Step::Create(_) => return Ok(Action::requeue(Duration::from_secs(1))),
            }
        }
    };
    if request.status.as_ref() != Some(&status) {
        write_status(&ctx.client, &name, &status).await?;
        tracing::info!(request = %name, phase = %status.phase, cluster = %status.cluster,
            "registration request updated");
    }
    Ok(Action::await_change())
}

async fn write_status(client: &Client, name: &str, status: &RequestStatus) -> Result<(), Error> {
    let api: Api<ClusterRegistrationRequest> = Api::all(client.clone());
    // Every field, empty ones too: a merge patch leaves out what it omits.
    let patch = serde_json::json!({ "status": {
        "phase": status.phase,
        "cluster": status.cluster,
        "message": status.message,
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn error_policy(
    request: Arc<ClusterRegistrationRequest>,
    error: &Error,
    _: Arc<Context>,
) -> Action {
    match error {
        // A Cluster of that name appeared meanwhile: decide again.
        Error::Kube(kube::Error::Api(e)) if e.code == 409 => {
            Action::requeue(Duration::from_secs(1))
        }
        _ => {
            tracing::warn!(request = %request.name_any(), error = %error,
                "could not handle a ClusterRegistrationRequest, retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}
