//! The write half of a leader's pass: the Cluster's `spec.connection` and
//! status as [`decide::plan`](crate::clusters::decide::plan) says, then its Events.
//!
//! Writes are merge patches of the fields we own, only when something
//! changed. The status write carries the resourceVersion of the spec write
//! before it, so it is a compare-and-swap: a conflict retries the pass rather
//! than overwrite what KubeSphere wrote meanwhile. Without the status
//! subresource (KubeSphere's own CRD) spec and status go out in one write
//! (`together`).
//!
//! Every write is remembered by its resourceVersion ([`Context::fresh`]): the
//! watch may lag by seconds, and a pass on an object older than our own last
//! write would issue another kubeconfig and conflict again.

use std::collections::HashMap;
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::{Context, Error};
use crate::clusters::crd::{self, Cluster};
use crate::clusters::decide::Plan;
use crate::clusters::events::publish;
use crate::clusters::status::patch::rfc3339;
use crate::clusters::{Ports, kubeconfig};

impl<P: Ports> Context<P> {
    pub(super) fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remember that this replica wrote `cluster` at `version`.
    fn wrote(&self, cluster: &str, version: Option<String>) {
        if let Some(v) = version.and_then(|v| v.parse::<u64>().ok()) {
            self.written().insert(cluster.to_string(), v);
        }
    }

    /// The cached object, or the API's when the cache has not yet seen this
    /// replica's last write. None: the Cluster is gone.
    pub(super) async fn fresh(&self, cached: Arc<Cluster>) -> Result<Option<Arc<Cluster>>, Error> {
        let name = cached.name_any();
        let known = self.written().get(&name).copied();
        if known.is_none_or(|w| version_of(&cached) >= w) {
            self.written().remove(&name);
            return Ok(Some(cached));
        }
        let api: Api<Cluster> = Api::all(self.client.clone());
        let Some(current) = api.get_opt(&name).await? else {
            return Ok(None);
        };
        self.written().insert(name, version_of(&current));
        Ok(Some(Arc::new(current)))
    }
}

/// A resourceVersion as the number it is (etcd's revision); 0 when it is not one.
fn version_of(cluster: &Cluster) -> u64 {
    cluster
        .resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Writes what `plan` says of `cluster` (the kubeconfig in `plan.spec` once
/// the cluster's ports are open), then publishes its Events.
pub(super) async fn write<P: Ports>(
    cluster: &Cluster,
    name: &str,
    ctx: &Context<P>,
    plan: Plan,
) -> Result<(), Error> {
    let spec = plan.spec;
    let api: Api<Cluster> = Api::all(ctx.client.clone());
    // Without a status subresource (KubeSphere's CRD) spec and status go
    // out in one write.
    let together = !spec.is_empty() && !ctx.status_path.subresource(&ctx.client).await;
    let mut resource_version = cluster.resource_version();
    if !spec.is_empty() && !together {
        let patched = api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(spec_patch(&spec)),
            )
            .await?;
        resource_version = patched.resource_version();
        ctx.wrote(name, patched.resource_version());
        tracing::info!(cluster = %name, fields = ?spec.keys().collect::<Vec<_>>(), "cluster spec updated");
    }
    let mut status = plan.forget;
    // The published kubeconfig's certificate expiry goes with this status
    // write (it was a member-status write of its own: one more write per
    // cluster at connect, 10,000 at a fleet's start).
    if let Some(expiry) = expiry_to_write(cluster, &spec, plan.serve_at.is_some()) {
        status.insert("certificateExpirationTime".into(), json!(expiry));
    }
    if let Some(conditions) = plan.conditions {
        status.insert("conditions".into(), json!(conditions));
    }
    // What the refresh after a session change saw of the member goes out
    // with this write rather than in one of its own.
    let left = match ctx.registry.live(name) > 0 {
        true => ctx.handoff.take(name).await,
        false => None,
    };
    if let Some(left) = &left {
        let kubeconfig = spec.get("kubeconfig").and_then(|k| k.as_str());
        let kubeconfig = kubeconfig.unwrap_or(&cluster.spec.connection.kubeconfig);
        let none = Default::default();
        let current = cluster.status.as_ref().unwrap_or(&none);
        for (field, value) in left.patch(name, current, kubeconfig) {
            status.entry(field).or_insert(value);
        }
    }
    if together {
        let mut patch = spec_patch(&spec);
        if !status.is_empty() {
            patch["metadata"] = json!({"resourceVersion": resource_version});
            patch["status"] = json!(status);
        }
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(patched) if !crd::dropped(&patch, &patched) => {
                resource_version = patched.resource_version();
                ctx.wrote(name, patched.resource_version());
                tracing::info!(cluster = %name, fields = ?spec.keys().collect::<Vec<_>>(), "cluster spec and status updated");
                status.clear();
            }
            Ok(patched) => {
                // The CRD gained the subresource since discovery was asked:
                // the spec is written, the status goes the other way.
                ctx.status_path.learn(true);
                resource_version = patched.resource_version();
                ctx.wrote(name, patched.resource_version());
                tracing::info!(cluster = %name, fields = ?spec.keys().collect::<Vec<_>>(), "cluster spec updated");
            }
            Err(e) => {
                if let Some(left) = left {
                    ctx.handoff.restore(name, left);
                }
                return Err(e.into());
            }
        }
    }
    if !status.is_empty() {
        // resourceVersion makes this a compare-and-swap: conditions written by
        // KubeSphere meanwhile are never overwritten (we retry on conflict).
        let patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "status": status,
        });
        let written = crd::patch_status(&ctx.client, &ctx.status_path, name, &patch).await;
        let patched = match written {
            Ok(c) => c,
            Err(e) => {
                if let Some(left) = left {
                    ctx.handoff.restore(name, left);
                }
                return Err(e.into());
            }
        };
        ctx.wrote(name, patched.resource_version());
        tracing::info!(cluster = %name, "cluster status updated");
    }
    for event in plan.events {
        let type_ = if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(&ctx.recorder, cluster, type_, event.reason, event.note);
    }
    Ok(())
}

/// A merge patch of the `spec.connection` fields in `spec`.
fn spec_patch(spec: &serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    json!({"spec": {"connection": spec}})
}

/// The expiry of the kubeconfig being written, or of the one published
/// while the cluster is served, when the status does not say it yet (also
/// after a status write that conflicted once the kubeconfig was written).
fn expiry_to_write(
    cluster: &Cluster,
    spec: &serde_json::Map<String, serde_json::Value>,
    served: bool,
) -> Option<String> {
    let published = &cluster.spec.connection.kubeconfig;
    let kubeconfig = match spec.get("kubeconfig").and_then(|k| k.as_str()) {
        Some(new) => new,
        None if served && !published.is_empty() => published,
        None => return None,
    };
    let expiry = rfc3339(kubeconfig::read(kubeconfig)?.cert_not_after?);
    let stored = cluster
        .status
        .as_ref()
        .and_then(|s| s.certificate_expiration_time.as_deref());
    (stored != Some(expiry.as_str())).then_some(expiry)
}
