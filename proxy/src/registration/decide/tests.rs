use super::*;
use crate::registration::crd::{RequestSpec, request_name};

const ID: &str = "0a1b2c3d-0000-4000-8000-000000000000";

fn request(decision: &str, cluster: Option<&str>) -> ClusterRegistrationRequest {
    let mut r = ClusterRegistrationRequest::new(
        &request_name(ID),
        RequestSpec {
            cluster_id: ID.into(),
            cluster_name: "cluster-0a1b2c3d".into(),
            bootstrap_token_id: "abcdef".into(),
            decision: decision.into(),
            ..Default::default()
        },
    );
    r.status = cluster.map(|c| RequestStatus {
        phase: "Approved".into(),
        cluster: c.into(),
        message: String::new(),
    });
    r
}

#[test]
fn identities_are_checked() {
    assert!(check_identity("cluster-0a1b2c3d", ID).is_ok());
    assert!(
        check_identity("Bad_Name", ID)
            .unwrap_err()
            .contains("--name")
    );
    assert!(check_identity("a", "").unwrap_err().contains("cluster ID"));
    assert!(check_identity("a", "UPPER").is_err());
    assert!(check_identity("a", &"a".repeat(64)).is_err());
    assert!(check_identity(&"a".repeat(64), ID).is_err());
}

#[test]
fn the_door_creates_approves_waits_and_joins() {
    assert_eq!(
        next(None, "x", "abcdef", false),
        Next::Create { approved: false }
    );
    assert_eq!(
        next(None, "x", "abcdef", true),
        Next::Create { approved: true }
    );
    let pending = request("", None);
    assert_eq!(next(Some(&pending), "x", "abcdef", true), Next::Approve);
    let Next::Refuse(text) = next(Some(&pending), "x", "abcdef", false) else {
        panic!("pending must refuse");
    };
    assert!(text.contains("kubectl get clsrr tower-0a1b2c3d"), "{text}");
    assert!(text.contains(r#""decision":"Approved""#), "{text}");
    // Anything but the two words waits for a person.
    assert_eq!(
        next(Some(&request("approved", None)), "x", "abcdef", false),
        next(Some(&pending), "x", "abcdef", false)
    );
    let approved = request("Approved", None);
    assert_eq!(next(Some(&approved), "x", "abcdef", false), Next::Wait);
    let joined = request("Approved", Some("cluster-0a1b2c3d"));
    assert_eq!(
        next(Some(&joined), "cluster-0a1b2c3d", "abcdef", false),
        Next::Join("cluster-0a1b2c3d".into())
    );
    let Next::Refuse(text) = next(Some(&joined), "other", "abcdef", false) else {
        panic!("another name must refuse");
    };
    assert!(text.contains("--name cluster-0a1b2c3d"), "{text}");
}

#[test]
fn an_approval_is_for_the_token_it_was_given_to() {
    let joined = request("Approved", Some("cluster-0a1b2c3d"));
    // Another valid token, not approving by itself: a person decides again.
    let Next::Refuse(text) = next(Some(&joined), "cluster-0a1b2c3d", "zzzzzz", false) else {
        panic!("another token must not take the approved request");
    };
    assert!(
        text.contains("bootstrap token abcdef") && text.contains("kubectl delete clsrr"),
        "{text}"
    );
    // One that approves by itself may, as it may create an approved request.
    assert_eq!(
        next(Some(&joined), "cluster-0a1b2c3d", "zzzzzz", true),
        Next::Join("cluster-0a1b2c3d".into())
    );
}

#[test]
fn denied_stays_denied_even_with_auto_approve() {
    let denied = request("Denied", None);
    let Next::Refuse(text) = next(Some(&denied), "x", "abcdef", true) else {
        panic!("denied must refuse");
    };
    assert!(text.contains("was denied"), "{text}");
    let Step::Status(status) = step(&denied, None, false) else {
        panic!("denied makes nothing");
    };
    assert_eq!(status.phase, "Denied");
}

#[test]
fn the_leader_creates_once_and_reuses_by_label() {
    let approved = request("Approved", None);
    let Step::Create(json) = step(&approved, None, false) else {
        panic!("approved without a Cluster creates one");
    };
    let cluster: crate::clusters::crd::Cluster = serde_json::from_value(json.clone()).unwrap();
    assert!(cluster.is_served());
    assert_eq!(cluster.metadata.name.as_deref(), Some("cluster-0a1b2c3d"));
    assert_eq!(
        cluster.metadata.labels.as_ref().unwrap()[CLUSTER_ID_LABEL],
        ID
    );
    // No empty token or kubeconfig: the Cluster controller fills them in.
    assert!(json["spec"]["connection"].get("kubeconfig").is_none());
    assert!(json["spec"]["connection"].get("token").is_none());
    // Found by its label: re-used, whatever its name.
    let Step::Status(status) = step(&approved, Some("alpha"), true) else {
        panic!("a labelled Cluster is re-used");
    };
    assert_eq!(
        (status.phase.as_str(), status.cluster.as_str()),
        ("Approved", "alpha")
    );
    // Another cluster's name: never taken over.
    let Step::Status(status) = step(&approved, None, true) else {
        panic!("a taken name is not created");
    };
    assert!(status.cluster.is_empty() && status.message.contains("another cluster"));
    let Step::Status(status) = step(&request("", None), None, false) else {
        panic!("pending makes nothing");
    };
    assert_eq!(status.phase, "Pending");
}
