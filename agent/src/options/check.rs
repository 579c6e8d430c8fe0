//! [`Flags::check`]: from flags as parsed to a [`Config`] in which every
//! value has been checked, so that a bad flag stops the agent at start with
//! a message naming the flag and the form it expects.
//!
//! What only the whole set of flags can tell is checked here too: one token
//! source, not two; a `--bootstrap-token` instead of `--name`; the same
//! `--hub-listen` name never twice.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{BOOTSTRAP_TOKEN_FORMAT, Config, DEFAULT_KUBESPHERE_SERVICE, Flags};
use crate::credentials::{CredentialSource, TokenSource};
use crate::dial::ProxyDialer;
use crate::endpoint::Endpoint;
use crate::hooks::Hook;
use crate::proxy_env::HttpProxy;

/// Kubernetes' bootstrap-token shape: `[a-z0-9]{6}.[a-z0-9]{16}`.
fn is_bootstrap_token(token: &str) -> bool {
    let part = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    token
        .split_once('.')
        .is_some_and(|(id, secret)| part(id, 6) && part(secret, 16))
}

impl Flags {
    /// Validate every flag; `env` reads environment variables (HTTP(S)_PROXY,
    /// NO_PROXY, AGENT_SERVICEACCOUNT_DIR), injectable for tests.
    pub fn check(self, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let bootstrap_token = match self.bootstrap_token.as_deref().map(str::trim) {
            None => None,
            Some(t) if is_bootstrap_token(t) => Some(t.to_string()),
            Some(_) => bail!(
                "--bootstrap-token: expected a Kubernetes bootstrap token, {BOOTSTRAP_TOKEN_FORMAT} \
                 (e.g. from `kubeadm token generate`)"
            ),
        };
        let name = self.name.trim().to_string();
        if name.is_empty() && bootstrap_token.is_none() {
            bail!(
                "--name is required (the member cluster's name), unless --bootstrap-token is \
                 given: the agent then derives one from its cluster ID"
            );
        }
        if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            bail!("--name {:?}: expected the member cluster's name", self.name);
        }
        let token = match (self.token, self.token_file) {
            (Some(_), Some(_)) => {
                bail!(
                    "give the agent token once: --token (or AGENT_TOKEN) or --token-file, not both"
                )
            }
            // Registering: no cluster token yet (the proxy hands it over).
            (None, None) if bootstrap_token.is_some() => TokenSource::Literal(String::new()),
            (None, None) => {
                bail!(
                    "the agent token is required: --token-file FILE, AGENT_TOKEN, or --token \
                     (or --bootstrap-token to register)"
                )
            }
            (Some(t), None) if t.trim().is_empty() => bail!("--token is empty"),
            (Some(t), None) => TokenSource::Literal(t.trim().to_string()),
            (None, Some(path)) => TokenSource::File(path),
        };
        // Read once now so that a missing or empty token file fails at start.
        token.read().context("--token-file")?;

        let endpoint = Endpoint::parse(&self.proxy_server)
            .map_err(|e| anyhow::anyhow!("--proxy-server {:?}: {e}", self.proxy_server))?;
        let via = HttpProxy::from_env(&endpoint, env)?;
        let dialer = ProxyDialer::new(endpoint, via, self.proxy_ca.as_deref())?;

        let mut host_key_fingerprints = Vec::new();
        for value in &self.proxy_host_key_fingerprint {
            let fingerprint = check_fingerprint(value)?;
            if !host_key_fingerprints.contains(&fingerprint) {
                host_key_fingerprints.push(fingerprint);
            }
        }

        if self.keepalive.is_zero() {
            bail!("--keepalive must be longer than 0s");
        }
        if self.max_retry_interval.is_zero() {
            bail!("--max-retry-interval must be longer than 0s");
        }
        if self.credentials_refresh_interval < Duration::from_secs(1) {
            bail!("--credentials-refresh-interval must be at least 1s");
        }
        let kubernetes_service = self
            .kubernetes_service
            .as_deref()
            .map(|v| check_host_port("--kubernetes-service", v, "kubernetes.default.svc:443"))
            .transpose()?;
        let kubesphere_service = check_host_port(
            "--kubesphere-service",
            &self.kubesphere_service,
            DEFAULT_KUBESPHERE_SERVICE,
        )?;
        let credentials = CredentialSource::detect(self.kubeconfig, env);
        if self.hook_timeout.is_zero() {
            bail!("--hook-timeout must be longer than 0s");
        }
        let hook = |flag: &str, cmd: Option<String>| match cmd {
            Some(cmd) if cmd.trim().is_empty() => bail!("{flag} is empty"),
            Some(cmd) => Ok(Some(Hook {
                cmd,
                timeout: self.hook_timeout,
            })),
            None => Ok(None),
        };
        let pre_start_hook = hook("--pre-start-hook", self.pre_start_hook)?;
        let post_start_hook = hook("--post-start-hook", self.post_start_hook)?;
        for (i, listen) in self.hub_listen.iter().enumerate() {
            if self.hub_listen[..i]
                .iter()
                .any(|l| l.service == listen.service)
            {
                bail!("--hub-listen {}: the name is given twice", listen.service);
            }
        }

        Ok(Config {
            name,
            bootstrap_token,
            cluster_id: String::new(),
            token,
            token_secret: self.token_secret,
            dialer,
            host_key_fingerprints,
            keepalive: self.keepalive,
            max_retry: (self.max_retry > 0).then_some(self.max_retry),
            max_retry_interval: self.max_retry_interval,
            kubernetes_service,
            kubesphere_service,
            credentials,
            credentials_refresh_interval: self.credentials_refresh_interval,
            allow_dial: self.allow_dial,
            pre_start_hook,
            post_start_hook,
            hub_listen: self.hub_listen,
        })
    }
}

/// Check a `HOST:PORT` flag value and return it unchanged: the proxy asks for
/// channels to exactly the string the agent advertised, so it must not be
/// rewritten. IPv6 hosts need brackets (`[fd00::1]:6443`).
pub fn check_host_port(flag: &str, value: &str, example: &str) -> anyhow::Result<String> {
    let expected = format!("expected HOST:PORT, e.g. {example} or [fd00::1]:6443");
    if value.contains("://") {
        bail!("{flag} {value:?} has a URL scheme; {expected} (no scheme)");
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            bail!("{flag} {value:?} has no closing ']'; {expected}");
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            bail!("{flag} {value:?}: {host:?} in brackets is not an IPv6 address; {expected}");
        }
        match after.strip_prefix(':') {
            Some(port) => (host, port),
            None => bail!("{flag} {value:?} has no port; {expected}"),
        }
    } else {
        match value.rsplit_once(':') {
            None => bail!("{flag} {value:?} has no port; {expected}"),
            Some((host, _)) if host.contains(':') => {
                bail!("{flag} {value:?}: an IPv6 address needs brackets; {expected}")
            }
            Some(parts) => parts,
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '?' | '#'))
    {
        bail!("{flag} {value:?}: {host:?} is not a host name or address; {expected}");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(value.to_string()),
        _ => bail!("{flag} {value:?}: {port:?} is not a port (1-65535); {expected}"),
    }
}

/// Check a `--proxy-host-key-fingerprint` and return it in the form the SSH
/// library prints (`SHA256:` + unpadded base64 of 32 bytes).
fn check_fingerprint(value: &str) -> anyhow::Result<String> {
    use base64::Engine as _;
    let expected =
        "expected SHA256:<base64>, the proxy host key's fingerprint as the proxy logs it";
    let Some(b64) = value.trim().strip_prefix("SHA256:") else {
        bail!("--proxy-host-key-fingerprint {value:?}: {expected}");
    };
    let b64 = b64.trim_end_matches('=');
    match base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64) {
        Ok(bytes) if bytes.len() == 32 => Ok(format!("SHA256:{b64}")),
        _ => {
            bail!("--proxy-host-key-fingerprint {value:?} is not a SHA-256 fingerprint; {expected}")
        }
    }
}
