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
use tunnel::wire::AgentConfig;

use crate::backoff::Backoff;
use crate::credentials::Material;
use crate::dial::{DialError, ProxyDialer};
use crate::hooks::{self, Hook, HookError};
use crate::killable::Killable;
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
    kill: CancellationToken,
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
        let kill = CancellationToken::new();
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
                        () = kill.cancelled() => return End::Crashed("cancelled".into()),
                    },
                };
                let ws = tokio::select! {
                    ws = shared.dialer.dial() => match ws {
                        Ok(ws) => ws,
                        Err(e) => return End::Dial(e),
                    },
                    () = kill.cancelled() => return End::Crashed("cancelled".into()),
                };
                let stream = Killable::new(ws, kill.clone());
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
                kill.cancel();
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
        self.kill.cancel();
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
mod tests {
    use super::*;
    use crate::credentials::Credentials;
    use crate::options::Flags;
    use bytes::Bytes;
    use clap::Parser as _;
    use http_body_util::Empty;
    use hyper::{Request, Response, StatusCode, header};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tunnel::server::{Admission, Session};

    /// Admits agents with token `good`, reports every admitted session.
    struct Registry {
        admitted: mpsc::UnboundedSender<Session>,
        rejections: mpsc::UnboundedSender<()>,
    }

    impl Admission for Registry {
        type Guard = ();
        async fn admit(&self, session: Session) -> Result<(), String> {
            if session.config().token.starts_with("good") {
                let _ = self.admitted.send(session);
                Ok(())
            } else {
                let _ = self.rejections.send(());
                Err(tunnel::wire::UNAUTHORIZED.into())
            }
        }
    }

    struct TestProxy {
        url: String,
        fingerprint: String,
        admitted: mpsc::UnboundedReceiver<Session>,
        rejections: mpsc::UnboundedReceiver<()>,
    }

    /// A proxy built from the tunnel crate's server side, answering the upgrade
    /// like Go Tower (no subprotocol echo).
    async fn test_proxy() -> TestProxy {
        let key = tunnel::ssh::generate_host_key().unwrap();
        let fingerprint = tunnel::ssh::fingerprint(key.public_key());
        let ssh = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
        let (admitted_tx, admitted) = mpsc::unbounded_channel();
        let (rejections_tx, rejections) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry {
            admitted: admitted_tx,
            rejections: rejections_tx,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = listener.accept().await.unwrap();
                let (ssh, registry) = (ssh.clone(), registry.clone());
                let service =
                    hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let (ssh, registry) = (ssh.clone(), registry.clone());
                        let key = req.headers()[header::SEC_WEBSOCKET_KEY].as_bytes().to_vec();
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let io = TokioIo::new(on.await.unwrap());
                            let ws = tunnel::ws::WsStream::from_upgraded(io, Role::Server).await;
                            let _ =
                                tunnel::server::serve(ws, ssh, registry, peer.to_string()).await;
                        });
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(StatusCode::SWITCHING_PROTOCOLS)
                                    .header(header::UPGRADE, "websocket")
                                    .header(header::CONNECTION, "Upgrade")
                                    .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
                                    .body(Empty::<Bytes>::new())
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades(),
                );
            }
        });
        TestProxy {
            url,
            fingerprint,
            admitted,
            rejections,
        }
    }

    fn config(proxy: &TestProxy, extra: &[&str]) -> Config {
        let mut args = vec![
            "agent",
            "--name",
            "member",
            "--token",
            "unused",
            "--proxy-server",
            &proxy.url,
        ];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args)
            .unwrap()
            .check(&|_| None)
            .unwrap()
    }

    fn material(token: &str, bearer: &str) -> Arc<Material> {
        Arc::new(Material {
            token: token.into(),
            credentials: Credentials {
                bearer_token: bearer.as_bytes().to_vec(),
                ..Default::default()
            },
        })
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn rotated_credentials_make_before_break() {
        let mut proxy = test_proxy().await;
        let config = config(&proxy, &["--kubernetes-service", "10.0.0.1:6443"]);
        let (tx, rx) = watch::channel(material("good", "first"));
        let controls = Controls::default();
        let agent = tokio::spawn(run(config, rx, controls.clone(), None));

        let first = tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.config().bearer_token, b"first");
        assert_eq!(first.config().kubernetes_svc_host, "10.0.0.1:6443");
        assert_eq!(first.config().version, VERSION);

        tx.send_replace(material("good", "second"));
        let second = tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.config().bearer_token, b"second");
        // The old tunnel goes once the new one is in; the new one stays.
        tokio::time::timeout(WAIT, async {
            while !first.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the previous tunnel was not closed");
        assert!(!second.is_closed());

        controls.shutdown.cancel();
        assert_eq!(
            tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
            Exit::Terminated
        );
    }

    #[tokio::test]
    async fn a_handed_token_is_kept_and_used_make_before_break() {
        let mut proxy = test_proxy().await;
        let config = config(&proxy, &[]);
        let handed = crate::handed::Handed::default();
        let loader = crate::credentials::Loader {
            token: crate::credentials::TokenSource::Literal("good".into()),
            source: crate::credentials::CredentialSource::None,
            handed: handed.clone(),
        };
        let reread = Arc::new(Notify::new());
        let rx = crate::credentials::watch(
            loader.clone(),
            loader.load().unwrap(),
            Duration::from_secs(3600),
            reread.clone(),
        );
        let keeper = crate::handed::Keeper {
            secret: None,
            handed: handed.clone(),
            reread,
        };
        let controls = Controls::default();
        let agent = tokio::spawn(run(config, rx, controls.clone(), Some(keeper)));
        let first = tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.config().token, "good");

        // A token that cannot be a token is refused, and nothing changes.
        let refused = first.hand_token("good but spaced").await;
        assert!(
            matches!(refused, Err(tunnel::server::TokenError::Refused(_))),
            "{refused:?}"
        );
        assert_eq!(handed.get(), None);

        let answer = first.hand_token("good-2").await.unwrap();
        assert_eq!(answer, tunnel::server::TokenAnswer::Stored);
        let second = tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.config().token, "good-2");
        tokio::time::timeout(WAIT, async {
            while !first.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the previous tunnel was not closed");
        // The periodic re-read keeps the handed token.
        assert_eq!(loader.load().unwrap().token, "good-2");

        controls.shutdown.cancel();
        assert_eq!(
            tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
            Exit::Terminated
        );
    }

    #[tokio::test]
    async fn without_a_keeper_a_token_is_not_understood() {
        let mut proxy = test_proxy().await;
        let (_tx, rx) = watch::channel(material("good", ""));
        let controls = Controls::default();
        let agent = tokio::spawn(run(config(&proxy, &[]), rx, controls.clone(), None));
        let session = tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            session.hand_token("good-2").await.unwrap(),
            tunnel::server::TokenAnswer::NotUnderstood
        );
        assert!(!session.is_closed());
        controls.shutdown.cancel();
        assert_eq!(
            tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
            Exit::Terminated
        );
    }

    #[tokio::test]
    async fn rejections_are_retried_until_max_retry() {
        let mut proxy = test_proxy().await;
        let config = config(
            &proxy,
            &["--max-retry", "3", "--max-retry-interval", "50ms"],
        );
        let (_tx, rx) = watch::channel(material("bad", ""));
        let exit = tokio::time::timeout(WAIT, run(config, rx, Controls::default(), None))
            .await
            .unwrap();
        assert_eq!(exit, Exit::GaveUp);
        for _ in 0..3 {
            proxy.rejections.try_recv().unwrap();
        }
        assert!(proxy.admitted.try_recv().is_err());
    }

    #[tokio::test]
    async fn sighup_cuts_the_wait_short() {
        let mut proxy = test_proxy().await;
        // A long wait after the first rejection, unless SIGHUP says otherwise.
        let config = config(&proxy, &["--max-retry-interval", "1h"]);
        let (tx, rx) = watch::channel(material("bad", ""));
        let controls = Controls::default();
        let agent = tokio::spawn(run(config, rx, controls.clone(), None));
        tokio::time::timeout(WAIT, proxy.rejections.recv())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        controls.retry_now.notify_one();
        // The natural wait is at least 500 ms after the rejection; 100 ms went by.
        tokio::time::timeout(Duration::from_millis(300), proxy.rejections.recv())
            .await
            .expect("SIGHUP did not retry at once");
        // New credentials also end the wait, and get in.
        tx.send_replace(material("good", ""));
        tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        controls.shutdown.cancel();
        assert_eq!(
            tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
            Exit::Terminated
        );
    }

    #[tokio::test]
    async fn a_host_key_mismatch_is_permanent() {
        let proxy = test_proxy().await;
        let other = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
        assert_ne!(proxy.fingerprint, other);
        let config = config(&proxy, &["--proxy-host-key-fingerprint", other]);
        let (_tx, rx) = watch::channel(material("good", ""));
        let exit = tokio::time::timeout(WAIT, run(config, rx, Controls::default(), None))
            .await
            .unwrap();
        assert_eq!(exit, Exit::HostKeyMismatch);
    }

    #[tokio::test]
    async fn the_right_host_key_is_accepted() {
        let mut proxy = test_proxy().await;
        let config = config(
            &proxy,
            &["--proxy-host-key-fingerprint", &proxy.fingerprint.clone()],
        );
        let (_tx, rx) = watch::channel(material("good", ""));
        let controls = Controls::default();
        let agent = tokio::spawn(run(config, rx, controls.clone(), None));
        tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        controls.shutdown.cancel();
        assert_eq!(
            tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
            Exit::Terminated
        );
    }

    #[tokio::test]
    async fn the_pre_start_hooks_credentials_are_sent_and_its_failures_retried() {
        let mut proxy = test_proxy().await;
        let hook = r#"echo '{"bearerToken": "from-hook"}'"#;
        let hooked = config(&proxy, &["--pre-start-hook", hook]);
        let (_tx, rx) = watch::channel(material("good", "own"));
        let controls = Controls::default();
        let agent = tokio::spawn(run(hooked, rx, controls.clone(), None));
        let session = tokio::time::timeout(WAIT, proxy.admitted.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(session.config().bearer_token, b"from-hook");
        controls.shutdown.cancel();
        assert_eq!(
            tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
            Exit::Terminated
        );

        // A failing hook is a failed attempt: the proxy never hears of it.
        let failing = config(
            &proxy,
            &[
                "--pre-start-hook=exit 1",
                "--max-retry=2",
                "--max-retry-interval=50ms",
            ],
        );
        let (_tx, rx) = watch::channel(material("good", "own"));
        let exit = tokio::time::timeout(WAIT, run(failing, rx, Controls::default(), None))
            .await
            .unwrap();
        assert_eq!(exit, Exit::GaveUp);
        assert!(proxy.admitted.try_recv().is_err() && proxy.rejections.try_recv().is_err());
    }

    #[test]
    fn the_config_advertises_what_the_agent_dials() {
        let shared = Shared {
            name: "member".into(),
            dialer: ProxyDialer::new(
                crate::endpoint::Endpoint::parse("http://p").unwrap(),
                None,
                None,
            )
            .unwrap(),
            host_key_fingerprints: Vec::new(),
            keepalive: Duration::from_secs(30),
            kubernetes_service: None,
            kubesphere_service: "ks:80".into(),
            allow_dial: Vec::new(),
            pre_start_hook: None,
            post_start_hook: None,
            attempts: AtomicU64::new(0),
            hub: Default::default(),
            tokens: None,
            bootstrap: Some(("abcdef.0123456789abcdef".into(), "uid-1".into())),
        };
        let mut m = Material {
            token: "t".into(),
            credentials: Credentials::default(),
        };
        let options = shared.options(&m);
        assert_eq!(
            options.config.kubernetes_svc_host,
            DEFAULT_KUBERNETES_SERVICE
        );
        assert_eq!(
            options.allowed_targets,
            vec![DEFAULT_KUBERNETES_SERVICE.to_string(), "ks:80".into()]
        );
        // A kubeconfig's server is used unless --kubernetes-service says otherwise.
        m.credentials.server = Some("10.1.1.1:6443".into());
        assert_eq!(shared.options(&m).allowed_targets[0], "10.1.1.1:6443");
        let shared = Shared {
            kubernetes_service: Some("[::1]:6443".into()),
            ..shared
        };
        assert_eq!(shared.options(&m).config.kubernetes_svc_host, "[::1]:6443");
        // With a token the bootstrap token stays home; without, it registers.
        assert!(shared.options(&m).config.bootstrap_token.is_empty());
        assert!(shared.options(&m).config.cluster_id.is_empty());
        m.token.clear();
        let registering = shared.options(&m).config;
        assert_eq!(registering.bootstrap_token, "abcdef.0123456789abcdef");
        assert_eq!(registering.cluster_id, "uid-1");
        assert_eq!(Seconds(Duration::from_millis(1534)).to_string(), "1.5s");
    }
}
