//! One pass over one Cluster, I/O only: gather the facts, ask
//! [`super::decide`], write what it says. [`super::controller`] decides
//! when a pass runs.
//!
//! - this file: the pass itself ([`reconcile`]: lead, follow or forget), its
//!   [`Context`] and [`Error`]s, and when it runs again;
//! - [`serving`]: what serving a Cluster takes besides the Cluster: ports,
//!   the Service, the certificate's names, the kubeconfig;
//! - [`write`]: the leader's writes of spec, status and Events, and reading
//!   the Cluster from the API while the cache lags behind our last write.

mod serving;
mod write;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::comeback;
use super::crd::{Cluster, StatusPath};
use super::decide::{self, Facts, Role};
use super::events::Recorder;
use super::service::{self, Addresses, Exposure};
use super::status::handoff::Handoff;
use super::store::Names;
use super::{Options, Ports};
use crate::agents::registry::Registry;
use crate::ha::leader::Leadership;
use crate::ha::owners::Owners;
use crate::identity::ca::Ca;
use crate::ops::metrics::Metrics;

/// Resync period: catches drift nobody told us about.
const RESYNC: Duration = Duration::from_secs(300);

/// What reconcile needs.
pub struct Context<P: Ports> {
    pub(super) client: Client,
    pub(super) store: Store<Cluster>,
    pub(super) registry: Registry,
    pub(super) ca: Arc<Ca>,
    pub(super) ports: Arc<P>,
    pub(super) options: Options,
    pub(super) recorder: Recorder,
    pub(super) names: Names,
    /// Ports handed out per cluster, maybe not yet visible in the store.
    pub(super) reserved: Mutex<HashMap<String, (u16, u16)>>,
    /// Only the leader writes; the others keep their own ports and sessions right.
    pub(super) leader: Leadership,
    /// Who serves what across replicas (HA), if several run.
    pub(super) owners: Option<Arc<Owners>>,
    pub(super) metrics: Arc<Metrics>,
    /// Per cluster, the resourceVersion of this replica's last write (or
    /// [`u64::MAX`] after a conflict): a cached object older than that is
    /// stale, so the pass reads the Cluster from the API instead. Under load
    /// the watch lags by seconds, and a pass on the old object would issue
    /// another kubeconfig and conflict again and again (at 1,000 clusters
    /// several writes per cluster and minutes to settle).
    pub(super) written: Mutex<HashMap<String, u64>>,
    /// `--cluster-ports none`: the names of our Services still to delete,
    /// listed on first use.
    pub(super) services_left: tokio::sync::OnceCell<Mutex<HashSet<String>>>,
    /// Since when this replica leads (None: it does not), for [`comeback`].
    pub(super) leading_since: Mutex<Option<SystemTime>>,
    /// What refreshes after session changes observed, for the status write.
    pub(super) handoff: Handoff,
    /// Whether the status is written apart from the object.
    pub(super) status_path: Arc<StatusPath>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the controller needs when several replicas run (`--leader-elect`).
pub struct Ha {
    pub leader: Leadership,
    pub owners: Arc<Owners>,
    /// Clusters whose holder changed ([`Owners::new`]).
    pub changes: mpsc::UnboundedReceiver<String>,
}

/// Errors of one reconcile; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("no free port pair left in {0:?} (ks port = kube port + 10000); widen --cluster-ports")]
    NoPorts(std::ops::Range<u16>),
    #[error("certificate: {0}")]
    Cert(String),
    #[error(
        "Service {0} cannot be created: does namespace {1:?} exist? (create it, or set --namespace)"
    )]
    Namespace(String, String),
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// A fresh token: 32 bytes from the OS CSPRNG, hex.
pub fn new_token() -> String {
    use rand::RngExt as _;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One pass over one Cluster.
pub async fn reconcile<P: Ports>(
    cluster: Arc<Cluster>,
    ctx: Arc<Context<P>>,
) -> Result<Action, Error> {
    let name = cluster.name_any();
    // The store is fresher than the queued object.
    let Some(cluster) = ctx.store.get(&ObjectRef::new(&name)) else {
        return Ok(Action::await_change());
    };
    let Some(cluster) = ctx.fresh(cluster).await? else {
        return Ok(Action::await_change());
    };
    let leader = ctx.leader.is_leader();
    {
        let mut since = lock(&ctx.leading_since);
        match leader {
            true => _ = since.get_or_insert_with(SystemTime::now),
            false => *since = None,
        }
    }
    match decide::role(&cluster, leader) {
        Role::Forget => forget(&name, &ctx).await,
        Role::Follow => follow(&cluster, &name, &ctx).await,
        Role::Lead => lead(&cluster, &name, &ctx).await,
    }
}

async fn forget<P: Ports>(name: &str, ctx: &Context<P>) -> Result<Action, Error> {
    ctx.handoff.discard(name);
    let reason = "cluster is no longer served by this proxy";
    if ctx.registry.revoke(name, None, reason).await > 0 {
        tracing::info!(cluster = %name, "cluster no longer served: sessions closed");
    }
    ctx.ports.close(name).await;
    Ok(Action::await_change())
}

async fn lead<P: Ports>(cluster: &Cluster, name: &str, ctx: &Context<P>) -> Result<Action, Error> {
    if super::rotate::rotate_if_asked(cluster, ctx).await? {
        return Ok(Action::requeue(RESYNC));
    }
    let token = decide::token(cluster, new_token);
    let elsewhere = ctx.elsewhere(name);
    if let Some(since) = *lock(&ctx.leading_since)
        && let Some(left) = comeback::wait(&comeback::Facts {
            cluster,
            token: &token,
            available: ctx.registry.live(name) > 0 || elsewhere.is_some(),
            seen_here: ctx.registry.seen(name),
            leading_since: since,
            now: SystemTime::now(),
        })
    {
        tracing::debug!(cluster = %name, ?left, "waiting for the agent to come back");
        return Ok(Action::requeue(left));
    }
    // A token that changed leaves no session of the old one behind, but
    // those of a rotation's grace period, until it ends.
    let grace_left = super::rotate::keep_and_tell(cluster, &token, ctx).await;
    // `--cluster-ports none`: no ports, no Service, the path form's URL.
    let path_server = ctx.options.path_form.as_ref().map(|p| p.server(name));
    let (ports, exposure, addresses) = match &path_server {
        Some(_) => {
            ctx.remove_service(name).await?;
            ((0, 0), Exposure::default(), Addresses::default())
        }
        None => {
            let ports = ctx.ports_for(cluster)?;
            let exposure = Exposure::of(cluster);
            let svc = ctx.apply_service(cluster, ports, &exposure).await?;
            let addresses = Addresses::of(Some(&svc), &exposure);
            (ports, exposure, addresses)
        }
    };
    let now = now();
    let mut plan = decide::plan(&Facts {
        cluster,
        token: &token,
        ports,
        exposure: &exposure,
        addresses: &addresses,
        advertise_address: ctx.options.advertise_address.as_deref(),
        path_server: path_server.as_deref(),
        live: ctx.registry.live(name),
        elsewhere: elsewhere.as_deref(),
        now: &now,
    });
    if let Some(server) = &plan.serve_at {
        if path_server.is_none() {
            // The certificate must also cover addresses learnt since the ports
            // opened: the ClusterIP, the load balancer's IP or hostname.
            let names = ctx.listener_names(name, &addresses);
            ctx.ports
                .open(name, ports.0, ports.1, &names)
                .await
                .map_err(Error::Cert)?;
        }
        if let Some(kubeconfig) = ctx.kubeconfig(cluster, server)? {
            plan.spec.insert("kubeconfig".into(), json!(kubeconfig));
        }
    }
    write::write(cluster, name, ctx, plan).await?;
    Ok(requeue(grace_left))
}

/// Again after the resync period, or when a grace period ends if sooner.
fn requeue(grace_left: Option<Duration>) -> Action {
    Action::requeue(grace_left.map_or(RESYNC, |left| left.min(RESYNC)))
}

/// A replica that does not lead writes nothing: it revokes sessions of a
/// stale token and keeps the cluster's ports open (for its own sessions, and
/// to relay clients to the replica with the agent).
async fn follow<P: Ports>(
    cluster: &Cluster,
    name: &str,
    ctx: &Context<P>,
) -> Result<Action, Error> {
    let token = &cluster.spec.connection.token;
    let grace_left = match token.is_empty() {
        false => super::rotate::keep_and_tell(cluster, token, ctx).await,
        true => None,
    };
    let available = ctx.registry.live(name) > 0 || ctx.elsewhere(name).is_some();
    if ctx.options.path_form.is_some() {
        // No ports to keep: the access port serves every cluster.
        return Ok(requeue(grace_left));
    }
    let Some((kube, ks)) = decide::follow(cluster, available) else {
        return Ok(requeue(grace_left));
    };
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ctx.options.namespace);
    let svc = services.get_opt(&service::name(name)).await?;
    let addresses = Addresses::of(svc.as_ref(), &Exposure::of(cluster));
    let names = ctx.listener_names(name, &addresses);
    ctx.ports
        .open(name, kube, ks, &names)
        .await
        .map_err(Error::Cert)?;
    Ok(requeue(grace_left))
}

pub(super) fn error_policy<P: Ports>(
    cluster: Arc<Cluster>,
    error: &Error,
    ctx: Arc<Context<P>>,
) -> Action {
    match error {
        // Someone (often our own previous write) changed the object meanwhile:
        // expected with optimistic concurrency, try again on fresh data (read
        // from the API: the cache may not have the change yet).
        Error::Kube(kube::Error::Api(e)) if e.code == 409 => {
            ctx.written().insert(cluster.name_any(), u64::MAX);
            tracing::debug!(cluster = %cluster.name_any(), "write conflict, retrying");
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            tracing::warn!(cluster = %cluster.name_any(), %error, "reconcile failed, retrying");
            Action::requeue(Duration::from_secs(2))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_64_hex_chars_and_differ() {
        let a = new_token();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_token());
    }
}
