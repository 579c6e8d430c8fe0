//! HTTP forwarding and upgrades: each request goes to the member as the
//! agent (the client's `Authorization` is replaced by the agent's credentials
//! on the kube-apiserver port, passed through on the ks-apiserver port),
//! hop-by-hop headers removed, bodies streamed both ways (watches, `logs -f`
//! and large lists are never held whole). Upgrades (exec, attach,
//! port-forward: SPDY or websocket) are forwarded and, once the member
//! answers 101, joined byte for byte. Only the response headers have a
//! deadline; a live stream is never cut.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::impersonate;
use super::status::{Body, empty, explain, status};
use super::upstream::{Connector, Pool, Routes};
use crate::member::{MemberDialer, Target};
use crate::ops::audit::{Audit, Caller, Counting, Pending, Record};
use crate::ops::in_flight::{Entered, InFlight};
use crate::ops::metrics::Metrics;
use crate::ops::uploads::{Flow, Paced, Pacer, Source, Waited};

/// How long the member may take to answer with response headers. Watches and
/// `logs -f` answer headers at once; their bodies and upgraded streams have no
/// deadline at all.
pub const RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// One cluster's request handler, behind its port or the path form.
pub struct Proxy {
    pub cluster: String,
    pub target: Target,
    /// The front door in audit records: `port`, or `path` ([`crate::serve::access`]).
    pub door: &'static str,
    pub dialer: MemberDialer,
    pub routes: Arc<Routes>,
    pub client: Pool,
    pub cancel: CancellationToken,
    pub response_header_timeout: Duration,
    pub in_flight: InFlight,
    pub metrics: Arc<Metrics>,
    pub audit: Audit,
    /// The caps on client TLS handshakes in progress.
    pub pending: Arc<crate::ops::pending::Pending>,
    /// Each client's request-body rate; `None`: not paced.
    pub uploads: Option<Arc<Pacer>>,
}

/// Where a paced request body's waits are counted: the cluster's
/// `tower_request_body_paced_seconds_total`.
pub struct PaceWaits {
    metrics: Arc<Metrics>,
    cluster: String,
}

impl Waited for PaceWaits {
    fn waited(&mut self, time: Duration) {
        self.metrics.paced(&self.cluster, time);
    }
}

/// A body whose data bytes are added to a [`Tally`] as they pass: the
/// request body on its way to the member, the response body to the client.
pub struct Metered<B, T> {
    inner: B,
    tally: T,
}

/// Where a [`Metered`] body's bytes go.
pub trait Tally: Unpin {
    fn add(&mut self, bytes: u64);
}

/// The request's bytes, read by the audit record that shares it.
impl Tally for Arc<AtomicU64> {
    fn add(&mut self, bytes: u64) {
        self.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A response keeps its request counted in flight until its body ends, then
/// writes its audit record (dropped: the body ended or the client left).
struct Answered {
    _in_flight: Entered,
    sent: u64,
    audit: Pending,
}

impl Tally for Answered {
    fn add(&mut self, bytes: u64) {
        self.sent += bytes;
    }
}

impl Drop for Answered {
    fn drop(&mut self) {
        if let Some(record) = self.audit.record() {
            record.bytes_out += self.sent;
        }
    }
}

/// The request body as the connection pool sends it.
pub type Tallied = Metered<Paced<Incoming, Option<PaceWaits>>, Arc<AtomicU64>>;

impl<B, T> Metered<B, T> {
    fn new(inner: B, tally: T) -> Self {
        Self { inner, tally }
    }
}

impl<B, T> hyper::body::Body for Metered<B, T>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
    T: Tally,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let bytes = data.len() as u64;
            self.tally.add(bytes);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Proxy {
    /// The handler of `cluster`'s `target` behind `door`, with its own
    /// connection pool; `cancel` ends its upgraded streams.
    pub fn new(
        cluster: &str,
        target: Target,
        door: &'static str,
        shared: &Shared,
        cancel: CancellationToken,
    ) -> Self {
        let routes = Arc::new(Routes::default());
        let client = Connector {
            cluster: cluster.to_string(),
            target,
            dialer: shared.dialer.clone(),
            routes: routes.clone(),
        }
        .pool();
        Self {
            cluster: cluster.to_string(),
            target,
            door,
            dialer: shared.dialer.clone(),
            routes,
            client,
            cancel,
            response_header_timeout: RESPONSE_HEADER_TIMEOUT,
            in_flight: shared.in_flight.clone(),
            metrics: shared.metrics.clone(),
            pending: shared.pending.clone(),
            audit: shared.audit.clone(),
            uploads: shared.uploads.clone(),
        }
    }

    /// [`Self::forward`], timed to response headers for /metrics, audited
    /// when the response body (or the upgraded stream) ends.
    pub async fn handle(&self, req: Request<Incoming>, caller: &Caller) -> Response<Body> {
        let in_flight = self.in_flight.enter();
        let started = std::time::Instant::now();
        let mut audit = self.audit.begin(|| {
            Record::http(
                self.door,
                &self.cluster,
                caller.clone(),
                req.uri(),
                req.method().as_str(),
            )
            .from(req.extensions().get::<Source>().map(|s| s.0))
        });
        let resp = self.forward(req, caller, &mut audit).await;
        self.metrics
            .observe_request(&self.cluster, started.elapsed());
        if let Some(record) = audit.record() {
            record.status = resp.status().as_u16();
        }
        resp.map(|inner| {
            let answered = Answered {
                _in_flight: in_flight,
                sent: 0,
                audit,
            };
            Metered::new(inner, answered).boxed()
        })
    }

    /// `body` paced as its client's (`source`, `caller`), when the proxy
    /// paces request bodies and the door said where the request came from.
    fn paced(
        &self,
        body: Incoming,
        source: Option<Source>,
        caller: &Caller,
    ) -> Paced<Incoming, Option<PaceWaits>> {
        let Some((pacer, Source(source))) = self.uploads.clone().zip(source) else {
            return Paced::new(body, None, None);
        };
        let flow = Flow {
            source,
            user: caller.user.as_str().into(),
        };
        let waits = PaceWaits {
            metrics: self.metrics.clone(),
            cluster: self.cluster.clone(),
        };
        Paced::new(body, Some((pacer, flow)), Some(waits))
    }

    /// `audit` is taken over by an upgraded stream, to be written when it ends.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        caller: &Caller,
        audit: &mut Pending,
    ) -> Response<Body> {
        let cluster = &self.cluster;
        let Some(session) = self.dialer.pick(cluster) else {
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no agent of cluster {cluster:?} is connected to the proxy"),
            );
        };
        let access = match self.dialer.access(&session, cluster, self.target) {
            Ok(access) => access,
            Err(why) => return status(StatusCode::BAD_GATEWAY, &why),
        };
        let host = self.routes.host_for(session);

        let upgrade = upgrade_of(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let (mut parts, body) = req.into_parts();
        let source = parts.extensions.get::<Source>().copied();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
        }
        if self.target == Target::KubeApiserver {
            // The member sees the agent's identity, never the client's credentials.
            parts.headers.remove(header::AUTHORIZATION);
            if let Some(auth) = &access.authorization {
                parts.headers.insert(header::AUTHORIZATION, auth.clone());
            }
            if caller.impersonated
                && let Err(why) = impersonate::apply(&mut parts.headers, caller)
            {
                return status(StatusCode::BAD_REQUEST, &why);
            }
        }
        if let Ok(value) = HeaderValue::from_str(&access.address) {
            parts.headers.insert(header::HOST, value);
        }
        let scheme = if access.tls.is_some() {
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
        drop(access);

        let body = Metered::new(self.paced(body, source, caller), audit.bytes_in.clone());
        let sent = self.client.request(Request::from_parts(parts, body));
        let mut resp = match tokio::time::timeout(self.response_header_timeout, sent).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let failure = explain(cluster, self.target.what(), &e);
                tracing::warn!(%cluster, %method, %path, status = failure.code.as_u16(),
                    error = %failure.message, "request to the member failed");
                return failure.response();
            }
            Err(_) => {
                let message = format!(
                    "the member {} of cluster {cluster:?} sent no response headers within {:?}",
                    self.target.what(),
                    self.response_header_timeout
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
                        self.target.what()
                    ),
                );
            };
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let cancel = self.cancel.clone();
            let cluster = cluster.clone();
            let in_flight = self.in_flight.enter();
            let mut audit = std::mem::replace(audit, Pending::none());
            if let Some(record) = audit.record() {
                record.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
            }
            tokio::spawn(async move {
                let _in_flight = in_flight;
                let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok(both) => both,
                    Err(e) => {
                        tracing::warn!(%cluster, %path, error = %e, "upgrade failed");
                        if let Some(record) = audit.record() {
                            record.reason = Some("upgrade failed".into());
                        }
                        return;
                    }
                };
                let mut client = TokioIo::new(client);
                let mut upstream = TokioIo::new(upstream);
                // Counted as they pass: a stream cut by a closing port still
                // reports what went through.
                let mut client = Counting::new(&mut client);
                tokio::select! {
                    () = cancel.cancelled() => {}
                    copied = tunnel::copy::join(&mut client, &mut upstream) => {
                        if let Err(e) = copied {
                            tracing::debug!(%cluster, %path, error = %e, "upgraded stream ended");
                        }
                    }
                }
                if let Some(record) = audit.record() {
                    record.bytes_in += client.read;
                    record.bytes_out += client.written;
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

/// The `Upgrade` header of a request that asks for one (`Connection: upgrade`).
pub(super) fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
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
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
