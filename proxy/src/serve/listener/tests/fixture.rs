//! The set-up of the listener tests: a fake member API server, an agent
//! through a real tunnel in process, the proxy side, a client.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::super::forward::RESPONSE_HEADER_TIMEOUT;
use super::super::tls::{Resolver, ServerCert, server_tls};
use super::super::{ClusterListener, Front, Shared};
use crate::agents::admission::Gate;
use crate::agents::registry::Registry;
use crate::identity::ca::{Ca, Issued};
use crate::member::MemberDialer;
use crate::ops::in_flight::InFlight;
use crate::ops::metrics::Metrics;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::AgentConfig;
use tunnel::client::{ClientOptions, TcpDialer};
use tunnel::ws::WsStream;

use crate::agents::store::StaticClusters;

pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);
pub(super) const CLUSTER: &str = "alpha";
pub(super) const AGENT_TOKEN: &str = "agent-token-0123456789";
pub(super) const BEARER: &str = "member-service-account-token";
pub(super) const WAIT: Duration = Duration::from_secs(20);

pub(super) type TestError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type MemberBody = BoxBody<Bytes, Infallible>;

// -- the fake member API server ------------------------------------------

/// A body whose chunks the test hands in one at a time.
pub(super) struct ChanBody(pub(super) mpsc::Receiver<Bytes>);

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

pub(super) fn text(code: StatusCode, body: String) -> Response<MemberBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = code;
    resp
}

/// A fake kube-apiserver (HTTPS with a certificate for 127.0.0.1 from its
/// own CA; client certificates of that CA are accepted and recorded; it
/// follows the client's order of cipher suites, as rustls does, and records
/// the suite of each connection) or a fake ks-apiserver (plain HTTP). It
/// counts TCP connections.
///
/// `/stream` answers a body the test feeds through `streams`; `/hang`
/// never answers; `/exec` upgrades (echo, then "bye" after the client's
/// EOF); `/forbidden` is 403; anything else echoes what it was sent.
pub(super) struct Member {
    pub(super) addr: String,
    pub(super) ca: Ca,
    pub(super) accepted: Arc<AtomicUsize>,
    pub(super) streams: mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
    pub(super) suites: Arc<std::sync::Mutex<Vec<rustls::CipherSuite>>>,
}

impl Member {
    pub(super) async fn start(tls: bool) -> Member {
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
        let suites = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = suites.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let streams_tx = streams_tx.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            if let Some(s) = tls.get_ref().1.negotiated_cipher_suite() {
                                record.lock().unwrap().push(s.suite());
                            }
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
            suites,
        }
    }
}

pub(super) fn common_name(der: &CertificateDer<'_>) -> String {
    let (_, x509) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = x509.subject().iter_common_name().next().unwrap();
    cn.as_str().unwrap().to_string()
}

pub(super) fn member_service(
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
                // Whom the member would judge: the impersonated identity.
                "/whoami" => {
                    let all = |name: &str| {
                        let values: Vec<_> = req
                            .headers()
                            .get_all(name)
                            .iter()
                            .map(|v| v.to_str().unwrap().to_string())
                            .collect();
                        values.join(",")
                    };
                    let who = format!(
                        "user={} groups={} auth={}",
                        all("impersonate-user"),
                        all("impersonate-group"),
                        header("authorization")
                    );
                    text(StatusCode::OK, who)
                }
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

pub(super) fn registry() -> Registry {
    Registry::new(Arc::new(Metrics::new()))
}

pub(super) fn gate(registry: &Registry) -> Arc<Gate<StaticClusters>> {
    let json = format!(r#"{{"{CLUSTER}": "{AGENT_TOKEN}"}}"#);
    let store = StaticClusters::from_json(&json).unwrap();
    let hub = crate::agents::hub::HubServices::new(
        Default::default(),
        registry.metrics().clone(),
        crate::ops::audit::Audit::Off,
    );
    Arc::new(Gate::new(registry.clone(), Arc::new(store), hub))
}

pub(super) fn shared(registry: &Registry) -> Shared {
    Shared {
        dialer: MemberDialer::new(registry.clone()),
        relay: None,
        in_flight: InFlight::default(),
        metrics: registry.metrics().clone(),
        audit: crate::ops::audit::Audit::Off,
        pending: crate::ops::pending::Pending::new(
            crate::ops::pending::Limits::default(),
            registry.metrics().clone(),
        ),
        uploads: None,
    }
}

/// Connect an agent for [`CLUSTER`] over a loopback websocket and wait
/// until the registry has its session. The agent serves `targets`.
pub(super) async fn connect_agent(
    registry: &Registry,
    config: AgentConfig,
    targets: Vec<String>,
) -> JoinHandle<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = tunnel::ssh::generate_host_key().unwrap();
    let ssh = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
    let admission = gate(registry);
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let ws = WsStream::from_upgraded(tcp, Role::Server).await;
        let _ = tunnel::server::serve(ws, ssh, admission, peer.to_string()).await;
    });
    let options = ClientOptions {
        config,
        keepalive: Duration::from_secs(30),
        host_key_fingerprints: Vec::new(),
        allowed_targets: targets,
        allow_dial: Vec::new(),
        hub: Default::default(),
    };
    let agent = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let ws = WsStream::from_upgraded(tcp, Role::Client).await;
        let _ = tunnel::client::run(ws, &options, Arc::new(TcpDialer), || {}).await;
    });
    sessions_until(
        registry,
        |r| r.pick(CLUSTER).is_some(),
        "the agent was admitted",
    )
    .await;
    agent
}

/// Wait (up to [`WAIT`]) until `done` holds, woken by session changes.
pub(super) async fn sessions_until(
    registry: &Registry,
    done: impl Fn(&Registry) -> bool,
    what: &str,
) {
    let mut changes = registry.subscribe();
    let waited = tokio::time::timeout(WAIT, changes.wait_for(|_| done(registry))).await;
    assert!(matches!(waited, Ok(Ok(_))), "{what}");
}

pub(super) fn agent_config(member: &Member, ks: Option<&Member>) -> AgentConfig {
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
pub(super) struct ProxySide {
    pub(super) ca: Arc<Ca>,
    pub(super) cert: ServerCert,
    pub(super) listener: ClusterListener,
    pub(super) client: Issued,
}

pub(super) async fn start_proxy(
    registry: &Registry,
    response_header_timeout: Duration,
) -> ProxySide {
    start_proxy_with(&shared(registry), response_header_timeout).await
}

pub(super) async fn start_proxy_with(
    shared: &Shared,
    response_header_timeout: Duration,
) -> ProxySide {
    let ca = Arc::new(Ca::generate().unwrap());
    let sans = ["127.0.0.1".to_string(), "localhost".to_string()];
    let cert = ServerCert::new(ca.issue_server(&sans, DAY).unwrap()).unwrap();
    let config = server_tls(&ca, cert.clone()).unwrap();
    let listener = ClusterListener::start_with(
        CLUSTER.into(),
        "127.0.0.1:0".parse().unwrap(),
        shared,
        Front::Https(TlsAcceptor::from(Arc::new(config))),
        response_header_timeout,
    )
    .await
    .unwrap();
    let client = ca
        .issue_client(&format!("tower:{CLUSTER}"), &["tower:clients"], DAY)
        .unwrap();
    ProxySide {
        ca,
        cert,
        listener,
        client,
    }
}

/// Member, agent and proxy, all connected.
pub(super) async fn setup(
    edit: impl FnOnce(&mut AgentConfig),
) -> (Member, ProxySide, JoinHandle<()>) {
    let (member, registry, agent) = member_with_agent(edit).await;
    let proxy = start_proxy(&registry, RESPONSE_HEADER_TIMEOUT).await;
    (member, proxy, agent)
}

/// A member and its agent, connected to a new registry: the test starts
/// the proxy side it needs.
pub(super) async fn member_with_agent(
    edit: impl FnOnce(&mut AgentConfig),
) -> (Member, Registry, JoinHandle<()>) {
    let member = Member::start(true).await;
    let registry = registry();
    let mut config = agent_config(&member, None);
    edit(&mut config);
    let agent = connect_agent(&registry, config, vec![member.addr.clone()]).await;
    (member, registry, agent)
}

// -- a kubectl stand-in -------------------------------------------------------

pub(super) fn client_tls(trust: &Ca, identity: Option<&Issued>) -> Arc<ClientConfig> {
    client_tls_with(rustls::crypto::ring::default_provider(), trust, identity)
}

/// [`client_tls`] with the cipher suites of `provider`, in its order.
pub(super) fn client_tls_with(
    provider: rustls::crypto::CryptoProvider,
    trust: &Ca,
    identity: Option<&Issued>,
) -> Arc<ClientConfig> {
    let provider = Arc::new(provider);
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

pub(super) async fn tls_connect(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::from(addr.ip());
    TlsConnector::from(tls).connect(name, tcp).await
}

/// One request on a new connection (plain HTTP when `tls` is None).
pub(super) async fn send(
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

pub(super) fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header(header::HOST, "proxy")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub(super) async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

impl ProxySide {
    pub(super) fn tls(&self) -> Option<Arc<ClientConfig>> {
        Some(client_tls(&self.ca, Some(&self.client)))
    }

    pub(super) async fn get(&self, path: &str) -> (StatusCode, String) {
        let resp = send(self.listener.local_addr(), self.tls(), get(path))
            .await
            .unwrap();
        let code = resp.status();
        (code, body_text(resp).await)
    }
}

pub(super) fn parse_status(body: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(status["kind"], "Status", "{body}");
    assert_eq!(status["apiVersion"], "v1", "{body}");
    assert_eq!(status["status"], "Failure", "{body}");
    status
}
