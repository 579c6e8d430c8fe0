//! The signer controller for `tower.kubesphere.io/cluster-access`: kube-rs's
//! `Controller` over the CertificateSigningRequests of that signer (a field
//! selector, so other signers' requests never reach the proxy).
//!
//! For each request, [`next_step`] decides from the object alone: approved
//! and not yet answered means sign; denied, failed, issued or still pending
//! means nothing (a denied request never gets a certificate, whatever comes
//! later). Signing checks the request ([`signer::check`]) and that its cluster
//! is a Cluster this proxy serves, then writes `status.certificate`; a request
//! that cannot be signed gets a `Failed` condition saying why and what to do.
//! Both go through the `/status` subresource (RBAC: `update`
//! `certificatesigningrequests/status` and `sign` on the signer).
//!
//! Only the leader writes; a new leader goes over every request once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::clusters::crd::Cluster;
use crate::ha::leader::Leadership;
use crate::identity::ca::Ca;
use crate::identity::signer::{self, Checked, Refusal, SIGNER_NAME};

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing (not ours, pending, denied, failed, or already issued).
    Nothing,
    /// Approved and well formed: sign it for this long, if its cluster exists.
    Sign(Checked, Duration),
    /// Approved but not signable: mark it Failed.
    Fail(Refusal),
}

/// Decide from the object alone.
pub fn next_step(csr: &CertificateSigningRequest) -> Step {
    if csr.spec.signer_name != SIGNER_NAME {
        return Step::Nothing;
    }
    let status = csr.status.as_ref();
    if status
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
    {
        return Step::Nothing;
    }
    let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
    let holds = |kind: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == kind && c.status == "True")
    };
    // Denied wins over Approved: nothing is ever issued for a denied request.
    if holds("Denied") || holds("Failed") || !holds("Approved") {
        return Step::Nothing;
    }
    let usages = csr.spec.usages.as_deref().unwrap_or(&[]);
    match signer::check(&csr.spec.request.0, usages) {
        Ok(checked) => Step::Sign(checked, signer::validity(csr.spec.expiration_seconds)),
        Err(refusal) => Step::Fail(refusal),
    }
}

/// Why a reconcile failed (retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Kube(#[from] kube::Error),
}

struct Context {
    client: Client,
    ca: Arc<Ca>,
    leader: Leadership,
}

/// Run the signer controller until the process ends.
pub fn start(client: Client, ca: Arc<Ca>, leader: Leadership) -> tokio::task::JoinHandle<()> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let selector = format!("spec.signerName={SIGNER_NAME}");
    let elected = leader.elections();
    let ctx = Arc::new(Context { client, ca, leader });
    tracing::info!(
        signer = SIGNER_NAME,
        "signing approved CertificateSigningRequests"
    );
    tokio::spawn(async move {
        Controller::new(api, watcher::Config::default().fields(&selector))
            .reconcile_all_on(elected)
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                // Watch failures (retried with backoff); reconcile errors are
                // logged by error_policy.
                if let Err(kube::runtime::controller::Error::QueueError(e)) = result {
                    tracing::warn!(error = %e, "cannot watch CertificateSigningRequests: \
                        the proxy needs the RBAC in config/proxy/rbac-csr.yaml");
                }
            })
            .await;
    })
}

async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change());
    }
    let name = csr.name_any();
    let answer = match next_step(&csr) {
        Step::Nothing => return Ok(Action::await_change()),
        Step::Fail(refusal) => Err(refusal),
        Step::Sign(checked, validity) => match served(&ctx.client, &checked.cluster).await? {
            false => Err(signer::unknown_cluster(&checked.cluster)),
            true => signer::sign(&ctx.ca, &checked, validity).inspect(|_| {
                tracing::info!(csr = %name, user = %checked.user, groups = ?checked.groups,
                    cluster = %checked.cluster, ?validity, "signed a personal certificate");
            }),
        },
    };
    let mut updated = (*csr).clone();
    let status = updated.status.get_or_insert_with(Default::default);
    match answer {
        Ok(pem) => status.certificate = Some(ByteString(pem.into_bytes())),
        Err(refusal) => {
            tracing::info!(csr = %name, reason = refusal.reason, why = %refusal.message,
                "refused to sign a CertificateSigningRequest");
            let now = Time(jiff::Timestamp::now());
            status.conditions.get_or_insert_with(Vec::new).push(
                CertificateSigningRequestCondition {
                    type_: "Failed".into(),
                    status: "True".into(),
                    reason: Some(refusal.reason.into()),
                    message: Some(refusal.message),
                    last_transition_time: Some(now.clone()),
                    last_update_time: Some(now),
                },
            );
        }
    }
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    api.replace_status(&name, &PostParams::default(), &updated)
        .await?;
    Ok(Action::await_change())
}

/// Is `cluster` a Cluster this proxy serves?
async fn served(client: &Client, cluster: &str) -> Result<bool, kube::Error> {
    let clusters: Api<Cluster> = Api::all(client.clone());
    Ok(clusters
        .get_opt(cluster)
        .await?
        .is_some_and(|c| c.is_served()))
}

fn error_policy(csr: Arc<CertificateSigningRequest>, error: &Error, _: Arc<Context>) -> Action {
    match error {
        Error::Kube(kube::Error::Api(e)) if e.code == 409 => {
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            tracing::warn!(csr = %csr.name_any(), error = %error, "could not answer a CertificateSigningRequest, retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

#[cfg(test)]
mod tests;
