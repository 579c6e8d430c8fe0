//! The workflow's decisions, case by case: no cluster, no network.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Service;
use serde_json::{Value, json};

use super::*;
use crate::clusters::crd::{ClusterSpec, ClusterStatus, Connection};
use crate::clusters::service::{self, LB_ANNOTATION};

const T0: &str = "2026-01-01T00:00:00Z";
const T1: &str = "2026-01-01T00:05:00Z";

fn cluster(edit: impl FnOnce(&mut Cluster)) -> Cluster {
    let mut c = Cluster::new(
        "alpha",
        ClusterSpec {
            join_federation: true,
            connection: Connection {
                kind: "proxy".into(),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    edit(&mut c);
    c
}

/// A cluster the leader has set up before: token, ports, endpoints.
fn set_up(edit: impl FnOnce(&mut Cluster)) -> Cluster {
    cluster(|c| {
        let conn = &mut c.spec.connection;
        conn.token = "t0k3n".into();
        conn.kubernetes_api_server_port = 16000;
        conn.kubesphere_api_server_port = 26000;
        conn.kubernetes_api_endpoint = "https://10.96.0.10:6443".into();
        conn.kubesphere_api_endpoint = "http://10.96.0.10:80".into();
        edit(c)
    })
}

fn ip(addr: &str) -> Addresses {
    Addresses {
        cluster_ip: Some(addr.into()),
        lb: None,
    }
}

struct Given {
    exposure: Exposure,
    addresses: Addresses,
    advertise: Option<String>,
    live: usize,
    elsewhere: Option<String>,
    path_server: Option<String>,
    now: &'static str,
}

impl Default for Given {
    fn default() -> Self {
        Self {
            exposure: Exposure::default(),
            addresses: ip("10.96.0.10"),
            advertise: None,
            live: 0,
            elsewhere: None,
            path_server: None,
            now: T0,
        }
    }
}

fn plan_for(c: &Cluster, given: &Given) -> Plan {
    let token = token(c, || "fresh".into());
    let conn = &c.spec.connection;
    let ports = (
        u16::try_from(conn.kubernetes_api_server_port)
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(16000),
        u16::try_from(conn.kubesphere_api_server_port)
            .ok()
            .filter(|p| *p != 0)
            .unwrap_or(26000),
    );
    plan(&Facts {
        cluster: c,
        token: &token,
        ports,
        exposure: &given.exposure,
        addresses: &given.addresses,
        advertise_address: given.advertise.as_deref(),
        live: given.live,
        elsewhere: given.elsewhere.as_deref(),
        path_server: given.path_server.as_deref(),
        now: given.now,
    })
}

/// `c` with the plan's spec fields and conditions written, as the API would.
fn applied(c: &Cluster, plan: &Plan) -> Cluster {
    let mut value = serde_json::to_value(c).unwrap();
    for (k, v) in &plan.spec {
        value["spec"]["connection"][k] = v.clone();
    }
    if let Some(conditions) = &plan.conditions {
        value["status"] = json!({ "conditions": conditions });
    }
    serde_json::from_value(value).unwrap()
}

fn condition<'a>(conditions: &'a [Condition], kind: &str) -> &'a Condition {
    conditions.iter().find(|c| c.kind == kind).unwrap()
}

#[test]
fn roles() {
    assert_eq!(role(&cluster(|_| {}), true), Role::Lead);
    assert_eq!(role(&cluster(|_| {}), false), Role::Follow);
    let direct = cluster(|c| c.spec.connection.kind = "direct".into());
    assert_eq!(role(&direct, true), Role::Forget);
    let left = cluster(|c| c.spec.join_federation = false);
    assert_eq!(role(&left, false), Role::Forget);
}

#[test]
fn an_empty_token_is_filled_and_a_set_one_kept() {
    let new = cluster(|_| {});
    assert_eq!(token(&new, || "fresh".into()), "fresh");
    let plan = plan_for(&new, &Given::default());
    assert_eq!(plan.spec["token"], "fresh");
    let old = set_up(|_| {});
    assert_eq!(token(&old, || unreachable!()), "t0k3n");
    assert!(!plan_for(&old, &Given::default()).spec.contains_key("token"));
}

#[test]
fn a_new_cluster_gets_ports_endpoints_and_conditions() {
    let plan = plan_for(&cluster(|_| {}), &Given::default());
    assert_eq!(plan.spec["kubernetesAPIServerPort"], 16000);
    assert_eq!(plan.spec["kubesphereAPIServerPort"], 26000);
    assert_eq!(
        plan.spec["kubernetesAPIEndpoint"],
        "https://10.96.0.10:6443"
    );
    assert_eq!(plan.spec["kubesphereAPIEndpoint"], "http://10.96.0.10:80");
    let conditions = plan.conditions.unwrap();
    assert_eq!(condition(&conditions, INITIALIZED).status, "True");
    assert_eq!(condition(&conditions, AGENT_AVAILABLE).status, "False");
    assert!(conditions.iter().all(|c| c.kind != EXTERNAL_ACCESS_READY));
}

#[test]
fn a_second_pass_changes_nothing() {
    let given = Given::default();
    let first = plan_for(&cluster(|_| {}), &given);
    let c = applied(&cluster(|_| {}), &first);
    let second = plan_for(&c, &Given { now: T1, ..given });
    assert!(second.spec.is_empty(), "{:?}", second.spec);
    assert!(second.conditions.is_none());
    assert!(second.events.is_empty());
}

#[test]
fn without_an_agent_nothing_is_served() {
    let plan = plan_for(&set_up(|_| {}), &Given::default());
    assert_eq!(plan.serve_at, None);
    let conditions = plan.conditions.unwrap();
    assert_eq!(
        condition(&conditions, AGENT_AVAILABLE).reason,
        "AgentDisconnected"
    );
}

#[test]
fn a_connected_agent_is_served_and_announced() {
    let given = Given {
        live: 2,
        ..Given::default()
    };
    let plan = plan_for(&set_up(|_| {}), &given);
    assert_eq!(plan.serve_at.as_deref(), Some("https://10.96.0.10:6443"));
    let available = condition(plan.conditions.as_ref().unwrap(), AGENT_AVAILABLE).clone();
    assert_eq!(available.status, "True");
    assert_eq!(available.message, "2 agent session(s) connected");
    assert_eq!(
        plan.events,
        vec![Event {
            warning: false,
            reason: "AgentConnected",
            note: "2 agent session(s) connected".into(),
        }]
    );
}

#[test]
fn an_agent_on_another_replica_counts() {
    let given = Given {
        elsewhere: Some("tower-1".into()),
        ..Given::default()
    };
    let plan = plan_for(&set_up(|_| {}), &given);
    assert!(plan.serve_at.is_some());
    let available = condition(plan.conditions.as_ref().unwrap(), AGENT_AVAILABLE).clone();
    assert_eq!(available.status, "True");
    assert_eq!(
        available.message,
        "agent connected to proxy replica tower-1"
    );
}

#[test]
fn an_agent_leaving_moves_the_transition_time_and_is_announced() {
    let connected = Given {
        live: 1,
        ..Given::default()
    };
    let c = set_up(|_| {});
    let c = applied(&c, &plan_for(&c, &connected));
    let gone = plan_for(
        &c,
        &Given {
            now: T1,
            ..Given::default()
        },
    );
    let available = condition(gone.conditions.as_ref().unwrap(), AGENT_AVAILABLE).clone();
    assert_eq!(available.status, "False");
    assert_eq!(available.last_transition_time.as_deref(), Some(T1));
    assert_eq!(gone.events.len(), 1);
    assert_eq!(gone.events[0].reason, "AgentDisconnected");
    // Initialized did not change: its time stays.
    let init = condition(gone.conditions.as_ref().unwrap(), INITIALIZED);
    assert_eq!(init.last_transition_time.as_deref(), Some(T0));
}

#[test]
fn a_changed_message_keeps_the_transition_time_and_sends_no_event() {
    let c = set_up(|_| {});
    let one = Given {
        live: 1,
        ..Given::default()
    };
    let c = applied(&c, &plan_for(&c, &one));
    let two = plan_for(
        &c,
        &Given {
            live: 2,
            now: T1,
            ..Given::default()
        },
    );
    let available = condition(two.conditions.as_ref().unwrap(), AGENT_AVAILABLE).clone();
    assert_eq!(available.message, "2 agent session(s) connected");
    assert_eq!(available.last_transition_time.as_deref(), Some(T0));
    assert_eq!(available.last_update_time.as_deref(), Some(T1));
    assert!(two.events.is_empty());
}

#[test]
fn kubespheres_own_conditions_are_kept() {
    let ready = Condition {
        kind: "Ready".into(),
        status: "True".into(),
        ..Default::default()
    };
    let c = set_up(|c| {
        c.status = Some(ClusterStatus {
            conditions: vec![ready.clone()],
            ..Default::default()
        })
    });
    let conditions = plan_for(&c, &Given::default()).conditions.unwrap();
    assert_eq!(conditions[0], ready);
    assert_eq!(conditions.len(), 3);
}

#[test]
fn the_advertise_address_wins_over_the_cluster_ip() {
    let given = Given {
        advertise: Some("192.168.100.3".into()),
        ..Given::default()
    };
    let plan = plan_for(&cluster(|_| {}), &given);
    assert_eq!(
        plan.spec["kubernetesAPIEndpoint"],
        "https://192.168.100.3:16000"
    );
    assert_eq!(
        plan.spec["kubesphereAPIEndpoint"],
        "http://192.168.100.3:26000"
    );
}

#[test]
fn endpoints_are_ipv6_safe_and_wait_for_an_address() {
    assert_eq!(
        endpoints(None, Some("fd00::10"), (16000, 26000)),
        Some((
            "https://[fd00::10]:6443".to_string(),
            "http://[fd00::10]:80".to_string()
        ))
    );
    assert_eq!(endpoints(None, None, (16000, 26000)), None);
    let waiting = plan_for(
        &cluster(|_| {}),
        &Given {
            addresses: Addresses::default(),
            live: 1,
            ..Given::default()
        },
    );
    assert!(!waiting.spec.contains_key("kubernetesAPIEndpoint"));
    assert_eq!(waiting.serve_at, None, "no endpoint, no kubeconfig");
}

#[test]
fn own_ports_are_kept_unless_another_cluster_has_them() {
    let none = HashSet::new();
    let free = |_| true;
    assert_eq!(
        ports((16005, 26005), None, &none, &none, 16000..16010, free),
        Some(PortChoice::Current((16005, 26005)))
    );
    let used: HashSet<u16> = [16005].into();
    assert_eq!(
        ports((16005, 26005), None, &used, &none, 16000..16010, free),
        Some(PortChoice::New((16000, 26000)))
    );
    // Ports out of u16 range or unset are not kept.
    assert_eq!(
        ports((70000, 0), None, &none, &none, 16000..16010, free),
        Some(PortChoice::New((16000, 26000)))
    );
}

#[test]
fn a_reservation_is_reused_and_others_reservations_skipped() {
    let none = HashSet::new();
    assert_eq!(
        ports(
            (0, 0),
            Some((16003, 26003)),
            &none,
            &none,
            16000..16010,
            |_| true
        ),
        Some(PortChoice::Reserved((16003, 26003)))
    );
    let theirs: HashSet<u16> = [16000, 26001].into();
    assert_eq!(
        ports((0, 0), None, &none, &theirs, 16000..16010, |_| true),
        Some(PortChoice::New((16002, 26002)))
    );
}

#[test]
fn ports_that_cannot_be_bound_are_skipped_and_a_full_range_is_none() {
    let none = HashSet::new();
    assert_eq!(
        ports((0, 0), None, &none, &none, 16000..16003, |p| p != 16000
            && p != 26001),
        Some(PortChoice::New((16002, 26002)))
    );
    assert_eq!(
        ports((0, 0), None, &none, &none, 16000..16003, |_| false),
        None
    );
    // No ks port above 65535.
    assert_eq!(
        ports((0, 0), None, &none, &none, 60000..60010, |_| true),
        None
    );
}

#[test]
fn certificate_names_cover_what_clients_dial() {
    let names = sans(
        "alpha",
        "kubesphere-system",
        Some("192.168.100.3"),
        &Addresses {
            cluster_ip: Some("10.96.0.10".into()),
            lb: Some("lb.example.com".into()),
        },
    );
    for name in [
        "mc-alpha.kubesphere-system.svc",
        "mc-alpha.kubesphere-system.svc.cluster.local",
        "mc-alpha.kubesphere-system",
        "localhost",
        "127.0.0.1",
        "192.168.100.3",
        "10.96.0.10",
        "lb.example.com",
    ] {
        assert!(
            names.contains(&name.to_string()),
            "{name} missing from {names:?}"
        );
    }
    let twice = sans("alpha", "ns", Some("127.0.0.1"), &Addresses::default());
    assert_eq!(twice.iter().filter(|n| *n == "127.0.0.1").count(), 1);
}

fn exposed(annotation: Option<&str>) -> (Cluster, Exposure) {
    let c = set_up(|c| {
        c.spec.external_kube_api_enabled = true;
        if let Some(a) = annotation {
            c.metadata.annotations = Some([(LB_ANNOTATION.to_string(), a.to_string())].into());
        }
    });
    let exposure = Exposure::of(&c);
    (c, exposure)
}

#[test]
fn an_exposed_cluster_waits_for_its_load_balancer_then_publishes_it() {
    let (c, exposure) = exposed(Some(r#"{"lb.example/type":"internal"}"#));
    assert_eq!(exposure.annotations["lb.example/type"], "internal");
    let waiting = plan_for(
        &c,
        &Given {
            exposure,
            ..Given::default()
        },
    );
    let ready = condition(waiting.conditions.as_ref().unwrap(), EXTERNAL_ACCESS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "WaitingForLoadBalancer")
    );
    assert!(!waiting.spec.contains_key("externalKubernetesAPIEndpoint"));

    let c = applied(&c, &waiting);
    let (_, exposure) = exposed(None);
    let assigned = plan_for(
        &c,
        &Given {
            exposure,
            addresses: Addresses {
                cluster_ip: Some("10.96.0.10".into()),
                lb: Some("203.0.113.7".into()),
            },
            now: T1,
            ..Given::default()
        },
    );
    assert_eq!(
        assigned.spec["externalKubernetesAPIEndpoint"],
        "https://203.0.113.7:6443"
    );
    let ready = condition(assigned.conditions.as_ref().unwrap(), EXTERNAL_ACCESS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "LoadBalancerReady")
    );
    assert_eq!(assigned.events.last().unwrap().reason, "LoadBalancerReady");
}

#[test]
fn a_bad_annotation_is_a_warning_naming_it() {
    let (c, exposure) = exposed(Some("not json"));
    assert!(exposure.invalid.is_some());
    let plan = plan_for(
        &c,
        &Given {
            exposure,
            ..Given::default()
        },
    );
    let event = plan
        .events
        .iter()
        .find(|e| e.reason == "InvalidAnnotation")
        .unwrap();
    assert!(event.warning);
    assert!(event.note.contains(LB_ANNOTATION), "{}", event.note);
}

#[test]
fn switching_exposure_off_removes_the_external_endpoint() {
    let c = set_up(|c| {
        c.spec.connection.external_kubernetes_api_endpoint = "https://203.0.113.7:6443".into();
        c.status = Some(ClusterStatus {
            conditions: vec![Condition {
                kind: EXTERNAL_ACCESS_READY.into(),
                status: "True".into(),
                reason: "LoadBalancerReady".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
    });
    let plan = plan_for(&c, &Given::default());
    assert_eq!(plan.spec["externalKubernetesAPIEndpoint"], Value::Null);
    let ready = condition(plan.conditions.as_ref().unwrap(), EXTERNAL_ACCESS_READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ExternalAccessDisabled")
    );
}

#[test]
fn a_follower_keeps_ports_only_once_assigned_and_available() {
    assert_eq!(follow(&cluster(|_| {}), true), None);
    assert_eq!(follow(&set_up(|_| {}), false), None);
    assert_eq!(follow(&set_up(|_| {}), true), Some((16000, 26000)));
    let no_token = set_up(|c| c.spec.connection.token.clear());
    assert_eq!(follow(&no_token, true), None);
}

#[test]
fn the_service_we_want_is_the_service_that_matches() {
    let (c, exposure) = exposed(Some(r#"{"a":"b"}"#));
    let selector: BTreeMap<String, String> = [("app".to_string(), "tower".to_string())].into();
    let want = service::desired(
        &c,
        "kubesphere-system",
        &selector,
        (16000, 26000),
        &exposure,
    );
    assert_eq!(want["spec"]["type"], "LoadBalancer");
    let svc: Service = serde_json::from_value(want).unwrap();
    assert!(service::matches(&svc, &selector, (16000, 26000), &exposure));
    assert!(!service::matches(
        &svc,
        &selector,
        (16001, 26001),
        &exposure
    ));
    assert!(!service::matches(
        &svc,
        &selector,
        (16000, 26000),
        &Exposure::default()
    ));
    let other: BTreeMap<String, String> = [("app".to_string(), "other".to_string())].into();
    assert!(!service::matches(&svc, &other, (16000, 26000), &exposure));
}

#[test]
fn in_the_path_form_the_endpoint_is_the_path_and_ports_are_left_alone() {
    let server = "https://192.168.1.5:9443/clusters/alpha";
    let given = Given {
        path_server: Some(server.into()),
        addresses: Addresses::default(),
        live: 1,
        ..Given::default()
    };
    // A new cluster: a token and the endpoint, no ports.
    let plan = plan_for(&cluster(|_| {}), &given);
    assert_eq!(plan.spec.get("kubernetesAPIEndpoint"), Some(&json!(server)));
    assert_eq!(plan.serve_at.as_deref(), Some(server));
    for field in [
        "kubernetesAPIServerPort",
        "kubesphereAPIServerPort",
        "kubesphereAPIEndpoint",
    ] {
        assert!(!plan.spec.contains_key(field), "{field}: {:?}", plan.spec);
    }
    let c = applied(&cluster(|_| {}), &plan);
    let init = condition(&c.status.as_ref().unwrap().conditions, INITIALIZED);
    assert!(init.message.contains("path form"), "{}", init.message);
    // A cluster switched from its own ports: the endpoint moves to the
    // path, the old ports stay for a switch back.
    let plan = plan_for(&set_up(|_| {}), &given);
    assert_eq!(plan.spec.get("kubernetesAPIEndpoint"), Some(&json!(server)));
    assert!(!plan.spec.contains_key("kubernetesAPIServerPort"));
    // Without an agent nothing is served.
    let idle = Given { live: 0, ..given };
    assert_eq!(plan_for(&set_up(|_| {}), &idle).serve_at, None);
}
