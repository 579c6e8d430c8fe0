//! A hostile agent with a valid token (of its own Cluster, `beta`): it logs
//! in as Tower's agents do, then opens channels by the thousand, or accepts
//! the proxy's channels and never reads them, or stops reading its
//! connection altogether ([`Rogue::stop_reading`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use russh::client::{Handle, Msg, Session};
use russh::keys::PublicKey;
use russh::{Channel, ChannelId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::wire::{AgentConfig, CONFIG_REQUEST, PING_REQUEST};
use tunnel::ws::WsStream;

use super::peers::{connect_from, upgrade};

/// Accepts every channel the proxy opens and keeps it, unread.
#[derive(Clone, Default)]
pub struct Hoarder {
    pub held: Arc<Mutex<Vec<Channel<Msg>>>>,
    /// The sequence numbers the proxy answered SSH_MSG_UNIMPLEMENTED for.
    pub unimplemented: Arc<Mutex<Vec<u32>>>,
    /// Each host key set the proxy announced (`hostkeys-00@openssh.com`), in order.
    pub announced: Arc<Mutex<Vec<Vec<PublicKey>>>>,
}

impl russh::client::Handler for Hoarder {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn should_accept_unknown_server_channel(&mut self, _: ChannelId, _: &str) -> bool {
        true
    }

    async fn server_channel_open_custom(
        &mut self,
        channel: Channel<Msg>,
        _kind: &str,
        _data: &[u8],
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Ok(mut held) = self.held.lock() {
            held.push(channel);
        }
        tokio::spawn(reply.accept());
        Ok(())
    }

    async fn unimplemented(
        &mut self,
        seqn: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Ok(mut seen) = self.unimplemented.lock() {
            seen.push(seqn);
        }
        Ok(())
    }

    async fn openssh_ext_host_keys_announced(
        &mut self,
        keys: Vec<PublicKey>,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Ok(mut announced) = self.announced.lock() {
            announced.push(keys);
        }
        Ok(())
    }

    async fn data(
        &mut self,
        _channel: ChannelId,
        _data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Lets reads through until shut: then the connection is not read at all,
/// so the socket's receive buffer fills, then what the proxy queues for it.
#[derive(Clone, Default)]
struct ReadGate {
    shut: Arc<AtomicBool>,
    waiting: Arc<Mutex<Option<Waker>>>,
}

// The stalling agent is host_key_rotation.rs's; adversarial.rs builds this file too.
#[allow(dead_code)]
impl ReadGate {
    fn set(&self, shut: bool) {
        self.shut.store(shut, Ordering::SeqCst);
        let waiting = self.waiting.lock().map(|mut w| w.take());
        if let Ok(Some(waker)) = waiting {
            waker.wake();
        }
    }
}

/// A connection whose reads wait while its [`ReadGate`] is shut.
struct Gated {
    tcp: TcpStream,
    gate: ReadGate,
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.gate.shut.load(Ordering::SeqCst) {
            if let Ok(mut waiting) = self.gate.waiting.lock() {
                *waiting = Some(cx.waker().clone());
            }
            // Opened in between: read after all.
            if self.gate.shut.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A logged-in agent of `cluster` with `token`, from `source`.
pub struct Rogue {
    pub handle: Arc<Handle<Hoarder>>,
    pub hoarder: Hoarder,
    #[allow(dead_code)]
    gate: ReadGate,
}

impl Rogue {
    pub async fn login(
        source: IpAddr,
        to: SocketAddr,
        cluster: &str,
        token: &str,
        member: &str,
    ) -> Result<Rogue> {
        let tcp = connect_from(source, to).await?;
        Self::login_on(tcp, to, cluster, token, member).await
    }

    /// As [`Rogue::login`], on a connection made by the caller (its socket
    /// options set).
    pub async fn login_on(
        mut tcp: TcpStream,
        to: SocketAddr,
        cluster: &str,
        token: &str,
        member: &str,
    ) -> Result<Rogue> {
        ensure!(upgrade(&mut tcp, to).await?, "upgrade refused");
        let gate = ReadGate::default();
        let tcp = Gated {
            tcp,
            gate: gate.clone(),
        };
        let ws = WsStream::from_upgraded(tcp, Role::Client).await;
        let hoarder = Hoarder::default();
        let config = Arc::new(tunnel::ssh::client_config());
        let mut handle = russh::client::connect_stream(config, ws, hoarder.clone())
            .await
            .context("SSH handshake")?;
        ensure!(
            handle.authenticate_password("", "").await?.success(),
            "password login refused"
        );
        let config = AgentConfig {
            version: "v0.0.0-adversary".into(),
            name: cluster.into(),
            token: token.into(),
            kubernetes_svc_host: member.into(),
            kubesphere_svc_host: member.into(),
            ..Default::default()
        };
        let answer = handle
            .global_request(CONFIG_REQUEST, &config.to_json())
            .await
            .context("config request")?;
        ensure!(answer.is_ok(), "config refused: {answer:?}");
        Ok(Rogue {
            handle: Arc::new(handle),
            hoarder,
            gate,
        })
    }
}

impl Rogue {
    /// Opens up to `n` channels of a type agents may not open, 64 at a
    /// time, until the proxy closes the session; how many were answered
    /// (refused) before it did.
    pub async fn channel_flood(&self, n: usize) -> usize {
        let mut answered = 0;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            if tasks.len() >= 64 {
                match tasks.join_next().await {
                    Some(Ok(true)) => answered += 1,
                    _ => break,
                }
            }
            let handle = self.handle.clone();
            tasks.spawn(async move {
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    handle.channel_open_custom("flood@adversary", i.to_le_bytes().to_vec()),
                )
                .await
                {
                    // Refused: what the proxy answers; anything else: the session is gone.
                    Ok(Err(russh::Error::ChannelOpenFailure(_))) => true,
                    _ => false,
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            if matches!(done, Ok(true)) {
                answered += 1;
            }
        }
        answered
    }

    /// Pings as our agents do; false once the proxy is gone.
    pub async fn ping(&self) -> bool {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(10),
                self.handle.global_request(PING_REQUEST, &[])
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// Sends messages of numbers no SSH RFC assigns (192-255: local
    /// extensions), back to back; the proxy's SSH_MSG_UNIMPLEMENTED
    /// answers (the packets' sequence numbers), once all came.
    pub async fn unknown_messages(&self, numbers: &[u8]) -> Result<Vec<u32>> {
        for &n in numbers {
            self.handle
                .send_raw_message(vec![n, 0, 0, 0, 3, b'x', b'y', b'z'])
                .await
                .context("sending an unknown message")?;
        }
        e2e::wait_for_ok(Duration::from_secs(30), || async {
            let seen = self
                .hoarder
                .unimplemented
                .lock()
                .map_or_else(|e| e.into_inner().clone(), |s| s.clone());
            ensure!(
                seen.len() >= numbers.len(),
                "{} SSH_MSG_UNIMPLEMENTED answers for {} unknown messages",
                seen.len(),
                numbers.len()
            );
            Ok(seen)
        })
        .await
    }

    pub fn held(&self) -> usize {
        self.hoarder.held.lock().map_or(0, |h| h.len())
    }
}

/// The stalling agent of host_key_rotation.rs.
#[allow(dead_code)]
impl Rogue {
    /// Stops reading the connection (the SSH session's reads wait).
    pub fn stop_reading(&self) {
        self.gate.set(true);
    }

    /// Reads the connection again.
    pub fn resume_reading(&self) {
        self.gate.set(false);
    }

    /// The host key sets announced so far, in order.
    pub fn announced(&self) -> Vec<Vec<PublicKey>> {
        self.hoarder
            .announced
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |a| a.clone())
    }
}
