//! The per-cluster proxy ports: every request a client sends to a cluster's
//! port goes through that cluster's tunnel to its member API server.
//!
//! - [`ClusterListener::start`]: the kube-apiserver port. HTTPS with a serving
//!   certificate from our CA that can be replaced at runtime ([`ServerCert`]),
//!   and, unlike Tower, a client certificate signed by our CA is required: any
//!   other client is refused in the TLS handshake. Upstream it speaks TLS to the
//!   member kube-apiserver, verified against the CA the agent sent (`CAData`,
//!   never unverified), with the agent's credentials: its bearer token (replacing
//!   whatever `Authorization` the client sent), else its client certificate.
//! - [`ClusterListener::start_kubesphere`]: the ks-apiserver port, plain HTTP on
//!   both legs as in Tower (ks-apiserver authenticates its users itself).
//!
//! Bodies stream both ways (watches, `logs -f`, large lists are never held
//! whole). Upstream connections are pooled per agent session (HTTP/1.1,
//! [`POOL_MAX_IDLE_PER_SESSION`] idle for up to [`POOL_IDLE_TIMEOUT`]), so the
//! credentials a request carries and the session its connection runs through
//! always belong together. Upgrades (exec, attach, port-forward: SPDY or
//! websocket) are forwarded and, once the member answers 101, joined byte for
//! byte. Failures are Kubernetes `Status` answers kubectl prints: no agent 503,
//! refused or broken 502, timeouts 504. Only the response headers have a
//! deadline ([`RESPONSE_HEADER_TIMEOUT`]); a live stream is never cut.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tunnel::server::{DialError, Session, TunnelStream};

use crate::ca::{Ca, CaError, Issued};
use crate::registry::{ClusterStore, Registry, Upstream};

/// How long the member may take to answer with response headers. Watches and
/// `logs -f` answer headers at once; their bodies and upgraded streams have no
/// deadline at all.
pub const RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a TLS handshake may take, with clients and with the member.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle upstream connections kept per agent session.
pub const POOL_MAX_IDLE_PER_SESSION: usize = 32;
/// How long an idle upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The HTTP bodies this proxy answers with.
type Body = BoxBody<Bytes, hyper::Error>;

/// Requests (until their response body ends), upgraded streams and relayed
/// connections in progress on every port of this process: a draining replica
/// waits for them.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many requests, upgraded streams and relays are in progress.
pub fn in_flight() -> usize {
    IN_FLIGHT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one unit of [`in_flight`] while alive.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted until it ends.
struct Counted {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------
// Serving certificate

/// A listener's serving certificate. Clones share it: [`ServerCert::set`]
/// replaces it for every new TLS connection of the listeners that use it, live
/// connections keep the one they started with.
#[derive(Clone)]
pub struct ServerCert(Arc<RwLock<CurrentCert>>);

struct CurrentCert {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

impl ServerCert {
    pub fn new(issued: Issued) -> Result<Self, CaError> {
        Ok(Self(Arc::new(RwLock::new(current_cert(&issued)?))))
    }

    /// Serve `issued` from now on (e.g. when the cluster's addresses changed or
    /// the certificate nears its end).
    pub fn set(&self, issued: Issued) -> Result<(), CaError> {
        let next = current_cert(&issued)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// When the certificate served now expires.
    pub fn not_after(&self) -> SystemTime {
        self.0.read().unwrap_or_else(|e| e.into_inner()).not_after
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).key.clone()
    }
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

fn current_cert(issued: &Issued) -> Result<CurrentCert, CaError> {
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Issued(format!("certificate is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CaError::Issued("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| CaError::Issued(format!("key is not PEM: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| CaError::Issued(format!("unusable certificate and key: {e}")))?;
    Ok(CurrentCert {
        key: Arc::new(key),
        not_after: issued.not_after,
    })
}

#[derive(Debug)]
struct Resolver(ServerCert);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
}

/// TLS for the kube-apiserver port: our serving certificate, client
/// certificates signed by `ca` required, HTTP/1.1 only.
fn server_tls(ca: &Ca, cert: ServerCert) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(cert)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

// ---------------------------------------------------------------------------
// Listener

/// One proxy port of one cluster. Dropping it (or [`ClusterListener::shutdown`])
/// closes the port and ends its connections, upgraded streams included.
pub struct ClusterListener {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    accept: Option<JoinHandle<()>>,
    /// Serves a connection that arrived some other way (relayed by a peer
    /// replica) as if this port had accepted it.
    serve: Arc<dyn Fn(Box<dyn Io>, SocketAddr) + Send + Sync>,
}

/// A client connection, whatever carries it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// HA: where a client connection goes when another replica serves its cluster
/// ([`crate::peers`]).
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
        kind: Upstream,
        tcp: TcpStream,
    ) -> Pin<Box<dyn Future<Output = Option<TcpStream>> + Send>>;
}

/// What clients speak to the port.
enum Front {
    Https(TlsAcceptor),
    Http,
}

/// Knobs the tests turn.
#[derive(Clone, Copy)]
struct Timeouts {
    response_header: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            response_header: RESPONSE_HEADER_TIMEOUT,
        }
    }
}

impl ClusterListener {
    /// Bind `addr` (done when this returns, so an agent can be told "success"
    /// only once its port exists) and serve `cluster`'s kube-apiserver on it:
    /// HTTPS with `cert`, clients must show a certificate signed by `ca`.
    pub async fn start<S: ClusterStore>(
        cluster: String,
        addr: SocketAddr,
        registry: Registry<S>,
        ca: Arc<Ca>,
        cert: ServerCert,
        relay: Option<Arc<dyn Relay>>,
    ) -> io::Result<Self> {
        Self::start_with(
            cluster,
            addr,
            registry,
            Some((ca, cert)),
            Timeouts::default(),
            relay,
        )
        .await
    }

    /// Bind `addr` and serve `cluster`'s ks-apiserver on it, plain HTTP.
    pub async fn start_kubesphere<S: ClusterStore>(
        cluster: String,
        addr: SocketAddr,
        registry: Registry<S>,
        relay: Option<Arc<dyn Relay>>,
    ) -> io::Result<Self> {
        Self::start_with(cluster, addr, registry, None, Timeouts::default(), relay).await
    }

    async fn start_with<S: ClusterStore>(
        cluster: String,
        addr: SocketAddr,
        registry: Registry<S>,
        tls: Option<(Arc<Ca>, ServerCert)>,
        timeouts: Timeouts,
        relay: Option<Arc<dyn Relay>>,
    ) -> io::Result<Self> {
        let (front, upstream) = match tls {
            Some((ca, cert)) => {
                let config = server_tls(&ca, cert).map_err(io::Error::other)?;
                (
                    Front::Https(TlsAcceptor::from(Arc::new(config))),
                    Upstream::Kubernetes,
                )
            }
            None => (Front::Http, Upstream::KubeSphere),
        };
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let routes = Arc::new(Routes::default());
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_SESSION)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(Connector {
                routes: routes.clone(),
            });
        let proxy = Arc::new(Proxy {
            cluster: cluster.clone(),
            registry,
            upstream,
            routes,
            client,
            cancel: cancel.clone(),
            timeouts,
        });
        let kind = match front {
            Front::Https(_) => "kube-apiserver",
            Front::Http => "ks-apiserver",
        };
        tracing::info!(%cluster, addr = %local_addr, kind, "cluster proxy listening");
        let front = Arc::new(front);
        let serve = {
            let (front, proxy, cancel) = (front.clone(), proxy.clone(), cancel.clone());
            Arc::new(move |io: Box<dyn Io>, peer: SocketAddr| {
                spawn_connection(io, peer, front.clone(), proxy.clone(), cancel.clone());
            })
        };
        let accept = tokio::spawn(accept_loop(listener, front, proxy, relay, cancel.clone()));
        Ok(Self {
            local_addr,
            cancel,
            accept: Some(accept),
            serve,
        })
    }

    /// Serve a connection relayed from a peer replica (`peer` is the client's
    /// address as far as known) as if this port had accepted it.
    pub fn serve_relayed(&self, io: Box<dyn Io>, peer: SocketAddr) {
        (self.serve)(io, peer);
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

async fn accept_loop<S: ClusterStore>(
    listener: TcpListener,
    front: Arc<Front>,
    proxy: Arc<Proxy<S>>,
    relay: Option<Arc<dyn Relay>>,
    cancel: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(cluster = %proxy.cluster, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        if let Some(relay) = &relay
            && let Some(target) = relay.target(&proxy.cluster, proxy.registry.live(&proxy.cluster))
        {
            tracing::debug!(cluster = %proxy.cluster, %peer, %target, "relaying to the replica with the agent");
            crate::metrics::METRICS
                .relayed
                .get_or_create(&crate::metrics::Metrics::cluster(&proxy.cluster))
                .inc();
            let relayed = relay.relay(target, proxy.cluster.clone(), proxy.upstream, tcp);
            let (front, proxy, cancel) = (front.clone(), proxy.clone(), cancel.clone());
            let in_flight = InFlight::enter();
            tokio::spawn(async move {
                let _in_flight = in_flight;
                let unreachable = tokio::select! {
                    () = cancel.cancelled() => None,
                    back = relayed => back,
                };
                if let Some(tcp) = unreachable {
                    spawn_connection(tcp, peer, front, proxy, cancel);
                }
            });
            continue;
        }
        spawn_connection(tcp, peer, front.clone(), proxy.clone(), cancel.clone());
    }
    tracing::info!(cluster = %proxy.cluster, "cluster proxy closed");
}

fn spawn_connection<S: ClusterStore, T: Io>(
    io: T,
    peer: SocketAddr,
    front: Arc<Front>,
    proxy: Arc<Proxy<S>>,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = cancel.cancelled() => {}
            () = serve_connection(io, peer, &front, proxy) => {}
        }
    });
}

async fn serve_connection<S: ClusterStore, T: Io>(
    tcp: T,
    peer: SocketAddr,
    front: &Front,
    proxy: Arc<Proxy<S>>,
) {
    let cluster = proxy.cluster.clone();
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEADER_TIMEOUT);
    let served = match front {
        Front::Http => {
            http.serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await
        }
        Front::Https(acceptor) => {
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // Port probes and health checks that connect and leave.
                    tracing::debug!(%cluster, %peer, error = %e, "client left during TLS handshake");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%cluster, %peer, error = %e, "TLS handshake with client failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%cluster, %peer, "client did not finish the TLS handshake in time");
                    return;
                }
            };
            http.serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
        }
    };
    if let Err(e) = served {
        tracing::debug!(%cluster, %peer, error = %e, "client connection ended with an error");
    }
}

// ---------------------------------------------------------------------------
// Routes: what the proxy needs to reach the member through one session

/// Per agent session: the target it advertised, the TLS setup and credentials
/// built from its config. The pool keys connections by [`session_host`], so a
/// request and the connection it travels on always use the same session.
#[derive(Default)]
struct Routes(Mutex<HashMap<String, Arc<Route>>>);

struct Route {
    session: Session,
    target: String,
    /// How to talk to the member, or why that is impossible.
    prepared: Result<Prepared, String>,
}

pub(crate) struct Prepared {
    pub(crate) tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    pub(crate) authorization: Option<HeaderValue>,
}

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Route>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The route through `session`, built on first use; forgets ended sessions.
    fn through(&self, session: Session, upstream: Upstream, cluster: &str) -> (String, Arc<Route>) {
        let host = session_host(&session);
        let mut routes = self.lock();
        routes.retain(|_, r| !r.session.is_closed());
        if let Some(route) = routes.get(&host) {
            return (host, route.clone());
        }
        let route = Arc::new(Route::new(session, upstream, cluster));
        routes.insert(host.clone(), route.clone());
        (host, route)
    }

    fn get(&self, host: &str) -> Option<Arc<Route>> {
        self.lock().get(host).cloned()
    }
}

/// The pool key of a session: a host name made from its agent's address.
/// Two live sessions never share an address (a TCP connection each); a dead
/// session whose address comes back is replaced in [`Routes::through`].
fn session_host(session: &Session) -> String {
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    session.peer().hash(&mut hash);
    format!("s{:016x}.tunnel", hash.finish())
}

impl Route {
    fn new(session: Session, upstream: Upstream, cluster: &str) -> Self {
        let config = session.config();
        let (target, prepared) = match upstream {
            Upstream::Kubernetes => (
                config.kubernetes_svc_host.clone(),
                prepare_kubernetes(config, cluster),
            ),
            Upstream::KubeSphere => (
                config.kubesphere_svc_host.clone(),
                if config.kubesphere_svc_host.is_empty() {
                    Err(format!(
                        "the agent of cluster {cluster:?} advertised no ks-apiserver address \
                         (KubeSphereSvcHost)"
                    ))
                } else {
                    Ok(Prepared {
                        tls: None,
                        authorization: None,
                    })
                },
            ),
        };
        Self {
            session,
            target,
            prepared,
        }
    }
}

/// TLS to the member kube-apiserver, verified against the agent's CA, and the
/// agent's credentials (bearer token, else client certificate).
pub(crate) fn prepare_kubernetes(
    config: &tunnel::AgentConfig,
    cluster: &str,
) -> Result<Prepared, String> {
    let target = &config.kubernetes_svc_host;
    if target.is_empty() {
        return Err(format!(
            "the agent of cluster {cluster:?} advertised no kube-apiserver address \
             (KubernetesSvcHost)"
        ));
    }
    if config.ca_data.is_empty() {
        return Err(format!(
            "the agent of cluster {cluster:?} sent no CA for its kube-apiserver (CAData), so its \
             certificate cannot be verified; run the agent with a service account or a \
             kubeconfig that includes the cluster's CA"
        ));
    }
    let mut roots = RootCertStore::empty();
    let mut bad = None;
    for cert in CertificateDer::pem_slice_iter(&config.ca_data) {
        match cert {
            Ok(cert) => {
                if let Err(e) = roots.add(cert) {
                    bad = Some(e.to_string());
                }
            }
            Err(e) => bad = Some(e.to_string()),
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "the CA the agent of cluster {cluster:?} sent (CAData) holds no usable PEM \
             certificate{}",
            bad.map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }
    let host = host_of(target);
    let server_name = ServerName::try_from(host.to_string()).map_err(|_| {
        format!(
            "the kube-apiserver address {target:?} the agent of cluster {cluster:?} advertised \
             has no valid host name"
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let token = String::from_utf8_lossy(&config.bearer_token);
    let token = token.trim();
    let (mut tls, authorization) = if !token.is_empty() {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            format!(
                "the bearer token the agent of cluster {cluster:?} sent has characters a \
                 header cannot carry"
            )
        })?;
        value.set_sensitive(true);
        (builder.with_no_client_auth(), Some(value))
    } else if !config.cert_data.is_empty() && !config.key_data.is_empty() {
        let certs = CertificateDer::pem_slice_iter(&config.cert_data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!("the client certificate of cluster {cluster:?}'s agent (CertData): {e}")
            })?;
        let key = PrivateKeyDer::from_pem_slice(&config.key_data)
            .map_err(|e| format!("the client key of cluster {cluster:?}'s agent (KeyData): {e}"))?;
        let tls = builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!(
                "the client certificate and key of cluster {cluster:?}'s agent are unusable: {e}"
            )
        })?;
        (tls, None)
    } else {
        // Anonymous: the member decides (usually 401/403, passed through).
        (builder.with_no_client_auth(), None)
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Prepared {
        tls: Some((Arc::new(tls), server_name)),
        authorization,
    })
}

/// The host part of `host:port`: `[::1]:6443` -> `::1`, `10.0.0.1:443` ->
/// `10.0.0.1`, `kubernetes.default.svc:443` -> `kubernetes.default.svc`; a
/// bare host or IPv6 address is returned as is.
fn host_of(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => target,
    }
}

// ---------------------------------------------------------------------------
// Connector: dials through the tunnel, then TLS

/// Why no connection to the member could be made; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("the agent's session ended")]
    SessionGone,
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

impl ConnectError {
    fn status(&self) -> StatusCode {
        match self {
            Self::SessionGone | Self::Dial(DialError::Closed) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Dial(DialError::Timeout(_)) | Self::TlsTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Prepare(_) | Self::Dial(DialError::Refused { .. }) | Self::Tls { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }
}

#[derive(Clone)]
struct Connector {
    routes: Arc<Routes>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let route = uri.host().and_then(|host| self.routes.get(host));
        Box::pin(async move {
            let route = route.ok_or(ConnectError::SessionGone)?;
            if route.session.is_closed() {
                return Err(ConnectError::SessionGone);
            }
            let prepared = route
                .prepared
                .as_ref()
                .map_err(|e| ConnectError::Prepare(e.clone()))?;
            let stream = route.session.dial(&route.target).await?;
            let Some((config, server_name)) = &prepared.tls else {
                return Ok(TokioIo::new(UpstreamStream::Plain(stream)));
            };
            let handshake = TlsConnector::from(config.clone()).connect(server_name.clone(), stream);
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(tls)) => Ok(TokioIo::new(UpstreamStream::Tls(tls))),
                Ok(Err(error)) => Err(ConnectError::Tls {
                    server_name: server_name.to_str().into_owned(),
                    error,
                }),
                Err(_) => Err(ConnectError::TlsTimeout(TLS_HANDSHAKE_TIMEOUT)),
            }
        })
    }
}

/// A connection to the member through a tunnel channel, with or without TLS.
/// Made once per connection and never moved after, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum UpstreamStream {
    Plain(TunnelStream),
    Tls(tokio_rustls::client::TlsStream<TunnelStream>),
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamStream {
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

impl AsyncWrite for UpstreamStream {
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

// ---------------------------------------------------------------------------
// Requests

struct Proxy<S> {
    cluster: String,
    registry: Registry<S>,
    upstream: Upstream,
    routes: Arc<Routes>,
    client: Client<Connector, Incoming>,
    cancel: CancellationToken,
    timeouts: Timeouts,
}

impl<S: ClusterStore> Proxy<S> {
    fn what(&self) -> &'static str {
        match self.upstream {
            Upstream::Kubernetes => "kube-apiserver",
            Upstream::KubeSphere => "ks-apiserver",
        }
    }

    /// [`Self::forward`], timed to response headers for /metrics.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let in_flight = InFlight::enter();
        let started = std::time::Instant::now();
        let resp = self.forward(req).await;
        crate::metrics::METRICS.observe_request(&self.cluster, started.elapsed());
        resp.map(|inner| {
            Counted {
                inner,
                _in_flight: in_flight,
            }
            .boxed()
        })
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let cluster = &self.cluster;
        let Some(session) = self.registry.pick(cluster) else {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no agent of cluster {cluster:?} is connected to the proxy"),
            );
        };
        let (host, route) = self.routes.through(session, self.upstream, cluster);
        let prepared = match &route.prepared {
            Ok(p) => p,
            Err(why) => return status(StatusCode::BAD_GATEWAY, why),
        };

        let upgrade = upgrade_of(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        if let Upstream::Kubernetes = self.upstream {
            // The member sees the agent's identity, never the client's credentials.
            parts.headers.remove(header::AUTHORIZATION);
            if let Some(auth) = &prepared.authorization {
                parts.headers.insert(header::AUTHORIZATION, auth.clone());
            }
        }
        if let Ok(value) = HeaderValue::from_str(&route.target) {
            parts.headers.insert(header::HOST, value);
        }
        let scheme = if prepared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = match Uri::try_from(format!("{scheme}://{host}{path_and_query}")) {
            Ok(uri) => uri,
            Err(e) => return status(StatusCode::BAD_REQUEST, &format!("bad request path: {e}")),
        };
        parts.version = Version::HTTP_11;
        parts.extensions = Default::default();
        drop(route);

        let sent = self.client.request(Request::from_parts(parts, body));
        let mut resp = match tokio::time::timeout(self.timeouts.response_header, sent).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let failure = explain(cluster, self.what(), &e);
                tracing::warn!(%cluster, %method, %path, status = failure.code.as_u16(),
                    error = %failure.message, "request to the member failed");
                return failure.response();
            }
            Err(_) => {
                let message = format!(
                    "the member {} of cluster {cluster:?} sent no response headers within {:?}",
                    self.what(),
                    self.timeouts.response_header
                );
                tracing::warn!(%cluster, %method, %path, "{message}");
                return status(StatusCode::GATEWAY_TIMEOUT, &message);
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return status(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "the member {} switched protocols without being asked to",
                        self.what()
                    ),
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let cancel = self.cancel.clone();
            let cluster = cluster.clone();
            let in_flight = InFlight::enter();
            tokio::spawn(async move {
                let _in_flight = in_flight;
                let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(both) => both,
                    Err(e) => {
                        tracing::warn!(%cluster, %path, error = %e, "upgrade failed");
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                tokio::select! {
                    () = cancel.cancelled() => {}
                    copied = tunnel::copy::join(&mut client, &mut upstream) => {
                        if let Err(e) = copied {
                            tracing::debug!(%cluster, %path, error = %e, "upgraded stream ended");
                        }
                    }
                }
            });
            // The member's 101 as is: Upgrade, Connection and the negotiated
            // Sec-WebSocket-Protocol / X-Stream-Protocol-Version.
            let (parts, _) = resp.into_parts();
            let mut answer = Response::new(empty());
            *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            *answer.headers_mut() = parts.headers;
            return answer;
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.extensions = Default::default();
        Response::from_parts(parts, body.boxed())
    }
}

/// Why a request to the member failed, as the client will be told.
struct Failure {
    code: StatusCode,
    message: String,
    /// The session went away under the request: client-go retries a 5xx
    /// that carries `Retry-After`, and the next try picks another session.
    transient: bool,
}

impl Failure {
    fn response(&self) -> Response<Body> {
        let mut resp = status(self.code, &self.message);
        if self.transient {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Explain a failed upstream request to `what` (kube-apiserver, ks-apiserver).
fn explain(cluster: &str, what: &str, e: &hyper_util::client::legacy::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(connect) = err.downcast_ref::<ConnectError>() {
            return Failure {
                code: connect.status(),
                message: format!(
                    "cannot reach the member {what} of cluster {cluster:?} through its tunnel: \
                     {connect}"
                ),
                transient: matches!(
                    connect,
                    ConnectError::SessionGone | ConnectError::Dial(DialError::Closed)
                ),
            };
        }
        if let Some(hyper_err) = err.downcast_ref::<hyper::Error>()
            && hyper_err.is_timeout()
        {
            return Failure {
                code: StatusCode::GATEWAY_TIMEOUT,
                message: format!("the member {what} of cluster {cluster:?} timed out: {hyper_err}"),
                transient: false,
            };
        }
        source = err.source();
    }
    Failure {
        code: StatusCode::BAD_GATEWAY,
        message: format!(
            "the connection to the member {what} of cluster {cluster:?} failed: {}",
            error_chain(e)
        ),
        transient: false,
    }
}

/// `e: cause: cause ...`, skipping repeats.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}

/// The `Upgrade` header of a request that asks for one (`Connection: upgrade`).
fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    headers.get(header::UPGRADE).cloned()
}

/// Remove the hop-by-hop headers (RFC 9110 7.6.1), including those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A Kubernetes `Status` answer, which kubectl prints as the error.
fn status(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        StatusCode::GATEWAY_TIMEOUT => "Timeout",
        StatusCode::BAD_REQUEST => "BadRequest",
        _ => "BadGateway",
    };
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tunnel::AgentConfig;
    use tunnel::client::{ClientOptions, TcpDialer};
    use tunnel::ws::WsStream;

    use crate::registry::StaticClusters;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const CLUSTER: &str = "alpha";
    const AGENT_TOKEN: &str = "agent-token-0123456789";
    const BEARER: &str = "member-service-account-token";
    const WAIT: Duration = Duration::from_secs(20);

    type TestError = Box<dyn std::error::Error + Send + Sync>;
    type MemberBody = BoxBody<Bytes, Infallible>;

    // -- the fake member API server ------------------------------------------

    /// A body whose chunks the test hands in one at a time.
    struct ChanBody(mpsc::Receiver<Bytes>);

    impl hyper::body::Body for ChanBody {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
        }
    }

    fn text(code: StatusCode, body: String) -> Response<MemberBody> {
        let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
        *resp.status_mut() = code;
        resp
    }

    /// A fake kube-apiserver (HTTPS with a certificate for 127.0.0.1 from its
    /// own CA; client certificates of that CA are accepted and recorded) or a
    /// fake ks-apiserver (plain HTTP). It counts TCP connections.
    ///
    /// `/stream` answers a body the test feeds through `streams`; `/hang`
    /// never answers; `/exec` upgrades (echo, then "bye" after the client's
    /// EOF); `/forbidden` is 403; anything else echoes what it was sent.
    struct Member {
        addr: String,
        ca: Ca,
        accepted: Arc<AtomicUsize>,
        streams: mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
    }

    impl Member {
        async fn start(tls: bool) -> Member {
            let ca = Ca::generate().unwrap();
            let acceptor = tls.then(|| {
                let issued = ca.issue_server(&["127.0.0.1".into()], DAY).unwrap();
                let cert = ServerCert::new(issued).unwrap();
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut roots = RootCertStore::empty();
                roots.add(ca.cert_der().clone()).unwrap();
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .allow_unauthenticated()
                        .build()
                        .unwrap();
                let config = ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_client_cert_verifier(verifier)
                    .with_cert_resolver(Arc::new(Resolver(cert)));
                TlsAcceptor::from(Arc::new(config))
            });
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let accepted = Arc::new(AtomicUsize::new(0));
            let (streams_tx, streams) = mpsc::unbounded_channel();
            let count = accepted.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let acceptor = acceptor.clone();
                    let streams_tx = streams_tx.clone();
                    tokio::spawn(async move {
                        let http = hyper::server::conn::http1::Builder::new();
                        match acceptor {
                            Some(acceptor) => {
                                let Ok(tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                let cn = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .map(|c| common_name(c));
                                let service = member_service(cn, streams_tx);
                                let _ = http
                                    .serve_connection(TokioIo::new(tls), service)
                                    .with_upgrades()
                                    .await;
                            }
                            None => {
                                let service = member_service(None, streams_tx);
                                let _ = http
                                    .serve_connection(TokioIo::new(tcp), service)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                    });
                }
            });
            Member {
                addr,
                ca,
                accepted,
                streams,
            }
        }
    }

    fn common_name(der: &CertificateDer<'_>) -> String {
        let (_, x509) = x509_parser::parse_x509_certificate(der).unwrap();
        let cn = x509.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_string()
    }

    fn member_service(
        cn: Option<String>,
        streams: mpsc::UnboundedSender<mpsc::Sender<Bytes>>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<MemberBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<MemberBody>, Infallible>> + Send,
    > + Clone {
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let cn = cn.clone();
            let streams = streams.clone();
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .map_or("none".to_string(), |v| v.to_str().unwrap().to_string())
                };
                let resp = match req.uri().path() {
                    "/stream" => {
                        let (tx, rx) = mpsc::channel(1);
                        streams.send(tx).unwrap();
                        Response::new(ChanBody(rx).boxed())
                    }
                    "/hang" => std::future::pending().await,
                    "/forbidden" => text(StatusCode::FORBIDDEN, "no exec for you".into()),
                    "/exec" if req.headers().contains_key(header::UPGRADE) => {
                        let upgrade = req.headers()[header::UPGRADE].clone();
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(upgraded) = on.await else { return };
                            let mut io = TokioIo::new(upgraded);
                            let mut buf = vec![0u8; 1024];
                            // Errors: the test cut the stream.
                            while let Ok(n @ 1..) = io.read(&mut buf).await {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            let _ = io.write_all(b"bye").await;
                            let _ = io.shutdown().await;
                        });
                        let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
                        let h = resp.headers_mut();
                        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                        h.insert(header::UPGRADE, upgrade);
                        h.insert(
                            "X-Stream-Protocol-Version",
                            HeaderValue::from_static("v4.channel.k8s.io"),
                        );
                        resp
                    }
                    _ => {
                        let (auth, host) = (header("authorization"), header("host"));
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        text(
                            StatusCode::OK,
                            format!(
                                "echo ok auth={auth} cn={} host={host} body={}",
                                cn.as_deref().unwrap_or("none"),
                                String::from_utf8_lossy(&body)
                            ),
                        )
                    }
                };
                Ok(resp)
            }
        })
    }

    // -- a real tunnel, in process ---------------------------------------------

    fn registry() -> Registry<StaticClusters> {
        let json = format!(r#"{{"{CLUSTER}": "{AGENT_TOKEN}"}}"#);
        Registry::new(StaticClusters::from_json(&json).unwrap())
    }

    /// Connect an agent for [`CLUSTER`] over a loopback websocket and wait
    /// until the registry has its session. The agent serves `targets`.
    async fn connect_agent(
        registry: &Registry<StaticClusters>,
        config: AgentConfig,
        targets: Vec<String>,
    ) -> JoinHandle<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let key = tunnel::ssh::generate_host_key().unwrap();
        let ssh = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
        let admission = Arc::new(registry.clone());
        tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.unwrap();
            let ws = WsStream::from_upgraded(tcp, Role::Server).await;
            let _ = tunnel::server::serve(ws, ssh, admission, peer.to_string()).await;
        });
        let options = ClientOptions {
            config,
            keepalive: Duration::from_secs(30),
            host_key_fingerprint: None,
            allowed_targets: targets,
        };
        let agent = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let ws = WsStream::from_upgraded(tcp, Role::Client).await;
            let _ = tunnel::client::run(ws, &options, Arc::new(TcpDialer), || {}).await;
        });
        tokio::time::timeout(WAIT, async {
            while registry.pick(CLUSTER).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the agent was admitted");
        agent
    }

    fn agent_config(member: &Member, ks: Option<&Member>) -> AgentConfig {
        AgentConfig {
            name: CLUSTER.into(),
            token: AGENT_TOKEN.into(),
            kubernetes_svc_host: member.addr.clone(),
            kubesphere_svc_host: ks.map(|m| m.addr.clone()).unwrap_or_default(),
            ca_data: member.ca.cert_pem().as_bytes().to_vec(),
            bearer_token: BEARER.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    /// The proxy side: our CA, a kube-apiserver listener on loopback.
    struct ProxySide {
        ca: Arc<Ca>,
        cert: ServerCert,
        listener: ClusterListener,
        client: Issued,
    }

    async fn start_proxy(registry: &Registry<StaticClusters>, timeouts: Timeouts) -> ProxySide {
        let ca = Arc::new(Ca::generate().unwrap());
        let sans = ["127.0.0.1".to_string(), "localhost".to_string()];
        let cert = ServerCert::new(ca.issue_server(&sans, DAY).unwrap()).unwrap();
        let listener = ClusterListener::start_with(
            CLUSTER.into(),
            "127.0.0.1:0".parse().unwrap(),
            registry.clone(),
            Some((ca.clone(), cert.clone())),
            timeouts,
            None,
        )
        .await
        .unwrap();
        let client = ca
            .issue_client("kubernetes-admin", &["system:masters"], DAY)
            .unwrap();
        ProxySide {
            ca,
            cert,
            listener,
            client,
        }
    }

    /// Member, agent and proxy, all connected.
    async fn setup(edit: impl FnOnce(&mut AgentConfig)) -> (Member, ProxySide, JoinHandle<()>) {
        let member = Member::start(true).await;
        let registry = registry();
        let mut config = agent_config(&member, None);
        edit(&mut config);
        let agent = connect_agent(&registry, config, vec![member.addr.clone()]).await;
        let proxy = start_proxy(&registry, Timeouts::default()).await;
        (member, proxy, agent)
    }

    // -- a kubectl stand-in -------------------------------------------------------

    fn client_tls(trust: &Ca, identity: Option<&Issued>) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(trust.cert_der().clone()).unwrap();
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    async fn tls_connect(
        addr: SocketAddr,
        tls: Arc<ClientConfig>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::from(addr.ip());
        TlsConnector::from(tls).connect(name, tcp).await
    }

    /// One request on a new connection (plain HTTP when `tls` is None).
    async fn send(
        addr: SocketAddr,
        tls: Option<Arc<ClientConfig>>,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TestError> {
        let mut sender = match tls {
            Some(tls) => {
                let stream = tls_connect(addr, tls).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn.with_upgrades());
                sender
            }
            None => {
                let stream = TcpStream::connect(addr).await?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn.with_upgrades());
                sender
            }
        };
        Ok(sender.send_request(req).await?)
    }

    fn get(path: &str) -> Request<Full<Bytes>> {
        Request::get(path)
            .header(header::HOST, "proxy")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn body_text(resp: Response<Incoming>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    impl ProxySide {
        fn tls(&self) -> Option<Arc<ClientConfig>> {
            Some(client_tls(&self.ca, Some(&self.client)))
        }

        async fn get(&self, path: &str) -> (StatusCode, String) {
            let resp = send(self.listener.local_addr(), self.tls(), get(path))
                .await
                .unwrap();
            let code = resp.status();
            (code, body_text(resp).await)
        }
    }

    fn parse_status(body: &str) -> serde_json::Value {
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(status["kind"], "Status", "{body}");
        assert_eq!(status["apiVersion"], "v1", "{body}");
        assert_eq!(status["status"], "Failure", "{body}");
        status
    }

    // -- the tests -----------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_reach_the_member_as_the_agent() {
        let (member, proxy, _agent) = setup(|_| {}).await;
        let req = Request::post("/api/v1/namespaces?fieldManager=x")
            .header(header::AUTHORIZATION, "Bearer the-clients-own-token")
            .header("Proxy-Authorization", "Basic c2VjcmV0")
            .body(Full::new(Bytes::from_static(b"{\"kind\":\"Namespace\"}")))
            .unwrap();
        let resp = send(proxy.listener.local_addr(), proxy.tls(), req)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = body_text(resp).await;
        assert_eq!(
            body,
            format!(
                "echo ok auth=Bearer {BEARER} cn=none host={} body={{\"kind\":\"Namespace\"}}",
                member.addr
            )
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_without_a_certificate_of_our_ca_are_refused() {
        let (_member, proxy, _agent) = setup(|_| {}).await;
        let addr = proxy.listener.local_addr();
        let foreign_ca = Ca::generate().unwrap();
        let foreign = foreign_ca
            .issue_client("kubernetes-admin", &["system:masters"], DAY)
            .unwrap();
        for (what, tls) in [
            ("no certificate", client_tls(&proxy.ca, None)),
            ("foreign certificate", client_tls(&proxy.ca, Some(&foreign))),
        ] {
            // TLS 1.3: the client learns of the refusal on its first read.
            let err = match tls_connect(addr, tls).await {
                Err(e) => e.to_string(),
                Ok(mut stream) => {
                    let _ = stream
                        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await;
                    let mut buf = Vec::new();
                    match stream.read_to_end(&mut buf).await {
                        Err(e) => e.to_string(),
                        Ok(_) => panic!("{what}: answered {:?}", String::from_utf8_lossy(&buf)),
                    }
                }
            };
            assert!(
                err.contains("CertificateRequired")
                    || err.contains("UnknownCA")
                    || err.contains("BadCertificate")
                    || err.contains("DecryptError"),
                "{what}: {err}"
            );
            eprintln!("{what}: {err}");
        }
        // Our own client certificate still works.
        assert_eq!(proxy.get("/echo").await.0, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_agent_is_a_503_status() {
        let registry = registry();
        let proxy = start_proxy(&registry, Timeouts::default()).await;
        let (code, body) = proxy.get("/api").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        let status = parse_status(&body);
        assert_eq!(status["code"], 503);
        assert_eq!(status["reason"], "ServiceUnavailable");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("no agent of cluster \"alpha\""),
            "{body}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_without_a_ca_gets_no_unverified_connection() {
        let (member, proxy, _agent) = setup(|c| c.ca_data.clear()).await;
        let (code, body) = proxy.get("/api").await;
        assert_eq!(code, StatusCode::BAD_GATEWAY);
        let status = parse_status(&body);
        assert_eq!(status["code"], 502);
        assert!(
            status["message"].as_str().unwrap().contains("CAData"),
            "{body}"
        );
        assert_eq!(member.accepted.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_certificate_the_agents_ca_did_not_sign_is_a_502() {
        let other = Ca::generate().unwrap();
        let (_member, proxy, _agent) =
            setup(|c| c.ca_data = other.cert_pem().as_bytes().to_vec()).await;
        let (code, body) = proxy.get("/api").await;
        assert_eq!(code, StatusCode::BAD_GATEWAY);
        let message = parse_status(&body)["message"].as_str().unwrap().to_string();
        // Both test CAs are named alike: webpki finds the issuer by name and
        // then the signature does not match.
        assert!(message.contains("TLS handshake"), "{message}");
        assert!(message.contains("invalid peer certificate"), "{message}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_bearer_token_the_agents_client_certificate_is_used() {
        let member = Member::start(true).await;
        let registry = registry();
        let id = member
            .ca
            .issue_client("tower-agent", &["system:masters"], DAY)
            .unwrap();
        let mut config = agent_config(&member, None);
        config.bearer_token.clear();
        config.cert_data = id.cert_pem.into_bytes();
        config.key_data = id.key_pem.into_bytes();
        let _agent = connect_agent(&registry, config, vec![member.addr.clone()]).await;
        let proxy = start_proxy(&registry, Timeouts::default()).await;
        let req = Request::get("/api")
            .header(header::AUTHORIZATION, "Bearer the-clients-own-token")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send(proxy.listener.local_addr(), proxy.tls(), req)
            .await
            .unwrap();
        let body = body_text(resp).await;
        assert!(body.contains("auth=none cn=tower-agent"), "{body}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn responses_stream_chunk_by_chunk() {
        let (mut member, proxy, _agent) = setup(|_| {}).await;
        let resp = send(proxy.listener.local_addr(), proxy.tls(), get("/stream"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let feed = member.streams.recv().await.unwrap();
        let mut body = resp.into_body();
        // Each chunk reaches the client before the member writes the next.
        for chunk in ["{\"type\":\"ADDED\"}\n", "{\"type\":\"MODIFIED\"}\n", "x"] {
            feed.send(Bytes::from(chunk)).await.unwrap();
            let mut got = Vec::new();
            while got.len() < chunk.len() {
                let frame = tokio::time::timeout(WAIT, body.frame())
                    .await
                    .expect("chunk did not arrive: the response is buffered")
                    .unwrap()
                    .unwrap();
                got.extend_from_slice(&frame.into_data().unwrap());
            }
            assert_eq!(got, chunk.as_bytes());
        }
        drop(feed);
        let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
        assert!(end.is_none(), "body must end when the member's ends");
    }

    fn exec_request(path: &str) -> Request<Full<Bytes>> {
        Request::post(path)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "SPDY/3.1")
            .header("X-Stream-Protocol-Version", "v4.channel.k8s.io")
            .header("X-Stream-Protocol-Version", "v3.channel.k8s.io")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upgrades_round_trip_bytes_both_ways() {
        let (_member, proxy, _agent) = setup(|_| {}).await;
        let addr = proxy.listener.local_addr();
        let resp = send(addr, proxy.tls(), exec_request("/exec"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers()[header::UPGRADE], "SPDY/3.1");
        assert_eq!(
            resp.headers()["X-Stream-Protocol-Version"],
            "v4.channel.k8s.io"
        );
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        for msg in [&b"hello"[..], &[7u8; 100_000][..]] {
            io.write_all(msg).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            tokio::time::timeout(WAIT, io.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(buf, msg);
        }
        // Half-close: our EOF reaches the member, which still answers.
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, io.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, b"bye");

        // A refused upgrade is passed through as is.
        let resp = send(addr, proxy.tls(), exec_request("/forbidden"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(body_text(resp).await, "no exec for you");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upstream_connections_are_reused() {
        let (member, proxy, _agent) = setup(|_| {}).await;
        for _ in 0..10 {
            let (code, _) = proxy.get("/api/v1/pods").await;
            assert_eq!(code, StatusCode::OK);
            // The pool takes a connection back in a task of its own once the
            // response has ended; give that task a moment on a busy machine.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let accepted = member.accepted.load(Ordering::SeqCst);
        assert!(accepted <= 2, "10 requests took {accepted} connections");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_gone_under_a_request_is_a_503_to_retry() {
        // The pool asks the connector for a session the routes no longer know.
        let client: Client<Connector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(Connector {
                routes: Arc::new(Routes::default()),
            });
        let err = client
            .request(
                Request::get("https://s0000000000000000.tunnel/api")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap_err();
        let failure = explain(CLUSTER, "kube-apiserver", &err);
        assert_eq!(failure.code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(failure.transient);
        let resp = failure.response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let status = parse_status(std::str::from_utf8(&body).unwrap());
        assert_eq!(status["code"], 503);
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("session ended"),
            "{status}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_that_leaves_and_returns() {
        let member = Member::start(true).await;
        let registry = registry();
        let targets = vec![member.addr.clone()];
        let agent = connect_agent(&registry, agent_config(&member, None), targets.clone()).await;
        let proxy = start_proxy(&registry, Timeouts::default()).await;
        assert_eq!(proxy.get("/api").await.0, StatusCode::OK);

        agent.abort();
        tokio::time::timeout(WAIT, async {
            while registry.pick(CLUSTER).is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the session ended");
        let (code, body) = proxy.get("/api").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");

        // A new session gets new upstream connections; the dead one's pooled
        // connection is not used.
        let _agent = connect_agent(&registry, agent_config(&member, None), targets).await;
        assert_eq!(proxy.get("/api").await.0, StatusCode::OK);
        assert_eq!(member.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replaced_certificate_serves_new_connections() {
        let (_member, proxy, _agent) = setup(|_| {}).await;
        let addr = proxy.listener.local_addr();
        let served = || async {
            let tls = tls_connect(addr, client_tls(&proxy.ca, Some(&proxy.client)))
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].clone()
        };
        let first = served().await;
        let old = proxy.cert.not_after();
        let next = proxy
            .ca
            .issue_server(
                &["127.0.0.1".into(), "mc-alpha.kubesphere-system.svc".into()],
                2 * DAY,
            )
            .unwrap();
        let next_der = CertificateDer::from_pem_slice(next.cert_pem.as_bytes()).unwrap();
        // A certificate with another certificate's key is refused, and the
        // one served stays.
        let stray = proxy.ca.issue_server(&["127.0.0.1".into()], DAY).unwrap();
        let mismatched = Issued {
            key_pem: stray.key_pem,
            ..next.clone()
        };
        let err = proxy.cert.set(mismatched).unwrap_err();
        assert!(err.to_string().contains("unusable"), "{err}");
        assert_eq!(served().await, first);
        proxy.cert.set(next).unwrap();
        assert!(proxy.cert.not_after() > old);
        let second = served().await;
        assert_ne!(first, second);
        assert_eq!(second, next_der);
        assert_eq!(proxy.get("/api").await.0, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_response_headers_are_a_504() {
        let member = Member::start(true).await;
        let registry = registry();
        let _agent = connect_agent(
            &registry,
            agent_config(&member, None),
            vec![member.addr.clone()],
        )
        .await;
        let timeouts = Timeouts {
            response_header: Duration::from_millis(300),
        };
        let proxy = start_proxy(&registry, timeouts).await;
        let (code, body) = proxy.get("/hang").await;
        assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
        let status = parse_status(&body);
        assert_eq!(status["reason"], "Timeout");
        assert_eq!(status["code"], 504);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_ks_apiserver_port_forwards_plain_http() {
        let member = Member::start(true).await;
        let ks = Member::start(false).await;
        let registry = registry();
        let config = agent_config(&member, Some(&ks));
        let _agent = connect_agent(
            &registry,
            config,
            vec![member.addr.clone(), ks.addr.clone()],
        )
        .await;
        let port = ClusterListener::start_kubesphere(
            CLUSTER.into(),
            "127.0.0.1:0".parse().unwrap(),
            registry.clone(),
            None,
        )
        .await
        .unwrap();
        // ks-apiserver checks its users' tokens itself: passed through.
        let req = Request::get("/kapis/tenant.kubesphere.io/v1alpha2/workspaces")
            .header(header::AUTHORIZATION, "Bearer ks-jwt")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send(port.local_addr(), None, req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = body_text(resp).await;
        assert!(body.contains("auth=Bearer ks-jwt"), "{body}");
        assert!(body.contains(&format!("host={}", ks.addr)), "{body}");
        assert_eq!(member.accepted.load(Ordering::SeqCst), 0);

        // Without an agent: 503 there too.
        let idle = ClusterListener::start_kubesphere(
            "beta".into(),
            "127.0.0.1:0".parse().unwrap(),
            registry.clone(),
            None,
        )
        .await
        .unwrap();
        let resp = send(idle.local_addr(), None, get("/kapis")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        parse_status(&body_text(resp).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_the_port_and_its_streams() {
        let (_member, proxy, _agent) = setup(|_| {}).await;
        let addr = proxy.listener.local_addr();
        let resp = send(addr, proxy.tls(), exec_request("/exec"))
            .await
            .unwrap();
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        io.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();

        proxy.listener.shutdown().await;
        // Closed at once in the proxy. A process the tests spawn meanwhile
        // (openssl, in the CA tests) may hold a copy of the socket between its
        // fork and exec, so allow for that moment.
        let closed = tokio::time::timeout(WAIT, async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "the port must be closed");
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(WAIT, io.read_to_end(&mut rest)).await;
        assert!(
            ended.is_ok(),
            "the upgraded stream must end with the listener"
        );
    }

    #[test]
    fn host_part_of_targets() {
        assert_eq!(
            host_of("kubernetes.default.svc:443"),
            "kubernetes.default.svc"
        );
        assert_eq!(host_of("10.96.0.1:443"), "10.96.0.1");
        assert_eq!(host_of("[::1]:6443"), "::1");
        assert_eq!(host_of("[fd00::1]"), "fd00::1");
        assert_eq!(host_of("fd00::1"), "fd00::1");
        assert_eq!(host_of("kubernetes"), "kubernetes");
        assert!(matches!(
            ServerName::try_from(host_of("[::1]:6443").to_string()).unwrap(),
            ServerName::IpAddress(_)
        ));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-stream-protocol-version", HeaderValue::from_static("v4"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-stream-protocol-version"));

        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(upgrade_of(&h).unwrap(), "websocket");
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert!(upgrade_of(&h).is_none());
    }
}
