//! The agents' endpoint: one HTTP/1.1 port (`--host`, `--port`) that upgrades
//! websocket requests carrying the `kubesphere-v1` subprotocol into tunnels and
//! answers `/health`, `/healthz`, `/readyz`, `/version` and `/metrics`;
//! anything else is 404. There is
//! no path routing, as in Tower. The agent's `User-Agent` travels with its
//! session ([`tunnel::server::Peer`]) into the Cluster status.
//!
//! Every connection holds a slot of [`Pending`] from its accept until its
//! agent is admitted (or it ends): a source over its cap, or a port over
//! the total, has its new connections closed at once. Headers must arrive
//! within [`HEADER_TIMEOUT`] (idle keep-alive connections included), the SSH
//! handshake and `config` within [`tunnel::server::CONFIG_TIMEOUT`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tunnel::server::{Peer, ServeError, serve_holding};
use tunnel::socket::TunnelSocket;
use tunnel::wire::SUBPROTOCOL;
use tunnel::ws::WsStream;

use super::admission::Gate;
use super::store::ClusterStore;
use crate::ops::accept::accept_loop;
use crate::ops::metrics::{Metrics, render};
use crate::ops::pending::{Pending, Permit, Refusal};

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The door's name in `tower_refused_connections_total` and logs.
const DOOR: &str = "agents";

/// A connection's pending slot, until its upgrade takes it along.
type Slot = Arc<std::sync::Mutex<Option<Permit>>>;

/// Everything a request handler needs.
pub struct Endpoint<S: ClusterStore> {
    pub gate: Arc<Gate<S>>,
    pub metrics: Arc<Metrics>,
    /// SSH settings with the host key new connections show (rotated live).
    pub ssh: Arc<crate::identity::host_keys::HostKeys>,
    /// Set once the proxy can admit agents (the Cluster cache is synced).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The caps on connections not admitted yet.
    pub pending: Arc<Pending>,
}

/// Accept connections until `stop` is cancelled.
pub async fn run<S: ClusterStore>(
    listener: TcpListener,
    endpoint: Arc<Endpoint<S>>,
    stop: CancellationToken,
) {
    accept_loop(listener, "agents", stop, |tcp, peer| {
        // Over a cap: closed here, before any task or buffer is spent on it.
        if let Some(permit) = endpoint.pending.enter(peer.ip(), DOOR) {
            let tcp = TunnelSocket::new(tcp);
            let endpoint = endpoint.clone();
            let slot: Slot = Arc::new(std::sync::Mutex::new(Some(permit)));
            tokio::spawn(async move {
                let pending = endpoint.pending.clone();
                let service = hyper::service::service_fn(move |req| {
                    let (endpoint, slot) = (endpoint.clone(), slot.clone());
                    async move { Ok::<_, Infallible>(handle(req, endpoint, peer.to_string(), slot)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(crate::serve::listener::MAX_HTTP_BUFFER)
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades();
                match conn.await {
                    Ok(()) => {}
                    Err(e) if e.is_timeout() => {
                        pending.refused(DOOR, Refusal::HandshakeTimeout);
                        tracing::warn!(%peer, limit = ?HEADER_TIMEOUT,
                            "no request headers in time on the agents' port: connection closed");
                    }
                    Err(e) => {
                        pending.refused(DOOR, Refusal::BadHandshake);
                        tracing::warn!(%peer, error = %e, "bad HTTP request on the agents' port, connection closed");
                    }
                }
            });
        }
        async {}
    })
    .await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn is_tunnel_request(req: &Request<Incoming>) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has(header::UPGRADE, "websocket") && has(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
}

fn handle<S: ClusterStore>(
    mut req: Request<Incoming>,
    endpoint: Arc<Endpoint<S>>,
    peer: String,
    slot: Slot,
) -> Response<Full<Bytes>> {
    if is_tunnel_request(&req) {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let user_agent = user_agent_of(req.headers());
        let permit = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        tokio::spawn(async move {
            let io = match upgrade.await {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "websocket upgrade failed");
                    return;
                }
            };
            // The socket itself, not hyper's upgraded wrapper around it: the
            // tunnel's every read and write skips two adapters, a `dyn` call
            // and a check for bytes hyper read ahead (those come first here).
            let parts = match io.downcast::<TokioIo<TunnelSocket>>() {
                Ok(parts) => parts,
                Err(_) => {
                    tracing::error!(%peer, "websocket upgrade of an unexpected connection type: closed");
                    return;
                }
            };
            let ws = WsStream::from_upgraded(parts.io.into_inner(), Role::Server)
                .await
                .read_ahead(&parts.read_buf);
            let peer = Peer {
                addr: peer,
                user_agent,
            };
            tunnel_session(ws, endpoint, peer, permit).await;
        });
        let mut resp = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
        let headers = resp.headers_mut();
        headers.remove(header::CONTENT_TYPE);
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        // Tower does not echo it; RFC 6455 clients want it. Go accepts both.
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
        return resp;
    }
    match req.uri().path() {
        "/health" | "/healthz" => text(StatusCode::OK, "OK\n"),
        "/readyz" if endpoint.ready.load(std::sync::atomic::Ordering::Relaxed) => {
            text(StatusCode::OK, "ok\n")
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the Cluster cache is not synced yet\n",
        ),
        "/version" => text(StatusCode::OK, format!("{}\n", env!("CARGO_PKG_VERSION"))),
        "/metrics" => {
            let stats = endpoint.gate.registry().stats();
            let mut resp = text(StatusCode::OK, render(&endpoint.metrics, &stats));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

/// The agent's User-Agent, cut to a sane length (it ends up in the status).
fn user_agent_of(headers: &header::HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(200).collect())
        .unwrap_or_default()
}

async fn tunnel_session<S, T>(
    ws: WsStream<T>,
    endpoint: Arc<Endpoint<S>>,
    peer_info: Peer,
    permit: Option<Permit>,
) where
    S: ClusterStore,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = peer_info.addr.clone();
    let (config, gate) = (endpoint.ssh.config(), endpoint.gate.clone());
    match serve_holding(ws, config, gate, peer_info, permit).await {
        Ok(()) => tracing::info!(%peer, "tunnel closed"),
        Err(ServeError::Rejected(reason)) => {
            tracing::warn!(%peer, %reason, "agent rejected");
        }
        Err(e @ ServeError::ConfigTimeout(_)) => {
            endpoint.pending.refused(DOOR, Refusal::HandshakeTimeout);
            tracing::warn!(%peer, error = %e, "tunnel ended: the agent did not finish its SSH handshake and config in time, connection closed");
        }
        Err(e @ ServeError::Handshake(_)) => {
            endpoint.pending.refused(DOOR, Refusal::BadHandshake);
            tracing::warn!(%peer, error = %e, "tunnel ended");
        }
        Err(e) => tracing::warn!(%peer, error = %e, "tunnel ended"),
    }
}
