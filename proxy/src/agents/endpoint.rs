//! The agents' endpoint: one HTTP/1.1 port (`--host`, `--port`) that upgrades
//! websocket requests carrying the `kubesphere-v1` subprotocol into tunnels and
//! answers `/health`, `/version` and `/metrics`; anything else is 404. There is
//! no path routing, as in Tower.

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
use tunnel::server::serve;
use tunnel::wire::SUBPROTOCOL;
use tunnel::ws::WsStream;

use crate::registry::{ClusterStore, Registry};

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler needs.
pub struct Endpoint<S: ClusterStore> {
    pub registry: Registry<S>,
    pub ssh: Arc<russh::server::Config>,
    /// Set once the proxy can admit agents (the Cluster cache is synced).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

/// Accept connections until `shutdown` resolves.
pub async fn run<S: ClusterStore>(
    listener: TcpListener,
    endpoint: Arc<Endpoint<S>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = tcp.set_nodelay(true);
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(handle(req, endpoint, peer.to_string())) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::warn!(%peer, error = %e, "bad HTTP request on the agents' port, connection closed");
            }
        });
    }
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
) -> Response<Full<Bytes>> {
    if is_tunnel_request(&req) {
        let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let user_agent = req.headers().get(header::USER_AGENT).cloned();
        tokio::spawn(async move {
            let io = match upgrade.await {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "websocket upgrade failed");
                    return;
                }
            };
            let ws = WsStream::from_upgraded(TokioIo::new(io), Role::Server).await;
            crate::member_info::remember_user_agent(&peer, user_agent.as_ref());
            tunnel_session(ws, endpoint, peer.clone()).await;
            crate::member_info::forget_user_agent(&peer);
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
            let mut resp = text(StatusCode::OK, crate::metrics::render(&endpoint.registry));
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

async fn tunnel_session<S, T>(ws: WsStream<T>, endpoint: Arc<Endpoint<S>>, peer: String)
where
    S: ClusterStore,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let admission = Arc::new(endpoint.registry.clone());
    match serve(ws, endpoint.ssh.clone(), admission, peer.clone()).await {
        Ok(()) => tracing::info!(%peer, "tunnel closed"),
        Err(tunnel::server::ServeError::Rejected(reason)) => {
            tracing::warn!(%peer, %reason, "agent rejected");
        }
        Err(e) => tracing::warn!(%peer, error = %e, "tunnel ended"),
    }
}
