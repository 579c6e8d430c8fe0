//! The reconnect loop: keep one tunnel to the proxy up, forever.
//!
//! Each round is an [`Attempt`]: dial the proxy ([`crate::dial`]), then run the
//! SSH side of the tunnel (`tunnel::client::run`) until it ends. Between rounds
//! the agent waits a jittered, growing delay ([`crate::backoff`]), which SIGHUP
//! cuts short. Nothing transient ends the loop: unreachable proxy, refused
//! upgrade, rejected token, dead tunnel all lead to another round. It stops only
//! on SIGTERM/SIGINT (exit 0), after `--max-retry` failed rounds in a row, or when
//! the proxy's host key does not match `--proxy-host-key-fingerprint` (retrying
//! cannot fix that; exit 1).
//!
//! When the credentials on disk change while a tunnel is up, the agent makes
//! before it breaks: it opens a new tunnel with the new credentials and closes
//! the old one only once the new one is accepted, so the cluster stays reachable
//! through a token rotation.
//!
//! Log lines other tools grep for (keep them exact):
//! `connected to proxy` (fields `proxy`, `name`), `tunnel lost` (`error`),
//! `rejected by proxy` (`reason`), `cannot connect to proxy` (`error`),
//! `retrying in <duration>`, `credentials changed, reconnecting`,
//! `pre-start hook failed` (`error`).
//!
//! Hooks ([`crate::hooks`]): the pre-start hook runs inside each attempt, before
//! the dial, so a slow hook delays only that attempt (a tunnel being replaced
//! keeps serving) and its failure counts as a failed attempt, retried with the
//! backoff. The post-start hook is spawned once the proxy accepted the config.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tunnel::client::{ClientError, ClientOptions, TcpDialer};
use tunnel::cut::Switch;
use tunnel::wire::AgentConfig;

use crate::backoff::Backoff;
use crate::credentials::Material;
use crate::dial::{DialError, ProxyDialer};
use crate::hooks::{self, Hook, HookError};
use crate::killable::killable;
use crate::options::{Config, DEFAULT_KUBERNETES_SERVICE};

/// Sent as `AgentConfig.Version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT: exit 0.
    Terminated,
    /// `--max-retry` failed attempts in a row.
    GaveUp,
    /// The proxy's host key is not the pinned one.
    HostKeyMismatch,
}

/// What the signal handlers tell the loop, and where it offers its tunnels.
#[derive(Clone, Default)]
pub struct Controls {
    /// Live tunnels, for the `--hub-listen` listeners.
    pub hub: tunnel::hub::HubLink,
    /// SIGHUP: stop waiting, retry now.
    pub retry_now: Arc<Notify>,
    /// SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
}

/// The settings every attempt shares.
struct Shared {
    name: String,
    dialer: ProxyDialer,
    host_key_fingerprints: Vec<String>,
    keepalive: Duration,
    kubernetes_service: Option<String>,
    kubesphere_service: String,
    allow_dial: Vec<tunnel::allow::Rule>,
    pre_start_hook: Option<Hook>,
    post_start_hook: Option<Hook>,
    /// Attempts started so far (`TOWER_ATTEMPT`).
    attempts: AtomicU64,
    hub: tunnel::hub::HubLink,
    /// Keeps tokens the proxy hands over.
    tokens: Option<crate::handed::Keeper>,
    /// `--bootstrap-token` and the cluster ID, sent while there is no token.
    bootstrap: Option<(String, String)>,
}

/// `host:port` of the member's kube-apiserver as the agent advertises it:
/// `--kubernetes-service`, else the kubeconfig's server, else the in-cluster name.
pub fn kubernetes_address(
    explicit: Option<&str>,
    creds: &crate::credentials::Credentials,
) -> String {
    explicit
        .map(str::to_string)
        .or_else(|| creds.server.clone())
        .unwrap_or_else(|| DEFAULT_KUBERNETES_SERVICE.to_string())
}

impl Shared {
    /// The `config` request and the targets it advertises, which the agent
    /// always dials; others only as `--allow-dial` allows.
    fn options(&self, material: &Material) -> ClientOptions {
        let creds = &material.credentials;
        let kubernetes = kubernetes_address(self.kubernetes_service.as_deref(), creds);
        // Registering (docs/registration.md): only while there is no token.
        let (bootstrap_token, cluster_id) = match &self.bootstrap {
            Some((token, id)) if material.token.is_empty() => (token.clone(), id.clone()),
            _ => Default::default(),
        };
        ClientOptions {
            config: AgentConfig {
                version: VERSION.to_string(),
                name: self.name.clone(),
                token: material.token.clone(),
                kubernetes_svc_host: kubernetes.clone(),
                kubesphere_svc_host: self.kubesphere_service.clone(),
                cert_data: creds.cert_data.clone(),
                key_data: creds.key_data.clone(),
                ca_data: creds.ca_data.clone(),
                bearer_token: creds.bearer_token.clone(),
                platform: tunnel::platform::current(),
                bootstrap_token,
                cluster_id,
            },
            keepalive: self.keepalive,
            host_key_fingerprints: self.host_key_fingerprints.clone(),
            allowed_targets: vec![kubernetes, self.kubesphere_service.clone()],
            allow_dial: self.allow_dial.clone(),
            hub: self.hub.clone(),
        }
    }
}

/// Why an attempt ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("{0}")]
    Dial(DialError),
    #[error("{0}")]
    Tunnel(ClientError),
    #[error("pre-start hook: {0}")]
    Hook(HookError),
    #[error("the tunnel task failed: {0}")]
    Crashed(String),
}

/// One connection to the proxy, from dial to end, in a task of its own.
/// Dropping it closes the connection.
struct Attempt {
    task: JoinHandle<End>,
    /// Fires once the proxy accepted the config; dropped unfired on failure.
    connected: oneshot::Receiver<()>,
    /// The proxy replica is draining: connect again, elsewhere.
    drain: Arc<Notify>,
    /// The streams the tunnel carries now.
    streams: tunnel::client::Streams,
    kill: Switch,
}

impl Attempt {
    fn start(shared: &Arc<Shared>, material: &Material) -> Self {
        let material = material.clone();
        let ctx = hooks::Context {
            cluster: shared.name.clone(),
            proxy: shared.dialer.endpoint().url(),
            attempt: shared.attempts.fetch_add(1, Ordering::Relaxed) + 1,
        };
        let shared = shared.clone();
        let kill = Switch::new();
        let (connected_tx, connected) = oneshot::channel();
        let drain = Arc::new(Notify::new());
        let streams = tunnel::client::Streams::default();
        let task = tokio::spawn({
            let kill = kill.clone();
            let drain = drain.clone();
            let streams = streams.clone();
            async move {
                let options = match &shared.pre_start_hook {
                    None => shared.options(&material),
                    Some(hook) => tokio::select! {
                        m = hooks::pre_start(hook, &ctx, &material) => match m {
                            Ok(m) => shared.options(&m),
                            Err(e) => return End::Hook(e),
                        },
                        () = kill.cut_wait() => return End::Crashed("cancelled".into()),
                    },
                };
                let ws = tokio::select! {
                    ws = shared.dialer.dial() => match ws {
                        Ok(ws) => ws,
                        Err(e) => return End::Dial(e),
                    },
                    () = kill.cut_wait() => return End::Crashed("cancelled".into()),
                };
                let stream = killable(ws, kill.clone());
                let proxy = shared.dialer.endpoint().url();
                let name = shared.name.clone();
                let post_start = shared.post_start_hook.clone();
                let on_connected = move || {
                    info!(%proxy, %name, "connected to proxy");
                    let _ = connected_tx.send(());
                    if let Some(hook) = post_start {
                        hooks::spawn_post_start(hook, ctx);
                    }
                };
                let signals = tunnel::client::Signals {
                    drain,
                    tokens: shared
                        .tokens
                        .as_ref()
                        .map(|k| k.sink(options.config.clone())),
                    streams,
                };
                let end = tunnel::client::run_with_signals(
                    stream,
                    &options,
                    Arc::new(TcpDialer),
                    on_connected,
                    signals,
                )
                .await;
                // Whatever ended the tunnel (a rejection included), close the
                // connection now rather than leave it to the proxy.
                kill.cut();
                End::Tunnel(end)
            }
        });
        Self {
            task,
            connected,
            drain,
            streams,
            kill,
        }
    }

    /// Wait for the task's end. Call at most once.
    async fn end(&mut self) -> End {
        match (&mut self.task).await {
            Ok(end) => end,
            Err(e) => End::Crashed(e.to_string()),
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.kill.cut();
        self.task.abort();
    }
}

/// Run until an [`Exit`]; `material` carries the current credentials;
/// `tokens` keeps the tokens the proxy hands over (`None`: refuse them).
pub async fn run(
    config: Config,
    mut material: watch::Receiver<Arc<Material>>,
    controls: Controls,
    tokens: Option<crate::handed::Keeper>,
) -> Exit {
    let shared = Arc::new(Shared {
        name: config.name,
        dialer: config.dialer,
        host_key_fingerprints: config.host_key_fingerprints,
        keepalive: config.keepalive,
        kubernetes_service: config.kubernetes_service,
        kubesphere_service: config.kubesphere_service,
        allow_dial: config.allow_dial,
        pre_start_hook: config.pre_start_hook,
        post_start_hook: config.post_start_hook,
        attempts: AtomicU64::new(0),
        hub: controls.hub.clone(),
        tokens,
        bootstrap: config.bootstrap_token.map(|t| (t, config.cluster_id)),
    });
    let mut backoff = Backoff::new(config.max_retry_interval);
    let mut failures = 0u32;
    // The tunnel being replaced after a credentials change, still serving.
    let mut previous: Option<Attempt> = None;
    // Tunnels to a draining proxy replica, or replaced for a new token: they
    // serve their last streams until the proxy closes them (drain) or until
    // those are done (token).
    let mut retiring: Vec<Retiring> = Vec::new();
    let shutdown = controls.shutdown.clone();
    let mut replacing_drained = false;
    let mut replacing_token = false;

    loop {
        let current = material.borrow_and_update().clone();
        let mut attempt = Attempt::start(&shared, &current);

        // Until the proxy accepts us, or the attempt fails.
        let connected = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Exit::Terminated,
                r = &mut attempt.connected => break r.is_ok(),
                end = previous_end(&mut previous) => {
                    previous = None;
                    warn!(error = %end, "previous tunnel lost while connecting its replacement");
                }
                () = retired(&mut retiring) => {}
            }
        };

        if connected {
            if let Some(old) = previous.take() {
                if replacing_drained {
                    info!("connected elsewhere; the draining tunnel serves its last streams");
                    retiring.push(Retiring {
                        attempt: old,
                        when_idle: false,
                    });
                } else if replacing_token {
                    info!(
                        streams = old.streams.count(),
                        "connected with the new token; the previous tunnel closes once its streams are done"
                    );
                    retiring.push(Retiring {
                        attempt: old,
                        when_idle: true,
                    });
                } else {
                    info!("closed the previous tunnel");
                }
            }
            replacing_drained = false;
            replacing_token = false;
            backoff.reset();
            failures = 0;
            // Until the tunnel ends (Some) or the credentials change or the
            // proxy drains (None).
            let drain = attempt.drain.clone();
            let ended = loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Exit::Terminated,
                    end = attempt.end() => break Some(end),
                    () = changed(&mut material) => {
                        // Only the token changed (handed over, or its file):
                        // the running streams may finish on the old tunnel.
                        let next = material.borrow().clone();
                        replacing_token = next.credentials == current.credentials
                            && next.token != current.token;
                        break None;
                    }
                    () = drain.notified() => {
                        replacing_drained = true;
                        break None;
                    }
                    () = retired(&mut retiring) => {}
                    // SIGHUP while connected: the credentials watcher re-reads.
                    () = controls.retry_now.notified() => {}
                }
            };
            match ended {
                None => {
                    if replacing_drained {
                        info!("the proxy is draining, reconnecting");
                    } else {
                        info!("credentials changed, reconnecting");
                    }
                    // Make before break: this one serves until its replacement is in.
                    previous = Some(attempt);
                    continue;
                }
                Some(end) => warn!(error = %end, "tunnel lost"),
            }
        } else {
            failures += 1;
            match attempt.end().await {
                End::Dial(e) => warn!(error = %e, "cannot connect to proxy"),
                End::Hook(e) => warn!(error = %e, "pre-start hook failed"),
                End::Tunnel(ClientError::Rejected(reason)) => {
                    warn!(reason = reason.as_str(), "rejected by proxy");
                }
                End::Tunnel(e) if e.is_permanent() => {
                    error!(error = %e, "refusing to connect to this proxy; not retrying");
                    return Exit::HostKeyMismatch;
                }
                end => warn!(error = %end, "tunnel lost"),
            }
            if let Some(max) = config.max_retry
                && failures >= max
            {
                error!(
                    "giving up: {failures} connection attempts in a row failed (--max-retry {max})"
                );
                return Exit::GaveUp;
            }
        }
        drop(attempt);

        let delay = backoff.next_delay();
        info!("retrying in {}", Seconds(delay));
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Exit::Terminated,
                () = &mut sleep => break,
                () = controls.retry_now.notified() => {
                    info!("SIGHUP: retrying now");
                    break;
                }
                () = changed(&mut material) => {
                    info!("credentials changed, reconnecting");
                    break;
                }
                end = previous_end(&mut previous) => {
                    previous = None;
                    warn!(error = %end, "previous tunnel lost");
                }
                () = retired(&mut retiring) => {}
            }
        }
    }
}

/// A tunnel that was replaced but still serves its last streams.
struct Retiring {
    attempt: Attempt,
    /// Close it once its streams are done (replaced for a new token); else
    /// wait for the proxy to close it (drain).
    when_idle: bool,
}

/// Wait for one retiring tunnel to end (the draining proxy closed it, or
/// its last stream is done) and forget it; pending when there is none.
/// The log line `draining tunnel closed` is kept for drains (tests grep it).
async fn retired(retiring: &mut Vec<Retiring>) {
    if retiring.is_empty() {
        return std::future::pending().await;
    }
    let ends = retiring.iter_mut().map(|r| {
        Box::pin(async move {
            let streams = r.attempt.streams.clone();
            if r.when_idle {
                tokio::select! {
                    end = r.attempt.end() => Some(end),
                    () = streams.idle() => None,
                }
            } else {
                Some(r.attempt.end().await)
            }
        })
    });
    let (end, index, _) = futures_util::future::select_all(ends).await;
    retiring.swap_remove(index);
    match end {
        Some(end) => info!(reason = %end, "draining tunnel closed"),
        None => info!("the previous tunnel's last stream is done: closed it"),
    }
}

/// The end of the tunnel being replaced; pending when there is none.
async fn previous_end(previous: &mut Option<Attempt>) -> End {
    match previous {
        Some(attempt) => attempt.end().await,
        None => std::future::pending().await,
    }
}

/// The next credentials change; pending forever if the watcher is gone.
async fn changed(material: &mut watch::Receiver<Arc<Material>>) {
    if material.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `1.5s`, `95.3s`: short and unambiguous in logs.
struct Seconds(Duration);

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}s", self.0.as_secs_f64())
    }
}

#[cfg(test)]
mod tests;
