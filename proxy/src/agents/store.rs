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

    /// After the token check, before the agent hears success: e.g. bind the
    /// cluster's listeners. An error rejects the agent with that reason.
    fn on_connect(&self, _cluster: &str) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// An agent claiming `cluster` was refused (wrong token, unknown cluster).
    fn on_reject(&self, _cluster: &str, _reason: &str) {}

    /// A session of `cluster` was added or has ended.
    fn on_change(&self, _cluster: &str) {}
}

/// Clusters and tokens fixed at start, e.g. from `--clusters-file`.
#[derive(Default)]
pub struct StaticClusters(HashMap<String, String>);

impl StaticClusters {
    /// Parse `{"alpha": "<token>", ...}`.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let map: HashMap<String, String> = serde_json::from_str(json)
            .map_err(|e| format!("expected a JSON object of cluster name to token: {e}"))?;
        if let Some(name) = map.iter().find(|(_, t)| t.is_empty()).map(|(n, _)| n) {
            return Err(format!("cluster {name:?} has an empty token"));
        }
        Ok(Self(map))
    }
}

impl ClusterStore for StaticClusters {
    fn token(&self, cluster: &str) -> Option<String> {
        self.0.get(cluster).cloned()
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
    }
}
