//! Dialing the Tower proxy: TCP, maybe an HTTP CONNECT tunnel, maybe TLS, then
//! the websocket upgrade.
//!
//! ```text
//! --proxy-server http://tower:8080/x  ->  ws://tower:8080/x
//! --proxy-server https://tower        ->  wss://tower:443/
//!
//! TCP (TCP_NODELAY) to the Tower proxy, or to the egress proxy from HTTP(S)_PROXY
//!   -> [egress proxy] CONNECT tower:443 HTTP/1.1, expect 2xx
//!   -> [wss] TLS: public web roots + --proxy-ca, SNI = the Tower host
//!   -> GET /x HTTP/1.1, Upgrade: websocket, Sec-WebSocket-Protocol: kubesphere-v1
//!   <- 101, Sec-WebSocket-Accept checked, subprotocol echoed or not
//!   -> tunnel::ws::WsStream, the byte stream SSH runs over
//! ```
//!
//! The HTTP parts are done with hyper's client connection API rather than a
//! websocket client crate for two reasons: Go Tower's proxy answers 101 without
//! echoing the subprotocol, which RFC-strict clients reject, and a CONNECT hop
//! plus a custom CA needs its own plumbing anyway. Each stage has its own timeout
//! so that a black-holed proxy costs seconds, not a hung agent.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::wire::SUBPROTOCOL;
use tunnel::ws::WsStream;

use crate::endpoint::Endpoint;
use crate::proxy_env::HttpProxy;

/// TCP connect, DNS lookup included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The egress proxy's answer to CONNECT.
pub const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake with the Tower proxy.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// The websocket upgrade request and its answer.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of a refusal's body goes into the error message.
const BODY_PREFIX: usize = 200;

/// The websocket the tunnel runs over.
pub type ProxyStream = WsStream<TokioIo<Upgraded>>;

/// Why a dial failed. All of them are worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("{stage} timed out after {after:?}")]
    Timeout { stage: String, after: Duration },
    #[error("HTTP proxy {proxy} refused CONNECT {target}: {status}: {body:?}")]
    ProxyRefused {
        proxy: String,
        target: String,
        status: StatusCode,
        body: String,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {peer} failed: {source}")]
    Http { peer: String, source: hyper::Error },
    #[error("the proxy refused the websocket upgrade: {status}: {body:?}")]
    NotUpgraded { status: StatusCode, body: String },
    #[error("the proxy's websocket answer is invalid: {0}")]
    BadUpgrade(String),
}

/// Dials the Tower proxy; see the module docs.
pub struct ProxyDialer {
    endpoint: Endpoint,
    via: Option<HttpProxy>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for ProxyDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyDialer")
            .field("url", &self.endpoint.url())
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

impl ProxyDialer {
    /// `proxy_ca`: extra PEM CA certificates trusted for `wss://`, on top of the
    /// public web roots (so a proxy behind a public certificate keeps working
    /// when the flag is set for a private one).
    pub fn new(
        endpoint: Endpoint,
        via: Option<HttpProxy>,
        proxy_ca: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let tls = match (endpoint.secure(), proxy_ca) {
            (true, ca) => Some(tokio_rustls::TlsConnector::from(tls_config(ca)?)),
            (false, Some(_)) => {
                tracing::warn!("--proxy-ca is ignored: --proxy-server is not https://");
                None
            }
            (false, None) => None,
        };
        Ok(Self { endpoint, via, tls })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The egress proxy in use, if any.
    pub fn via(&self) -> Option<&HttpProxy> {
        self.via.as_ref()
    }

    /// Open a websocket to the Tower proxy.
    pub async fn dial(&self) -> Result<ProxyStream, DialError> {
        let target = self.endpoint.authority();
        let first_hop = self
            .via
            .as_ref()
            .map_or(target.clone(), |p| p.address.clone());
        let tcp = within(
            CONNECT_TIMEOUT,
            format!("TCP connect to {first_hop}"),
            async {
                TcpStream::connect(&first_hop)
                    .await
                    .map_err(|source| DialError::Connect {
                        address: first_hop.clone(),
                        source,
                    })
            },
        )
        .await?;
        // Nagle would add ~40 ms to every small SSH round trip.
        let _ = tcp.set_nodelay(true);
        match &self.via {
            None => self.secure_and_upgrade(tcp).await,
            Some(proxy) => {
                let stage = format!("CONNECT {target} through {}", proxy.address);
                let tunnel = within(
                    PROXY_CONNECT_TIMEOUT,
                    stage,
                    connect_through(tcp, proxy, &target),
                )
                .await?;
                self.secure_and_upgrade(TokioIo::new(tunnel)).await
            }
        }
    }

    async fn secure_and_upgrade<S>(&self, io: S) -> Result<ProxyStream, DialError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(tls) = &self.tls else {
            return self.upgrade(io).await;
        };
        let host = self.endpoint.host().to_string();
        let name =
            rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| DialError::Tls {
                host: host.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
        let stage = format!("TLS handshake with {host}");
        let stream = within(TLS_TIMEOUT, stage, async {
            tls.connect(name, io)
                .await
                .map_err(|source| DialError::Tls { host, source })
        })
        .await?;
        self.upgrade(stream).await
    }

    async fn upgrade<S>(&self, io: S) -> Result<ProxyStream, DialError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.endpoint.url();
        let stage = format!("websocket upgrade at {peer}");
        let upgraded = within(UPGRADE_TIMEOUT, stage, async {
            let http_err = |source| DialError::Http {
                peer: peer.clone(),
                source,
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
                    .await
                    .map_err(http_err)?;
            let _conn = AbortOnDrop(tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            }));
            let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
            let request = Request::get(self.endpoint.path())
                .header(header::HOST, self.endpoint.host_header())
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .header(header::SEC_WEBSOCKET_KEY, &key)
                .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
                .header(
                    header::USER_AGENT,
                    concat!("tower-agent/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::new())
                .map_err(|e| DialError::BadUpgrade(format!("cannot build the request: {e}")))?;
            let response = sender.send_request(request).await.map_err(http_err)?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = response.status();
                let body = body_prefix(response).await;
                return Err(DialError::NotUpgraded { status, body });
            }
            check_upgrade_answer(response.headers(), &key).map_err(DialError::BadUpgrade)?;
            hyper::upgrade::on(response).await.map_err(http_err)
        })
        .await?;
        Ok(WsStream::from_upgraded(TokioIo::new(upgraded), Role::Client).await)
    }
}

/// Ask the egress proxy for a tunnel to `target` (`CONNECT host:port`).
async fn connect_through(
    tcp: TcpStream,
    proxy: &HttpProxy,
    target: &str,
) -> Result<Upgraded, DialError> {
    let http_err = |source| DialError::Http {
        peer: format!("HTTP proxy {}", proxy.address),
        source,
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(http_err)?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    }));
    let mut request = Request::connect(target).header(header::HOST, target);
    if let Some(auth) = &proxy.authorization {
        let mut value = HeaderValue::from_str(auth).map_err(|_| {
            DialError::BadUpgrade(format!(
                "{}: the proxy credentials are not valid in a header",
                proxy.variable
            ))
        })?;
        value.set_sensitive(true);
        request = request.header(header::PROXY_AUTHORIZATION, value);
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| DialError::BadUpgrade(format!("cannot build CONNECT {target}: {e}")))?;
    let response = sender.send_request(request).await.map_err(http_err)?;
    if !response.status().is_success() {
        let status = response.status();
        return Err(DialError::ProxyRefused {
            proxy: proxy.address.clone(),
            target: target.to_string(),
            status,
            body: body_prefix(response).await,
        });
    }
    // hyper hands over the raw connection after a 2xx answer to CONNECT.
    hyper::upgrade::on(response).await.map_err(http_err)
}

/// Check a 101 answer: `Upgrade: websocket`, `Connection: upgrade`, the accept
/// key; the subprotocol may be missing (Go Tower does not echo it) but, if
/// present, must be ours.
fn check_upgrade_answer(headers: &HeaderMap, key: &str) -> Result<(), String> {
    let text = |name: &header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if !text(&header::UPGRADE).eq_ignore_ascii_case("websocket") {
        return Err(format!(
            "Upgrade is {:?}, not websocket",
            text(&header::UPGRADE)
        ));
    }
    let connection = text(&header::CONNECTION);
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err(format!("Connection is {connection:?}, not upgrade"));
    }
    let accept = text(&header::SEC_WEBSOCKET_ACCEPT);
    if accept != derive_accept_key(key.as_bytes()) {
        return Err(format!(
            "Sec-WebSocket-Accept {accept:?} does not match the key sent"
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        None => Ok(()),
        Some(p) if p.as_bytes() == SUBPROTOCOL.as_bytes() => Ok(()),
        Some(p) => Err(format!(
            "subprotocol {p:?} was not offered (only {SUBPROTOCOL})"
        )),
    }
}

/// Up to [`BODY_PREFIX`] bytes of a refusal, for the error message.
async fn body_prefix(response: Response<Incoming>) -> String {
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let read = async {
        while bytes.len() < BODY_PREFIX {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        bytes.extend_from_slice(data);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    bytes.truncate(BODY_PREFIX);
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

/// Run `future` with a deadline; a timeout names the stage.
async fn within<T>(
    after: Duration,
    stage: String,
    future: impl Future<Output = Result<T, DialError>>,
) -> Result<T, DialError> {
    tokio::time::timeout(after, future)
        .await
        .unwrap_or(Err(DialError::Timeout { stage, after }))
}

/// Stops hyper's connection task when the dial is abandoned (timeout, refusal),
/// so no half-open socket outlives it. After a successful upgrade the task has
/// already handed the socket over and finished.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tls_config(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let what = || format!("--proxy-ca {}", path.display());
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).with_context(what)? {
            let cert = cert.with_context(what)?;
            roots.add(cert).with_context(what)?;
            added += 1;
        }
        if added == 0 {
            bail!(
                "--proxy-ca {}: no PEM certificate in the file",
                path.display()
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The upgrade is HTTP/1.1; say so, lest a server pick h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn upgrade_answers_are_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        // No subprotocol echoed, like Go Tower: fine.
        assert_eq!(check_upgrade_answer(&headers, key), Ok(()));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        assert_eq!(check_upgrade_answer(&headers, key), Ok(()));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat"),
        );
        assert!(
            check_upgrade_answer(&headers, key)
                .unwrap_err()
                .contains("not offered")
        );
        headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
        assert!(
            check_upgrade_answer(&headers, "b3RoZXIga2V5")
                .unwrap_err()
                .contains("Accept")
        );
    }

    /// A websocket server in the style of Go Tower: 101 without the subprotocol,
    /// then echoes every byte of the stream back.
    async fn tower_like_server() -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::Receiver<Request<Incoming>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let seen_tx = seen_tx.clone();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let seen_tx = seen_tx.clone();
                    async move {
                        let key = req.headers()[header::SEC_WEBSOCKET_KEY].as_bytes().to_vec();
                        let on = hyper::upgrade::on(&mut req);
                        let _ = seen_tx.send(req).await;
                        tokio::spawn(async move {
                            let io = TokioIo::new(on.await.unwrap());
                            let mut ws = WsStream::from_upgraded(io, Role::Server).await;
                            let mut buf = [0u8; 1024];
                            loop {
                                let n = ws.read(&mut buf).await.unwrap();
                                if n == 0 {
                                    break;
                                }
                                ws.write_all(&buf[..n]).await.unwrap();
                            }
                        });
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
        (addr, seen_rx)
    }

    /// A minimal CONNECT proxy that records the request head and requires
    /// `expected_auth`.
    async fn connect_proxy(
        expected_auth: &'static str,
    ) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        if client.read(&mut byte).await.unwrap() == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8(head).unwrap();
                    let _ = tx.send(head.clone()).await;
                    if !head
                        .to_ascii_lowercase()
                        .contains(&expected_auth.to_ascii_lowercase())
                    {
                        let _ = client
                            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 12\r\n\r\nwho are you?")
                            .await;
                        return;
                    }
                    let target = head.split(' ').nth(1).unwrap().to_string();
                    let mut upstream = TcpStream::connect(target).await.unwrap();
                    client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn dials_through_a_connect_proxy_and_accepts_no_subprotocol_echo() {
        let (server, mut requests) = tower_like_server().await;
        let (proxy, mut heads) = connect_proxy("Proxy-Authorization: Basic dTpw").await;
        let endpoint = Endpoint::parse(&format!("http://{server}/tunnel?x=1")).unwrap();
        let via = HttpProxy::parse(&format!("http://u:p@{proxy}"), "HTTP_PROXY").unwrap();
        let dialer = ProxyDialer::new(endpoint, Some(via), None).unwrap();

        let mut ws = dialer.dial().await.unwrap();
        ws.write_all(b"SSH-kubesphere-v1-client\r\n").await.unwrap();
        let mut echoed = [0u8; 26];
        ws.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"SSH-kubesphere-v1-client\r\n");

        let head = heads.recv().await.unwrap();
        assert!(
            head.starts_with(&format!("CONNECT {server} HTTP/1.1\r\n")),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("host: {server}")),
            "{head}"
        );
        let request = requests.recv().await.unwrap();
        assert_eq!(request.uri(), "/tunnel?x=1");
        assert_eq!(
            request.headers()[header::SEC_WEBSOCKET_PROTOCOL],
            SUBPROTOCOL
        );
        assert_eq!(request.headers()[header::HOST], server.to_string().as_str());
        assert_eq!(request.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }

    #[tokio::test]
    async fn a_proxy_refusal_shows_status_and_body() {
        let (server, _requests) = tower_like_server().await;
        let (proxy, _heads) = connect_proxy("Proxy-Authorization: Basic nobody").await;
        let endpoint = Endpoint::parse(&format!("http://{server}")).unwrap();
        let via = HttpProxy::parse(&format!("{proxy}"), "HTTP_PROXY").unwrap();
        let dialer = ProxyDialer::new(endpoint, Some(via), None).unwrap();
        let Err(e) = dialer.dial().await else {
            panic!("dial succeeded")
        };
        let e = e.to_string();
        assert!(e.contains("407") && e.contains("who are you?"), "{e}");
    }

    #[tokio::test]
    async fn a_non_101_answer_shows_status_and_body() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let body = "x".repeat(500);
            let answer = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
        });
        let dialer = ProxyDialer::new(
            Endpoint::parse(&format!("http://{addr}")).unwrap(),
            None,
            None,
        )
        .unwrap();
        let Err(e) = dialer.dial().await else {
            panic!("dial succeeded")
        };
        match &e {
            DialError::NotUpgraded { status, body } => {
                assert_eq!(*status, StatusCode::NOT_FOUND);
                assert_eq!(body.len(), BODY_PREFIX);
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn stages_time_out_with_their_name() {
        let hang = std::future::pending::<Result<(), DialError>>();
        let e = within(
            Duration::from_millis(20),
            "websocket upgrade at ws://x:1/".into(),
            hang,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "websocket upgrade at ws://x:1/ timed out after 20ms"
        );
    }

    #[test]
    fn proxy_ca_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a pem").unwrap();
        let e = tls_config(Some(&empty)).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(tls_config(Some(&dir.path().join("missing.pem"))).is_err());
        assert!(tls_config(None).is_ok());
    }
}
