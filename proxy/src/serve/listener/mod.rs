//! The per-cluster proxy ports: every request a client sends to a cluster's
//! port goes through that cluster's tunnel to its member API server.
//!
//! - [`ClusterListener::start`]: the kube-apiserver port, HTTPS with client
//!   certificates of our CA required ([`tls`]); upstream TLS verified against
//!   the CA the agent sent, with the agent's credentials ([`crate::member`]).
//! - [`ClusterListener::start_kubesphere`]: the ks-apiserver port, plain HTTP
//!   on both legs as in Tower (ks-apiserver authenticates its users itself).
//!
//! One request, in the order this folder handles it: accepted and served here
//! (or relayed whole to the replica with the agent, [`Relay`]), TLS in
//! [`tls`], forwarded in [`forward`] through a pooled connection from
//! [`upstream`], failures answered as Kubernetes `Status` objects by
//! [`status`].

pub mod forward;
pub mod impersonate;
pub mod status;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::forward::{Proxy, RESPONSE_HEADER_TIMEOUT};
use self::tls::{ServerCert, server_tls};
use crate::identity::ca::Ca;
use crate::member::{MemberDialer, Target};
use crate::ops::accept::accept_loop;
use crate::ops::audit::{Audit, Caller};
use crate::ops::in_flight::InFlight;
use crate::ops::metrics::Metrics;
use crate::ops::pending::{Pending, Permit};
use crate::ops::uploads::Source;
use crate::serve::admit::{Client, handshake};

/// How long a client may take to send a request's headers.
pub const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What hyper buffers per HTTP connection each way, at every front door and
/// to the members: a request head larger gets `431`, and an upload that
/// waits on a slow channel holds this much, not hyper's default (about
/// 400 KiB each way).
pub const MAX_HTTP_BUFFER: usize = 64 * 1024;

/// A client connection, whatever carries it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// HA: where a client connection goes when another replica serves its cluster
/// ([`crate::ha::peers`]).
pub trait Relay: Send + Sync + 'static {
    /// The peer replica to relay a new connection for `cluster` to, given how
    /// many sessions of it this replica has; `None` serves it here.
    fn target(&self, cluster: &str, local_sessions: usize) -> Option<String>;
    /// Carry `tcp` to `target`'s port of the same kind, untouched (the
    /// client's TLS ends there). Gives `tcp` back when `target` cannot be
    /// reached, to be served here.
    fn relay(
        &self,
        target: String,
        cluster: String,
        kind: Target,
        tcp: TcpStream,
    ) -> Pin<Box<dyn Future<Output = Option<TcpStream>> + Send>>;
}

/// What every cluster port of this process shares.
#[derive(Clone)]
pub struct Shared {
    pub dialer: MemberDialer,
    /// HA: connections for clusters another replica serves go there.
    pub relay: Option<Arc<dyn Relay>>,
    pub in_flight: InFlight,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
    /// The caps on TLS handshakes in progress, shared by the clients' doors.
    pub pending: Arc<Pending>,
    /// Each client's request-body rate (`--request-body-rate-per-source`).
    pub uploads: Option<Arc<crate::ops::uploads::Pacer>>,
}

/// What clients speak to the port.
enum Front {
    Https(TlsAcceptor),
    Http,
}

/// One proxy port of one cluster. Dropping it (or [`ClusterListener::shutdown`])
/// closes the port and ends its connections, upgraded streams included.
pub struct ClusterListener {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    accept: Option<JoinHandle<()>>,
    front: Arc<Front>,
    proxy: Arc<Proxy>,
}

impl ClusterListener {
    /// Bind `addr` (done when this returns, so an agent can be told "success"
    /// only once its port exists) and serve `cluster`'s kube-apiserver on it:
    /// HTTPS with `cert`, clients must show a certificate signed by `ca`.
    pub async fn start(
        cluster: String,
        addr: SocketAddr,
        shared: &Shared,
        ca: &Ca,
        cert: ServerCert,
    ) -> io::Result<Self> {
        let config = server_tls(ca, cert).map_err(io::Error::other)?;
        let front = Front::Https(TlsAcceptor::from(Arc::new(config)));
        Self::start_with(cluster, addr, shared, front, RESPONSE_HEADER_TIMEOUT).await
    }

    /// Bind `addr` and serve `cluster`'s ks-apiserver on it, plain HTTP.
    pub async fn start_kubesphere(
        cluster: String,
        addr: SocketAddr,
        shared: &Shared,
    ) -> io::Result<Self> {
        Self::start_with(cluster, addr, shared, Front::Http, RESPONSE_HEADER_TIMEOUT).await
    }

    async fn start_with(
        cluster: String,
        addr: SocketAddr,
        shared: &Shared,
        front: Front,
        response_header_timeout: Duration,
    ) -> io::Result<Self> {
        let target = match front {
            Front::Https(_) => Target::KubeApiserver,
            Front::Http => Target::KsApiserver,
        };
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let proxy = Arc::new(Proxy {
            response_header_timeout,
            ..Proxy::new(&cluster, target, "port", shared, cancel.clone())
        });
        tracing::info!(%cluster, addr = %local_addr, kind = target.what(), "cluster proxy listening");
        let front = Arc::new(front);
        let accept = tokio::spawn(accept(
            listener,
            front.clone(),
            proxy.clone(),
            shared.relay.clone(),
            cancel.clone(),
        ));
        Ok(Self {
            local_addr,
            cancel,
            accept: Some(accept),
            front,
            proxy,
        })
    }

    /// Serve a connection relayed from a peer replica (`peer` is the client's
    /// address as far as known) as if this port had accepted it.
    pub fn serve_relayed(&self, io: Box<dyn Io>, peer: SocketAddr) {
        // The relaying replica took the client's turn (its rate); the slot
        // is counted by the client's address the relay named.
        let Ok(slot) = slot(&self.front, &self.proxy, peer, false) else {
            return;
        };
        spawn_connection(
            io,
            peer,
            self.front.clone(),
            self.proxy.clone(),
            self.cancel.clone(),
            slot,
        );
    }

    /// The bound address (the real port when `addr` asked for port 0).
    #[allow(dead_code)] // The controller binds fixed ports; tests bind port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Close the port and end its connections; returns once the port is closed.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }
}

impl Drop for ClusterListener {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

/// Serve each connection here, or relay it whole to the replica with the
/// cluster's agent (served here after all when that replica is unreachable).
async fn accept(
    listener: TcpListener,
    front: Arc<Front>,
    proxy: Arc<Proxy>,
    relay: Option<Arc<dyn Relay>>,
    cancel: CancellationToken,
) {
    let port = format!("cluster {} {}", proxy.cluster, proxy.target.what());
    accept_loop(listener, &port, cancel.clone(), |tcp, peer| {
        // Only with replicas: how many sessions here decides where it goes.
        let relay_to = relay.as_ref().and_then(|r| {
            let local = proxy.dialer.registry().live(&proxy.cluster);
            Some((r, r.target(&proxy.cluster, local)?))
        });
        match relay_to {
            Some((relay, target)) => {
                // Its TLS handshake is the other replica's, after the
                // client's turn here (the rate is per client address).
                let turn = match front.as_ref() {
                    Front::Https(_) => proxy.pending.turn(peer.ip(), "cluster"),
                    Front::Http => Some(None),
                };
                let Some(turn) = turn else {
                    return std::future::ready(());
                };
                tracing::debug!(cluster = %proxy.cluster, %peer, %target, "relaying to the replica with the agent");
                proxy
                    .metrics
                    .relayed
                    .get_or_create(&Metrics::cluster(&proxy.cluster))
                    .inc();
                let relayed = relay.relay(target, proxy.cluster.clone(), proxy.target, tcp);
                let (front, proxy, cancel) = (front.clone(), proxy.clone(), cancel.clone());
                let in_flight = proxy.in_flight.enter();
                tokio::spawn(async move {
                    let _in_flight = in_flight;
                    let relayed = async move {
                        if let Some(at) = turn {
                            tokio::time::sleep_until(at.into()).await;
                        }
                        relayed.await
                    };
                    let unreachable = tokio::select! {
                        () = cancel.cancelled() => None,
                        back = relayed => back,
                    };
                    // Served here after all: its turn was taken above.
                    if let Some(tcp) = unreachable
                        && let Ok(slot) = slot(&front, &proxy, peer, false)
                    {
                        spawn_connection(tcp, peer, front, proxy, cancel, slot);
                    }
                });
            }
            None => {
                // The caps on pending TLS handshakes and the source's rate,
                // checked here: a connection over them is closed before it
                // costs a task.
                if let Ok(slot) = slot(&front, &proxy, peer, true) {
                    spawn_connection(tcp, peer, front.clone(), proxy.clone(), cancel.clone(), slot);
                }
            }
        }
        std::future::ready(())
    })
    .await;
    tracing::info!(cluster = %proxy.cluster, "cluster proxy closed");
}

/// The pending-handshake slot of a connection from `peer` (HTTPS; none
/// for plain HTTP), with the source's rate when `rated`; `Err` when it is
/// refused (counted and logged; the caller closes it).
fn slot(front: &Front, proxy: &Proxy, peer: SocketAddr, rated: bool) -> Result<Option<Permit>, ()> {
    if let Front::Http = front {
        return Ok(None);
    }
    let permit = if rated {
        proxy.pending.enter(peer.ip(), "cluster")
    } else {
        proxy.pending.enter_unrated(peer.ip(), "cluster")
    };
    permit.map(Some).ok_or(())
}

fn spawn_connection<T: Io>(
    io: T,
    peer: SocketAddr,
    front: Arc<Front>,
    proxy: Arc<Proxy>,
    cancel: CancellationToken,
    slot: Option<Permit>,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = serve_connection(io, peer, &front, proxy, slot) => {}
        }
    });
}

/// `slot`: the pending-handshake slot taken at accept (HTTPS), or `None`
/// to take it here.
async fn serve_connection<T: Io>(
    tcp: T,
    peer: SocketAddr,
    front: &Front,
    proxy: Arc<Proxy>,
    slot: Option<Permit>,
) {
    let cluster = proxy.cluster.clone();
    let audit = proxy.audit.clone();
    let pending = proxy.pending.clone();
    let service = |caller: Arc<Caller>| {
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(Source(peer.ip()));
            let (proxy, caller) = (proxy.clone(), caller.clone());
            async move { Ok::<_, Infallible>(proxy.handle(req, &caller).await) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEADER_TIMEOUT)
        .max_buf_size(MAX_HTTP_BUFFER);
    let served = match front {
        Front::Http => {
            // ks-apiserver authenticates its users itself; we only know the port.
            let caller = Caller::named(format!("client of the ks-apiserver port of {cluster}"));
            http.serve_connection(TokioIo::new(tcp), service(Arc::new(caller)))
                .with_upgrades()
                .await
        }
        Front::Https(acceptor) => {
            let port = format!("cluster {cluster} kube-apiserver");
            let Some(tls) = handshake(slot, acceptor, tcp, peer, &port, &pending, "cluster").await
            else {
                return;
            };
            let client = Client::of(&tls);
            let caller = match client.opens(&cluster) {
                Ok(caller) => caller,
                Err(why) => {
                    tracing::info!(%cluster, %peer, reason = %why, "refused a client certificate of another cluster");
                    // Answered in HTTP so kubectl shows why, then closed.
                    let refuse = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let resp = client.refuse(&audit, "port", &cluster, &req, &why);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    http.keep_alive(false);
                    let _ = http.serve_connection(TokioIo::new(tls), refuse).await;
                    return;
                }
            };
            http.serve_connection(TokioIo::new(tls), service(Arc::new(caller)))
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%cluster, %peer, error = %e, "client connection ended with an error");
    }
}
