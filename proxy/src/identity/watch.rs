//! Every replica follows the Secret `<namespace>/tower-proxy`: a rotation is
//! an edit of it (by kubectl or `proxy rotate-*`), so no replica restarts and
//! all of them take the same step. An unreadable edit keeps what is in use
//! and says why (a rotation must never break the port agents dial).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::watcher;

use super::ca::Ca;
use super::host_keys::HostKeys;
use super::rotation::plan;
use super::secret::{SECRET_NAME, host_keys_in};

/// Follow the Secret until the task is dropped. `host_keys`: `None` when the
/// host key comes from `--host-key`; `ca`: `None` when the CA comes from
/// `--ca-cert`/`--ca-key` (files are not rotated through the Secret).
pub async fn follow(
    client: kube::Client,
    namespace: String,
    host_keys: Option<Arc<HostKeys>>,
    ca: Option<Ca>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={SECRET_NAME}"));
    let mut events = watcher(api, config).boxed();
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching Secret {namespace}/{SECRET_NAME} failed, \
                    retrying (the proxy needs list/watch on it: config/proxy/rbac.yaml)");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let data = secret.data.unwrap_or_default();
        if let Some(keys) = &host_keys {
            match host_keys_in(&data, &namespace) {
                Ok((current, next)) => {
                    keys.set(current, next.as_ref());
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "the SSH host keys in the Secret are unusable: keeping the ones in use; fix \
                     the Secret"
                ),
            }
        }
        if let Some(ca) = &ca {
            match plan(&data) {
                Ok(plan) => {
                    let phase = plan.phase.name();
                    let trusted = plan.others.len() + 1;
                    let serving = if plan.serving.is_some() {
                        "previous"
                    } else {
                        "signer"
                    };
                    if ca.rotate(plan) {
                        tracing::info!(
                            phase,
                            trusted,
                            serving,
                            "CA rotation step taken: listeners trust the new set; re-issuing \
                             serving certificates and kubeconfigs"
                        );
                    }
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "the CA keys in the Secret are unusable: keeping the CAs in use; fix the Secret"
                ),
            }
        }
    }
}
