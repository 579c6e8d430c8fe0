//! Where agents' tokens come from, and who hears about their sessions.
//!
//! Two stores: [`StaticClusters`] (`--clusters-file`, no Kubernetes) and the
//! Cluster resources ([`crate::clusters::store::CrStore`]).

use std::collections::HashMap;
use std::future::Future;

/// Where cluster tokens come from, and who hears about sessions.
pub trait ClusterStore: Send + Sync + 'static {
    /// The token agents of `cluster` must present, if the cluster exists.
    fn token(&self, cluster: &str) -> Option<String>;

    /// Resolves once [`Self::token`] knows every cluster (a cache that
    /// syncs after the agents' port opens), or after a deadline.
    fn synced(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The previous token of `cluster` and until when it is still accepted
    /// (a rotation's grace period), if one applies now.
    fn grace(&self, _cluster: &str) -> Option<super::grace::Grace> {
        None
    }

    /// After the token check, before the agent hears success: e.g. bind the
    /// cluster's listeners. An error rejects the agent with that reason.
    fn on_connect(&self, _cluster: &str) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// An agent claiming `cluster` was refused (wrong token, unknown cluster).
    fn on_reject(&self, _cluster: &str, _reason: &str) {}

    /// A session of `cluster` was added or has ended.
    fn on_change(&self, _cluster: &str) {}

    /// The hub services `cluster` opted in to (pull mode); `None`: it did not
    /// opt in. Asked for every hub channel, so a change applies at once.
    fn hub_services(&self, _cluster: &str) -> Option<Vec<String>> {
        None
    }
}

/// Clusters and tokens fixed at start, e.g. from `--clusters-file`.
#[derive(Default)]
pub struct StaticClusters(HashMap<String, Entry>);

/// One cluster of a `--clusters-file`: its token, or its token and the hub
/// services it opts in to (the annotation's comma-separated list).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Entry {
    Token(String),
    #[serde(rename_all = "camelCase")]
    Full {
        token: String,
        #[serde(default)]
        hub_services: Option<String>,
    },
}

impl Entry {
    fn token(&self) -> &str {
        match self {
            Entry::Token(token) | Entry::Full { token, .. } => token,
        }
    }
}

impl StaticClusters {
    /// Parse `{"alpha": "<token>", "beta": {"token": "<token>", "hubServices": "hub-api"}}`.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let map: HashMap<String, Entry> = serde_json::from_str(json).map_err(|e| {
            format!(
                "expected a JSON object of cluster name to token, or to \
                 {{\"token\": ..., \"hubServices\": \"a,b\"}}: {e}"
            )
        })?;
        if let Some(name) = map
            .iter()
            .find(|(_, e)| e.token().is_empty())
            .map(|(n, _)| n)
        {
            return Err(format!("cluster {name:?} has an empty token"));
        }
        Ok(Self(map))
    }
}

impl ClusterStore for StaticClusters {
    fn token(&self, cluster: &str) -> Option<String> {
        self.0.get(cluster).map(|e| e.token().to_string())
    }

    fn hub_services(&self, cluster: &str) -> Option<Vec<String>> {
        match self.0.get(cluster)? {
            Entry::Full {
                hub_services: Some(list),
                ..
            } => Some(super::hub::parse_opt_in(list)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_clusters_file() {
        let store = StaticClusters::from_json(r#"{"alpha":"t1"}"#).unwrap();
        assert_eq!(store.token("alpha").as_deref(), Some("t1"));
        assert_eq!(store.token("beta"), None);
        let err = StaticClusters::from_json("[1]").err().unwrap();
        assert!(err.contains("JSON object"), "{err}");
        let err = StaticClusters::from_json(r#"{"a":""}"#).err().unwrap();
        assert!(err.contains("empty token"), "{err}");
        let err = StaticClusters::from_json(r#"{"a":{"token":""}}"#)
            .err()
            .unwrap();
        assert!(err.contains("empty token"), "{err}");
    }

    #[test]
    fn static_clusters_opt_in_to_hub_services() {
        let store = StaticClusters::from_json(
            r#"{"alpha":"t1","beta":{"token":"t2","hubServices":"hub-api, x"},"gamma":{"token":"t3"}}"#,
        )
        .unwrap();
        assert_eq!(store.hub_services("alpha"), None);
        assert_eq!(store.hub_services("beta").unwrap(), ["hub-api", "x"]);
        assert_eq!(store.token("beta").as_deref(), Some("t2"));
        assert_eq!(store.hub_services("gamma"), None);
        assert_eq!(store.hub_services("delta"), None);
    }
}
