//! The path form (`--access-port`): one HTTPS port of the proxy's own serves
//! every cluster at `/clusters/<name>/...` ([`path`]), so a deployment with
//! thousands of clusters needs neither a port nor a Service per cluster
//! (`--cluster-ports none`; the kubeconfigs in the Clusters then point here).
//!
//! One request, in order: the client's certificate (of the proxy CA, required
//! in the handshake) must open the cluster in the path, exactly as on that
//! cluster's own port ([`crate::serve::admit`]); the cluster must be one the
//! proxy serves; the request then goes to the member with the cluster prefix
//! taken off, through that cluster's [`Proxy`](crate::serve::listener::forward::Proxy)
//! ([`proxies`]): watches, `logs -f` and upgrades (exec, attach,
//! port-forward) as on the cluster's port. Audit records name the door `path`.
//!
//! With several replicas, a request reaching a replica without the cluster's
//! agent is answered 503 naming the replica that has it: unlike a cluster's
//! port, this port does not relay (a connection carries requests for any
//! cluster, so it cannot be handed over whole).

pub mod path;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::path::route;
use super::admit::{Client, handshake};
use super::connect::Known;
use super::listener::status::{Body, status};
use super::listener::tls::own_port_tls;
use super::listener::{MAX_HTTP_BUFFER, REQUEST_HEADER_TIMEOUT, Shared};
use super::proxies::Proxies;
use crate::identity::ca::Ca;
use crate::ops::accept::accept_loop;
use crate::ops::audit::{Caller, Record};
use crate::ops::uploads::Source;

/// The audit records' door for requests through the path form.
pub const DOOR: &str = "path";

/// `--access-port` and the names its certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub port: u16,
    /// Besides loopback and `--host`: `--advertise-address` and the host of
    /// `--publish-service-address`, the addresses kubeconfigs may use.
    pub names: Vec<String>,
}

/// Why the access port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--access-port needs the proxy CA: give --ca-cert and --ca-key")]
    NoCa,
    #[error("cannot listen on {0} (--access-port): {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("the access port's certificate: {0}")]
    Cert(String),
}

/// The access port's request handling.
pub struct Access {
    shared: Shared,
    /// Clusters the proxy serves (they have a token).
    known: Known,
    proxies: Arc<Proxies>,
}

impl Access {
    pub fn new(shared: Shared, known: Known, stop: &CancellationToken) -> Self {
        let proxies = Arc::new(Proxies::new(DOOR, shared.clone(), stop.child_token()));
        Self {
            shared,
            known,
            proxies,
        }
    }

    /// Listen on `options.port` at `bind` (bound when this returns) and serve
    /// until `stop`; live connections end with their requests.
    pub async fn open(
        self: Arc<Self>,
        options: &Options,
        bind: IpAddr,
        ca: Option<&Arc<Ca>>,
        stop: &CancellationToken,
    ) -> Result<SocketAddr, OpenError> {
        let ca = ca.ok_or(OpenError::NoCa)?;
        let tls = own_port_tls(ca, bind, options.names.iter().cloned(), "access", stop)
            .map_err(OpenError::Cert)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let addr = SocketAddr::new(bind, options.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| OpenError::Listen(addr, e))?;
        let local = listener.local_addr().unwrap_or(addr);
        tracing::info!(addr = %local, "access port listening (path form, mutual TLS)");
        let registry = self.shared.dialer.registry().clone();
        tokio::spawn(
            self.proxies
                .clone()
                .sweep_on_changes(registry, stop.clone()),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            accept_loop(listener, "access", stop, |tcp, peer| {
                // The caps on pending TLS handshakes, checked here: a
                // connection over them is closed before it costs a task.
                let pending = self.shared.pending.clone();
                let Some(slot) = pending.enter(peer.ip(), "access") else {
                    return std::future::ready(());
                };
                let (access, acceptor) = (self.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Some(tls) =
                        handshake(Some(slot), &acceptor, tcp, peer, "access", &pending, "access")
                            .await
                    else {
                        return;
                    };
                    let client = Client::of(&tls);
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(Source(peer.ip()));
                        let (access, client) = (access.clone(), client.clone());
                        async move { Ok::<_, Infallible>(access.handle(req, &client).await) }
                    });
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(TokioTimer::new())
                        .header_read_timeout(REQUEST_HEADER_TIMEOUT)
                        .max_buf_size(MAX_HTTP_BUFFER);
                    let served = http
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "access port: connection ended with an error");
                    }
                });
                std::future::ready(())
            })
            .await;
            tracing::info!("access port closed");
        });
        Ok(local)
    }

    /// One request: routed, checked, forwarded.
    async fn handle(&self, mut req: Request<Incoming>, client: &Client) -> Response<Body> {
        let (cluster, rest) = match route(req.uri().path(), req.uri().query()) {
            Ok(routed) => (routed.cluster.to_string(), routed.rest),
            Err(why) => {
                let resp = status(StatusCode::NOT_FOUND, &why);
                return self.answered(&req, client.named(), "", resp, why);
            }
        };
        let caller = match client.opens(&cluster) {
            Ok(caller) => caller,
            Err(why) => {
                tracing::info!(%cluster, reason = %why, "path form: refused a client certificate of another cluster");
                return client.refuse(&self.shared.audit, DOOR, &cluster, &req, &why);
            }
        };
        if !(self.known)(&cluster) {
            let why = format!(
                "cluster {cluster:?} is not served by this proxy: no Cluster of that name with \
                 a token (check `kubectl get cluster {cluster}` on the host)"
            );
            let resp = status(StatusCode::NOT_FOUND, &why);
            return self.answered(&req, caller, &cluster, resp, why);
        }
        if let Some(replica) = self.elsewhere(&cluster) {
            let why = format!(
                "the agent of cluster {cluster:?} is connected to proxy replica {replica}, not \
                 to this one, and the path form does not relay between replicas: retry (a new \
                 connection may reach {replica}), or use the cluster's own port"
            );
            let resp = status(StatusCode::SERVICE_UNAVAILABLE, &why);
            return self.answered(&req, caller, &cluster, resp, why);
        }
        *req.uri_mut() = match Uri::try_from(rest) {
            Ok(uri) => uri,
            Err(e) => {
                let why = format!("bad request path: {e}");
                let resp = status(StatusCode::BAD_REQUEST, &why);
                return self.answered(&req, caller, &cluster, resp, why);
            }
        };
        self.proxies.get(&cluster).handle(req, &caller).await
    }

    /// HA: the replica holding `cluster`'s agent, when this one has none.
    fn elsewhere(&self, cluster: &str) -> Option<String> {
        let relay = self.shared.relay.as_ref()?;
        if self.shared.dialer.registry().live(cluster) > 0 {
            return None;
        }
        relay.target(cluster, 0)
    }

    /// `resp`, a request the door answered itself, audited with `why`.
    fn answered(
        &self,
        req: &Request<Incoming>,
        caller: Caller,
        cluster: &str,
        resp: Response<Body>,
        why: String,
    ) -> Response<Body> {
        let record = Record::http(DOOR, cluster, caller, req.uri(), req.method().as_str());
        self.shared
            .audit
            .log(record.answered(resp.status().as_u16(), why));
        resp
    }
}
