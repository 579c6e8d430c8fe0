//! Command-line flags and their validation.
//!
//! [`Flags`] is what clap parses: Tower's agent flags (`--name`, `--token`,
//! `--proxy-server`, `--keepalive`, `--max-retry`, `--max-retry-interval`,
//! `--kubernetes-service`, `--kubesphere-service`, `--kubeconfig`) plus ours
//! (`--token-file`, `--proxy-ca`, `--proxy-host-key-fingerprint`, `--log-format`,
//! `--credentials-refresh-interval`, `--pre-start-hook`, `--post-start-hook`,
//! `--hook-timeout`) and Go Tower's klog flags
//! ([`KlogFlags`], `--v=0` and friends). [`Flags::check`] turns them into a
//! [`Config`] in which every value has been checked, so that a bad flag stops the
//! agent at start with a message naming the flag and the expected form, instead of
//! a panic or a retry loop that can never succeed (Go Tower panics on a
//! `--kubesphere-service` with a scheme).
//!
//! Syntax and values are Go Tower's (pflag's `--keepalive=10s`, Go durations
//! like `30s`, `2m`, `1h30m`, `500ms`, see [`tunnel::cli`]) so that KubeSphere's
//! deployment manifests keep working unchanged.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use tunnel::cli::{KlogFlags, LogFormat, parse_go_duration};

use crate::credentials::{CredentialSource, TokenSource};
use crate::dial::ProxyDialer;
use crate::endpoint::Endpoint;
use crate::hooks::Hook;
use crate::proxy_env::HttpProxy;

/// Tower's default for `--kubernetes-service` (Tower leaves the port out; the
/// proxy needs it to dial, so ours carries it).
pub const DEFAULT_KUBERNETES_SERVICE: &str = "kubernetes.default.svc:443";
/// Tower's default for `--kubesphere-service`, with its port.
pub const DEFAULT_KUBESPHERE_SERVICE: &str = "ks-apiserver.kubesphere-system.svc:80";

/// The shape of `--bootstrap-token`, in messages.
pub const BOOTSTRAP_TOKEN_FORMAT: &str = "[a-z0-9]{6}.[a-z0-9]{16}";

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

/// Tower agent: dials the Tower proxy and serves this cluster's kube-apiserver and
/// ks-apiserver through the tunnel.
#[derive(Debug, Parser)]
// args_override_self: a repeated flag's last value wins, as in Go's pflag.
#[command(name = "agent", version, about, args_override_self = true)]
pub struct Flags {
    /// Name of this member cluster, as registered on the host cluster. With
    /// --bootstrap-token it may be left out: the agent then asks to join as
    /// `cluster-<first 8 characters of its kube-system namespace's UID>`.
    #[arg(long, default_value = "")]
    pub name: String,

    /// Join by itself (docs/registration.md): a Kubernetes bootstrap token
    /// ([a-z0-9]{6}.[a-z0-9]{16}) of the host cluster, used only while the
    /// agent has no cluster token (none given, none stored in --token-secret).
    /// The proxy hands the cluster token over once the request is approved.
    #[arg(
        long,
        env = "AGENT_BOOTSTRAP_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub bootstrap_token: Option<String>,

    /// The cluster's agent token. Visible in `ps`: prefer --token-file or the
    /// AGENT_TOKEN environment variable.
    #[arg(long, env = "AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the agent token (surrounding whitespace ignored); re-read
    /// periodically, a change reconnects with the new token.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Secret in the member cluster (key `token`) where the agent keeps a token
    /// the proxy hands it (rotation, registration), written with the member
    /// credentials; at start a non-empty one there wins over --token/--token-file.
    /// Without it a handed token lives in memory only.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub token_secret: Option<crate::handed::SecretRef>,

    /// The Tower proxy: http://HOST[:PORT][/PATH] (websocket) or https://... (TLS).
    #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
    pub proxy_server: String,

    /// Extra CA (PEM) trusted for an https:// proxy, besides the public web roots.
    #[arg(long, value_name = "FILE")]
    pub proxy_ca: Option<PathBuf>,

    /// Pin the proxy's SSH host key (`SHA256:...`, as printed by the proxy); the
    /// agent refuses to send its credentials to any other key. Repeat it to pin
    /// a set (any match passes): the current key and the next one, while the
    /// proxy's host key is rotated (docs/ca-rotation.md).
    #[arg(long, value_name = "SHA256:...")]
    pub proxy_host_key_fingerprint: Vec<String>,

    /// Period of keepalive pings to the proxy; three missed pings end the tunnel.
    #[arg(long, default_value = "30s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub keepalive: Duration,

    /// Give up (exit 1) after this many failed connection attempts in a row;
    /// 0 retries forever.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_retry: u32,

    /// Longest wait between two connection attempts (the backoff's cap).
    #[arg(long, default_value = "2m", value_parser = parse_go_duration, value_name = "DURATION")]
    pub max_retry_interval: Duration,

    /// HOST:PORT of the kube-apiserver as this agent reaches it [default: the
    /// --kubeconfig server, else kubernetes.default.svc:443].
    #[arg(long, value_name = "HOST:PORT")]
    pub kubernetes_service: Option<String>,

    /// HOST:PORT of the ks-apiserver as this agent reaches it.
    #[arg(long, default_value = DEFAULT_KUBESPHERE_SERVICE, value_name = "HOST:PORT")]
    pub kubesphere_service: String,

    /// Kubeconfig whose current context gives the kube-apiserver and the
    /// credentials handed to the proxy [default: the pod's service account].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Further addresses the proxy may open streams to through this agent
    /// (repeatable): CIDR:PORT, CIDR:LOW-HIGH, HOST:PORT or *.DNS-SUFFIX:PORT,
    /// e.g. 10.0.0.0/8:1-65535. Default: only the two API servers.
    #[arg(long = "allow-dial", value_name = "RULE", value_parser = tunnel::allow::Rule::parse)]
    pub allow_dial: Vec<tunnel::allow::Rule>,

    /// Pull mode (repeatable): listen on ADDR and carry each connection through
    /// the tunnel to the hub service NAME the proxy publishes, e.g.
    /// hub-api=127.0.0.1:6443.
    #[arg(long = "hub-listen", value_name = "NAME=ADDR", value_parser = crate::hub::parse_listen)]
    pub hub_listen: Vec<crate::hub::Listen>,

    /// How often token files and the kubeconfig are re-read (SIGHUP re-reads now).
    #[arg(long, default_value = "30s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub credentials_refresh_interval: Duration,

    /// Shell command (`sh -c CMD`) run before each connection attempt; its stdout,
    /// if not empty, is a JSON object replacing the credentials handed to the
    /// proxy (`bearerToken`, `caData`, `certData`, `keyData`). A failure is retried.
    #[arg(long, value_name = "CMD")]
    pub pre_start_hook: Option<String>,

    /// Shell command (`sh -c CMD`) run after each successful connection, in the
    /// background; its failure is only logged.
    #[arg(long, value_name = "CMD")]
    pub post_start_hook: Option<String>,

    /// Longest a hook may run before it (and its children) are killed.
    #[arg(long, default_value = "30s", value_parser = parse_go_duration, value_name = "DURATION")]
    pub hook_timeout: Duration,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Go Tower's logging flags (`--v=0`, ...): see `tunnel::cli::logging`.
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// Checked configuration: everything the agent needs, validated.
#[derive(Debug)]
pub struct Config {
    /// Empty only with a bootstrap token: derived from the cluster ID at start.
    pub name: String,
    /// `--bootstrap-token`, well formed.
    pub bootstrap_token: Option<String>,
    /// The member's cluster ID, read at start when registering (empty until then).
    pub cluster_id: String,
    pub token: TokenSource,
    /// `--token-secret`: where a handed token is kept.
    pub token_secret: Option<crate::handed::SecretRef>,
    /// Dials the proxy (URL, TLS roots, HTTP(S)_PROXY).
    pub dialer: ProxyDialer,
    /// Pinned host key fingerprints; empty: not pinned.
    pub host_key_fingerprints: Vec<String>,
    pub keepalive: Duration,
    /// `None`: retry forever.
    pub max_retry: Option<u32>,
    pub max_retry_interval: Duration,
    /// Explicit `--kubernetes-service`; otherwise it comes with the credentials.
    pub kubernetes_service: Option<String>,
    pub kubesphere_service: String,
    pub credentials: CredentialSource,
    pub credentials_refresh_interval: Duration,
    /// `--allow-dial` rules.
    pub allow_dial: Vec<tunnel::allow::Rule>,
    pub pre_start_hook: Option<Hook>,
    pub post_start_hook: Option<Hook>,
    /// `--hub-listen` listeners, one per service name.
    pub hub_listen: Vec<crate::hub::Listen>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut argv = vec!["agent", "--name", "member", "--token", "t0k"];
        argv.extend_from_slice(args);
        Flags::try_parse_from(argv).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn check(args: &[&str]) -> anyhow::Result<Config> {
        flags(args).check(&no_env)
    }

    fn err(args: &[&str]) -> String {
        format!("{:#}", check(args).unwrap_err())
    }

    #[test]
    fn defaults_are_towers() {
        let config = check(&[]).unwrap();
        assert_eq!(config.name, "member");
        assert_eq!(config.keepalive, Duration::from_secs(30));
        assert_eq!(config.max_retry, None);
        assert_eq!(config.max_retry_interval, Duration::from_secs(120));
        assert_eq!(config.kubernetes_service, None);
        assert_eq!(config.kubesphere_service, DEFAULT_KUBESPHERE_SERVICE);
        assert_eq!(config.dialer.endpoint().url(), "ws://127.0.0.1:8080/");
    }

    #[test]
    fn service_with_a_scheme_is_a_clear_error() {
        let e = err(&["--kubesphere-service", "http://ks-apiserver:80"]);
        assert!(e.contains("--kubesphere-service"), "{e}");
        assert!(e.contains("scheme"), "{e}");
        assert!(e.contains("HOST:PORT"), "{e}");
    }

    #[test]
    fn service_without_a_port_is_a_clear_error() {
        let e = err(&["--kubesphere-service", "ks-apiserver.kubesphere-system.svc"]);
        assert!(
            e.contains("--kubesphere-service") && e.contains("no port"),
            "{e}"
        );
        let e = err(&["--kubernetes-service", "10.0.0.1:https"]);
        assert!(
            e.contains("--kubernetes-service") && e.contains("not a port"),
            "{e}"
        );
        let e = err(&["--kubernetes-service", "10.0.0.1:0"]);
        assert!(e.contains("not a port"), "{e}");
    }

    #[test]
    fn ipv6_services_need_brackets() {
        let config = check(&[
            "--kubernetes-service",
            "[::1]:6443",
            "--kubesphere-service",
            "[fd00::1]:80",
        ])
        .unwrap();
        assert_eq!(config.kubernetes_service.as_deref(), Some("[::1]:6443"));
        assert_eq!(config.kubesphere_service, "[fd00::1]:80");
        let e = err(&["--kubernetes-service", "::1:6443"]);
        assert!(e.contains("brackets"), "{e}");
        let e = err(&["--kubernetes-service", "[::1]"]);
        assert!(e.contains("no port"), "{e}");
        let e = err(&["--kubernetes-service", "[nothost]:1"]);
        assert!(e.contains("not an IPv6"), "{e}");
    }

    #[test]
    fn hub_listen() {
        let config = check(&["--hub-listen", "hub-api=127.0.0.1:6443"]).unwrap();
        assert_eq!(config.hub_listen[0].service, "hub-api");
        assert_eq!(config.hub_listen[0].addr.port(), 6443);
        let e = err(&["--hub-listen=a=127.0.0.1:1", "--hub-listen=a=127.0.0.1:2"]);
        assert!(e.contains("--hub-listen a") && e.contains("twice"), "{e}");
        for (value, says) in [("hub-api", "NAME=ADDR"), ("hub-api=h:1", "IP:PORT")] {
            let e = Flags::try_parse_from(["agent", "--name", "a", "--hub-listen", value])
                .unwrap_err()
                .to_string();
            assert!(e.contains("--hub-listen") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn bootstrap_token_replaces_token_and_name() {
        let config =
            Flags::try_parse_from(["agent", "--bootstrap-token", "abcdef.0123456789abcdef"])
                .unwrap()
                .check(&|_| None)
                .unwrap();
        assert_eq!(config.name, "");
        assert_eq!(
            config.bootstrap_token.as_deref(),
            Some("abcdef.0123456789abcdef")
        );
        assert_eq!(config.token.read().unwrap(), "");
        for bad in [
            "abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde",
        ] {
            let e = Flags::try_parse_from(["agent", "--name=a", "--bootstrap-token", bad])
                .unwrap()
                .check(&|_| None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("[a-z0-9]{6}.[a-z0-9]{16}"), "{bad}: {e}");
        }
        let e = Flags::try_parse_from(["agent", "--token=t"])
            .unwrap()
            .check(&|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--name is required"), "{e}");
    }

    #[test]
    fn token_once() {
        let e = Flags::try_parse_from(["agent", "--name", "a"])
            .unwrap()
            .check(&no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token is required"), "{e}");
        let e = err(&["--token-file", "/nonexistent"]);
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn fingerprints_are_checked() {
        let good = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
        let config = check(&["--proxy-host-key-fingerprint", good]).unwrap();
        assert_eq!(config.host_key_fingerprints, [good]);
        let padded = format!("{good}=");
        let config = check(&["--proxy-host-key-fingerprint", &padded]).unwrap();
        assert_eq!(config.host_key_fingerprints, [good]);
        // Repeatable: a set, duplicates folded.
        let next = "SHA256:ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs";
        let config = check(&[
            "--proxy-host-key-fingerprint",
            good,
            "--proxy-host-key-fingerprint",
            next,
            "--proxy-host-key-fingerprint",
            &padded,
        ])
        .unwrap();
        assert_eq!(config.host_key_fingerprints, [good, next]);
        let e = err(&["--proxy-host-key-fingerprint", "MD5:aa:bb"]);
        assert!(e.contains("SHA256:"), "{e}");
        let e = err(&["--proxy-host-key-fingerprint", "SHA256:short"]);
        assert!(e.contains("not a SHA-256"), "{e}");
    }

    #[test]
    fn proxy_server_errors_name_the_flag() {
        let e = err(&["--proxy-server", "ftp://x"]);
        assert!(e.contains("--proxy-server"), "{e}");
    }

    /// KubeSphere's agent Deployment, word for word.
    const KUBESPHERE_AGENT_LINE: [&str; 8] = [
        "agent",
        "--name=alpha",
        "--token=abc",
        "--proxy-server=http://127.0.0.1:8080",
        "--keepalive=10s",
        "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80",
        "--kubernetes-service=kubernetes.default.svc:443",
        "--v=0",
    ];

    #[test]
    fn kubesphere_agent_command_line_is_accepted() {
        let flags = Flags::try_parse_from(KUBESPHERE_AGENT_LINE).unwrap();
        assert_eq!(flags.klog.v, Some(0));
        let config = flags.check(&no_env).unwrap();
        assert_eq!(config.name, "alpha");
        assert_eq!(config.dialer.endpoint().url(), "ws://127.0.0.1:8080/");
        assert_eq!(config.keepalive, Duration::from_secs(10));
        assert_eq!(
            config.kubernetes_service.as_deref(),
            Some("kubernetes.default.svc:443")
        );
        assert_eq!(
            config.kubesphere_service,
            "ks-apiserver.kubesphere-system.svc:80"
        );
    }

    #[test]
    fn every_go_tower_agent_flag_in_pflag_syntax() {
        let flags = Flags::try_parse_from([
            "agent",
            "--name=alpha",
            "--token=abc",
            "--proxy-server=https://tower.example:8443",
            "--keepalive=1m30s",
            "--max-retry=5",
            "--max-retry-interval=1.5m",
            "--kubernetes-service=[fd00::1]:6443",
            "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80",
            "--kubeconfig=/etc/member/kubeconfig",
            "--v=4",
            "--vmodule=proxy=2",
            "--logtostderr=true",
            "--alsologtostderr=false",
            "--log-dir=/var/log",
            "--log-file=/var/log/agent.log",
            "--log-file-max-size=1800",
            "--skip-headers",
            "--skip-log-headers=false",
            "--stderrthreshold=2",
            "--add-dir-header",
            "--log-backtrace-at=agent.go:42",
            "--one-output=true",
        ])
        .unwrap();
        assert_eq!(flags.klog.v, Some(4));
        assert_eq!(flags.klog.logtostderr, Some(true));
        assert_eq!(flags.klog.without_effect().len(), 8);
        let config = flags.check(&no_env).unwrap();
        assert_eq!(config.keepalive, Duration::from_secs(90));
        assert_eq!(config.max_retry, Some(5));
        assert_eq!(config.max_retry_interval, Duration::from_secs(90));
        assert_eq!(config.kubernetes_service.as_deref(), Some("[fd00::1]:6443"));
        assert!(matches!(
            config.credentials,
            CredentialSource::Kubeconfig { .. }
        ));
        assert_eq!(config.dialer.endpoint().url(), "wss://tower.example:8443/");
    }

    #[test]
    fn klog_short_forms_and_version_coexist() {
        for v in [&["-v", "4"][..], &["-v4"], &["-v=4"], &["--v", "4"]] {
            let mut argv = vec!["agent", "--name=a", "--token=t"];
            argv.extend_from_slice(v);
            assert_eq!(
                Flags::try_parse_from(argv).unwrap().klog.v,
                Some(4),
                "{v:?}"
            );
        }
        let e = Flags::try_parse_from(["agent", "-V"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
    }

    #[test]
    fn a_bad_duration_names_the_flag() {
        let e = Flags::try_parse_from(["agent", "--name=a", "--token=t", "--keepalive=soon"])
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = e.to_string();
        assert!(e.contains("--keepalive"), "{e}");
        assert!(e.contains("is not a duration like 30s"), "{e}");
    }

    #[test]
    fn zero_durations_are_refused() {
        assert!(err(&["--keepalive", "0"]).contains("--keepalive"));
        assert!(err(&["--max-retry-interval", "0s"]).contains("--max-retry-interval"));
        assert!(err(&["--hook-timeout", "0s"]).contains("--hook-timeout"));
    }

    #[test]
    fn hooks_share_the_timeout() {
        let config = check(&[]).unwrap();
        assert!(config.pre_start_hook.is_none() && config.post_start_hook.is_none());
        let config = check(&[
            "--pre-start-hook=cat /run/creds.json",
            "--post-start-hook",
            "logger joined",
            "--hook-timeout=2s",
        ])
        .unwrap();
        let pre = config.pre_start_hook.unwrap();
        assert_eq!(pre.cmd, "cat /run/creds.json");
        assert_eq!(pre.timeout, Duration::from_secs(2));
        let post = config.post_start_hook.unwrap();
        assert_eq!(
            (post.cmd.as_str(), post.timeout),
            ("logger joined", pre.timeout)
        );
        assert!(err(&["--pre-start-hook", " "]).contains("--pre-start-hook is empty"));
        let config = check(&["--post-start-hook=true"]).unwrap();
        assert_eq!(
            config.post_start_hook.unwrap().timeout,
            Duration::from_secs(30)
        );
    }
}
