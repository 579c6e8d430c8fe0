//! What the agent hands the proxy: its own token, and the member cluster's
//! kube-apiserver address and credentials (`AgentConfig`'s `KubernetesSvcHost`,
//! `CAData`, `CertData`, `KeyData`, `BearerToken`).
//!
//! The proxy uses these to talk to the member's kube-apiserver through the
//! tunnel, end to end over TLS: it trusts `CAData`, checks the server name from
//! `KubernetesSvcHost`, and authenticates with the client certificate or the
//! bearer token. They come from one of three places ([`CredentialSource`]):
//!
//! 1. `--kubeconfig FILE`: the current context's cluster and user. The server
//!    URL's `host:port` becomes `KubernetesSvcHost` (unless `--kubernetes-service`
//!    is given). Every static credential kind is taken: `client-certificate(-data)`
//!    with `client-key(-data)`, `token`, `tokenFile`; relative file names are
//!    resolved against the kubeconfig's directory, as kubectl does. Exec plugins,
//!    auth providers and basic auth are refused at start: the proxy can only use a
//!    credential it is handed, not run a plugin.
//! 2. In a pod (the service-account directory has a `token`): that token and
//!    `ca.crt`. The directory is `/var/run/secrets/kubernetes.io/serviceaccount`,
//!    or `$AGENT_SERVICEACCOUNT_DIR`.
//! 3. Neither: no credentials (a warning at start).
//!
//! Projected service-account tokens expire (an hour by default) and the kubelet
//! rewrites the file; Go Tower reads it once, so its proxy ends up with a dead
//! token. Here [`watch`] re-reads every source (and `--token-file`) periodically
//! and on SIGHUP, and publishes a changed [`Material`]; the agent then opens a
//! new tunnel with it.
//!
//! This file holds the sources, what they yield and the watcher;
//! [`kubeconfig`] reads a kubeconfig's static credentials and refuses the
//! others.

mod kubeconfig;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use kube_client::config::Kubeconfig;
use tokio::sync::{Notify, watch};

use kubeconfig::from_kubeconfig;

/// Where pods get their service-account token and CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Environment variable overriding [`SERVICE_ACCOUNT_DIR`] (tests, odd mounts).
pub const SERVICE_ACCOUNT_DIR_ENV: &str = "AGENT_SERVICEACCOUNT_DIR";

/// Where the agent token comes from.
#[derive(Clone)]
pub enum TokenSource {
    Literal(String),
    File(PathBuf),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Literal(_) => f.write_str("Literal(<redacted>)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl TokenSource {
    pub fn read(&self) -> anyhow::Result<String> {
        match self {
            Self::Literal(token) => Ok(token.clone()),
            Self::File(path) => read_token_file(path),
        }
    }
}

/// Where the member cluster's credentials come from (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    None,
    ServiceAccount { dir: PathBuf },
    Kubeconfig { path: PathBuf },
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::ServiceAccount { dir } => write!(f, "service account ({})", dir.display()),
            Self::Kubeconfig { path } => write!(f, "kubeconfig {}", path.display()),
        }
    }
}

impl CredentialSource {
    /// `--kubeconfig` if given, else the pod's service account if there is one.
    pub fn detect(kubeconfig: Option<PathBuf>, env: &dyn Fn(&str) -> Option<String>) -> Self {
        if let Some(path) = kubeconfig {
            return Self::Kubeconfig { path };
        }
        let dir = env(SERVICE_ACCOUNT_DIR_ENV)
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR), PathBuf::from);
        if dir.join("token").exists() {
            Self::ServiceAccount { dir }
        } else {
            Self::None
        }
    }

    /// Read the credentials now. Blocking file I/O.
    pub fn load(&self) -> anyhow::Result<Credentials> {
        match self {
            Self::None => Ok(Credentials::default()),
            Self::ServiceAccount { dir } => {
                let token = dir.join("token");
                let ca = dir.join("ca.crt");
                Ok(Credentials {
                    bearer_token: read_token_file(&token)?.into_bytes(),
                    ca_data: if ca.exists() { read(&ca)? } else { Vec::new() },
                    ..Default::default()
                })
            }
            Self::Kubeconfig { path } => {
                // kube's error repeats its cause in its message; show it once.
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| anyhow!("--kubeconfig {}: {e}", path.display()))?;
                from_kubeconfig(&kubeconfig)
                    .with_context(|| format!("--kubeconfig {}", path.display()))
            }
        }
    }
}

/// The member kube-apiserver as the agent hands it to the proxy.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `host:port` of the kubeconfig's server, if from a kubeconfig.
    pub server: Option<String>,
    pub ca_data: Vec<u8>,
    pub cert_data: Vec<u8>,
    pub key_data: Vec<u8>,
    pub bearer_token: Vec<u8>,
}

/// Never print secrets.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("ca_data", &!self.ca_data.is_empty())
            .field("cert_data", &!self.cert_data.is_empty())
            .field("key_data", &!self.key_data.is_empty())
            .field("bearer_token", &!self.bearer_token.is_empty())
            .finish()
    }
}

impl Credentials {
    /// A short description for logs: which kinds are present, never values.
    pub fn kinds(&self) -> String {
        let mut kinds = Vec::new();
        if !self.ca_data.is_empty() {
            kinds.push("ca");
        }
        if !self.cert_data.is_empty() {
            kinds.push("client-certificate");
        }
        if !self.bearer_token.is_empty() {
            kinds.push("bearer-token");
        }
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(",")
        }
    }
}

/// Everything that may change on disk while the agent runs.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The agent token.
    pub token: String,
    pub credentials: Credentials,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// Reads the agent token and the member credentials. A token the proxy
/// handed over ([`crate::handed`]) wins over `token`: it is newer.
#[derive(Clone, Debug)]
pub struct Loader {
    pub token: TokenSource,
    pub source: CredentialSource,
    pub handed: crate::handed::Handed,
}

impl Loader {
    pub fn load(&self) -> anyhow::Result<Material> {
        let token = match self.handed.get() {
            Some(token) => token,
            None => self.token.read().context("--token-file")?,
        };
        Ok(Material {
            token,
            credentials: self.source.load()?,
        })
    }
}

/// Re-read `loader` every `every` and whenever `poke` is notified; publish the
/// result when it differs. A failed re-read keeps the current material (a
/// rotation may be half-way) and logs a warning.
pub fn watch(
    loader: Loader,
    initial: Material,
    every: Duration,
    poke: Arc<Notify>,
) -> watch::Receiver<Arc<Material>> {
    let (tx, rx) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let start = tokio::time::Instant::now() + every;
        let mut tick = tokio::time::interval_at(start, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = poke.notified() => {}
                _ = tx.closed() => return,
            }
            let loader = loader.clone();
            match tokio::task::spawn_blocking(move || loader.load()).await {
                Ok(Ok(material)) => {
                    if **tx.borrow() != material {
                        tracing::info!(
                            credentials = material.credentials.kinds(),
                            "credentials changed"
                        );
                        tx.send_replace(Arc::new(material));
                    }
                }
                Ok(Err(e)) => tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot re-read credentials, keeping the current ones"
                ),
                Err(e) => tracing::warn!(error = %e, "credentials reader failed"),
            }
        }
    });
    rx
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = String::from_utf8(read(path)?)
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests;
