//! Pull mode: the agent reaches services on the hub's side through its tunnel.
//!
//! The agent opens a [`HUB_CHANNEL_TYPE`] channel whose data is a service
//! *name*; the proxy maps published names to addresses and never dials an
//! address the agent sends (Tower's `direct-tcpip` into the host network stays
//! refused). The proxy's side is [`serve_channel`], deciding through
//! [`Admission::open_hub`]; the agent's side is a [`HubLink`] to whichever
//! tunnel is live, which its local listeners open channels through. At both
//! ends a hub stream's writes take turns with the session's other channels
//! (docs/protocol.md 9.3.2): the proxy's side is a `TunnelStream`, the
//! agent's a [`HubStream`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use russh::{Channel, ChannelOpenFailure, ChannelStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::{Admission, OPEN_TIMEOUT, Session};
use crate::wire::HUB_CHANNEL_TYPE;
use crate::write_behind::{QueueLevel, Turn};

/// Longest service name (a DNS label).
pub const MAX_SERVICE_NAME: usize = 63;

/// Service names are DNS labels: `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service name {name:?} is not a DNS label (a-z, 0-9 and '-', at most {MAX_SERVICE_NAME} characters)"
        ))
    }
}

/// Why the proxy refused a hub channel. `text` is sent to the agent as the
/// channel-open failure's description, so it must not reveal secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRefusal {
    /// False: not allowed (SSH reason 1); true: allowed but unreachable (2).
    pub unreachable: bool,
    pub text: String,
}

impl HubRefusal {
    pub fn prohibited(text: impl Into<String>) -> Self {
        Self {
            unreachable: false,
            text: text.into(),
        }
    }

    pub fn unreachable(text: impl Into<String>) -> Self {
        Self {
            unreachable: true,
            text: text.into(),
        }
    }

    pub(crate) fn failure(self) -> ChannelOpenFailure {
        ChannelOpenFailure::Other {
            code: if self.unreachable { 2 } else { 1 },
            reason: self.text,
        }
    }
}

/// The proxy's connection to a published service, joined to the channel.
pub struct HubUpstream {
    pub stream: tokio::net::TcpStream,
    /// Called when the stream ends, with (bytes to the service, bytes from it).
    pub on_end: Box<dyn FnOnce(u64, u64) + Send>,
}

/// A hub channel the agent of `session` opened: ask `admission`, then accept
/// and copy, or refuse with its reason. Runs in a task of its own, off the
/// session loop, holding `slot` of the session's open hub channels.
pub(crate) fn serve_channel<A: Admission>(
    admission: Arc<A>,
    session: Session,
    channel: Channel<russh::server::Msg>,
    data: &[u8],
    reply: russh::server::ChannelOpenHandle,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    // Bounded and printable: the name reaches logs and the refusal text.
    let service: String = String::from_utf8_lossy(data)
        .chars()
        .take(MAX_SERVICE_NAME + 1)
        .collect();
    tokio::spawn(async move {
        // The session's count of open hub channels, freed when this ends.
        let slot = slot;
        let mut upstream = match admission.open_hub(&session, &service).await {
            Ok(upstream) => upstream,
            Err(refusal) => {
                tracing::info!(cluster = %session.config().name, %service,
                    reason = %refusal.text, "refused a hub channel");
                reply.reject(refusal.failure()).await;
                return;
            }
        };
        reply.accept().await;
        let mut stream = session.stream(channel);
        let (to, from) = match crate::copy::join(&mut stream, &mut upstream.stream).await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::debug!(%service, error = %e, "hub stream ended with an error");
                (0, 0)
            }
        };
        // Freed first: whoever learns of the end from `on_end` may open again.
        drop(slot);
        (upstream.on_end)(to, from);
    });
}

/// Why the agent could not open a hub channel.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("no tunnel to the proxy is up")]
    NoTunnel,
    /// `code`: the SSH reason (1 prohibited, 2 unreachable, 4 resource
    /// shortage: too many hub channels open, retry once some close).
    #[error("the proxy refused: {reason}")]
    Refused { code: u32, reason: String },
    #[error("the proxy did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the tunnel closed")]
    Closed,
}

impl HubError {
    /// The proxy's policy refused (name not published, cluster not opted
    /// in): unlike every other error here, no retry changes it.
    pub fn prohibited(&self) -> bool {
        matches!(self, Self::Refused { code, .. }
            if *code == ChannelOpenFailure::AdministrativelyProhibited.code())
    }
}

type OpenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Channel<russh::client::Msg>, russh::Error>> + Send + 'a>>;

/// Something hub channels can be opened through: a live client session.
pub(crate) trait Opener: Send + Sync {
    fn open(&self, service: String) -> OpenFuture<'_>;
}

impl<H: russh::client::Handler> Opener for russh::client::Handle<H> {
    fn open(&self, service: String) -> OpenFuture<'_> {
        Box::pin(self.channel_open_custom(HUB_CHANNEL_TYPE, service.into_bytes()))
    }
}

/// A live tunnel hub channels can go through, and its write queue (where
/// their writes take turns), if it has one.
#[derive(Clone)]
struct Tunnel {
    opener: Arc<dyn Opener>,
    queue: Option<Arc<QueueLevel>>,
}

/// The live tunnels, oldest first, each with the id its [`Attached`] removes.
type Live = Vec<(u64, Tunnel)>;

/// The agent's way to the live tunnel(s): hub channels go through the newest.
/// Cheap to clone; one per agent, shared by its listeners and its tunnels.
#[derive(Clone, Default)]
pub struct HubLink {
    live: Arc<Mutex<Live>>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for HubLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubLink").finish_non_exhaustive()
    }
}

/// Keeps a tunnel usable for hub channels; dropping it (the tunnel ended) detaches it.
pub(crate) struct Attached {
    link: HubLink,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut live = self.link.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(id, _)| *id != self.id);
    }
}

impl HubLink {
    pub(crate) fn attach(
        &self,
        opener: Arc<dyn Opener>,
        queue: Option<Arc<QueueLevel>>,
    ) -> Attached {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.push((id, Tunnel { opener, queue }));
        Attached {
            link: self.clone(),
            id,
        }
    }

    /// Open a hub channel to `service` through the newest live tunnel.
    pub async fn open(&self, service: &str) -> Result<HubStream, HubError> {
        let tunnel = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.last().map(|(_, t)| t.clone())
        };
        let tunnel = tunnel.ok_or(HubError::NoTunnel)?;
        match tokio::time::timeout(OPEN_TIMEOUT, tunnel.opener.open(service.to_string())).await {
            Err(_) => Err(HubError::Timeout(OPEN_TIMEOUT)),
            Ok(Ok(channel)) => Ok(HubStream {
                inner: channel.into_stream(),
                turn: tunnel.queue.map(Turn::new),
            }),
            Ok(Err(russh::Error::ChannelOpenFailure(reason))) => Err(HubError::Refused {
                code: reason.code(),
                reason: reason.description().to_string(),
            }),
            Ok(Err(_)) => Err(HubError::Closed),
        }
    }
}

/// The agent's end of a hub channel: a byte stream whose writes take turns
/// with the session's other channels, so a member uploading to a hub
/// service without pause does not queue in front of everyone's answers.
pub struct HubStream {
    inner: ChannelStream<russh::client::Msg>,
    turn: Option<Turn>,
}

impl HubStream {
    /// `write` on this stream's turn, if it has turns.
    fn poll_turn_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(
            &mut ChannelStream<russh::client::Msg>,
            &mut Context<'_>,
        ) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.inner;
        match self.turn.as_mut() {
            Some(turn) => turn.poll_write(cx, |cx| write(inner, cx)),
            None => write(inner, cx),
        }
    }
}

impl AsyncRead for HubStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HubStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_turn_write(cx, |inner, cx| Pin::new(inner).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_turn_write(cx, |inner, cx| {
            Pin::new(inner).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_dns_labels() {
        for good in ["hub-api", "a", "x1", &"a".repeat(63)] {
            assert_eq!(check_service_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", "a-", "Hub", "a.b", "a_b", "a b", &"a".repeat(64)] {
            let err = check_service_name(bad).unwrap_err();
            assert!(err.contains("DNS label"), "{bad}: {err}");
        }
    }

    #[test]
    fn refusals_carry_their_text_and_code() {
        let f = HubRefusal::prohibited("no").failure();
        assert_eq!((f.code(), f.description()), (1, "no"));
        let f = HubRefusal::unreachable("down").failure();
        assert_eq!((f.code(), f.description()), (2, "down"));
    }
}
