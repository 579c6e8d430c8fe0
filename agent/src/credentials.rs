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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use kube_client::config::{AuthInfo, Kubeconfig};
use secrecy::ExposeSecret as _;
use tokio::sync::{Notify, watch};
use tunnel::addr::{join_host_port, split_host_port};

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

/// Take the current context's server and static credentials.
fn from_kubeconfig(kubeconfig: &Kubeconfig) -> anyhow::Result<Credentials> {
    let context_name = kubeconfig
        .current_context
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| anyhow!("no current-context"))?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| anyhow!("current-context {context_name:?} is not among the contexts"))?;
    let cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| {
            anyhow!(
                "cluster {:?} of context {context_name:?} is not among the clusters",
                context.cluster
            )
        })?;
    let server = cluster
        .server
        .as_deref()
        .ok_or_else(|| anyhow!("cluster {:?} has no server", context.cluster))?;
    let mut credentials = Credentials {
        server: Some(server_host_port(server)?),
        ..Default::default()
    };
    credentials.ca_data = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) if !data.trim().is_empty() => decode("certificate-authority-data", data)?,
        (_, Some(path)) if !path.is_empty() => read(Path::new(path))?,
        _ => Vec::new(),
    };

    let Some(user) = context.user.as_deref().filter(|u| !u.is_empty()) else {
        return Ok(credentials);
    };
    let auth = kubeconfig
        .auth_infos
        .iter()
        .find(|a| a.name == user)
        .and_then(|a| a.auth_info.as_ref())
        .ok_or_else(|| {
            anyhow!("user {user:?} of context {context_name:?} is not among the users")
        })?;
    refuse_dynamic(user, auth)?;

    credentials.cert_data = match (&auth.client_certificate_data, &auth.client_certificate) {
        (Some(data), _) if !data.trim().is_empty() => decode("client-certificate-data", data)?,
        (_, Some(path)) if !path.is_empty() => read(Path::new(path))?,
        _ => Vec::new(),
    };
    credentials.key_data = match (&auth.client_key_data, &auth.client_key) {
        (Some(data), _) if !data.expose_secret().trim().is_empty() => {
            decode("client-key-data", data.expose_secret())?
        }
        (_, Some(path)) if !path.is_empty() => read(Path::new(path))?,
        _ => Vec::new(),
    };
    if credentials.cert_data.is_empty() != credentials.key_data.is_empty() {
        bail!(
            "user {user:?} has a client certificate without its key, or a key without its certificate"
        );
    }
    // The token file wins over an inline token: it is the one that gets
    // refreshed (client-go likewise re-reads the file and ignores the stale token).
    credentials.bearer_token = match (&auth.token_file, &auth.token) {
        (Some(path), _) if !path.is_empty() => read_token_file(Path::new(path))?.into_bytes(),
        (_, Some(token)) => token.expose_secret().trim().as_bytes().to_vec(),
        _ => Vec::new(),
    };
    Ok(credentials)
}

/// Exec plugins, auth providers and basic auth cannot be handed to the proxy.
fn refuse_dynamic(user: &str, auth: &AuthInfo) -> anyhow::Result<()> {
    const INSTEAD: &str = "give the agent a kubeconfig with a static credential instead: a client \
                           certificate (client-certificate/client-key), a token, or a tokenFile \
                           (e.g. a service-account token)";
    if let Some(exec) = &auth.exec {
        let command = exec.command.as_deref().unwrap_or("?");
        bail!(
            "user {user:?} gets its credential from the exec plugin {command:?}, which is not \
             supported: the proxy needs a credential it can use itself; {INSTEAD}"
        );
    }
    if let Some(provider) = &auth.auth_provider {
        bail!(
            "user {user:?} uses the auth provider {:?}, which is not supported; {INSTEAD}",
            provider.name
        );
    }
    if auth.username.is_some() || auth.password.is_some() {
        bail!(
            "user {user:?} uses basic auth (username/password), which Tower cannot carry; {INSTEAD}"
        );
    }
    Ok(())
}

/// `https://host[:port]` to `host:port` (443 by default). The proxy always
/// speaks TLS to the kube-apiserver and can carry no path.
fn server_host_port(server: &str) -> anyhow::Result<String> {
    let uri: hyper::Uri = server
        .trim()
        .parse()
        .with_context(|| format!("server {server:?} is not a URL"))?;
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("https") => {}
        _ => bail!(
            "server {server:?}: the proxy reaches the kube-apiserver over TLS, so the server must be an https:// URL"
        ),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!(
            "server {server:?} has a path; the tunnel carries only host:port, so point --kubeconfig \
             at the kube-apiserver itself"
        );
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("server {server:?} has no host"))?;
    let (host, _) = split_host_port(authority.as_str()).ok_or_else(|| {
        anyhow!(
            "server {server:?}: {:?} is not HOST[:PORT]",
            authority.as_str()
        )
    })?;
    Ok(join_host_port(&host, uri.port_u16().unwrap_or(443)))
}

fn decode(field: &str, data: &str) -> anyhow::Result<Vec<u8>> {
    let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .with_context(|| format!("{field} is not valid base64"))
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
mod tests {
    use super::*;

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    fn write_kubeconfig(dir: &Path, cluster: &str, user: &str) -> PathBuf {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: member\n\
             contexts:\n- name: other\n  context: {{cluster: other, user: other}}\n\
             - name: member\n  context: {{cluster: c, user: u}}\n\
             clusters:\n- name: c\n  cluster:\n{cluster}\n\
             users:\n- name: u\n  user:\n{user}\n"
        );
        let path = dir.join("config");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn load(path: PathBuf) -> anyhow::Result<Credentials> {
        CredentialSource::Kubeconfig { path }.load()
    }

    #[test]
    fn kubeconfig_with_inline_cert_data() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = format!(
            "    server: https://10.0.0.1:6443\n    certificate-authority-data: {}",
            B64.encode("CA PEM")
        );
        let user = format!(
            "    client-certificate-data: {}\n    client-key-data: {}",
            B64.encode("CERT PEM"),
            B64.encode("KEY PEM")
        );
        let creds = load(write_kubeconfig(dir.path(), &cluster, &user)).unwrap();
        assert_eq!(creds.server.as_deref(), Some("10.0.0.1:6443"));
        assert_eq!(creds.ca_data, b"CA PEM");
        assert_eq!(creds.cert_data, b"CERT PEM");
        assert_eq!(creds.key_data, b"KEY PEM");
        assert!(creds.bearer_token.is_empty());
        assert_eq!(creds.kinds(), "ca,client-certificate");
        assert!(!format!("{creds:?}").contains("PEM"));
    }

    #[test]
    fn kubeconfig_files_are_relative_to_the_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pki")).unwrap();
        std::fs::write(dir.path().join("pki/ca.crt"), "CA FILE").unwrap();
        std::fs::write(dir.path().join("pki/tls.crt"), "CERT FILE").unwrap();
        std::fs::write(dir.path().join("pki/tls.key"), "KEY FILE").unwrap();
        std::fs::write(dir.path().join("token"), "  file-token\n").unwrap();
        let cluster = "    server: https://[fd00::1]\n    certificate-authority: pki/ca.crt";
        let user = "    client-certificate: pki/tls.crt\n    client-key: pki/tls.key\n    \
                    token: stale-inline\n    tokenFile: token";
        let path = write_kubeconfig(dir.path(), cluster, user);
        let creds = load(path.clone()).unwrap();
        assert_eq!(creds.server.as_deref(), Some("[fd00::1]:443"));
        assert_eq!(creds.ca_data, b"CA FILE");
        assert_eq!(creds.cert_data, b"CERT FILE");
        assert_eq!(creds.key_data, b"KEY FILE");
        assert_eq!(creds.bearer_token, b"file-token");

        // A rotated token file is seen on the next load.
        std::fs::write(dir.path().join("token"), "rotated").unwrap();
        assert_eq!(load(path).unwrap().bearer_token, b"rotated");
    }

    #[test]
    fn kubeconfig_inline_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_kubeconfig(
            dir.path(),
            "    server: https://api.example:443",
            "    token: abc",
        );
        let creds = load(path).unwrap();
        assert_eq!(creds.server.as_deref(), Some("api.example:443"));
        assert_eq!(creds.bearer_token, b"abc");
        assert!(creds.ca_data.is_empty());
    }

    #[test]
    fn exec_and_other_dynamic_credentials_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let exec = "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws\n      args: [eks, get-token]";
        let e = format!(
            "{:#}",
            load(write_kubeconfig(dir.path(), "    server: https://a", exec)).unwrap_err()
        );
        assert!(
            e.contains("exec plugin \"aws\"") && e.contains("not supported"),
            "{e}"
        );
        assert!(
            e.contains("client certificate") && e.contains("tokenFile"),
            "{e}"
        );

        let provider = "    auth-provider:\n      name: oidc\n      config: {}";
        let e = format!(
            "{:#}",
            load(write_kubeconfig(
                dir.path(),
                "    server: https://a",
                provider
            ))
            .unwrap_err()
        );
        assert!(e.contains("auth provider \"oidc\""), "{e}");

        let basic = "    username: admin\n    password: secret";
        let e = format!(
            "{:#}",
            load(write_kubeconfig(dir.path(), "    server: https://a", basic)).unwrap_err()
        );
        assert!(e.contains("basic auth") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn kubeconfig_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            load(write_kubeconfig(
                dir.path(),
                "    server: http://a:8080",
                "    token: t"
            ))
            .unwrap_err()
        );
        assert!(e.contains("https://"), "{e}");
        let e = format!(
            "{:#}",
            load(write_kubeconfig(
                dir.path(),
                "    server: https://rancher/k8s/clusters/c-1",
                "    token: t"
            ))
            .unwrap_err()
        );
        assert!(e.contains("has a path"), "{e}");
        let e = format!(
            "{:#}",
            load(write_kubeconfig(
                dir.path(),
                "    server: https://a",
                "    client-certificate-data: Q0VSVA=="
            ))
            .unwrap_err()
        );
        assert!(e.contains("without its key"), "{e}");
        let e = format!(
            "{:#}",
            load(write_kubeconfig(
                dir.path(),
                "    server: https://a",
                "    tokenFile: missing"
            ))
            .unwrap_err()
        );
        assert!(e.contains("cannot read") && e.contains("missing"), "{e}");
        let e = format!("{:#}", load(dir.path().join("nope")).unwrap_err());
        assert!(e.contains("--kubeconfig"), "{e}");
    }

    #[test]
    fn service_account_directory() {
        let dir = tempfile::tempdir().unwrap();
        let env_dir = dir.path().to_str().unwrap().to_string();
        let env = move |name: &str| (name == SERVICE_ACCOUNT_DIR_ENV).then(|| env_dir.clone());
        // No token yet: not in a pod.
        assert_eq!(CredentialSource::detect(None, &env), CredentialSource::None);
        std::fs::write(dir.path().join("token"), "sa-token\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "SA CA").unwrap();
        let source = CredentialSource::detect(None, &env);
        assert_eq!(
            source,
            CredentialSource::ServiceAccount {
                dir: dir.path().into()
            }
        );
        let creds = source.load().unwrap();
        assert_eq!(creds.bearer_token, b"sa-token");
        assert_eq!(creds.ca_data, b"SA CA");
        assert_eq!(creds.server, None);
        // --kubeconfig wins over the pod.
        let explicit = CredentialSource::detect(Some("k".into()), &env);
        assert_eq!(explicit, CredentialSource::Kubeconfig { path: "k".into() });
    }

    #[tokio::test]
    async fn the_watcher_publishes_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "one").unwrap();
        let loader = Loader {
            token: TokenSource::Literal("agent".into()),
            source: CredentialSource::ServiceAccount {
                dir: dir.path().into(),
            },
            handed: Default::default(),
        };
        let poke = Arc::new(Notify::new());
        let mut rx = watch(
            loader.clone(),
            loader.load().unwrap(),
            Duration::from_secs(3600),
            poke.clone(),
        );
        // Unchanged: nothing published.
        poke.notify_one();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.changed())
                .await
                .is_err()
        );
        std::fs::write(dir.path().join("token"), "two").unwrap();
        poke.notify_one();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().credentials.bearer_token, b"two");
        // A handed token wins over the configured one, re-read after re-read.
        loader.handed.set("handed".into());
        poke.notify_one();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().token, "handed");
        assert_eq!(loader.load().unwrap().token, "handed");
        // A broken re-read keeps the current material.
        std::fs::remove_file(dir.path().join("token")).unwrap();
        poke.notify_one();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rx.changed())
                .await
                .is_err()
        );
        assert_eq!(rx.borrow().credentials.bearer_token, b"two");
    }
}
