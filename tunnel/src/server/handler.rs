//! The SSH server's side of one agent connection, as russh calls it: the
//! empty password accepted, `config` handed to the [`Admission`] (bounded by
//! [`ADMISSION_TIMEOUT`]) and answered, `ping`s answered and each one timed
//! ([`Session::rtt`]), and the channels an agent opens refused, but hub
//! channels to the services the proxy publishes.
//!
//! What [`super::serve`] waits for comes back through [`AuthOutcome`]: the
//! agent admitted, or rejected with the reason it was told.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use russh::server::{Auth, GlobalRequestReply, Msg, Session as SshSession};
use russh::{Channel, ChannelId, Disconnect};
use tokio::sync::{Semaphore, oneshot};

use super::{
    ADMISSION_TIMEOUT, Admission, MAX_REFUSED_CHANNELS, Peer, RTT_TIMEOUT, Session, SessionInner,
    unix_now,
};
use crate::hub::HubRefusal;
use crate::wire::{AgentConfig, CONFIG_REQUEST, HUB_CHANNEL_TYPE, PING_REQUEST};
use crate::write_behind::QueueLevel;

pub(super) enum AuthOutcome {
    Admitted(String),
    Rejected(String),
}

pub(super) struct Handler<A: Admission> {
    admission: Arc<A>,
    peer: Peer,
    guard: Option<A::Guard>,
    session: Option<Session>,
    outcome: Option<oneshot::Sender<AuthOutcome>>,
    /// Told when `config` came: from then on the admission's time runs.
    configured: Option<oneshot::Sender<()>>,
    /// Channels refused so far ([`MAX_REFUSED_CHANNELS`]).
    refused_channels: usize,
    /// Open hub channels' slots ([`Admission::max_hub_channels`] of them).
    hub_channels: Arc<Semaphore>,
    hub_limit: usize,
    /// Hub channels refused at `hub_limit` (warned at the first).
    hub_refused: u64,
    /// The connection's write queue, for the session.
    write_queue: Arc<QueueLevel>,
}

impl<A: Admission> Handler<A> {
    /// A handler for one connection; `outcome` is told whether the agent
    /// was admitted, `configured` when its `config` came.
    pub(super) fn new(
        admission: Arc<A>,
        peer: Peer,
        outcome: oneshot::Sender<AuthOutcome>,
        configured: oneshot::Sender<()>,
        write_queue: Arc<QueueLevel>,
    ) -> Self {
        let hub_limit = admission.max_hub_channels();
        Self {
            admission,
            peer,
            guard: None,
            session: None,
            outcome: Some(outcome),
            configured: Some(configured),
            refused_channels: 0,
            hub_channels: Arc::new(Semaphore::new(hub_limit)),
            hub_limit,
            hub_refused: 0,
            write_queue,
        }
    }

    /// Count a refused channel; true while it is worth a warning (the first
    /// few). At [`MAX_REFUSED_CHANNELS`] the session is closed with why.
    fn refused_channel(&mut self, ssh: &mut SshSession) -> bool {
        self.refused_channels += 1;
        if self.refused_channels == MAX_REFUSED_CHANNELS {
            tracing::warn!(peer = %self.peer.addr, limit = MAX_REFUSED_CHANNELS,
                "the agent opened too many channels of types agents may not open: closing its session");
            let handle = ssh.handle();
            tokio::spawn(async move {
                let reason = format!(
                    "more than {MAX_REFUSED_CHANNELS} channels of types agents may not open"
                );
                let _ = handle
                    .disconnect(Disconnect::ByApplication, reason, String::new())
                    .await;
            });
        }
        self.refused_channels <= 3
    }

    fn finish(&mut self, outcome: AuthOutcome) {
        if let Some(tx) = self.outcome.take() {
            let _ = tx.send(outcome);
        }
    }

    async fn on_config(&mut self, data: &[u8], ssh: &mut SshSession) -> GlobalRequestReply {
        if self.guard.is_some() {
            return GlobalRequestReply::Failure(b"config already accepted".to_vec());
        }
        if let Some(tx) = self.configured.take() {
            let _ = tx.send(());
        }
        let config = match AgentConfig::from_json(data) {
            Ok(config) => config,
            Err(e) => return self.reject(format!("invalid config: {e}"), ssh),
        };
        let name = config.name.clone();
        let session = Session {
            inner: Arc::new(SessionInner {
                handle: ssh.handle(),
                config,
                peer: self.peer.clone(),
                open_streams: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
                received: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                heartbeat: AtomicU64::new(unix_now()),
                rtt_micros: AtomicU64::new(0),
                rtt_in_flight: AtomicBool::new(false),
                rtt_measured: tokio::sync::Notify::new(),
                write_queue: self.write_queue.clone(),
            }),
        };
        // Boxed: the admission (a Kubernetes round trip when registering) runs
        // once per connection, but inline its future would size every idle
        // session's task for good.
        let admit = Box::pin(self.admission.admit(session.clone()));
        // Bounded here, in the session loop's own turn: a decision that
        // never comes would hold the loop, and with it the connection.
        let decided = tokio::time::timeout(ADMISSION_TIMEOUT, admit)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the proxy could not decide on this agent within {ADMISSION_TIMEOUT:?}; \
                     the agent retries"
                ))
            });
        match decided {
            Ok(guard) => {
                self.guard = Some(guard);
                self.session = Some(session);
                self.measure_rtt(ssh);
                self.finish(AuthOutcome::Admitted(name));
                GlobalRequestReply::Success(Vec::new())
            }
            Err(reason) => self.reject(reason, ssh),
        }
    }

    /// Send a `keepalive@openssh.com` (want-reply) and record how long its
    /// answer took in [`Session::rtt`]; one at a time per session.
    fn measure_rtt(&self, ssh: &mut SshSession) {
        let Some(session) = &self.session else {
            return;
        };
        let inner = session.inner.clone();
        if inner.rtt_in_flight.swap(true, Ordering::Relaxed) {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::Instant::now();
        if ssh.send_ping(tx).is_err() {
            inner.rtt_in_flight.store(false, Ordering::Relaxed);
            return;
        }
        tokio::spawn(async move {
            // Err: the session ended (or never sent it); nothing to record.
            if let Ok(Ok(())) = tokio::time::timeout(RTT_TIMEOUT, rx).await {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                inner.rtt_micros.store(us.max(1), Ordering::Relaxed);
                inner.rtt_measured.notify_waiters();
            }
            inner.rtt_in_flight.store(false, Ordering::Relaxed);
        });
    }

    /// Answer with the reason, then close: the disconnect is queued behind the
    /// answer, so the agent reads why before the connection ends.
    fn reject(&mut self, reason: String, ssh: &mut SshSession) -> GlobalRequestReply {
        self.finish(AuthOutcome::Rejected(reason.clone()));
        let handle = ssh.handle();
        let text = reason.clone();
        tokio::spawn(async move {
            let _ = handle
                .disconnect(Disconnect::ByApplication, text, String::new())
                .await;
        });
        GlobalRequestReply::Failure(reason.into_bytes())
    }
}

impl<A: Admission> Drop for Handler<A> {
    fn drop(&mut self) {
        if let Some(session) = &self.session {
            session.inner.closed.store(true, Ordering::Relaxed);
        }
    }
}

impl<A: Admission> russh::server::Handler for Handler<A> {
    type Error = russh::Error;

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // Tower's agents log in as "" with password ""; `config` is the real check.
        Ok(Auth::Accept)
    }

    async fn global_request(
        &mut self,
        name: &str,
        data: &[u8],
        session: &mut SshSession,
    ) -> Result<GlobalRequestReply, Self::Error> {
        Ok(match name {
            CONFIG_REQUEST => self.on_config(data, session).await,
            PING_REQUEST if self.guard.is_some() => {
                if let Some(s) = &self.session {
                    s.inner.heartbeat.store(unix_now(), Ordering::Relaxed);
                }
                self.measure_rtt(session);
                GlobalRequestReply::Success(Vec::new())
            }
            _ => {
                tracing::debug!(peer = %self.peer.addr, request = name, "refused global request");
                GlobalRequestReply::Failure(Vec::new())
            }
        })
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        _reply: russh::server::ChannelOpenHandle,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        // Dropping `_reply` refuses the channel.
        if self.refused_channel(session) {
            tracing::warn!(peer = %self.peer.addr, "refused a session channel opened by the agent");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator: &str,
        _originator_port: u32,
        _reply: russh::server::ChannelOpenHandle,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        if self.refused_channel(session) {
            tracing::warn!(peer = %self.peer.addr, target = %format!("{host}:{port}"),
                "refused a channel opened by the agent: agents may not dial into the host network");
        }
        Ok(())
    }

    async fn channel_open_custom(
        &mut self,
        channel: Channel<Msg>,
        kind: &str,
        data: &[u8],
        reply: russh::server::ChannelOpenHandle,
        session: &mut SshSession,
    ) -> Result<(), Self::Error> {
        match (&self.session, kind) {
            (Some(session), HUB_CHANNEL_TYPE) => {
                let Ok(slot) = self.hub_channels.clone().try_acquire_owned() else {
                    self.hub_refused += 1;
                    if self.hub_refused == 1 {
                        tracing::warn!(peer = %self.peer.addr, cluster = %session.config().name,
                            limit = self.hub_limit,
                            "the agent holds too many hub channels open: refusing more until some close");
                    }
                    tokio::spawn(reply.reject(russh::ChannelOpenFailure::Other {
                        // SSH_OPEN_RESOURCE_SHORTAGE (RFC 4254 5.1).
                        code: 4,
                        reason: format!("more than {} hub channels open", self.hub_limit),
                    }));
                    return Ok(());
                };
                crate::hub::serve_channel(
                    self.admission.clone(),
                    session.clone(),
                    channel,
                    data,
                    reply,
                    slot,
                );
            }
            (None, HUB_CHANNEL_TYPE) => {
                let refusal = HubRefusal::prohibited("send config first");
                tokio::spawn(reply.reject(refusal.failure()));
            }
            _ => {
                if self.refused_channel(session) {
                    tracing::warn!(peer = %self.peer.addr, kind, "refused a channel of a type agents may not open");
                }
                tokio::spawn(reply.reject(russh::ChannelOpenFailure::UnknownChannelType));
            }
        }
        Ok(())
    }

    async fn channel_eof(&mut self, _: ChannelId, _: &mut SshSession) -> Result<(), Self::Error> {
        Ok(())
    }
}
