//! The Kubernetes verb of a request, from its method, path and query, the way
//! the kube-apiserver's `RequestInfo` derives it (RBAC's verbs), except that
//! the streaming subresources keep their own name (`exec`, `attach`,
//! `portforward`, `proxy`) so the audit log shows what was opened.

/// The verb of `method path?query`; `query` is the raw query string, if any.
pub fn verb(method: &str, path: &str, query: Option<&str>) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // /api/<version>/... and /apis/<group>/<version>/...
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return method.to_ascii_lowercase(),
    };
    let (watch_path, mut rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    // namespaces/<ns>/<resource>...; namespaces/<ns>/status|finalize stay
    // the namespace's own subresources.
    if let ["namespaces", _ns, next, ..] = rest
        && !matches!(*next, "status" | "finalize")
    {
        rest = &rest[2..];
    }
    let (name, subresource) = match rest {
        [] => return method.to_ascii_lowercase(),
        [_resource] => (None, None),
        [_resource, name] => (Some(*name), None),
        [_resource, name, sub, ..] => (Some(*name), Some(*sub)),
    };
    if let Some(sub @ ("exec" | "attach" | "portforward" | "proxy")) = subresource {
        return sub.to_string();
    }
    let verb = match method.to_ascii_uppercase().as_str() {
        "GET" | "HEAD" if watch_path || watch_param(query) => "watch",
        "GET" | "HEAD" if name.is_none() => "list",
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if name.is_none() => "deletecollection",
        "DELETE" => "delete",
        other => return other.to_ascii_lowercase(),
    };
    verb.to_string()
}

/// `watch=true` or `watch=1` in the query (as the apiserver reads it).
fn watch_param(query: Option<&str>) -> bool {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|pair| pair.split_once('='))
        .any(|(k, v)| k == "watch" && matches!(v, "true" | "1"))
}

#[cfg(test)]
mod tests {
    use super::verb;

    #[test]
    fn verbs_like_the_apiserver() {
        let cases = [
            ("GET", "/api/v1/namespaces", None, "list"),
            ("GET", "/api/v1/namespaces/default", None, "get"),
            ("GET", "/api/v1/namespaces/default/pods", None, "list"),
            ("GET", "/api/v1/namespaces/default/pods/box", None, "get"),
            (
                "GET",
                "/api/v1/namespaces",
                Some("watch=true&resourceVersion=1"),
                "watch",
            ),
            ("GET", "/api/v1/pods", Some("limit=500&watch=1"), "watch"),
            ("GET", "/api/v1/pods", Some("watch=false"), "list"),
            (
                "GET",
                "/api/v1/watch/namespaces/default/pods",
                None,
                "watch",
            ),
            (
                "GET",
                "/apis/apps/v1/namespaces/default/deployments",
                None,
                "list",
            ),
            ("POST", "/api/v1/namespaces", None, "create"),
            (
                "PUT",
                "/apis/apps/v1/namespaces/d/deployments/web",
                None,
                "update",
            ),
            ("PATCH", "/api/v1/namespaces/audited", None, "patch"),
            ("DELETE", "/api/v1/namespaces/audited", None, "delete"),
            (
                "DELETE",
                "/api/v1/namespaces/default/pods",
                None,
                "deletecollection",
            ),
            ("PUT", "/api/v1/namespaces/gone/finalize", None, "update"),
            (
                "GET",
                "/api/v1/namespaces/default/pods/box/log",
                Some("follow=true"),
                "get",
            ),
            (
                "POST",
                "/api/v1/namespaces/default/pods/box/exec",
                Some("command=ls"),
                "exec",
            ),
            (
                "GET",
                "/api/v1/namespaces/default/pods/box/exec",
                None,
                "exec",
            ),
            (
                "POST",
                "/api/v1/namespaces/default/pods/box/attach",
                None,
                "attach",
            ),
            (
                "POST",
                "/api/v1/namespaces/d/pods/box/portforward",
                None,
                "portforward",
            ),
            (
                "GET",
                "/api/v1/namespaces/d/services/web/proxy/x/y",
                None,
                "proxy",
            ),
            ("GET", "/api", None, "get"),
            ("GET", "/api/v1", None, "get"),
            ("GET", "/apis/apps", None, "get"),
            ("GET", "/version", None, "get"),
            ("GET", "/healthz", Some("watch=true"), "get"),
            ("POST", "/openapi/v3", None, "post"),
            ("OPTIONS", "/api/v1/pods", None, "options"),
        ];
        for (method, path, query, want) in cases {
            assert_eq!(verb(method, path, query), want, "{method} {path}?{query:?}");
        }
    }
}
