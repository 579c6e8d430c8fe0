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
//!
//! This file holds the dial and its stages' shared parts (timeouts, errors,
//! TLS); [`connect`] is the CONNECT hop, [`upgrade`] the websocket upgrade,
//! [`conn`] the connection the websocket then runs over.

mod conn;
mod connect;
mod upgrade;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::task::AbortOnDropHandle;
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
pub type ProxyStream = WsStream<conn::Conn>;

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
        // Nagle would add ~40 ms to every small SSH round trip; and the
        // kernel holds little unsent, so channels take turns (fair share).
        let tcp = tunnel::socket::TunnelSocket::new(tcp);
        match &self.via {
            None => self.secure_and_upgrade(tcp).await,
            Some(proxy) => {
                let stage = format!("CONNECT {target} through {}", proxy.address);
                let tunnel = within(
                    PROXY_CONNECT_TIMEOUT,
                    stage,
                    connect::connect_through(tcp, proxy, &target),
                )
                .await?;
                self.secure_and_upgrade(TokioIo::new(tunnel)).await
            }
        }
    }

    async fn secure_and_upgrade<S>(&self, io: S) -> Result<ProxyStream, DialError>
    where
        S: conn::Shape,
        tokio_rustls::client::TlsStream<S>: conn::Shape,
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

/// An HTTP/1 client over `io` for one request whose answer may take the
/// connection over (CONNECT, the websocket upgrade). hyper's connection task
/// stops when the returned handle drops, so an abandoned dial (timeout,
/// refusal) leaves no half-open socket behind; after a successful upgrade the
/// task has already handed the socket over and finished.
async fn http1<S>(io: S) -> hyper::Result<(SendRequest<Empty<Bytes>>, AbortOnDropHandle<()>)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = AbortOnDropHandle::new(tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    }));
    Ok((sender, conn))
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
mod tests;
