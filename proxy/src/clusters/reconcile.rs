//! One pass over one Cluster, I/O only: gather the facts, ask
//! [`super::decide`], write what it says. Writes are merge patches of the
//! fields we own, only when something changed. [`super::controller`] decides
//! when a pass runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use super::comeback;
use super::crd::{Cluster, StatusPath};
use super::decide::{self, Facts, PortChoice, Role};
use super::events::{Recorder, publish};
use super::service::{self, Addresses, Exposure};
use super::status::handoff::Handoff;
use super::status::patch::rfc3339;
use super::store::Names;
use super::{Options, Ports, kubeconfig};
use crate::agents::registry::Registry;
use crate::ha::leader::Leadership;
use crate::ha::owners::Owners;
use crate::identity::ca::Ca;
use crate::identity::names::{MANAGED_BY, MANAGER};
use crate::ops::metrics::Metrics;

/// How long the client certificates in written kubeconfigs are valid...
const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// ...and how long before expiry they are renewed.
const CLIENT_CERT_RENEW: Duration = Duration::from_secs(30 * 24 * 3600);
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

/// A resourceVersion as the number it is (etcd's revision); 0 when it is not one.
fn version_of(cluster: &Cluster) -> u64 {
    cluster
        .resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl<P: Ports> Context<P> {
    fn written(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
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
    async fn fresh(&self, cached: Arc<Cluster>) -> Result<Option<Arc<Cluster>>, Error> {
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

    /// Ports of `cluster` per [`decide::ports`]; a new pair is reserved.
    fn ports_for(&self, cluster: &Cluster) -> Result<(u16, u16), Error> {
        let name = cluster.name_any();
        let used: HashSet<u16> = self
            .store
            .state()
            .iter()
            .filter(|c| c.name_any() != name)
            .flat_map(|c| {
                [
                    c.spec.connection.kubernetes_api_server_port,
                    c.spec.connection.kubesphere_api_server_port,
                ]
            })
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let others: HashSet<u16> = reserved
            .iter()
            .filter(|(n, _)| **n != name)
            .flat_map(|(_, (a, b))| [*a, *b])
            .collect();
        let conn = &cluster.spec.connection;
        let choice = decide::ports(
            (
                conn.kubernetes_api_server_port,
                conn.kubesphere_api_server_port,
            ),
            reserved.get(&name).copied(),
            &used,
            &others,
            self.options.ports.clone(),
            |port| self.bindable(port),
        )
        .ok_or_else(|| Error::NoPorts(self.options.ports.clone()))?;
        if let PortChoice::New(pair) = choice {
            reserved.insert(name, pair);
        }
        Ok(choice.pair())
    }

    /// Proven free by binding it (and letting go at once).
    fn bindable(&self, port: u16) -> bool {
        std::net::TcpListener::bind((self.options.bind_host.as_str(), port)).is_ok()
    }

    fn selector(&self) -> BTreeMap<String, String> {
        self.options.selector.iter().cloned().collect()
    }

    /// Create or fix Service mc-<name>; writes only when our fields differ.
    async fn apply_service(
        &self,
        cluster: &Cluster,
        ports: (u16, u16),
        exposure: &Exposure,
    ) -> Result<Service, Error> {
        let name = service::name(&cluster.name_any());
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.options.namespace);
        let selector = self.selector();
        if let Some(current) = api.get_opt(&name).await?
            && service::matches(&current, &selector, ports, exposure)
        {
            return Ok(current);
        }
        let svc = service::desired(cluster, &self.options.namespace, &selector, ports, exposure);
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&svc),
            )
            .await
        {
            Ok(svc) => {
                tracing::info!(cluster = %cluster.name_any(), service = %name, "service applied");
                Ok(svc)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                Err(Error::Namespace(name, self.options.namespace.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `--cluster-ports none`: a Service left from per-cluster ports is
    /// deleted (clients are told the path form instead).
    async fn remove_service(&self, cluster: &str) -> Result<(), Error> {
        // A Service is left only by a run with per-cluster ports before this
        // one, so ours are listed once per process. Asked per cluster it was a
        // read per cluster, 10,000 at a fleet's start.
        let left = self
            .services_left
            .get_or_try_init(|| async {
                let api: Api<Service> =
                    Api::namespaced(self.client.clone(), &self.options.namespace);
                let ours = api
                    .list(&ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}")))
                    .await?;
                let names = ours.items.iter().map(ResourceExt::name_any).collect();
                Ok::<_, Error>(Mutex::new(names))
            })
            .await?;
        let name = service::name(cluster);
        if !lock(left).contains(&name) {
            return Ok(());
        }
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.options.namespace);
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {
                tracing::info!(%cluster, service = %name, "service deleted: --cluster-ports none")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        lock(left).remove(&name);
        Ok(())
    }

    /// The names of the cluster's serving certificate, remembered for agents
    /// that connect before the next reconcile.
    fn listener_names(&self, cluster: &str, addresses: &Addresses) -> Vec<String> {
        let names = decide::sans(
            cluster,
            &self.options.namespace,
            self.options.advertise_address.as_deref(),
            addresses,
        );
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.to_string(), names.clone());
        names
    }

    /// The kubeconfig to publish, or None when the current one is still good.
    fn kubeconfig(&self, cluster: &Cluster, server: &str) -> Result<Option<String>, Error> {
        let current = &cluster.spec.connection.kubeconfig;
        // Every trusted CA: during a rotation clients must accept either.
        let ca = &self.ca.bundle_pem();
        let name = cluster.name_any();
        if kubeconfig::is_current(
            current,
            &name,
            server,
            ca,
            SystemTime::now(),
            CLIENT_CERT_RENEW,
        ) {
            return Ok(None);
        }
        let issued = self
            .ca
            .issue_client(
                &format!("tower:{name}"),
                &["tower:clients"],
                CLIENT_CERT_VALIDITY,
            )
            .map_err(|e| Error::Cert(e.to_string()))?;
        self.metrics
            .set_cert_expiry(&name, "client", issued.not_after);
        let yaml = kubeconfig::render(&name, server, ca, &issued.cert_pem, &issued.key_pem);
        Ok(Some(B64.encode(yaml)))
    }

    /// An agent on another replica counts: clients reach it through any replica.
    fn elsewhere(&self, cluster: &str) -> Option<String> {
        self.owners
            .as_ref()
            .and_then(|o| o.owner(cluster))
            .map(|o| o.replica)
    }
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
    let plan = decide::plan(&Facts {
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
    let mut spec = plan.spec;
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
            spec.insert("kubeconfig".into(), json!(kubeconfig));
        }
    }
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
            Ok(patched) if !super::crd::dropped(&patch, &patched) => {
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
        let written = super::crd::patch_status(&ctx.client, &ctx.status_path, name, &patch).await;
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
    Ok(requeue(grace_left))
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
