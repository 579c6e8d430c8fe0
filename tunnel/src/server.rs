//! The proxy's side of one agent connection.
//!
//! [`serve`] runs SSH over an upgraded websocket: it accepts the empty password,
//! waits at most [`CONFIG_TIMEOUT`] for the agent's `config` request, asks an
//! [`Admission`] whether that agent may join, answers (success, or failure with
//! the reason, never silence), closes rejected connections, and answers `ping`.
//! An admitted agent becomes a [`Session`] through which the proxy [`Session::dial`]s
//! `kubesphere` channels. On admission and on every `ping`, the proxy times a
//! `keepalive@openssh.com` request of its own ([`Session::rtt`]): every SSH
//! peer answers it (Go agents with a failure, which times just as well), so
//! the round trip is measured with no new message and no extra timer.
//! Channels the agent tries to open are refused (Tower let
//! agents dial into the host network through them), except hub channels to
//! services the proxy publishes by name ([`crate::hub`], pull mode).
//!
//! This file holds the [`Session`] and [`serve`]; `server/handler.rs` is what
//! russh calls for each request and channel the agent sends, and
//! [`TunnelStream`] (`server/stream.rs`) one channel as a byte stream.

mod handler;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{Channel, Disconnect};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::hub::{HubRefusal, HubUpstream};
use crate::wire::{AgentConfig, CHANNEL_TYPE, DRAIN_CHANNEL_TYPE, TOKEN_CHANNEL_TYPE};
use crate::write_behind::QueueLevel;
use handler::{AuthOutcome, Handler};
pub use stream::TunnelStream;

/// How long an agent has, from the moment its upgraded connection is handed
/// to SSH, to finish the handshake and send `config`.
pub const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the [`Admission`] may take once `config` came: the proxy's
/// own waits (its Cluster cache, the cluster's ports: 30 s each at most,
/// rarely both)
/// are not the agent's delay, so they do not count against
/// [`CONFIG_TIMEOUT`]. Past it the agent is refused, with that reason;
/// shorter than the agent's patience (`client::CONFIG_ANSWER_TIMEOUT`).
pub const ADMISSION_TIMEOUT: Duration = Duration::from_secs(45);
/// How long opening a channel may take before the dial counts as failed.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Channels of types agents may not open (sessions, direct-tcpip, unknown
/// types) a session may try before the proxy closes it: a Tower agent opens
/// none, so only a broken or hostile one gets here; each refusal costs a
/// task and a log line.
pub const MAX_REFUSED_CHANNELS: usize = 100;
/// Hub channels one agent's session may hold open at once (the default of
/// [`Admission::max_hub_channels`]): each holds a task, a connection to a
/// published service and its buffers; an agent asking for more (100,000
/// opens) gets "resource shortage" for each one over, until some of its
/// channels close.
pub const MAX_HUB_CHANNELS: usize = 1024;
/// What the proxy queues for one agent's connection before its session
/// waits: an agent that grants windows and does not read its socket costs
/// the proxy this much, not the windows of all its channels.
pub const WRITE_QUEUE_LIMIT: usize = 4 * 1024 * 1024;
/// A round-trip measurement unanswered for this long is given up (the
/// keepalives decide whether the session is dead, not this).
const RTT_TIMEOUT: Duration = Duration::from_secs(60);

/// Decides whether an agent may join and keeps it registered while it is
/// connected. The proxy's session registry implements it.
pub trait Admission: Send + Sync + 'static {
    /// Held for as long as the session lives; dropping it unregisters.
    type Guard: Send + 'static;
    /// Admit `session` (its config is [`Session::config`]) or say why not; the
    /// reason is sent to the agent, so it must not reveal secrets.
    fn admit(&self, session: Session) -> impl Future<Output = Result<Self::Guard, String>> + Send;

    /// The admitted agent of `session` opened a hub channel to `service` (a
    /// name, unchecked): connect to it, or say why not. Default: refuse.
    fn open_hub(
        &self,
        session: &Session,
        service: &str,
    ) -> impl Future<Output = Result<HubUpstream, HubRefusal>> + Send {
        let _ = (session, service);
        async {
            Err(HubRefusal::prohibited(
                "this proxy publishes no hub services",
            ))
        }
    }

    /// Hub channels one session may hold open at once; default
    /// [`MAX_HUB_CHANNELS`] (a test sets a few, not a thousand connections).
    fn max_hub_channels(&self) -> usize {
        MAX_HUB_CHANNELS
    }
}

/// One connected, admitted agent, as the proxy sees it. Cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

/// Who is on the other end of an agent connection, as the proxy's port saw it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The agent's network address, for logs.
    pub addr: String,
    /// The `User-Agent` of its websocket upgrade (`tower-agent/<version>` for
    /// ours, whatever a Go agent sends for theirs); empty if none.
    pub user_agent: String,
}

impl From<String> for Peer {
    fn from(addr: String) -> Self {
        Self {
            addr,
            user_agent: String::new(),
        }
    }
}

struct SessionInner {
    handle: Handle,
    config: AgentConfig,
    peer: Peer,
    open_streams: AtomicUsize,
    closed: AtomicBool,
    /// Bytes read from / written to this session's streams.
    received: AtomicU64,
    sent: AtomicU64,
    /// Unix seconds of the agent's last `config` or `ping`.
    heartbeat: AtomicU64,
    /// Last measured round trip in microseconds (at least 1); 0: none yet.
    rtt_micros: AtomicU64,
    /// A round-trip measurement is waiting for its answer.
    rtt_in_flight: AtomicBool,
    /// Told when a measurement is recorded ([`Session::first_rtt`]).
    rtt_measured: tokio::sync::Notify,
    /// The connection's write queue ([`WRITE_QUEUE_LIMIT`]).
    write_queue: Arc<QueueLevel>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a channel could not be opened through a session.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("the agent's tunnel is closed")]
    Closed,
    #[error("the agent did not answer the channel open within {0:?}")]
    Timeout(Duration),
    #[error("the agent refused to open a channel to {target}: {reason}")]
    Refused { target: String, reason: String },
}

/// How an agent answered a `token@tower.kubesphere.io` channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAnswer {
    /// Confirmed: the agent stored the token and connects again with it.
    Stored,
    /// Refused as an unknown channel type (Go Tower agents): it cannot be told.
    NotUnderstood,
}

/// Why handing a token to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the agent's tunnel is closed")]
    Closed,
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent could not store the token ({0}); it keeps its old one, see its log")]
    Refused(String),
}

impl Session {
    /// What the agent sent in its `config` request.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    /// The agent's network address, for logs.
    pub fn peer(&self) -> &str {
        &self.inner.peer.addr
    }

    /// The User-Agent the agent introduced itself with (may be empty).
    pub fn user_agent(&self) -> &str {
        &self.inner.peer.user_agent
    }

    /// Identifies this session among the live ones (two live sessions never
    /// share it; a clone has the same).
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Streams open through this session right now: the dialer picks the least busy.
    pub fn load(&self) -> usize {
        self.inner.open_streams.load(Ordering::Relaxed)
    }

    /// Bytes (received from the agent, sent to the agent) through its streams.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.inner.received.load(Ordering::Relaxed),
            self.inner.sent.load(Ordering::Relaxed),
        )
    }

    /// Bytes queued for the agent's connection and not yet written out
    /// (at most about [`WRITE_QUEUE_LIMIT`]; see [`crate::write_behind`]).
    pub fn write_queue_bytes(&self) -> usize {
        self.inner.write_queue.bytes()
    }

    /// The write queue is at [`WRITE_QUEUE_LIMIT`] and the connection takes
    /// nothing more: the session waits for the agent to read.
    pub fn write_stalled(&self) -> bool {
        self.inner.write_queue.stalled()
    }

    /// When the agent last spoke up (its `config`, then each `ping`), to the second.
    pub fn last_heartbeat(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(self.inner.heartbeat.load(Ordering::Relaxed))
    }

    /// The last round trip measured through the tunnel (a
    /// `keepalive@openssh.com` request and its answer, taken on admission and
    /// on every `ping` of the agent); None until the first answer.
    pub fn rtt(&self) -> Option<Duration> {
        match self.inner.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// [`Session::rtt`], waiting up to `within` for the first measurement
    /// of a session just admitted (taken then: one round trip away). The
    /// status written at a connect then says it, rather than a write of its
    /// own when the next refresh learns it.
    pub async fn first_rtt(&self, within: Duration) -> Option<Duration> {
        let measured = self.inner.rtt_measured.notified();
        tokio::pin!(measured);
        // Registered before looking: a measurement in between wakes it.
        measured.as_mut().enable();
        if let Some(rtt) = self.rtt() {
            return Some(rtt);
        }
        let _ = tokio::time::timeout(within, measured).await;
        self.rtt()
    }

    /// True once the SSH connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Relaxed)
    }

    /// Open a `kubesphere` channel to `target` (`host:port` on the agent's side).
    pub async fn dial(&self, target: &str) -> Result<TunnelStream, DialError> {
        if self.is_closed() {
            return Err(DialError::Closed);
        }
        let open = self
            .inner
            .handle
            .channel_open_custom(CHANNEL_TYPE, target.as_bytes().to_vec());
        let channel = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Err(_) => return Err(DialError::Timeout(OPEN_TIMEOUT)),
            Ok(Ok(channel)) => channel,
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                return Err(DialError::Refused {
                    target: target.to_string(),
                    reason: format!("{reason:?}"),
                });
            }
            Ok(Err(_)) => return Err(DialError::Closed),
        };
        Ok(TunnelStream::new(channel, self.inner.clone()))
    }

    /// Tell the agent which host keys the proxy holds (the current one and,
    /// while rotating, the next): OpenSSH's `hostkeys-00@openssh.com`
    /// (PROTOCOL 2.5), want-reply false. Our agent logs them and warns about
    /// a key it does not pin; Go's x/crypto ignores the request.
    pub async fn announce_host_keys(&self, keys: &[russh::keys::PublicKey]) {
        if self.is_closed() {
            return;
        }
        let data = crate::ssh::host_keys_announcement(keys);
        if let Err(e) = self
            .inner
            .handle
            .global_request_no_reply(crate::ssh::HOSTKEYS_REQUEST, data)
            .await
        {
            tracing::debug!(peer = %self.inner.peer.addr, error = %e, "cannot announce host keys");
        }
    }

    /// Ask the agent to connect again (to another replica) and close this
    /// tunnel once its streams are done. False when the agent does not know
    /// the request (Go Tower agents): the caller closes the session itself.
    pub async fn drain(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        let open = self
            .inner
            .handle
            .channel_open_custom(DRAIN_CHANNEL_TYPE, Vec::new());
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Ok(Ok(channel)) => {
                let _ = channel.close().await;
                true
            }
            _ => false,
        }
    }

    /// Hand the agent a new token (`token@tower.kubesphere.io`): it confirms
    /// once stored, then connects again with it while this tunnel still
    /// serves. The channel carries nothing else and is closed at once.
    pub async fn hand_token(&self, token: &str) -> Result<TokenAnswer, TokenError> {
        if self.is_closed() {
            return Err(TokenError::Closed);
        }
        let open = self
            .inner
            .handle
            .channel_open_custom(TOKEN_CHANNEL_TYPE, token.as_bytes().to_vec());
        match tokio::time::timeout(OPEN_TIMEOUT, open).await {
            Err(_) => Err(TokenError::Timeout(OPEN_TIMEOUT)),
            Ok(Ok(channel)) => {
                let _ = channel.close().await;
                Ok(TokenAnswer::Stored)
            }
            Ok(Err(russh::Error::ChannelOpenFailure(
                russh::ChannelOpenFailure::UnknownChannelType,
            ))) => Ok(TokenAnswer::NotUnderstood),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
                Err(TokenError::Refused(format!("{reason:?}")))
            }
            Ok(Err(_)) => Err(TokenError::Closed),
        }
    }

    /// A byte stream through `channel`, counted like the proxy's own.
    pub(crate) fn stream(&self, channel: Channel<Msg>) -> TunnelStream {
        TunnelStream::new(channel, self.inner.clone())
    }

    /// Close the SSH connection, telling the agent why.
    pub async fn close(&self, reason: &str) {
        let _ = self
            .inner
            .handle
            .disconnect(Disconnect::ByApplication, reason.to_string(), String::new())
            .await;
    }
}

/// How an agent connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("SSH handshake failed: {0}")]
    Handshake(russh::Error),
    #[error("no config request within {0:?}")]
    ConfigTimeout(Duration),
    #[error("agent rejected: {0}")]
    Rejected(String),
    #[error("connection lost: {0}")]
    Lost(russh::Error),
}

/// Run one agent connection on `stream` (an upgraded websocket) until it ends.
/// `peer` names the connection in logs (an address, or a [`Peer`]).
pub async fn serve<S, A>(
    stream: S,
    config: Arc<russh::server::Config>,
    admission: Arc<A>,
    peer: impl Into<Peer>,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Admission,
{
    serve_holding(stream, config, admission, peer, ()).await
}

/// [`serve`], holding `pending` (the proxy's slot for a handshake in
/// progress) until the agent is admitted or the connection ends.
pub async fn serve_holding<S, A, P>(
    stream: S,
    config: Arc<russh::server::Config>,
    admission: Arc<A>,
    peer: impl Into<Peer>,
    pending: P,
) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Admission,
    P: Send,
{
    let peer_info = peer.into();
    let peer = peer_info.addr.clone();
    let (tx, rx) = oneshot::channel();
    let (configured, config_came) = oneshot::channel();
    let stream = crate::write_behind::WriteBehind::with_limit(stream, WRITE_QUEUE_LIMIT);
    let handler = Handler::new(admission, peer_info, tx, configured, stream.level());
    let deadline = tokio::time::Instant::now() + CONFIG_TIMEOUT;
    // Whenever this returns, the session loop's stream fails: a handshake
    // given up on (deadline, rejection) ends even if the loop is stuck
    // waiting for the peer in the middle of a key exchange.
    let cut = crate::cut::Switch::new();
    let _cut_on_return = cut.cut_on_drop();
    let stream = crate::cut::Cut::new(stream, cut, crate::cut::cut_by_proxy);
    // Boxed: inline, the handshake's state would size this future for as
    // long as the tunnel is idle (issue #15 part 4).
    let handshake = Box::pin(russh::server::run_stream(config, stream, handler));
    let running = match tokio::time::timeout_at(deadline, handshake).await {
        Err(_) => return Err(ServeError::ConfigTimeout(CONFIG_TIMEOUT)),
        Ok(Err(e)) => return Err(ServeError::Handshake(e)),
        Ok(Ok(running)) => running,
    };
    let handle = running.handle();
    tokio::pin!(running);
    // The agent has until `deadline` to send `config`; the decision then
    // has ADMISSION_TIMEOUT of its own (in the handler).
    let no_config = async {
        if tokio::time::timeout_at(deadline, config_came).await.is_ok() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        outcome = rx => match outcome {
            Ok(AuthOutcome::Admitted(name)) => {
                drop(pending);
                tracing::info!(%peer, cluster = %name, "agent connected");
            }
            Ok(AuthOutcome::Rejected(reason)) => {
                // The handler queued the answer and the disconnect; let them go out.
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
                return Err(ServeError::Rejected(reason));
            }
            Err(_) => {}
        },
        ended = &mut running => {
            return Err(ServeError::Handshake(ended.err().unwrap_or(russh::Error::Disconnect)));
        }
        () = no_config => {
            // Boxed: rare, and inline it would size this (long-lived) future.
            let _ = Box::pin(handle.disconnect(
                Disconnect::ByApplication,
                "no config request".into(),
                String::new(),
            ))
            .await;
            return Err(ServeError::ConfigTimeout(CONFIG_TIMEOUT));
        }
    }
    match running.await {
        Ok(()) => Ok(()),
        Err(e) => Err(ServeError::Lost(e)),
    }
}
