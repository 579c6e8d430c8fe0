//! Credentials from `--kubeconfig`: the current context's server and user,
//! as kubectl would resolve them, but only what can be handed on.
//!
//! The proxy uses the credential itself, from another cluster, so only
//! static ones will do: a client certificate and key, a token, a token file
//! (read again at every refresh, as client-go does). Exec plugins, auth
//! providers and basic auth are refused with what to use instead, and the
//! server must be an `https://host[:port]` with no path: the tunnel carries
//! only `host:port`.

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use kube_client::config::{AuthInfo, Kubeconfig};
use secrecy::ExposeSecret as _;
use tunnel::addr::{join_host_port, split_host_port};

use super::{Credentials, read, read_token_file};

/// Take the current context's server and static credentials.
pub(super) fn from_kubeconfig(kubeconfig: &Kubeconfig) -> anyhow::Result<Credentials> {
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
