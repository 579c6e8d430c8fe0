//! What the kube-aggregator and kubectl read before any request: the group,
//! its one version and the `clusters/proxy` subresource, an empty OpenAPI
//! (v2 and v3) so the aggregator's OpenAPI controllers are content, and the
//! health endpoints. Only the subresource is listed, never `clusters` itself:
//! a listed `clusters` resource would compete with `cluster.kubesphere.io`'s
//! Clusters for `kubectl get clusters`.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::{GROUP, GROUP_VERSION, VERSION};
use crate::serve::listener::status::{Body, json as json_answer, text};

/// The answer for a discovery, OpenAPI or health `path`, or `None`.
pub fn answer(path: &str) -> Option<Response<Body>> {
    let path = path.trim_end_matches('/');
    let group = || {
        json!({
            "name": GROUP,
            "versions": [{"groupVersion": GROUP_VERSION, "version": VERSION}],
            "preferredVersion": {"groupVersion": GROUP_VERSION, "version": VERSION},
        })
    };
    let body = match path {
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]}),
        p if p == format!("/apis/{GROUP}") => {
            let mut g = group();
            g["kind"] = "APIGroup".into();
            g["apiVersion"] = "v1".into();
            g
        }
        p if p == format!("/apis/{GROUP_VERSION}") => json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": GROUP_VERSION,
            "resources": [{
                "name": "clusters/proxy",
                "singularName": "",
                "namespaced": false,
                "kind": "ClusterProxyOptions",
                "verbs": ["create", "delete", "get", "patch", "update"],
            }],
        }),
        "/openapi/v2" => json!({
            "swagger": "2.0",
            "info": {"title": "Tower aggregated API", "version": VERSION},
            "paths": {},
        }),
        "/openapi/v3" => json!({"paths": {}}),
        "/healthz" | "/readyz" | "/livez" => return Some(text(StatusCode::OK, "ok")),
        _ => return None,
    };
    Some(json_answer(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_names_the_subresource_only() {
        assert!(answer("/apis/tower.kubesphere.io/v1alpha1").is_some());
        assert!(answer("/apis/tower.kubesphere.io/").is_some());
        assert!(answer("/openapi/v3").is_some());
        assert!(answer("/apis/tower.kubesphere.io/v1alpha1/clusters").is_none());
    }
}
