//! The `APIService` that makes the host kube-apiserver front this API:
//! `v1alpha1.tower.kubesphere.io`, pointing at the proxy's Service, with the
//! proxy CA as `caBundle` so the aggregator verifies our serving certificate
//! and nobody copies a CA by hand. Applied (server-side, idempotent) by every
//! replica at start and at each CA rotation step (the `caBundle` holds every
//! CA trusted then), retried until the host accepts it.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::{
    APIService, APIServiceSpec, ServiceReference,
};
use kube::api::{Api, Patch, PatchParams};
use kube::core::ObjectMeta;

use crate::identity::ca::Ca;

use super::{GROUP, VERSION};
use crate::identity::names::{MANAGED_BY, MANAGER};

/// Above the built-in groups' defaults for CRDs (1000), below Kubernetes'
/// own groups; only order in discovery depends on it.
const GROUP_PRIORITY_MINIMUM: i32 = 1000;
const VERSION_PRIORITY: i32 = 15;

/// `v1alpha1.tower.kubesphere.io`.
pub fn name() -> String {
    format!("{VERSION}.{GROUP}")
}

/// The object to apply: served by `namespace/service` port 443, verified
/// with `ca_pem`.
pub fn desired(namespace: &str, service: &str, ca_pem: &str) -> APIService {
    APIService {
        metadata: ObjectMeta {
            name: Some(name()),
            labels: Some([(MANAGED_BY.to_string(), MANAGER.to_string())].into()),
            ..Default::default()
        },
        spec: Some(APIServiceSpec {
            group: Some(GROUP.into()),
            version: Some(VERSION.into()),
            service: Some(ServiceReference {
                namespace: Some(namespace.into()),
                name: Some(service.into()),
                port: Some(443),
            }),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            group_priority_minimum: GROUP_PRIORITY_MINIMUM,
            version_priority: VERSION_PRIORITY,
            insecure_skip_tls_verify: None,
        }),
        status: None,
    }
}

/// Apply [`desired`] until the host accepts it (logged once done).
pub async fn register(client: kube::Client, namespace: String, service: String, ca_pem: String) {
    let api: Api<APIService> = Api::all(client);
    let object = desired(&namespace, &service, &ca_pem);
    let params = PatchParams::apply(MANAGER).force();
    let mut wait = Duration::from_secs(1);
    loop {
        match api.patch(&name(), &params, &Patch::Apply(&object)).await {
            Ok(_) => {
                tracing::info!(apiservice = %name(), service = %format!("{namespace}/{service}"),
                    "aggregated API registered");
                return;
            }
            Err(e) => {
                tracing::warn!(apiservice = %name(), error = %e, "cannot apply the APIService, \
                    retrying (the proxy needs create/update/patch on apiservices)");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// [`register`] with every CA trusted now, again at each CA rotation step,
/// until dropped.
pub async fn follow(client: kube::Client, namespace: String, service: String, ca: Ca) {
    let mut steps = ca.subscribe();
    loop {
        let bundle = ca.bundle_pem();
        register(client.clone(), namespace.clone(), service.clone(), bundle).await;
        if steps.changed().await.is_err() {
            return;
        }
    }
}
