//! Service `<namespace>/mc-<name>`, what the proxy wants it to be: ClusterIP,
//! or LoadBalancer when the Cluster asks for external access (Tower's
//! `externalKubeAPIEnabled`, with the load balancer's annotations from a
//! Cluster annotation), ports 6443 -> the cluster's kube port and 80 -> its
//! ks port, selecting the proxy's pods. Pure: [`super::reconcile`] applies it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::crd::Cluster;
use crate::identity::names::{CLUSTER_LABEL, MANAGED_BY, MANAGER};

/// Cluster annotation whose JSON object becomes the LB Service's annotations
/// (key spelled as in Tower).
pub const LB_ANNOTATION: &str = "tower.kubesphere.io/external-lb-service-annoations";

/// The Service of `cluster`.
pub fn name(cluster: &str) -> String {
    format!("mc-{cluster}")
}

/// How mc-<name> is exposed: Tower's `externalKubeAPIEnabled` plus the JSON
/// object in [`LB_ANNOTATION`].
#[derive(Debug, Default, PartialEq)]
pub struct Exposure {
    pub enabled: bool,
    pub annotations: BTreeMap<String, String>,
    /// Why the annotation could not be used.
    pub invalid: Option<String>,
}

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

    fn kind(&self) -> &'static str {
        if self.enabled {
            "LoadBalancer"
        } else {
            "ClusterIP"
        }
    }
}

/// What a Service we read tells the workflow.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Addresses {
    /// The ClusterIP, when it is an IP (not `None` or empty).
    pub cluster_ip: Option<String>,
    /// The load balancer's first address, when exposed and assigned.
    pub lb: Option<String>,
}

impl Addresses {
    pub fn of(svc: Option<&Service>, exposure: &Exposure) -> Self {
        let cluster_ip = svc
            .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        let lb = svc.filter(|_| exposure.enabled).and_then(lb_address);
        Self { cluster_ip, lb }
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

/// The Service to apply for `cluster` (server-side apply, owned by the Cluster).
pub fn desired(
    cluster: &Cluster,
    namespace: &str,
    selector: &BTreeMap<String, String>,
    (kube, ks): (u16, u16),
    exposure: &Exposure,
) -> Value {
    let owner = cluster
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name(&cluster.name_any()),
            "namespace": namespace,
            "labels": {MANAGED_BY: MANAGER, CLUSTER_LABEL: cluster.name_any()},
            "annotations": exposure.annotations,
            "ownerReferences": owner,
        },
        "spec": {
            "type": exposure.kind(),
            "selector": selector,
            "ports": [
                {"name": "kubernetes", "protocol": "TCP", "port": 6443, "targetPort": kube},
                {"name": "kubesphere", "protocol": "TCP", "port": 80, "targetPort": ks},
            ],
        },
    })
}

/// True when `svc` already has every field [`desired`] would apply, so an
/// unchanged cluster causes no write.
pub fn matches(
    svc: &Service,
    selector: &BTreeMap<String, String>,
    (kube, ks): (u16, u16),
    exposure: &Exposure,
) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    let port = |name: &str, port: i32, target: u16| {
        spec.ports.iter().flatten().any(|p| {
            p.name.as_deref() == Some(name)
                && p.port == port
                && p.target_port == Some(IntOrString::Int(i32::from(target)))
        })
    };
    let current_annotations = svc.metadata.annotations.clone().unwrap_or_default();
    spec.type_.as_deref().unwrap_or("ClusterIP") == exposure.kind()
        && spec.ports.as_ref().map_or(0, Vec::len) == 2
        && port("kubernetes", 6443, kube)
        && port("kubesphere", 80, ks)
        && spec.selector.as_ref() == Some(selector)
        && exposure
            .annotations
            .iter()
            .all(|(k, v)| current_annotations.get(k) == Some(v))
        && svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY))
            .map(String::as_str)
            == Some(MANAGER)
}
