//! One request through the aggregated API, in order: the caller as the front
//! proxy vouches ([`super::identity`], else 401), discovery and OpenAPI
//! ([`super::discovery`]), the cluster from the path
//! (`/apis/tower.kubesphere.io/v1alpha1/clusters/<name>/proxy/<rest>`, else
//! 404), the host's RBAC ([`super::authorize`], else 403), then `<rest>`
//! (query kept) through the cluster's handler ([`super::members`]) with the
//! caller impersonated on the member unless the Cluster opts out
//! ([`IMPERSONATE_ANNOTATION`]).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};

use super::authorize::{Decision, forbidden_message, rbac_verb, review};
use super::identity;
use super::trust::Trust;
use super::{GROUP_VERSION, discovery};
use crate::ops::audit::{Audit, Caller, Record};
use crate::ops::uploads::Source;
use crate::serve::listener::status::{Body, status};
use crate::serve::proxies::Proxies;

/// The audit's door name for this API.
pub const DOOR: &str = "aggregated";

/// The Cluster annotation that turns impersonation off for the aggregated
/// API (`"false"`): the member then sees the agent's identity, as through a
/// cluster's port. Absent or anything else: the caller is impersonated.
pub const IMPERSONATE_ANNOTATION: &str = "tower.kubesphere.io/impersonate";

/// What the handler needs to know of a Cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterView {
    pub impersonate: bool,
}

/// A Cluster by name, from the controller's cache; `None`: no such Cluster.
pub type Lookup = Arc<dyn Fn(&str) -> Option<ClusterView> + Send + Sync>;

pub struct Handler {
    pub client: kube::Client,
    pub members: Proxies,
    pub clusters: Lookup,
    pub audit: Audit,
}

impl Handler {
    /// Answer `req`, sent over a connection whose verified front-proxy
    /// certificate has common name `cn` (`None`: no certificate).
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        trust: Option<Arc<Trust>>,
        cn: Option<String>,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        if matches!(path.as_str(), "/healthz" | "/readyz" | "/livez")
            && let Some(resp) = discovery::answer(&path)
        {
            return resp;
        }
        let who = match &trust {
            None => Err(
                "the proxy has not read the host's front-proxy settings yet \
                         (ConfigMap kube-system/extension-apiserver-authentication)"
                    .to_string(),
            ),
            Some(trust) => identity::caller(trust, cn.as_deref(), req.headers()),
        };
        let who = match who {
            Ok(who) => {
                // Vouched for by the front proxy: so is its client's address.
                if let Some(ip) = identity::forwarded_for(req.headers()) {
                    req.extensions_mut().insert(Source(ip));
                }
                who
            }
            Err(why) => {
                let cluster = cluster_of(&path).map_or("", |(c, _)| c);
                return self.refuse(
                    &req,
                    cluster,
                    Caller::named("unauthenticated"),
                    StatusCode::UNAUTHORIZED,
                    why,
                );
            }
        };
        if let Some(resp) = discovery::answer(&path) {
            return resp;
        }
        let Some((cluster, rest)) = cluster_of(&path) else {
            return status(
                StatusCode::NOT_FOUND,
                &format!(
                    "{path} is not served here: use /apis/{GROUP_VERSION}/clusters/<name>/proxy/..."
                ),
            );
        };
        let (cluster, rest) = (cluster.to_string(), rest.to_string());
        let Some(view) = (self.clusters)(&cluster) else {
            self.members.forget(&cluster);
            let why = format!("cluster {cluster:?} not found in the host cluster");
            return self.refuse(&req, &cluster, who.caller, StatusCode::NOT_FOUND, why);
        };
        let verb = rbac_verb(req.method().as_str(), &rest, req.uri().query());
        match review(&self.client, &who, &verb, &cluster).await {
            Ok(Decision::Allowed) => {}
            Ok(Decision::Denied(reason)) => {
                let why = forbidden_message(&who, &verb, &cluster, &reason);
                return self.refuse(&req, &cluster, who.caller, StatusCode::FORBIDDEN, why);
            }
            Err(e) => {
                tracing::warn!(%cluster, user = %who.caller.user, error = %e,
                    "SubjectAccessReview failed");
                let why = format!(
                    "cannot ask the host whether {:?} may reach cluster {cluster:?}: {e}",
                    who.caller.user
                );
                return self.refuse(
                    &req,
                    &cluster,
                    who.caller,
                    StatusCode::SERVICE_UNAVAILABLE,
                    why,
                );
            }
        }
        let (mut parts, body) = req.into_parts();
        let inner = match parts.uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest,
        };
        parts.uri = match Uri::try_from(inner) {
            Ok(uri) => uri,
            Err(e) => return status(StatusCode::BAD_REQUEST, &format!("bad request path: {e}")),
        };
        if let Some(trust) = &trust {
            strip_vouching(&mut parts.headers, trust);
        }
        let caller = Caller {
            impersonated: view.impersonate,
            ..who.caller
        };
        self.members
            .get(&cluster)
            .handle(Request::from_parts(parts, body), &caller)
            .await
    }

    /// Answer `code` with `why`, and audit it.
    fn refuse(
        &self,
        req: &Request<Incoming>,
        cluster: &str,
        caller: Caller,
        code: StatusCode,
        why: String,
    ) -> Response<Body> {
        tracing::info!(%cluster, user = %caller.user, status = code.as_u16(), reason = %why,
            "aggregated API refused a request");
        let source = req.extensions().get::<Source>().map(|s| s.0);
        let record =
            Record::http(DOOR, cluster, caller, req.uri(), req.method().as_str()).from(source);
        self.audit.log(record.answered(code.as_u16(), why.clone()));
        status(code, &why)
    }
}

/// `(cluster, rest)` of `/apis/<group>/<version>/clusters/<cluster>/proxy<rest>`;
/// `rest` is `/` when empty.
fn cluster_of(path: &str) -> Option<(&str, &str)> {
    let tail = path.strip_prefix(&format!("/apis/{GROUP_VERSION}/clusters/"))?;
    let (cluster, after) = tail.split_once('/')?;
    let rest = after.strip_prefix("proxy")?;
    if cluster.is_empty() || !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    Some((cluster, if rest.is_empty() { "/" } else { rest }))
}

/// The front proxy's `X-Remote-*` headers stay here: the member trusts its
/// own front proxy only, and the caller reaches it impersonated.
fn strip_vouching(headers: &mut hyper::HeaderMap, trust: &Trust) {
    let names: Vec<_> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            trust
                .user_headers
                .iter()
                .chain(&trust.group_headers)
                .chain(&trust.uid_headers)
                .any(|h| h.eq_ignore_ascii_case(k))
                || trust
                    .extra_prefixes
                    .iter()
                    .any(|p| k.starts_with(&p.to_ascii_lowercase()))
        })
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::cluster_of;

    #[test]
    fn the_cluster_and_the_inner_path() {
        let p = |s| cluster_of(s);
        assert_eq!(
            p("/apis/tower.kubesphere.io/v1alpha1/clusters/alpha/proxy/api/v1/namespaces"),
            Some(("alpha", "/api/v1/namespaces"))
        );
        assert_eq!(
            p("/apis/tower.kubesphere.io/v1alpha1/clusters/alpha/proxy"),
            Some(("alpha", "/"))
        );
        assert_eq!(
            p("/apis/tower.kubesphere.io/v1alpha1/clusters/alpha/proxyx"),
            None
        );
        assert_eq!(p("/apis/tower.kubesphere.io/v1alpha1/clusters/alpha"), None);
        assert_eq!(p("/api/v1/namespaces"), None);
    }
}
