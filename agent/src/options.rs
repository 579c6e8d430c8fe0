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
//!
//! This file holds the flags and the checked [`Config`]; [`check`] the
//! checks, and `options/tests.rs` one test per rule.

mod check;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tunnel::cli::{KlogFlags, LogFormat, parse_go_duration};

use crate::credentials::{CredentialSource, TokenSource};
use crate::dial::ProxyDialer;
use crate::hooks::Hook;

/// Tower's default for `--kubernetes-service` (Tower leaves the port out; the
/// proxy needs it to dial, so ours carries it).
pub const DEFAULT_KUBERNETES_SERVICE: &str = "kubernetes.default.svc:443";
/// Tower's default for `--kubesphere-service`, with its port.
pub const DEFAULT_KUBESPHERE_SERVICE: &str = "ks-apiserver.kubesphere-system.svc:80";

/// The shape of `--bootstrap-token`, in messages.
pub const BOOTSTRAP_TOKEN_FORMAT: &str = "[a-z0-9]{6}.[a-z0-9]{16}";

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
#[cfg(test)]
mod tests;
