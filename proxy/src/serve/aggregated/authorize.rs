//! May this caller reach this cluster? The host decides, with plain RBAC:
//! a `SubjectAccessReview` for the verb of the request the caller sends to
//! the member, on `clusters/proxy` of group `tower.kubesphere.io` with the
//! cluster as the resource name. So a ClusterRole with
//! `resources: [clusters/proxy]`, `resourceNames: [alpha]`,
//! `verbs: [get, list, watch]` opens alpha read-only and nothing else.
//!
//! (The host kube-apiserver has already checked its own verb for the outer
//! request, `get`/`create`/... on `clusters/proxy`, before calling us.)

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::identity::Vouched;
use super::{GROUP, VERSION};
use crate::ops::audit::verb::verb;

/// The RBAC verb of the inner request `method path?query`: the audit's verb
/// ([`verb`]), except that the streaming subresources the audit names
/// (`exec`, `attach`, `portforward`) are `create` to RBAC, whether they come
/// as SPDY POSTs or websocket GETs, and `proxy` takes its method's verb.
pub fn rbac_verb(method: &str, path: &str, query: Option<&str>) -> String {
    match verb(method, path, query).as_str() {
        "exec" | "attach" | "portforward" => "create".into(),
        "proxy" => match method.to_ascii_uppercase().as_str() {
            "GET" | "HEAD" | "OPTIONS" => "get",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "get",
        }
        .into(),
        other => other.to_string(),
    }
}

/// The review's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Denied; the authorizer's reason, if it gave one.
    Denied(String),
}

/// Ask the host whether `who` may `verb` on `clusters/proxy` of `cluster`.
pub async fn review(
    client: &kube::Client,
    who: &Vouched,
    verb: &str,
    cluster: &str,
) -> Result<Decision, kube::Error> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(who.caller.user.clone()),
            groups: Some(who.caller.groups.clone()),
            uid: who.uid.clone(),
            extra: Some(who.caller.extra.iter().cloned().collect()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                version: Some(VERSION.into()),
                resource: Some("clusters".into()),
                subresource: Some("proxy".into()),
                name: Some(cluster.into()),
                verb: Some(verb.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let answer = api.create(&PostParams::default(), &review).await?;
    let status = answer.status.unwrap_or_default();
    Ok(if status.allowed && status.denied != Some(true) {
        Decision::Allowed
    } else {
        Decision::Denied(status.reason.unwrap_or_default())
    })
}

/// The refusal as kubectl shows it, in the kube-apiserver's words.
pub fn forbidden_message(who: &Vouched, verb: &str, cluster: &str, reason: &str) -> String {
    let mut message = format!(
        "clusters.{GROUP} \"{cluster}\" is forbidden: User \"{}\" cannot {verb} resource \
         \"clusters/proxy\" in API group \"{GROUP}\" at the cluster scope: the host's RBAC \
         does not let this user reach cluster {cluster:?}",
        who.caller.user
    );
    if !reason.is_empty() {
        message.push_str(&format!(" ({reason})"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::rbac_verb;

    #[test]
    fn inner_verbs_are_rbac_verbs() {
        assert_eq!(rbac_verb("GET", "/api/v1/namespaces", None), "list");
        assert_eq!(
            rbac_verb("GET", "/api/v1/namespaces", Some("watch=true")),
            "watch"
        );
        assert_eq!(rbac_verb("GET", "/api/v1/namespaces/a", None), "get");
        assert_eq!(rbac_verb("POST", "/api/v1/namespaces", None), "create");
        assert_eq!(
            rbac_verb(
                "GET",
                "/api/v1/namespaces/a/pods/p/exec",
                Some("command=ls")
            ),
            "create"
        );
        assert_eq!(
            rbac_verb("POST", "/api/v1/namespaces/a/pods/p/portforward", None),
            "create"
        );
        assert_eq!(
            rbac_verb("GET", "/api/v1/namespaces/a/services/s/proxy/x", None),
            "get"
        );
        assert_eq!(rbac_verb("GET", "/apis", None), "get");
    }
}
