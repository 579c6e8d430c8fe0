//! Tokens the proxy hands over the tunnel (`token@tower.kubesphere.io`): a
//! rotated token, or the per-cluster token a registered agent receives.
//!
//! A handed token is newer than the one the deployment gave (`--token`,
//! `--token-file`, `AGENT_TOKEN`), so it wins from then on: [`Handed`] holds it
//! and [`crate::credentials::Loader`] prefers it on every re-read, which is
//! what keeps the periodic re-read from putting the old token back.
//!
//! With `--token-secret NAMESPACE/NAME` the token is also written to that
//! Secret (key `token`) in the member cluster, through the same member
//! credentials the agent hands the proxy, before the agent confirms; a
//! restart reads it back. Without the flag it lives in memory only.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tunnel::client::TokenSink;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube_client::api::{Api, Patch, PatchParams, PostParams};
use kube_client::config::AuthInfo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tunnel::wire::AgentConfig;

/// Key of the token in the `--token-secret` Secret.
pub const SECRET_KEY: &str = "token";

/// `--token-secret NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for SecretRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let dns = |p: &str| {
            !p.is_empty()
                && p.len() <= 253
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match s.split_once('/') {
            Some((ns, name)) if dns(ns) && dns(name) && !name.contains('/') => Ok(Self {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            _ => Err(format!(
                "{s:?}: expected NAMESPACE/NAME of a Secret in the member cluster, e.g. kubesphere-system/tower-agent-token"
            )),
        }
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a handed token could not be kept or read back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot build a client for the member's kube-apiserver: {0}")]
    Client(String),
    #[error(
        "cannot write Secret {secret} in the member cluster: {source}; \
         give the agent get/update/patch on it and create on secrets (config/agent/rbac.yaml)"
    )]
    Write {
        secret: SecretRef,
        source: kube_client::Error,
    },
    #[error("cannot read Secret {secret} in the member cluster: {source}")]
    Read {
        secret: SecretRef,
        source: kube_client::Error,
    },
}

/// The handed token, shared by the tunnel (which sets it) and the
/// credentials loader (which prefers it). Cheap to clone.
#[derive(Clone, Default)]
pub struct Handed(Arc<Mutex<Option<String>>>);

impl Handed {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, token: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
    }
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Handed")
            .field(&self.get().map(|_| "<redacted>"))
            .finish()
    }
}

/// Keeps handed tokens: in `secret` if given, always in `handed`, then pokes
/// the credentials re-read so the agent connects again with the token (make
/// before break, as for any credentials change).
#[derive(Clone, Debug)]
pub struct Keeper {
    pub secret: Option<SecretRef>,
    pub handed: Handed,
    pub reread: Arc<Notify>,
}

impl Keeper {
    /// The sink for one tunnel; `member` is that tunnel's `config` (the
    /// member address and credentials the Secret is written with).
    pub fn sink(&self, member: AgentConfig) -> TokenSink {
        let keeper = self.clone();
        let member = Arc::new(member);
        TokenSink::new(move |token| {
            let (keeper, member) = (keeper.clone(), member.clone());
            Box::pin(async move { keeper.keep(&member, token).await })
        })
    }

    async fn keep(&self, member: &AgentConfig, token: String) -> Result<(), String> {
        match &self.secret {
            Some(secret) => {
                write(secret, member, &token)
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%secret, "stored the token the proxy handed over; reconnecting with it");
            }
            None => tracing::warn!(
                "keeping the token the proxy handed over in memory only: it is lost on restart \
                 (give --token-secret NAMESPACE/NAME to keep it in the member cluster); reconnecting with it"
            ),
        }
        self.handed.set(token);
        self.reread.notify_one();
        Ok(())
    }
}

/// A kube client for the member's kube-apiserver, with exactly what the
/// agent hands the proxy (`config`'s address, CA, certificate or token).
pub(crate) fn member_client(config: &AgentConfig) -> Result<kube_client::Client, StoreError> {
    let url = format!("https://{}", config.kubernetes_svc_host)
        .parse()
        .map_err(|e| StoreError::Client(format!("{}: {e}", config.kubernetes_svc_host)))?;
    let mut kube = kube_client::Config::new(url);
    if !config.ca_data.is_empty() {
        let roots = CertificateDer::pem_slice_iter(&config.ca_data)
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Client(format!("CA: {e}")))?;
        kube.root_cert = Some(roots);
    }
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let mut auth = AuthInfo::default();
    if !config.cert_data.is_empty() {
        auth.client_certificate_data = Some(b64(&config.cert_data));
        auth.client_key_data = Some(b64(&config.key_data).into());
    }
    if !config.bearer_token.is_empty() {
        let token = String::from_utf8_lossy(&config.bearer_token).into_owned();
        auth.token = Some(token.into());
    }
    kube.auth_info = auth;
    kube.connect_timeout = Some(std::time::Duration::from_secs(10));
    kube.read_timeout = Some(std::time::Duration::from_secs(10));
    kube_client::Client::try_from(kube).map_err(|e| StoreError::Client(e.to_string()))
}

/// Write `token` to `secret` (merge patch, or create it).
pub async fn write(
    secret: &SecretRef,
    config: &AgentConfig,
    token: &str,
) -> Result<(), StoreError> {
    let api: Api<Secret> = Api::namespaced(member_client(config)?, &secret.namespace);
    let encoded = base64::engine::general_purpose::STANDARD.encode(token);
    let patch = serde_json::json!({ "data": { SECRET_KEY: encoded } });
    let write_err = |source| StoreError::Write {
        secret: secret.clone(),
        source,
    };
    match api
        .patch(&secret.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube_client::Error::Api(status)) if status.code == 404 => {
            let mut object: Secret = serde_json::from_value(serde_json::json!({
                "metadata": { "name": secret.name, "namespace": secret.namespace },
                "type": "Opaque",
            }))
            .map_err(|e| StoreError::Client(e.to_string()))?;
            object.data = Some(
                [(
                    SECRET_KEY.to_string(),
                    k8s_openapi::ByteString(token.into()),
                )]
                .into_iter()
                .collect(),
            );
            api.create(&PostParams::default(), &object)
                .await
                .map(|_| ())
                .map_err(write_err)
        }
        Err(e) => Err(write_err(e)),
    }
}

/// The token kept in `secret`, if it exists and holds a non-empty one.
pub async fn read(secret: &SecretRef, config: &AgentConfig) -> Result<Option<String>, StoreError> {
    let api: Api<Secret> = Api::namespaced(member_client(config)?, &secret.namespace);
    let found = api
        .get_opt(&secret.name)
        .await
        .map_err(|source| StoreError::Read {
            secret: secret.clone(),
            source,
        })?;
    Ok(found
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(SECRET_KEY))
        .and_then(|v| String::from_utf8(v.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_flag_is_namespace_and_name() {
        let s: SecretRef = "kubesphere-system/tower-agent-token".parse().unwrap();
        assert_eq!(s.namespace, "kubesphere-system");
        assert_eq!(s.name, "tower-agent-token");
        assert_eq!(s.to_string(), "kubesphere-system/tower-agent-token");
        for bad in ["noslash", "/name", "ns/", "a/b/c", "NS/name", "ns/na me"] {
            let e = bad.parse::<SecretRef>().unwrap_err();
            assert!(e.contains("NAMESPACE/NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_handed_token_is_never_printed() {
        let handed = Handed::default();
        handed.set("supersecret".into());
        assert!(!format!("{handed:?}").contains("supersecret"));
        assert_eq!(handed.get().as_deref(), Some("supersecret"));
    }
}
