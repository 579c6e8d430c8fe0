//! Whom the aggregated API believes: the host kube-apiserver's front proxy.
//! The kube-aggregator calls us with its proxy-client certificate and names
//! the real caller in headers (`X-Remote-User`, ...). Only a certificate from
//! the front-proxy CA, with a common name the host allows, may do that:
//! anyone else could write those headers too.
//!
//! The host publishes all of it in the ConfigMap
//! `kube-system/extension-apiserver-authentication` (readable through the
//! Role `extension-apiserver-authentication-reader`); [`watch`] keeps a
//! [`Trust`] built from it current, so a rotated front-proxy CA is picked up
//! without a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::watcher;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub const NAMESPACE: &str = "kube-system";
pub const CONFIG_MAP: &str = "extension-apiserver-authentication";

/// The front proxy as the host describes it.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The front-proxy CA(s), DER.
    pub roots: Vec<CertificateDer<'static>>,
    /// Common names the front proxy's certificate may have; empty: any.
    pub allowed_names: Vec<String>,
    pub user_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
    pub uid_headers: Vec<String>,
}

impl Trust {
    /// From the ConfigMap's data. Fails, saying what is wrong, when the host
    /// has no front proxy configured (aggregation off) or the data is bad.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, String> {
        let pem = data
            .get("requestheader-client-ca-file")
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "{NAMESPACE}/{CONFIG_MAP} has no requestheader-client-ca-file: the host \
                     kube-apiserver needs --requestheader-client-ca-file and \
                     --proxy-client-cert-file for aggregated APIs"
                )
            })?;
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("requestheader-client-ca-file is not PEM: {e}"))?;
        if roots.is_empty() {
            return Err("requestheader-client-ca-file holds no certificate".into());
        }
        let list = |key: &str| -> Result<Vec<String>, String> {
            match data.get(key).map(|v| v.trim()) {
                None | Some("") => Ok(Vec::new()),
                Some(json) => serde_json::from_str(json)
                    .map_err(|e| format!("{key} is not a JSON list of strings: {e}")),
            }
        };
        let trust = Self {
            roots,
            allowed_names: list("requestheader-allowed-names")?,
            user_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
            uid_headers: list("requestheader-uid-headers")?,
        };
        if trust.user_headers.is_empty() {
            return Err(format!(
                "{NAMESPACE}/{CONFIG_MAP} names no requestheader-username-headers: give the host \
                 kube-apiserver --requestheader-username-headers=X-Remote-User"
            ));
        }
        Ok(trust)
    }

    /// The roots as a rustls store.
    pub fn root_store(&self) -> Result<RootCertStore, rustls::Error> {
        let mut roots = RootCertStore::empty();
        for der in &self.roots {
            roots.add(der.clone())?;
        }
        Ok(roots)
    }
}

/// The current [`Trust`], shared; `None` until the ConfigMap was read.
pub type Current = Arc<RwLock<Option<Arc<Trust>>>>;

/// Keep `current` in step with the host's ConfigMap until the task is
/// dropped. A bad or missing ConfigMap keeps the last good trust (none at
/// first: every request is then refused with 401).
pub async fn watch(client: kube::Client, current: Current) {
    let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let config = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"));
    let mut events = watcher(api, config).boxed();
    while let Some(event) = events.next().await {
        let cm = match event {
            Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching {NAMESPACE}/{CONFIG_MAP} failed, retrying \
                    (the proxy needs get/list/watch on it: RoleBinding to \
                    extension-apiserver-authentication-reader)");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        match Trust::from_data(&cm.data.unwrap_or_default()) {
            Ok(trust) => {
                tracing::info!(
                    allowed_names = ?trust.allowed_names,
                    "aggregated API: trusting the host's front proxy"
                );
                *current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(trust));
            }
            Err(why) => tracing::warn!("aggregated API: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_host_without_a_front_proxy_is_named() {
        let err = Trust::from_data(&data(&[("client-ca-file", "x")])).unwrap_err();
        assert!(err.contains("--requestheader-client-ca-file"), "{err}");
    }

    #[test]
    fn lists_are_json() {
        let ca = crate::identity::ca::Ca::generate().unwrap();
        let trust = Trust::from_data(&data(&[
            ("requestheader-client-ca-file", &ca.cert_pem()),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#,
            ),
        ]))
        .unwrap();
        assert_eq!(trust.allowed_names, ["front-proxy-client"]);
        assert_eq!(trust.extra_prefixes, ["X-Remote-Extra-"]);
        assert!(trust.uid_headers.is_empty());
        assert_eq!(trust.roots.len(), 1);
        let err = Trust::from_data(&data(&[
            ("requestheader-client-ca-file", &ca.cert_pem()),
            ("requestheader-username-headers", "X-Remote-User"),
        ]))
        .unwrap_err();
        assert!(err.contains("JSON list"), "{err}");
    }
}
