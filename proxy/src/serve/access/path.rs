//! The path form's URLs: `https://<address>:<access-port>/clusters/<name>`
//! is a cluster's API server, and everything under it is that API server's
//! own path (`/clusters/alpha/api/v1/namespaces` is `/api/v1/namespaces` on
//! alpha). kubectl takes such a `server` as is: client-go puts its paths
//! after the server's.

use tunnel::addr::endpoint;

use crate::identity::names::is_cluster_name;

/// Where the clusters' paths start.
pub const PREFIX: &str = "/clusters/";

/// The `server` of `cluster`'s kubeconfig in the path form.
pub fn server(address: &str, port: u16, cluster: &str) -> String {
    format!("{}{PREFIX}{cluster}", endpoint("https", address, port))
}

/// A request's path and query split into the cluster it is for and the
/// path and query to send to that cluster's API server.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    pub cluster: &'a str,
    /// Starts with `/`; the query, if any, kept as the client sent it.
    pub rest: String,
}

/// Split `/clusters/<name>/<rest>?<query>`; the error says what is wrong
/// with the path.
pub fn route<'a>(path: &'a str, query: Option<&str>) -> Result<Routed<'a>, String> {
    let Some(after) = path.strip_prefix(PREFIX) else {
        return Err(format!(
            "{path:?} is not a cluster's path: this port serves /clusters/<cluster>/..., \
             use the kubeconfig in the Cluster (spec.connection.kubeconfig)"
        ));
    };
    let (cluster, rest) = match after.find('/') {
        Some(slash) => (&after[..slash], &after[slash..]),
        None => (after, "/"),
    };
    if !is_cluster_name(cluster) {
        return Err(format!(
            "{cluster:?} in {path:?} is not a cluster name (lower-case letters, digits, '-' \
             and '.')"
        ));
    }
    let rest = match query {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_string(),
    };
    Ok(Routed { cluster, rest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str, query: Option<&str>) -> (String, String) {
        let routed = route(path, query).unwrap();
        (routed.cluster.to_string(), routed.rest)
    }

    #[test]
    fn a_clusters_path_goes_to_its_api_server() {
        assert_eq!(
            ok("/clusters/alpha/api/v1/namespaces", None),
            ("alpha".into(), "/api/v1/namespaces".into())
        );
        // The query goes along untouched (watches, label selectors).
        assert_eq!(
            ok(
                "/clusters/alpha/api/v1/pods",
                Some("watch=true&labelSelector=a%3Db")
            ),
            (
                "alpha".into(),
                "/api/v1/pods?watch=true&labelSelector=a%3Db".into()
            )
        );
        // The cluster itself is its API server's root.
        assert_eq!(ok("/clusters/alpha", None), ("alpha".into(), "/".into()));
        assert_eq!(ok("/clusters/alpha/", None), ("alpha".into(), "/".into()));
        assert_eq!(
            ok("/clusters/m-01.example/version", Some("timeout=32s")),
            ("m-01.example".into(), "/version?timeout=32s".into())
        );
        // Upgrades keep their path (exec's command is in the query).
        assert_eq!(
            ok(
                "/clusters/c7/api/v1/namespaces/default/pods/box/exec",
                Some("command=echo&stdout=true")
            ),
            (
                "c7".into(),
                "/api/v1/namespaces/default/pods/box/exec?command=echo&stdout=true".into()
            )
        );
    }

    #[test]
    fn other_paths_are_refused_with_the_reason() {
        for path in ["/", "/api/v1/namespaces", "/clusters", "/cluster/alpha/api"] {
            let e = route(path, None).unwrap_err();
            assert!(e.contains("/clusters/<cluster>/"), "{path}: {e}");
        }
        for path in [
            "/clusters//api",
            "/clusters/Alpha/api",
            "/clusters/../api",
            "/clusters/a..b/api",
            "/clusters/-alpha/api",
            "/clusters/al%2Fpha/api",
            "/clusters/alpha%00/api",
        ] {
            let e = route(path, None).unwrap_err();
            assert!(e.contains("not a cluster name"), "{path}: {e}");
        }
        let long = format!("/clusters/{}/api", "a".repeat(254));
        assert!(route(&long, None).is_err());
    }

    #[test]
    fn servers_in_the_path_form_route_back_to_their_cluster() {
        assert_eq!(
            server("10.0.0.1", 9443, "alpha"),
            "https://10.0.0.1:9443/clusters/alpha"
        );
        assert_eq!(
            server("fd00::1", 9443, "alpha"),
            "https://[fd00::1]:9443/clusters/alpha"
        );
        let url: hyper::Uri = format!("{}/api", server("tower.example", 443, "beta"))
            .parse()
            .unwrap();
        assert_eq!(route(url.path(), url.query()).unwrap().cluster, "beta");
    }
}
