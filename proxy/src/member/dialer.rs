//! [`MemberDialer`]: a stream to a target in cluster X, with the right
//! credentials. See the [module docs](super).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tunnel::server::{DialError, Session, TunnelStream};

use super::{Access, Target};
use crate::agents::registry::Registry;

/// How long the TLS handshake with a member's kube-apiserver may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many sessions a dial tries when the one picked dies under it.
const ATTEMPTS: usize = 3;

/// Why no stream to the member could be made.
#[derive(Debug, thiserror::Error)]
pub enum ReachError {
    #[error("no agent of cluster {0:?} is connected to the proxy")]
    NoAgent(String),
    #[error("the agent's session ended")]
    SessionGone,
    /// The agent's config makes the target unreachable (no address, no CA...).
    #[error("{0}")]
    Prepare(String),
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error(
        "TLS handshake with the member kube-apiserver as {server_name:?} failed: {error} (its \
         certificate must be signed by the CA the agent sent and name {server_name:?})"
    )]
    Tls {
        server_name: String,
        error: io::Error,
    },
    #[error("the member kube-apiserver did not finish the TLS handshake within {0:?}")]
    TlsTimeout(Duration),
}

impl ReachError {
    /// The session went away: another try may find another one.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::SessionGone | Self::NoAgent(_) | Self::Dial(DialError::Closed)
        )
    }
}

/// A stream to the member with what to present on it.
pub struct Reached {
    pub stream: MemberStream,
    pub access: Arc<Access>,
}

/// Picks sessions and reaches members through them. Cheap to clone.
#[derive(Clone)]
pub struct MemberDialer {
    registry: Registry,
    /// Access per (session, target), built once from the session's config.
    prepared: Arc<Mutex<PreparedMap>>,
}

/// The entries, and the size at which the next sweep of ended sessions runs.
#[derive(Default)]
struct PreparedMap {
    entries: HashMap<(usize, Target), Prepared>,
    sweep_at: usize,
}

/// Entries kept before the first sweep.
const FIRST_SWEEP: usize = 64;

struct Prepared {
    /// Keeps the session (and so its id) alive while its entry exists.
    session: Session,
    access: Result<Arc<Access>, String>,
}

impl MemberDialer {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            prepared: Arc::default(),
        }
    }

    /// The registry sessions are picked from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The least busy live session of `cluster`.
    pub fn pick(&self, cluster: &str) -> Option<Session> {
        self.registry.pick(cluster)
    }

    /// How to reach `target` through `session` (built on first use), or why
    /// it is impossible.
    pub fn access(
        &self,
        session: &Session,
        cluster: &str,
        target: Target,
    ) -> Result<Arc<Access>, String> {
        let mut prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        let key = (session.id(), target);
        if let Some(p) = prepared.entries.get(&key) {
            return p.access.clone();
        }
        // Forget the ended sessions once the map has doubled since the last
        // sweep: a sweep on every new session was quadratic (10,000 agents
        // connecting spent a tenth of the proxy's CPU here).
        if prepared.entries.len() >= prepared.sweep_at {
            prepared.entries.retain(|_, p| !p.session.is_closed());
            prepared.sweep_at = (prepared.entries.len() * 2).max(FIRST_SWEEP);
        }
        let access = Access::prepare(session.config(), cluster, target).map(Arc::new);
        prepared.entries.insert(
            key,
            Prepared {
                session: session.clone(),
                access: access.clone(),
            },
        );
        access
    }

    /// A raw channel to `target` through `cluster`'s least busy session; if
    /// that session died meanwhile, the next.
    pub async fn open(&self, cluster: &str, target: Target) -> Result<TunnelStream, ReachError> {
        self.open_with(cluster, |session| {
            target.address(session.config()).to_string()
        })
        .await
    }

    /// A raw channel to any `address` (`host:port` as the agent sees it)
    /// through `cluster`'s least busy session. The agent decides whether it
    /// serves that address (its `--allow-dial`); a refusal comes back as
    /// [`DialError::Refused`].
    pub async fn open_to(&self, cluster: &str, address: &str) -> Result<TunnelStream, ReachError> {
        self.open_with(cluster, |_| address.to_string()).await
    }

    async fn open_with(
        &self,
        cluster: &str,
        address: impl Fn(&Session) -> String,
    ) -> Result<TunnelStream, ReachError> {
        let mut last = ReachError::NoAgent(cluster.to_string());
        for _ in 0..ATTEMPTS {
            let Some(session) = self.pick(cluster) else {
                break;
            };
            match session.dial(&address(&session)).await {
                Ok(stream) => return Ok(stream),
                Err(DialError::Closed) => last = DialError::Closed.into(),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last)
    }

    /// A stream to `target` through `cluster`'s least busy session, TLS
    /// done for the kube-apiserver.
    pub async fn reach(&self, cluster: &str, target: Target) -> Result<Reached, ReachError> {
        let mut last = ReachError::NoAgent(cluster.to_string());
        for _ in 0..ATTEMPTS {
            let Some(session) = self.pick(cluster) else {
                break;
            };
            match self.reach_via(&session, cluster, target).await {
                Err(e) if e.is_transient() => last = e,
                other => return other,
            }
        }
        Err(last)
    }

    /// A stream to `target` through this `session` (the listeners' pools keep
    /// a connection and the session it runs through together).
    pub async fn reach_via(
        &self,
        session: &Session,
        cluster: &str,
        target: Target,
    ) -> Result<Reached, ReachError> {
        if session.is_closed() {
            return Err(ReachError::SessionGone);
        }
        let access = self
            .access(session, cluster, target)
            .map_err(ReachError::Prepare)?;
        let stream = session.dial(&access.address).await?;
        let Some((config, server_name)) = &access.tls else {
            return Ok(Reached {
                stream: MemberStream::Plain(stream),
                access,
            });
        };
        let handshake = TlsConnector::from(config.clone()).connect(server_name.clone(), stream);
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => Ok(Reached {
                stream: MemberStream::Tls(tls),
                access,
            }),
            Ok(Err(error)) => Err(ReachError::Tls {
                server_name: server_name.to_str().into_owned(),
                error,
            }),
            Err(_) => Err(ReachError::TlsTimeout(TLS_HANDSHAKE_TIMEOUT)),
        }
    }
}

/// A stream to the member through a tunnel channel, with or without TLS.
/// Made once per connection and never moved after, so its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum MemberStream {
    Plain(TunnelStream),
    Tls(tokio_rustls::client::TlsStream<TunnelStream>),
}

impl AsyncRead for MemberStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MemberStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    /// Vectored, so hyper queues a body's chunks instead of copying them
    /// into its write buffer first.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
