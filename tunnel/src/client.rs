//! The agent's side of the tunnel.
//!
//! [`run`] speaks SSH over an upgraded websocket as Tower's agent does: password
//! login as "" / "", the `config` request (a failure carries the proxy's reason,
//! e.g. `Unauthorized agent`), then `ping` every keepalive period. The proxy opens
//! `kubesphere` channels; each one whose target the agent advertised is dialed
//! through a [`Dialer`] and joined, any other target is refused. `run` returns
//! when the tunnel ends, with the reason; reconnecting is the caller's job.
//!
//! Two more channel types the proxy may open are our extensions
//! ([`Signals`]): `drain@tower.kubesphere.io` (connect again elsewhere) and
//! `token@tower.kubesphere.io` (a new token: hand it to the [`TokenSink`],
//! confirm once it is stored, refuse if it cannot be). Without a sink the
//! token channel is refused as unknown, as Go agents do.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use russh::client::{Handle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

use futures_util::future::BoxFuture;

use crate::wire::{
    AgentConfig, CHANNEL_TYPE, CONFIG_REQUEST, DRAIN_CHANNEL_TYPE, PING_REQUEST,
    TOKEN_CHANNEL_TYPE, parse_target, parse_token,
};

/// How long the SSH handshake and the login may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the proxy may take to answer `config`: longer than its own
/// bound on admission (`server::ADMISSION_TIMEOUT`), so that a proxy that
/// waits for its Cluster cache or the cluster's ports answers, with its
/// reason if it refuses, before the agent gives up. Not longer: while the
/// proxy decides its session answers nothing, so a connection that died
/// silently meanwhile is noticed only at this deadline.
pub const CONFIG_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent's connect to its local target may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Missed pings after which the proxy counts as gone.
pub const MAX_MISSED_PINGS: u32 = 3;

/// Connects the agent to the targets it forwards to (its kube-apiserver and
/// ks-apiserver). A plain TCP dialer in production; tests may substitute.
pub trait Dialer: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn dial(&self, target: &str) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;

    /// The stream as a plain TCP connection, when it is one: the session
    /// may then write received data to it itself ([`crate::copy::join_tcp`]).
    fn into_tcp(stream: Self::Stream) -> Result<tokio::net::TcpStream, Self::Stream> {
        Err(stream)
    }
}

/// Dials TCP with `TCP_NODELAY` (Nagle adds ~40 ms to small round trips).
pub struct TcpDialer;

impl Dialer for TcpDialer {
    type Stream = tokio::net::TcpStream;
    async fn dial(&self, target: &str) -> std::io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    fn into_tcp(stream: Self::Stream) -> Result<tokio::net::TcpStream, Self::Stream> {
        Ok(stream)
    }
}

/// What the agent needs to run one tunnel.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Sent as the `config` request.
    pub config: AgentConfig,
    /// Period of `ping` requests; the tunnel is dead after [`MAX_MISSED_PINGS`].
    pub keepalive: Duration,
    /// `SHA256:...` fingerprints the proxy's host key must have one of; empty:
    /// not pinned. A set, so a host key rotation can pin the current and the
    /// next key at once.
    pub host_key_fingerprints: Vec<String>,
    /// Targets the proxy may ask for (the advertised API servers); anything
    /// else is refused unless `allow_dial` allows it.
    pub allowed_targets: Vec<String>,
    /// `--allow-dial` rules: further targets the proxy may ask for.
    pub allow_dial: Vec<crate::allow::Rule>,
    /// Where this tunnel is offered for hub channels (pull mode) while it is up.
    pub hub: crate::hub::HubLink,
}

/// Keeps a token the proxy hands over (`token@tower.kubesphere.io`); the
/// channel is confirmed when it returns `Ok`, refused with the error logged
/// otherwise. Connecting again with the token is the caller's job.
#[derive(Clone)]
pub struct TokenSink(Arc<dyn Fn(String) -> BoxFuture<'static, Result<(), String>> + Send + Sync>);

impl TokenSink {
    pub fn new(
        store: impl Fn(String) -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(store))
    }
}

impl std::fmt::Debug for TokenSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSink")
    }
}

/// What the proxy may tell a running tunnel besides opening `kubesphere`
/// channels, and what the tunnel tells its owner.
#[derive(Clone, Debug, Default)]
pub struct Signals {
    /// Notified when the proxy asks the agent to connect again elsewhere.
    pub drain: Arc<Notify>,
    /// Where handed tokens go; `None` refuses them as an unknown channel type.
    pub tokens: Option<TokenSink>,
    /// The `kubesphere` channels open now (a replaced tunnel is closed once
    /// they are done).
    pub streams: Streams,
}

/// How many `kubesphere` channels a tunnel carries now. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Streams(tokio::sync::watch::Sender<usize>);

impl Default for Streams {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(0))
    }
}

impl Streams {
    pub fn count(&self) -> usize {
        *self.0.borrow()
    }

    /// Resolves once no stream is open.
    pub async fn idle(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    fn open(&self) -> StreamGuard {
        self.0.send_modify(|n| *n += 1);
        StreamGuard(self.clone())
    }
}

/// Counts one open stream until dropped.
struct StreamGuard(Streams);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Why a tunnel ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("SSH handshake with the proxy failed: {0}")]
    Handshake(russh::Error),
    #[error("the proxy did not finish the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the proxy did not answer the agent's config within {0:?}")]
    ConfigTimeout(Duration),
    #[error(
        "the proxy's SSH host key is {actual}, but --proxy-host-key-fingerprint pins {expected}: \
         refusing to send credentials (a different proxy, or a man in the middle)"
    )]
    HostKeyMismatch {
        /// The pinned fingerprints, comma-separated.
        expected: String,
        actual: String,
    },
    #[error("the proxy refused the password login")]
    LoginRefused,
    #[error("the proxy rejected this agent: {0}")]
    Rejected(String),
    #[error("the proxy missed {MAX_MISSED_PINGS} pings in a row: tunnel is dead")]
    KeepaliveTimeout,
    #[error("the tunnel closed: {0}")]
    Closed(String),
}

impl ClientError {
    /// True when retrying cannot help without a change by the operator.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::HostKeyMismatch { .. })
    }
}

/// Whether `fingerprint` passes the pins: any match, or no pins at all.
pub fn pinned(pins: &[String], fingerprint: &str) -> bool {
    pins.is_empty() || pins.iter().any(|p| p == fingerprint)
}

struct Handler<D: Dialer> {
    dialer: Arc<D>,
    allowed: Arc<crate::allow::AllowList>,
    pins: Arc<[String]>,
    seen_key: Arc<Mutex<Option<String>>>,
    /// Signalled when the SSH session ends (the session task drops its handler).
    ended: Arc<Notify>,
    /// Signalled when the proxy asks the agent to move (it is draining).
    drain: Arc<Notify>,
    tokens: Option<TokenSink>,
    streams: Streams,
    /// The session's write queue, where channels take turns (set once the
    /// connection is wrapped, before the session starts).
    write_queue: Option<Arc<crate::write_behind::QueueLevel>>,
}

impl<D: Dialer> Drop for Handler<D> {
    fn drop(&mut self) {
        // notify_one keeps the signal for a waiter that comes later.
        self.ended.notify_one();
    }
}

impl<D: Dialer> russh::client::Handler for Handler<D> {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => key.key_data(),
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => cert.public_key(),
        };
        let actual = key.fingerprint(russh::keys::HashAlg::Sha256).to_string();
        if let Ok(mut seen) = self.seen_key.lock() {
            *seen = Some(actual.clone());
        }
        Ok(pinned(&self.pins, &actual))
    }

    /// `hostkeys-00@openssh.com`: the proxy lists the host keys it holds,
    /// the next one too while its key is being rotated. Logged with whether
    /// each is pinned: a next key that is not will be refused after the switch.
    async fn openssh_ext_host_keys_announced(
        &mut self,
        keys: Vec<russh::keys::PublicKey>,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        for key in keys {
            let fingerprint = key.fingerprint(russh::keys::HashAlg::Sha256).to_string();
            let is_pinned = pinned(&self.pins, &fingerprint);
            if is_pinned || self.pins.is_empty() {
                tracing::info!(%fingerprint, pinned = is_pinned, "the proxy announced a host key");
            } else {
                tracing::warn!(
                    %fingerprint,
                    pinned = false,
                    "the proxy announced a host key that --proxy-host-key-fingerprint does not pin: \
                     add it before the proxy switches to it, or this agent will be refused"
                );
            }
        }
        Ok(())
    }

    async fn should_accept_unknown_server_channel(&mut self, _: ChannelId, kind: &str) -> bool {
        kind == CHANNEL_TYPE
            || kind == DRAIN_CHANNEL_TYPE
            || (kind == TOKEN_CHANNEL_TYPE && self.tokens.is_some())
    }

    async fn server_channel_open_custom(
        &mut self,
        channel: Channel<Msg>,
        kind: &str,
        data: &[u8],
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if kind == DRAIN_CHANNEL_TYPE {
            tracing::info!("the proxy is draining: moving to another replica");
            self.drain.notify_one();
            drop(channel);
            tokio::spawn(reply.accept());
            return Ok(());
        }
        if kind == TOKEN_CHANNEL_TYPE {
            drop(channel);
            let token = parse_token(data).map(str::to_string);
            let sink = self.tokens.clone();
            // Storing may take a round trip to the member's API server: not
            // in the session loop.
            tokio::spawn(async move {
                let stored = match (token, sink) {
                    (Ok(token), Some(sink)) => (sink.0)(token).await,
                    (Err(e), _) => Err(e),
                    (_, None) => Err("this agent keeps no handed tokens".into()),
                };
                match stored {
                    Ok(()) => reply.accept().await,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot keep the token the proxy handed over; keeping the current one");
                        reply
                            .reject(ChannelOpenFailure::AdministrativelyProhibited)
                            .await;
                    }
                }
            });
            return Ok(());
        }
        let target = match parse_target(data).map(|t| (t, self.allowed.check(t))) {
            Ok((t, Ok(()))) => t.to_string(),
            Ok((t, Err(why))) => {
                tracing::warn!(target = t, reason = %why, "refused a channel to a target this agent does not serve");
                tokio::spawn(reply.reject(ChannelOpenFailure::AdministrativelyProhibited));
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a channel with a malformed target");
                tokio::spawn(reply.reject(ChannelOpenFailure::AdministrativelyProhibited));
                return Ok(());
            }
        };
        // Dial outside the session loop: a slow target must not stall other channels.
        let dialer = self.dialer.clone();
        let write_queue = self.write_queue.clone();
        let counted = self.streams.open();
        tokio::spawn(async move {
            let _counted = counted;
            let upstream = match tokio::time::timeout(DIAL_TIMEOUT, dialer.dial(&target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(%target, error = %e, "cannot reach target");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
                Err(_) => {
                    tracing::warn!(%target, "connect to target timed out");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            reply.accept().await;
            let mut stream = channel.into_stream();
            let turn = write_queue.map(crate::write_behind::Turn::new);
            let end = match D::into_tcp(upstream) {
                Ok(tcp) => crate::copy::join_tcp(tcp, &mut stream, turn).await.end,
                Err(mut upstream) => crate::copy::join_channel(&mut upstream, &mut stream, turn)
                    .await
                    .map(|_| ()),
            };
            if let Err(e) = end {
                tracing::debug!(%target, error = %e, "stream ended with an error");
            }
        });
        Ok(())
    }
}

/// Run one tunnel over `stream` until it ends. `on_connected` runs once the proxy
/// has accepted the agent's config.
pub async fn run<S, D>(
    stream: S,
    options: &ClientOptions,
    dialer: Arc<D>,
    on_connected: impl FnOnce(),
) -> ClientError
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Dialer,
{
    run_with_drain(stream, options, dialer, on_connected, Arc::default()).await
}

/// [`run`], and `drain` is notified when the proxy asks the agent to connect
/// again elsewhere (the proxy replica is shutting down). The tunnel keeps
/// serving until the proxy closes it.
pub async fn run_with_drain<S, D>(
    stream: S,
    options: &ClientOptions,
    dialer: Arc<D>,
    on_connected: impl FnOnce(),
    drain: Arc<Notify>,
) -> ClientError
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Dialer,
{
    let signals = Signals {
        drain,
        ..Default::default()
    };
    run_with_signals(stream, options, dialer, on_connected, signals).await
}

/// [`run`], answering the proxy's drain and token channels as `signals` say.
pub async fn run_with_signals<S, D>(
    stream: S,
    options: &ClientOptions,
    dialer: Arc<D>,
    on_connected: impl FnOnce(),
    signals: Signals,
) -> ClientError
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Dialer,
{
    let Signals {
        drain,
        tokens,
        streams,
    } = signals;
    let seen_key = Arc::new(Mutex::new(None));
    let ended = Arc::new(Notify::new());
    let handler = Handler {
        drain,
        tokens,
        streams,
        ended: ended.clone(),
        dialer,
        allowed: Arc::new(crate::allow::AllowList::new(
            options.allowed_targets.clone(),
            options.allow_dial.clone(),
        )),
        pins: options.host_key_fingerprints.clone().into(),
        seen_key: seen_key.clone(),
        write_queue: None,
    };
    // Boxed: inline, the handshake's state (russh's connect, the
    // authentication) would size this future for as long as the tunnel is
    // idle (issue #15 part 4); so is the config request's below.
    let handshake = Box::pin(handshake(stream, handler));
    let handle = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Err(_) => return ClientError::HandshakeTimeout(HANDSHAKE_TIMEOUT),
        Ok(Err(ClientError::Handshake(russh::Error::UnknownKey)))
        | Ok(Err(ClientError::Handshake(russh::Error::WrongServerSig))) => {
            let actual = seen_key
                .lock()
                .ok()
                .and_then(|k| k.clone())
                .unwrap_or_else(|| "unknown".into());
            return ClientError::HostKeyMismatch {
                expected: options.host_key_fingerprints.join(", "),
                actual,
            };
        }
        Ok(Err(e)) => return e,
        Ok(Ok(handle)) => handle,
    };
    let (handle, queue) = handle;
    if let Err(e) = Box::pin(configure(&handle, options, &ended)).await {
        return e;
    }
    let handle = Arc::new(handle);
    let _hub = options.hub.attach(handle.clone(), Some(queue));
    on_connected();
    keepalive(&handle, options.keepalive, &ended).await
}

/// The logged-in session, and its write queue's level (hub streams take
/// their turns there).
async fn handshake<S, D>(
    stream: S,
    mut handler: Handler<D>,
) -> Result<(Handle<Handler<D>>, Arc<crate::write_behind::QueueLevel>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Dialer,
{
    let config = Arc::new(crate::ssh::client_config());
    let stream = crate::write_behind::WriteBehind::new(stream);
    let queue = stream.level();
    handler.write_queue = Some(queue.clone());
    let mut handle = russh::client::connect_stream(config, stream, handler)
        .await
        .map_err(ClientError::Handshake)?;
    let login = handle
        .authenticate_password("", "")
        .await
        .map_err(ClientError::Handshake)?;
    if !login.success() {
        return Err(ClientError::LoginRefused);
    }
    Ok((handle, queue))
}

/// Sends the agent's `config` and waits for the proxy's answer.
async fn configure<D: Dialer>(
    handle: &Handle<Handler<D>>,
    options: &ClientOptions,
    ended: &Notify,
) -> Result<(), ClientError> {
    let config = options.config.to_json();
    let request = tokio::time::timeout(
        CONFIG_ANSWER_TIMEOUT,
        handle.global_request(CONFIG_REQUEST, &config),
    );
    let answer = tokio::select! {
        // The proxy gave up on deciding (or went away): say so now.
        () = ended.notified() => {
            return Err(ClientError::Closed(
                "the proxy closed the connection before answering the agent's config".into(),
            ));
        }
        answer = request => answer,
    };
    match answer {
        Err(_) => Err(ClientError::ConfigTimeout(CONFIG_ANSWER_TIMEOUT)),
        // Go Tower treats any payload as an error text; so do we.
        Ok(Ok(Ok(payload))) if payload.is_empty() => Ok(()),
        Ok(Ok(Ok(payload)) | Ok(Err(payload))) => Err(ClientError::Rejected(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        Ok(Err(e)) => Err(ClientError::Handshake(e)),
    }
}

/// Ping every `period`; a ping unanswered within a period is a miss. Returns
/// as soon as the session ends, not at the next ping.
async fn keepalive<D: Dialer>(
    handle: &Handle<Handler<D>>,
    period: Duration,
    ended: &Notify,
) -> ClientError {
    let closed = || ClientError::Closed("the proxy closed the connection".into());
    let mut missed = 0;
    loop {
        let started = tokio::time::Instant::now();
        let ping = tokio::time::timeout(period, handle.global_request(PING_REQUEST, &[]));
        let answer = tokio::select! {
            () = ended.notified() => return closed(),
            answer = ping => answer,
        };
        match answer {
            Ok(Ok(_)) => missed = 0,
            Ok(Err(russh::Error::SendError | russh::Error::Disconnect)) => return closed(),
            Ok(Err(e)) => return ClientError::Closed(e.to_string()),
            Err(_) => {
                missed += 1;
                tracing::warn!(missed, "proxy did not answer a ping");
                if missed >= MAX_MISSED_PINGS {
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, "keepalive timeout", "")
                        .await;
                    return ClientError::KeepaliveTimeout;
                }
                continue;
            }
        }
        tokio::select! {
            () = ended.notified() => return closed(),
            () = tokio::time::sleep_until(started + period) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pinned;

    #[test]
    fn any_pinned_fingerprint_passes() {
        let pins = ["SHA256:old".to_string(), "SHA256:new".to_string()];
        assert!(pinned(&pins, "SHA256:old"));
        assert!(pinned(&pins, "SHA256:new"));
        assert!(!pinned(&pins, "SHA256:other"));
        assert!(pinned(&[], "SHA256:anything"));
    }
}
