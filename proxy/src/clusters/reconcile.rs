//! The Cluster controller: Tower's workflow on `cluster.kubesphere.io` objects.
//!
//! For every Cluster with `joinFederation: true` and `connection.type: proxy`,
//! [`reconcile`] makes the world match:
//! - a token (64 hex chars from the OS CSPRNG) when `spec.connection.token` is empty;
//! - a kube API port and a ks-apiserver port (+10000) that no other Cluster uses
//!   and that are free on this host;
//! - Service `<namespace>/mc-<name>` (6443 -> kube port, 80 -> ks port), owned by
//!   the Cluster, re-created if deleted;
//! - `kubernetesAPIEndpoint` / `kubesphereAPIEndpoint` (`--advertise-address`, or
//!   the Service's ClusterIP), IPv6-safe;
//! - while an agent is connected: a kubeconfig for the cluster's HTTPS port in
//!   `spec.connection.kubeconfig` (our CA, a client certificate renewed before it
//!   expires);
//! - conditions `Initialized` and `AgentAvailable` (True while a session lives).
//!
//! Everything is derived from the object and the session [`Registry`], so running
//! it again changes nothing. Writes are merge patches of the fields we own, only
//! when something changed; a condition's lastTransitionTime moves only when its
//! status does. Sessions trigger reconciles through [`CrStore::on_change`]; a
//! separate watch closes the sessions and ports of deleted Clusters at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::ca::Ca;
use crate::crd::{Cluster, Condition};
use crate::leader::Leadership;
use crate::owners::Owners;
use crate::registry::{ClusterStore, Registry};

/// Field manager name for server-side apply, and the managed-by label.
const MANAGER: &str = "tower-proxy";
/// Label marking the Services we manage.
const MANAGER_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming the Cluster an mc-<name> Service belongs to.
const CLUSTER_LABEL: &str = "cluster.kubesphere.io/name";
/// How long the client certificates in written kubeconfigs are valid...
const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// ...and how long before expiry they are renewed.
const CLIENT_CERT_RENEW: Duration = Duration::from_secs(30 * 24 * 3600);
/// Resync period: catches drift nobody told us about.
const RESYNC: Duration = Duration::from_secs(300);
pub const INITIALIZED: &str = "Initialized";
pub const AGENT_AVAILABLE: &str = "AgentAvailable";

/// Opens and closes a cluster's ports (kube API over HTTPS, ks-apiserver over
/// HTTP). Implemented by the listeners; a seam for tests.
pub trait Ports: Send + Sync + 'static {
    /// Make sure both ports listen, with a serving certificate for `sans`.
    fn open(
        &self,
        cluster: &str,
        kube_port: u16,
        ks_port: u16,
        sans: &[String],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Close both ports at once.
    fn close(&self, cluster: &str) -> impl Future<Output = ()> + Send;
}

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct Options {
    /// Namespace of the `mc-<name>` Services.
    pub namespace: String,
    /// Endpoints point here instead of the Service's ClusterIP (proxy outside the cluster).
    pub advertise_address: Option<String>,
    /// Labels selecting the proxy's pods, for the `mc-<name>` Services.
    pub selector: Vec<(String, String)>,
    /// Kube API ports are taken from here; the ks port is +10000.
    pub ports: std::ops::Range<u16>,
    /// Address the listeners bind to, for the "is it free" check.
    pub bind_host: String,
}

/// What reconcile needs.
pub struct Context<P: Ports> {
    client: Client,
    store: Store<Cluster>,
    registry: Registry<CrStore>,
    ca: Arc<Ca>,
    ports: Arc<P>,
    options: Options,
    recorder: Recorder,
    names: Names,
    /// Ports handed out per cluster, maybe not yet visible in the store.
    reserved: Mutex<HashMap<String, (u16, u16)>>,
    /// Only the leader writes; the others keep their own ports and sessions right.
    leader: Leadership,
    /// Who serves what across replicas (HA), if several run.
    owners: Option<Arc<Owners>>,
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
        "Service {0} cannot be created: does namespace {1:?} exist? (create it, or set --service-namespace)"
    )]
    Namespace(String, String),
}

/// The registry's view of the Cluster objects: tokens come from the cache,
/// session changes trigger reconciles, and ports open before an agent hears
/// success.
pub struct CrStore {
    store: Store<Cluster>,
    /// The serving certificate names reconcile last computed per cluster (it
    /// knows the ClusterIP and LB address), so connecting agents get them too.
    names: Names,
    recorder: Recorder,
    trigger: mpsc::UnboundedSender<ObjectRef<Cluster>>,
    open: OpenPorts,
    options: Options,
    owners: Option<Arc<Owners>>,
}

type Names = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// [`Ports::open`], type-erased: the listeners hold a `Registry<CrStore>`, so
/// `CrStore` cannot name their type.
type OpenPorts = Arc<
    dyn Fn(
            String,
            u16,
            u16,
            Vec<String>,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

impl ClusterStore for CrStore {
    fn token(&self, cluster: &str) -> Option<String> {
        let obj = self.store.get(&ObjectRef::new(cluster))?;
        (obj.is_served() && !obj.spec.connection.token.is_empty())
            .then(|| obj.spec.connection.token.clone())
    }

    async fn on_connect(&self, cluster: &str) -> Result<(), String> {
        let obj = self
            .store
            .get(&ObjectRef::new(cluster))
            .ok_or_else(|| format!("cluster {cluster} not found"))?;
        let conn = &obj.spec.connection;
        match (
            u16::try_from(conn.kubernetes_api_server_port),
            u16::try_from(conn.kubesphere_api_server_port),
        ) {
            (Ok(kube), Ok(ks)) if kube != 0 && ks != 0 => {
                let cached = self
                    .names
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(cluster)
                    .cloned();
                let sans = cached.unwrap_or_else(|| sans(cluster, &self.options, &[]));
                (self.open)(cluster.to_string(), kube, ks, sans).await
            }
            _ => Err("the cluster's ports are not assigned yet, retry shortly".into()),
        }
    }

    fn on_reject(&self, cluster: &str, reason: &str) {
        // Only for clusters that exist: anyone can send any name.
        if let Some(obj) = self.store.get(&ObjectRef::new(cluster)) {
            let recorder = self.recorder.clone();
            let note = format!("an agent was refused: {reason}");
            tokio::spawn(async move {
                publish(&recorder, &obj, EventType::Warning, "AgentRejected", note).await;
            });
        }
    }

    fn on_change(&self, cluster: &str) {
        let _ = self.trigger.send(ObjectRef::new(cluster));
        if let Some(owners) = &self.owners {
            owners.sessions_changed();
        }
        crate::member_info::notify(cluster);
    }
}

/// `https://host:port`, with brackets around IPv6 addresses.
pub fn endpoint(scheme: &str, host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

fn service_name(cluster: &str) -> String {
    format!("mc-{cluster}")
}

/// SANs of a cluster's serving certificate.
fn sans(cluster: &str, options: &Options, addresses: &[&str]) -> Vec<String> {
    let svc = service_name(cluster);
    let ns = &options.namespace;
    let mut sans = vec![
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
        format!("{svc}.{ns}"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    sans.extend(options.advertise_address.iter().cloned());
    sans.extend(addresses.iter().map(|a| a.to_string()));
    let mut seen = HashSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

/// A fresh token: 32 bytes from the OS CSPRNG, hex.
pub fn new_token() -> String {
    use rand::RngExt as _;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// `conditions` with `kind` set to `status`; None when nothing changes.
/// lastTransitionTime moves only when the status does.
pub fn set_condition(
    conditions: &[Condition],
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> Option<Vec<Condition>> {
    let status = if status { "True" } else { "False" };
    let mut out = conditions.to_vec();
    match out.iter_mut().find(|c| c.kind == kind) {
        Some(c) if c.status == status && c.reason == reason && c.message == message => None,
        Some(c) => {
            let t = now();
            if c.status != status {
                c.last_transition_time = Some(t.clone());
            }
            c.status = status.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.last_update_time = Some(t);
            Some(out)
        }
        None => {
            let t = now();
            out.push(Condition {
                kind: kind.to_string(),
                status: status.to_string(),
                last_update_time: Some(t.clone()),
                last_transition_time: Some(t),
                reason: reason.to_string(),
                message: message.to_string(),
            });
            Some(out)
        }
    }
}

impl<P: Ports> Context<P> {
    /// A Kubernetes Event on the Cluster; failing to record one is only logged.
    async fn event(&self, cluster: &Cluster, type_: EventType, reason: &str, note: String) {
        publish(&self.recorder, cluster, type_, reason, note).await;
    }

    /// Ports of `cluster` if set and not taken by another Cluster, else a free pair.
    fn ports_for(&self, cluster: &Cluster) -> Result<(u16, u16), Error> {
        let name = cluster.name_any();
        let kube = cluster.spec.connection.kubernetes_api_server_port;
        let ks = cluster.spec.connection.kubesphere_api_server_port;
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
        if let (Ok(kube), Ok(ks)) = (u16::try_from(kube), u16::try_from(ks))
            && kube != 0
            && ks != 0
            && !used.contains(&kube)
            && !used.contains(&ks)
        {
            return Ok((kube, ks));
        }
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&pair) = reserved.get(&name)
            && !used.contains(&pair.0)
            && !used.contains(&pair.1)
        {
            return Ok(pair);
        }
        let taken: HashSet<u16> = reserved
            .iter()
            .filter(|(n, _)| **n != name)
            .flat_map(|(_, (a, b))| [*a, *b])
            .chain(used)
            .collect();
        for port in self.options.ports.clone() {
            let Some(ks) = port.checked_add(10000) else {
                break;
            };
            if taken.contains(&port)
                || taken.contains(&ks)
                || !self.bindable(port)
                || !self.bindable(ks)
            {
                continue;
            }
            reserved.insert(name, (port, ks));
            return Ok((port, ks));
        }
        Err(Error::NoPorts(self.options.ports.clone()))
    }

    /// Proven free by binding it (and letting go at once).
    fn bindable(&self, port: u16) -> bool {
        std::net::TcpListener::bind((self.options.bind_host.as_str(), port)).is_ok()
    }

    /// Create or fix Service mc-<name>. Writes only when our fields differ, so
    /// an unchanged cluster causes no PATCH.
    async fn apply_service(
        &self,
        cluster: &Cluster,
        kube: u16,
        ks: u16,
        exposure: &Exposure,
    ) -> Result<Service, Error> {
        let name = service_name(&cluster.name_any());
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.options.namespace);
        let owner = cluster
            .controller_owner_ref(&())
            .map(|o| vec![o])
            .unwrap_or_default();
        let selector: BTreeMap<String, String> = self.options.selector.iter().cloned().collect();
        let kind = if exposure.enabled {
            "LoadBalancer"
        } else {
            "ClusterIP"
        };
        if let Some(current) = api.get_opt(&name).await?
            && service_matches(&current, kind, kube, ks, &selector, &exposure.annotations)
        {
            return Ok(current);
        }
        let svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": self.options.namespace,
                "labels": {"app.kubernetes.io/managed-by": MANAGER, CLUSTER_LABEL: cluster.name_any()},
                "annotations": exposure.annotations,
                "ownerReferences": owner,
            },
            "spec": {
                "type": kind,
                "selector": selector,
                "ports": [
                    {"name": "kubernetes", "protocol": "TCP", "port": 6443, "targetPort": kube},
                    {"name": "kubesphere", "protocol": "TCP", "port": 80, "targetPort": ks},
                ],
            },
        });
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&svc),
            )
            .await
        {
            Ok(svc) => {
                tracing::info!(cluster = %cluster.name_any(), service = %name, kind, "service applied");
                Ok(svc)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                Err(Error::Namespace(name, self.options.namespace.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The names the cluster's serving certificate covers (its ClusterIP and
    /// load balancer address when known), remembered for agents that connect
    /// before the next reconcile.
    fn listener_names(
        &self,
        cluster: &str,
        cluster_ip: Option<&str>,
        lb: Option<&str>,
    ) -> Vec<String> {
        let addresses: Vec<&str> = cluster_ip.into_iter().chain(lb).collect();
        let names = sans(cluster, &self.options, &addresses);
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.to_string(), names.clone());
        names
    }

    /// The kubeconfig to publish, or None when the current one is still good.
    fn kubeconfig(&self, cluster: &Cluster, server: &str) -> Result<Option<String>, Error> {
        let current = &cluster.spec.connection.kubeconfig;
        if !current.is_empty() && kubeconfig_is_current(current, server, self.ca.cert_pem()) {
            return Ok(None);
        }
        let name = cluster.name_any();
        let user = format!("tower:{name}");
        let issued = self
            .ca
            .issue_client(&user, &["tower:clients"], CLIENT_CERT_VALIDITY)
            .map_err(|e| Error::Cert(e.to_string()))?;
        crate::metrics::METRICS.set_cert_expiry(&name, "client", issued.not_after);
        let yaml = render_kubeconfig(
            &name,
            server,
            self.ca.cert_pem(),
            &issued.cert_pem,
            &issued.key_pem,
        );
        Ok(Some(B64.encode(yaml)))
    }
}

/// How mc-<name> is exposed: Tower's `externalKubeAPIEnabled` plus the JSON
/// object in the Cluster annotation (key spelled as in Tower).
#[derive(Debug, Default)]
pub struct Exposure {
    pub enabled: bool,
    pub annotations: BTreeMap<String, String>,
    /// Why the annotation could not be used.
    pub invalid: Option<String>,
}

/// Cluster annotation whose JSON object becomes the LB Service's annotations.
pub const LB_ANNOTATION: &str = "tower.kubesphere.io/external-lb-service-annoations";
pub const EXTERNAL_ACCESS_READY: &str = "ExternalAccessReady";

impl Exposure {
    pub fn of(cluster: &Cluster) -> Self {
        if !cluster.spec.external_kube_api_enabled {
            return Self::default();
        }
        let mut exposure = Self {
            enabled: true,
            ..Self::default()
        };
        if let Some(raw) = cluster.annotations().get(LB_ANNOTATION) {
            match serde_json::from_str::<BTreeMap<String, String>>(raw) {
                Ok(map) => exposure.annotations = map,
                Err(e) => {
                    exposure.invalid = Some(format!(
                        "annotation {LB_ANNOTATION} is not a JSON object of strings: {e}"
                    ))
                }
            }
        }
        exposure
    }
}

/// The first address the load balancer got, if any.
fn lb_address(svc: &Service) -> Option<String> {
    let ingress = svc
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?;
    ingress
        .iter()
        .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .filter(|a| !a.is_empty())
}

/// True when `svc` already has every field we would apply.
fn service_matches(
    svc: &Service,
    kind: &str,
    kube: u16,
    ks: u16,
    selector: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    let port = |name: &str, port: i32, target: u16| {
        spec.ports.iter().flatten().any(|p| {
            p.name.as_deref() == Some(name)
                && p.port == port
                && p.target_port
                    == Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                            target,
                        )),
                    )
        })
    };
    let current_annotations = svc.metadata.annotations.clone().unwrap_or_default();
    spec.type_.as_deref().unwrap_or("ClusterIP") == kind
        && spec.ports.as_ref().map_or(0, Vec::len) == 2
        && port("kubernetes", 6443, kube)
        && port("kubesphere", 80, ks)
        && spec.selector.as_ref() == Some(selector)
        && annotations
            .iter()
            .all(|(k, v)| current_annotations.get(k) == Some(v))
        && svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGER_LABEL))
            .map(String::as_str)
            == Some(MANAGER)
}

async fn publish(
    recorder: &Recorder,
    cluster: &Cluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::debug!(cluster = %cluster.name_any(), error = %e, "cannot record an event");
    }
}

/// A kubeconfig for one cluster; YAML, as kubectl writes them.
pub fn render_kubeconfig(
    cluster: &str,
    server: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: tower-{cluster}\ncurrent-context: {cluster}\nusers:\n- name: tower-{cluster}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\npreferences: {{}}\n",
        ca = B64.encode(ca_pem),
        cert = B64.encode(cert_pem),
        key = B64.encode(key_pem),
    )
}

/// True when the published kubeconfig points at `server`, trusts our CA and
/// its client certificate is ours and not due for renewal.
fn kubeconfig_is_current(b64: &str, server: &str, ca_pem: &str) -> bool {
    let Ok(yaml) = B64.decode(b64.trim()) else {
        return false;
    };
    let Ok(yaml) = String::from_utf8(yaml) else {
        return false;
    };
    let Ok(config) = kube::config::Kubeconfig::from_yaml(&yaml) else {
        return false;
    };
    let Some(cluster) = config.clusters.first().and_then(|c| c.cluster.as_ref()) else {
        return false;
    };
    if cluster.server.as_deref() != Some(server)
        || cluster.certificate_authority_data.as_deref() != Some(B64.encode(ca_pem).as_str())
    {
        return false;
    }
    let Some(cert) = config
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.client_certificate_data.clone())
    else {
        return false;
    };
    let Ok(cert_pem) = B64.decode(cert) else {
        return false;
    };
    match pem_not_after(&cert_pem) {
        Some(expiry) => expiry > SystemTime::now() + CLIENT_CERT_RENEW,
        None => false,
    }
}

/// Expiry of the first certificate in a PEM block.
pub(crate) fn pem_not_after(pem: &[u8]) -> Option<SystemTime> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// One pass over one Cluster; see the module docs.
pub async fn reconcile<P: Ports>(
    cluster: Arc<Cluster>,
    ctx: Arc<Context<P>>,
) -> Result<Action, Error> {
    let name = cluster.name_any();
    // The store is fresher than the queued object.
    let Some(cluster) = ctx.store.get(&ObjectRef::new(&name)) else {
        return Ok(Action::await_change());
    };
    if !cluster.is_served() {
        if ctx
            .registry
            .revoke(&name, None, "cluster is no longer served by this proxy")
            .await
            > 0
        {
            tracing::info!(cluster = %name, "cluster no longer served: sessions closed");
        }
        ctx.ports.close(&name).await;
        return Ok(Action::await_change());
    }
    if !ctx.leader.is_leader() {
        return follow(&cluster, &name, &ctx).await;
    }
    let api: Api<Cluster> = Api::all(ctx.client.clone());
    let conn = &cluster.spec.connection;

    // Token, ports: ours to fill in when empty.
    let token = if conn.token.is_empty() {
        new_token()
    } else {
        conn.token.clone()
    };
    // A token that changed leaves no session of the old one behind.
    ctx.registry
        .revoke(&name, Some(&token), "the cluster's token changed")
        .await;
    let (kube_port, ks_port) = ctx.ports_for(&cluster)?;
    let exposure = Exposure::of(&cluster);
    let svc = ctx
        .apply_service(&cluster, kube_port, ks_port, &exposure)
        .await?;
    let lb = if exposure.enabled {
        lb_address(&svc)
    } else {
        None
    };
    let cluster_ip = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .filter(|ip| ip.parse::<IpAddr>().is_ok());
    let (kube_ep, ks_ep) = match (&ctx.options.advertise_address, &cluster_ip) {
        (Some(host), _) => (
            endpoint("https", host, kube_port),
            endpoint("http", host, ks_port),
        ),
        (None, Some(ip)) => (endpoint("https", ip, 6443), endpoint("http", ip, 80)),
        (None, None) => (String::new(), String::new()),
    };

    let live = ctx.registry.live(&name);
    // An agent on another replica counts: clients reach it through any replica.
    let elsewhere = ctx.owners.as_ref().and_then(|o| o.owner(&name));
    let available = live > 0 || elsewhere.is_some();
    let mut spec = serde_json::Map::new();
    if conn.token != token {
        spec.insert("token".into(), json!(token));
    }
    if conn.kubernetes_api_server_port != i32::from(kube_port) {
        spec.insert("kubernetesAPIServerPort".into(), json!(kube_port));
    }
    if conn.kubesphere_api_server_port != i32::from(ks_port) {
        spec.insert("kubesphereAPIServerPort".into(), json!(ks_port));
    }
    if !kube_ep.is_empty() && conn.kubernetes_api_endpoint != kube_ep {
        spec.insert("kubernetesAPIEndpoint".into(), json!(kube_ep));
    }
    if !ks_ep.is_empty() && conn.kubesphere_api_endpoint != ks_ep {
        spec.insert("kubesphereAPIEndpoint".into(), json!(ks_ep));
    }
    let external_ep = lb.as_deref().map(|a| endpoint("https", a, 6443));
    match &external_ep {
        Some(ep) if conn.external_kubernetes_api_endpoint != *ep => {
            spec.insert("externalKubernetesAPIEndpoint".into(), json!(ep));
        }
        None if !exposure.enabled && !conn.external_kubernetes_api_endpoint.is_empty() => {
            // Exposure switched off: the endpoint is gone.
            spec.insert(
                "externalKubernetesAPIEndpoint".into(),
                serde_json::Value::Null,
            );
        }
        _ => {}
    }
    let names = ctx.listener_names(&name, cluster_ip.as_deref(), lb.as_deref());
    if available && !kube_ep.is_empty() {
        // The listener's certificate must also cover addresses learnt since it
        // opened: the ClusterIP, the load balancer's IP or hostname.
        ctx.ports
            .open(&name, kube_port, ks_port, &names)
            .await
            .map_err(Error::Cert)?;
        if let Some(kubeconfig) = ctx.kubeconfig(&cluster, &kube_ep)? {
            spec.insert("kubeconfig".into(), json!(kubeconfig));
        }
    }
    let mut resource_version = cluster.resource_version();
    if !spec.is_empty() {
        let fields: Vec<_> = spec.keys().cloned().collect();
        let patched = api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"connection": spec}})),
            )
            .await?;
        resource_version = patched.resource_version();
        tracing::info!(cluster = %name, ?fields, "cluster spec updated");
        if spec.contains_key("kubeconfig") {
            // Its certificate's expiry goes into the status.
            crate::member_info::notify(&name);
        }
    }

    let conditions = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    let mut conditions = conditions;
    if let Some(c) = set_condition(
        &conditions,
        INITIALIZED,
        true,
        "Initialized",
        "token, ports and Service are ready",
    ) {
        conditions = c;
        changed = true;
    }
    let (reason, message) = if live > 0 {
        (
            "AgentConnected",
            format!("{live} agent session(s) connected"),
        )
    } else if let Some(owner) = &elsewhere {
        (
            "AgentConnected",
            format!("agent connected to proxy replica {}", owner.replica),
        )
    } else {
        ("AgentDisconnected", "no agent is connected".to_string())
    };
    let mut events = Vec::new();
    if let Some(c) = set_condition(&conditions, AGENT_AVAILABLE, available, reason, &message) {
        let before = conditions.iter().find(|c| c.kind == AGENT_AVAILABLE);
        if before.map(|c| c.status == "True") != Some(available) {
            events.push((EventType::Normal, reason, message.clone()));
        }
        conditions = c;
        changed = true;
    }
    let external = match (&exposure, &external_ep) {
        (Exposure { enabled: false, .. }, _) => conditions
            .iter()
            .any(|c| c.kind == EXTERNAL_ACCESS_READY)
            .then(|| {
                (
                    false,
                    "ExternalAccessDisabled",
                    "externalKubeAPIEnabled is false".to_string(),
                )
            }),
        (
            Exposure {
                invalid: Some(why), ..
            },
            _,
        ) => Some((false, "InvalidAnnotation", why.clone())),
        (_, Some(ep)) => Some((true, "LoadBalancerReady", format!("reachable at {ep}"))),
        (_, None) => Some((
            false,
            "WaitingForLoadBalancer",
            "the Service has no load balancer address yet".to_string(),
        )),
    };
    if let Some((ready, reason, message)) = external
        && let Some(c) = set_condition(&conditions, EXTERNAL_ACCESS_READY, ready, reason, &message)
    {
        let kind = if reason == "InvalidAnnotation" {
            EventType::Warning
        } else {
            EventType::Normal
        };
        events.push((kind, reason, message));
        conditions = c;
        changed = true;
    }
    if changed {
        // resourceVersion makes this a compare-and-swap: conditions written by
        // KubeSphere meanwhile are never overwritten (we retry on conflict).
        let patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "status": {"conditions": conditions},
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // KubeSphere's own CRD has no status subresource: status is part of the object.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(cluster = %name, agent_available = available, "cluster status updated");
    }
    for (type_, reason, note) in events {
        ctx.event(&cluster, type_, reason, note).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// A replica that does not lead writes nothing: it revokes sessions of a
/// stale token and keeps the cluster's ports open (for its own sessions, and
/// to relay clients to the replica with the agent).
async fn follow<P: Ports>(
    cluster: &Cluster,
    name: &str,
    ctx: &Context<P>,
) -> Result<Action, Error> {
    let conn = &cluster.spec.connection;
    if conn.token.is_empty() {
        return Ok(Action::requeue(RESYNC));
    }
    ctx.registry
        .revoke(name, Some(&conn.token), "the cluster's token changed")
        .await;
    let (Ok(kube), Ok(ks)) = (
        u16::try_from(conn.kubernetes_api_server_port),
        u16::try_from(conn.kubesphere_api_server_port),
    ) else {
        return Ok(Action::requeue(RESYNC));
    };
    let available =
        ctx.registry.live(name) > 0 || ctx.owners.as_ref().is_some_and(|o| o.owner(name).is_some());
    if kube == 0 || ks == 0 || !available {
        return Ok(Action::requeue(RESYNC));
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ctx.options.namespace);
    let svc = services.get_opt(&service_name(name)).await?;
    let cluster_ip = svc
        .as_ref()
        .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
        .filter(|ip| ip.parse::<IpAddr>().is_ok());
    let lb = svc
        .as_ref()
        .filter(|_| Exposure::of(cluster).enabled)
        .and_then(lb_address);
    let names = ctx.listener_names(name, cluster_ip.as_deref(), lb.as_deref());
    ctx.ports
        .open(name, kube, ks, &names)
        .await
        .map_err(Error::Cert)?;
    Ok(Action::requeue(RESYNC))
}

fn error_policy<P: Ports>(cluster: Arc<Cluster>, error: &Error, _: Arc<Context<P>>) -> Action {
    match error {
        // Someone (often our own previous write) changed the object meanwhile:
        // expected with optimistic concurrency, try again on fresh data.
        Error::Kube(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(cluster = %cluster.name_any(), "write conflict, retrying");
            Action::requeue(Duration::from_millis(200))
        }
        _ => {
            tracing::warn!(cluster = %cluster.name_any(), %error, "reconcile failed, retrying");
            Action::requeue(Duration::from_secs(2))
        }
    }
}

/// Close the sessions and ports of Clusters that disappear. The controller
/// never sees deletions (it reconciles objects that exist), so a plain watch
/// does this; after a re-list it also sweeps clusters deleted meanwhile.
async fn watch_deletions<P: Ports>(api: Api<Cluster>, registry: Registry<CrStore>, ports: Arc<P>) {
    let mut seen = HashSet::new();
    let mut events = watcher(api, watcher::Config::default()).boxed();
    let forget = |name: String| {
        let registry = registry.clone();
        let ports = ports.clone();
        async move {
            registry
                .revoke(&name, None, "the cluster was deleted")
                .await;
            ports.close(&name).await;
        }
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Delete(c)) => {
                tracing::info!(cluster = %c.name_any(), "cluster deleted: closing its sessions and ports");
                forget(c.name_any()).await;
            }
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::InitApply(c)) => {
                seen.insert(c.name_any());
            }
            Ok(watcher::Event::InitDone) => {
                for name in registry.clusters() {
                    if !seen.contains(&name) {
                        forget(name).await;
                    }
                }
            }
            Ok(watcher::Event::Apply(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "watching clusters failed, retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Build the registry and run the controller until `shutdown`.
pub struct Running {
    pub registry: Registry<CrStore>,
    /// The controller's cache of Clusters.
    pub store: Store<Cluster>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Start the controller. The returned registry is what the agents' endpoint
/// admits agents into.
pub fn start<P: Ports>(
    client: Client,
    ca: Arc<Ca>,
    ports: Arc<P>,
    options: Options,
    ha: Option<Ha>,
) -> Running {
    let api: Api<Cluster> = Api::all(client.clone());
    let services: Api<Service> = Api::namespaced(client.clone(), &options.namespace);
    // `owns` would map a Service to a *namespaced* ref of its cluster-scoped
    // owner, a second queue key racing the Cluster's own; map by label instead.
    let controller = Controller::new(api.clone(), watcher::Config::default()).watches(
        services,
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}")),
        |svc: Service| {
            let name = svc.labels().get(CLUSTER_LABEL)?;
            Some(ObjectRef::new(name))
        },
    );
    let store = controller.store();
    let (trigger, triggers) = mpsc::unbounded_channel();

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let open_ports = ports.clone();
    let names = Names::default();
    let cr_store = CrStore {
        names: names.clone(),
        recorder: recorder.clone(),
        store: store.clone(),
        trigger,
        open: Arc::new(move |cluster, kube, ks, sans| {
            let ports = open_ports.clone();
            Box::pin(async move { ports.open(&cluster, kube, ks, &sans).await })
        }),
        options: options.clone(),
        owners: ha.as_ref().map(|h| h.owners.clone()),
    };
    let registry = Registry::new(cr_store);
    let ctx_store = store.clone();
    let ctx = Arc::new(Context {
        names,
        recorder: recorder.clone(),
        client,
        store,
        registry: registry.clone(),
        ca,
        ports: ports.clone(),
        options,
        reserved: Mutex::default(),
        leader: ha
            .as_ref()
            .map_or_else(Leadership::always, |h| h.leader.clone()),
        owners: ha.as_ref().map(|h| h.owners.clone()),
    });
    let deletions = tokio::spawn(watch_deletions(api, registry.clone(), ports));
    let task = tokio::spawn(async move {
        let triggers = tokio_stream_from(triggers);
        let controller = controller.reconcile_on(triggers);
        let controller = match ha {
            Some(Ha {
                leader, changes, ..
            }) => {
                // Another replica's agent came or went: the leader re-counts.
                let changes = tokio_stream_from(changes).map(|c| ObjectRef::new(&c));
                // A new leader makes its first pass over every cluster.
                let elected = futures_util::stream::unfold(leader, |mut leader| async move {
                    loop {
                        if leader.changed().await {
                            return Some(((), leader));
                        }
                    }
                });
                controller.reconcile_on(changes).reconcile_all_on(elected)
            }
            None => controller,
        };
        controller
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {})
            .await;
        deletions.abort();
    });
    Running {
        registry,
        store: ctx_store,
        task,
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
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

    #[test]
    fn endpoints_are_ipv6_safe() {
        assert_eq!(endpoint("https", "10.0.0.1", 6443), "https://10.0.0.1:6443");
        assert_eq!(endpoint("https", "fd00::1", 6443), "https://[fd00::1]:6443");
        assert_eq!(
            endpoint("http", "proxy.example.com", 80),
            "http://proxy.example.com:80"
        );
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let first = set_condition(&[], AGENT_AVAILABLE, true, "AgentConnected", "1").unwrap();
        assert!(set_condition(&first, AGENT_AVAILABLE, true, "AgentConnected", "1").is_none());
        let mut old = first.clone();
        old[0].last_transition_time = Some("2020-01-01T00:00:00Z".into());
        let msg = set_condition(&old, AGENT_AVAILABLE, true, "AgentConnected", "2").unwrap();
        assert_eq!(
            msg[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        let flipped =
            set_condition(&old, AGENT_AVAILABLE, false, "AgentDisconnected", "0").unwrap();
        assert_ne!(
            flipped[0].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        assert_eq!(flipped[0].status, "False");
        // Other conditions (KubeSphere's) are kept as they are.
        let with_ready = vec![Condition {
            kind: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }];
        let out = set_condition(&with_ready, INITIALIZED, true, "Initialized", "").unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], with_ready[0]);
    }
}
