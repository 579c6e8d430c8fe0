//! The Cluster workflow's decisions, without I/O: from a Cluster and what the
//! proxy knows (sessions, its Service, other replicas) to the spec fields to
//! write, the conditions and the events. [`super::reconcile`] gathers the
//! facts, calls these and writes what they return; the tests below go through
//! the cases one by one.

use std::collections::HashSet;
use std::ops::Range;

use serde_json::{Map, Value, json};

use super::crd::{Cluster, Condition};
use super::service::{Addresses, Exposure};
use tunnel::addr::endpoint;

pub const INITIALIZED: &str = "Initialized";
pub const AGENT_AVAILABLE: &str = "AgentAvailable";
pub const EXTERNAL_ACCESS_READY: &str = "ExternalAccessReady";

/// What this replica does with a Cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Role {
    /// Not (or no longer) a proxy-connected member: close its sessions and ports.
    Forget,
    /// Served, but another replica leads: keep own sessions and ports right, write nothing.
    Follow,
    /// Served and this replica leads: make the world match.
    Lead,
}

pub fn role(cluster: &Cluster, leader: bool) -> Role {
    match (cluster.is_served(), leader) {
        (false, _) => Role::Forget,
        (true, false) => Role::Follow,
        (true, true) => Role::Lead,
    }
}

/// The cluster's token: its own, or `fresh()` when it has none yet.
pub fn token(cluster: &Cluster, fresh: impl FnOnce() -> String) -> String {
    let current = &cluster.spec.connection.token;
    if current.is_empty() {
        fresh()
    } else {
        current.clone()
    }
}

/// How a port pair was found.
#[derive(Debug, PartialEq, Eq)]
pub enum PortChoice {
    /// The cluster's own, set and used by no other Cluster.
    Current((u16, u16)),
    /// Handed out earlier and not yet visible on the object.
    Reserved((u16, u16)),
    /// The first free pair in the range: reserve it.
    New((u16, u16)),
}

impl PortChoice {
    pub fn pair(&self) -> (u16, u16) {
        match self {
            Self::Current(p) | Self::Reserved(p) | Self::New(p) => *p,
        }
    }
}

/// The ks port of a kube port.
pub const KS_OFFSET: u16 = 10000;

/// Ports for a cluster: its own if valid and not taken by another Cluster
/// (`used`), else its reservation, else the first pair in `range` that no one
/// uses or reserved (`reserved_by_others`) and that `free` says can be bound.
pub fn ports(
    current: (i32, i32),
    reserved: Option<(u16, u16)>,
    used: &HashSet<u16>,
    reserved_by_others: &HashSet<u16>,
    range: Range<u16>,
    free: impl Fn(u16) -> bool,
) -> Option<PortChoice> {
    let available = |p: u16| !used.contains(&p);
    if let (Ok(kube), Ok(ks)) = (u16::try_from(current.0), u16::try_from(current.1))
        && kube != 0
        && ks != 0
        && available(kube)
        && available(ks)
    {
        return Some(PortChoice::Current((kube, ks)));
    }
    if let Some(pair) = reserved
        && available(pair.0)
        && available(pair.1)
    {
        return Some(PortChoice::Reserved(pair));
    }
    let taken = |p: u16| !available(p) || reserved_by_others.contains(&p);
    range
        .map_while(|port| Some((port, port.checked_add(KS_OFFSET)?)))
        .find(|&(kube, ks)| !taken(kube) && !taken(ks) && free(kube) && free(ks))
        .map(PortChoice::New)
}

/// The endpoints written to the Cluster: `--advertise-address` with the
/// cluster's own ports, else the Service's ClusterIP with 6443 / 80; none
/// while neither is known.
pub fn endpoints(
    advertise: Option<&str>,
    cluster_ip: Option<&str>,
    (kube, ks): (u16, u16),
) -> Option<(String, String)> {
    match (advertise, cluster_ip) {
        (Some(host), _) => Some((endpoint("https", host, kube), endpoint("http", host, ks))),
        (None, Some(ip)) => Some((endpoint("https", ip, 6443), endpoint("http", ip, 80))),
        (None, None) => None,
    }
}

/// SANs of a cluster's serving certificate: its Service's names, loopback,
/// `--advertise-address` and the `addresses` learnt (ClusterIP, LB).
pub fn sans(
    cluster: &str,
    namespace: &str,
    advertise: Option<&str>,
    addresses: &Addresses,
) -> Vec<String> {
    let svc = super::service::name(cluster);
    let mut sans = vec![
        format!("{svc}.{namespace}.svc"),
        format!("{svc}.{namespace}.svc.cluster.local"),
        format!("{svc}.{namespace}"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    sans.extend(advertise.map(str::to_string));
    sans.extend(addresses.cluster_ip.iter().cloned());
    sans.extend(addresses.lb.iter().cloned());
    let mut seen = HashSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

/// `conditions` with `kind` set to `status`; None when nothing changes.
/// lastTransitionTime moves only when the status does; `now` is RFC 3339.
pub fn set_condition(
    conditions: &[Condition],
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
) -> Option<Vec<Condition>> {
    let status = if status { "True" } else { "False" };
    let mut out = conditions.to_vec();
    match out.iter_mut().find(|c| c.kind == kind) {
        Some(c) if c.status == status && c.reason == reason && c.message == message => None,
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now.to_string());
            }
            c.status = status.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.last_update_time = Some(now.to_string());
            Some(out)
        }
        None => {
            out.push(Condition {
                kind: kind.to_string(),
                status: status.to_string(),
                last_update_time: Some(now.to_string()),
                last_transition_time: Some(now.to_string()),
                reason: reason.to_string(),
                message: message.to_string(),
            });
            Some(out)
        }
    }
}

/// What the leader knows about one served Cluster.
pub struct Facts<'a> {
    pub cluster: &'a Cluster,
    pub token: &'a str,
    pub ports: (u16, u16),
    pub exposure: &'a Exposure,
    pub addresses: &'a Addresses,
    pub advertise_address: Option<&'a str>,
    /// `--cluster-ports none`: the cluster's path-form URL, its only
    /// endpoint (no ports, no Service: `ports` and `addresses` are unused).
    pub path_server: Option<&'a str>,
    /// Live sessions on this replica.
    pub live: usize,
    /// The replica that holds the cluster's agent, if another one does.
    pub elsewhere: Option<&'a str>,
    /// RFC 3339, for condition times.
    pub now: &'a str,
}

/// A Kubernetes Event to record on the Cluster.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What the leader writes for one Cluster.
#[derive(Debug, Default)]
pub struct Plan {
    /// `spec.connection` fields that differ (the kubeconfig is added by the
    /// caller once the cluster's ports are open).
    pub spec: Map<String, Value>,
    /// While an agent is available and the endpoint is known: the kube
    /// endpoint clients reach the cluster at; its ports must be open and its
    /// kubeconfig published.
    pub serve_at: Option<String>,
    /// New `status.conditions`, when they change.
    pub conditions: Option<Vec<Condition>>,
    /// Other status fields to remove: the health only a live tunnel can
    /// tell, once no agent is connected ([`super::status::health::forget`]).
    pub forget: Map<String, Value>,
    pub events: Vec<Event>,
}

/// The leader's decisions for one served Cluster.
pub fn plan(f: &Facts) -> Plan {
    let conn = &f.cluster.spec.connection;
    let (kube_port, ks_port) = f.ports;
    let available = f.live > 0 || f.elsewhere.is_some();
    let mut spec = Map::new();
    let mut set = |field: &str, value: Value| {
        spec.insert(field.into(), value);
    };
    if conn.token != f.token {
        set("token", json!(f.token));
    }
    let kube_ep = match f.path_server {
        Some(server) => {
            // The port fields are left as they are: switching back reuses them.
            if conn.kubernetes_api_endpoint != server {
                set("kubernetesAPIEndpoint", json!(server));
            }
            Some(server.to_string())
        }
        None => {
            if conn.kubernetes_api_server_port != i32::from(kube_port) {
                set("kubernetesAPIServerPort", json!(kube_port));
            }
            if conn.kubesphere_api_server_port != i32::from(ks_port) {
                set("kubesphereAPIServerPort", json!(ks_port));
            }
            let endpoints = endpoints(
                f.advertise_address,
                f.addresses.cluster_ip.as_deref(),
                f.ports,
            );
            if let Some((kube_ep, ks_ep)) = &endpoints {
                if conn.kubernetes_api_endpoint != *kube_ep {
                    set("kubernetesAPIEndpoint", json!(kube_ep));
                }
                if conn.kubesphere_api_endpoint != *ks_ep {
                    set("kubesphereAPIEndpoint", json!(ks_ep));
                }
            }
            endpoints.map(|(kube_ep, _)| kube_ep)
        }
    };
    let external_ep = f
        .addresses
        .lb
        .as_deref()
        .filter(|_| f.exposure.enabled)
        .map(|a| endpoint("https", a, 6443));
    match &external_ep {
        Some(ep) if conn.external_kubernetes_api_endpoint != *ep => {
            set("externalKubernetesAPIEndpoint", json!(ep));
        }
        // Exposure switched off: the endpoint is gone.
        None if !f.exposure.enabled && !conn.external_kubernetes_api_endpoint.is_empty() => {
            set("externalKubernetesAPIEndpoint", Value::Null);
        }
        _ => {}
    }
    let serve_at = kube_ep.filter(|_| available);
    let (conditions, events) = conditions(f, available, external_ep.as_deref());
    Plan {
        spec,
        serve_at,
        conditions,
        forget: super::status::health::forget(f.cluster.status.as_ref(), available),
        events,
    }
}

/// `Initialized`, `AgentAvailable` and `ExternalAccessReady`, and the events
/// of their changes.
fn conditions(
    f: &Facts,
    available: bool,
    external_ep: Option<&str>,
) -> (Option<Vec<Condition>>, Vec<Event>) {
    let mut conditions = f
        .cluster
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    let mut events = Vec::new();
    let initialized = match f.path_server {
        Some(_) => "token is ready; clients reach the cluster through the path form",
        None => "token, ports and Service are ready",
    };
    if let Some(c) = set_condition(
        &conditions,
        INITIALIZED,
        true,
        "Initialized",
        initialized,
        f.now,
    ) {
        conditions = c;
        changed = true;
    }
    let (reason, message) = match (f.live, f.elsewhere) {
        (1.., _) => (
            "AgentConnected",
            format!("{} agent session(s) connected", f.live),
        ),
        (0, Some(replica)) => (
            "AgentConnected",
            format!("agent connected to proxy replica {replica}"),
        ),
        (0, None) => ("AgentDisconnected", "no agent is connected".to_string()),
    };
    if let Some(c) = set_condition(
        &conditions,
        AGENT_AVAILABLE,
        available,
        reason,
        &message,
        f.now,
    ) {
        let before = conditions.iter().find(|c| c.kind == AGENT_AVAILABLE);
        if before.map(|c| c.status == "True") != Some(available) {
            events.push(Event {
                warning: false,
                reason,
                note: message.clone(),
            });
        }
        conditions = c;
        changed = true;
    }
    let external = match (f.exposure, external_ep) {
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
        && let Some(c) = set_condition(
            &conditions,
            EXTERNAL_ACCESS_READY,
            ready,
            reason,
            &message,
            f.now,
        )
    {
        events.push(Event {
            warning: reason == "InvalidAnnotation",
            reason,
            note: message,
        });
        conditions = c;
        changed = true;
    }
    (changed.then_some(conditions), events)
}

/// What a replica that does not lead does with a served Cluster: the ports
/// to keep open, once the leader has assigned them and an agent is available
/// somewhere.
pub fn follow(cluster: &Cluster, available: bool) -> Option<(u16, u16)> {
    let conn = &cluster.spec.connection;
    let kube = u16::try_from(conn.kubernetes_api_server_port).ok()?;
    let ks = u16::try_from(conn.kubesphere_api_server_port).ok()?;
    (!conn.token.is_empty() && kube != 0 && ks != 0 && available).then_some((kube, ks))
}

#[cfg(test)]
mod tests;
