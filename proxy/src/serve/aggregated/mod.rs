//! The aggregated API (`--aggregated-api-port`): the host kube-apiserver
//! fronts this port under `/apis/tower.kubesphere.io/v1alpha1`, so a person
//! reaches member `alpha` with the HOST's kubeconfig at
//! `https://HOST/apis/tower.kubesphere.io/v1alpha1/clusters/alpha/proxy`, the
//! host authenticates them, the host's RBAC on `clusters/proxy` decides, and
//! the member sees them (impersonated), not the agent. No per-cluster port,
//! Service or kubeconfig is involved.
//!
//! In the order a request meets them: the registration that makes the host
//! route here ([`apiservice`]); TLS with a serving certificate from the proxy
//! CA for `<service>.<namespace>.svc` and client certificates checked
//! against the host's front-proxy CA ([`trust`]); the caller from the
//! headers the front proxy vouches for ([`identity`]); discovery
//! ([`discovery`]); the host's verdict ([`authorize`]); the member's handler
//! ([`members`]); all tied together in [`handler`].

pub mod apiservice;
pub mod authorize;
pub mod discovery;
pub mod handler;
pub mod identity;
pub mod trust;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::handler::{Handler, Lookup};
use self::trust::Trust;
use super::proxies::Proxies;
use crate::identity::ca::{Ca, peer_common_name};
use crate::ops::accept::accept_loop;
use crate::ops::uploads::Source;
use crate::serve::admit::handshake;
use crate::serve::listener::Shared;
use crate::serve::listener::tls::{OWN_PORT_CERT_VALIDITY, Resolver, ServerCert, keep_renewed};

pub const GROUP: &str = "tower.kubesphere.io";
pub const VERSION: &str = "v1alpha1";
pub const GROUP_VERSION: &str = "tower.kubesphere.io/v1alpha1";

/// `--aggregated-api-port` and `--aggregated-api-service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub port: u16,
    /// The Service the APIService points at (the proxy's pods behind it).
    pub namespace: String,
    pub service: String,
}

impl Options {
    /// The names the aggregator verifies our certificate for.
    fn sans(&self) -> Vec<String> {
        let (s, ns) = (&self.service, &self.namespace);
        vec![
            format!("{s}.{ns}.svc"),
            format!("{s}.{ns}.svc.cluster.local"),
        ]
    }
}

/// Parse `--aggregated-api-service NAMESPACE/NAME`.
pub fn parse_service(value: &str) -> Result<(String, String), String> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!(
            "{value:?} is not NAMESPACE/NAME, e.g. kubesphere-system/tower-api"
        )),
    }
}

/// Bind the port, then serve it, keep the front-proxy trust current and
/// register the APIService, until `stop`.
pub async fn start(
    options: &Options,
    bind: std::net::IpAddr,
    client: kube::Client,
    ca: &Arc<Ca>,
    shared: Shared,
    clusters: Lookup,
    stop: CancellationToken,
) -> io::Result<()> {
    let issued = ca
        .issue_server(&options.sans(), OWN_PORT_CERT_VALIDITY)
        .map_err(io::Error::other)?;
    let cert = ServerCert::new(issued).map_err(io::Error::other)?;
    let renew = tokio::spawn(keep_renewed(
        cert.clone(),
        ca.clone(),
        options.sans(),
        "aggregated API",
    ));
    let addr = SocketAddr::new(bind, options.port);
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, service = %format!("{}/{}", options.namespace, options.service),
        "aggregated API listening");
    let current = trust::Current::default();
    let watch = tokio::spawn(trust::watch(client.clone(), current.clone()));
    let register = tokio::spawn(apiservice::follow(
        client.clone(),
        options.namespace.clone(),
        options.service.clone(),
        (**ca).clone(),
    ));
    let shared_pending = shared.pending.clone();
    let handler = Arc::new(Handler {
        client,
        audit: shared.audit.clone(),
        members: Proxies::new(handler::DOOR, shared, stop.child_token()),
        clusters,
    });
    let tls = Arc::new(Tls {
        pending: shared_pending,
        cert,
        current,
        cached: Mutex::default(),
    });
    tokio::spawn(async move {
        accept_loop(listener, "aggregated API", stop.clone(), |tcp, peer| {
            // The caps on pending TLS handshakes, checked here: a connection
            // over them is closed before it costs a task.
            if let Some(slot) = tls.pending.enter_unrated(peer.ip(), "aggregated") {
                let (tls, handler, stop) = (tls.clone(), handler.clone(), stop.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = serve(tcp, peer, slot, tls, handler) => {}
                    }
                });
            }
            async {}
        })
        .await;
        watch.abort();
        register.abort();
        renew.abort();
        tracing::info!("aggregated API closed");
    });
    Ok(())
}

/// The serving certificate and the TLS set-up for the current trust.
struct Tls {
    /// The caps on client TLS handshakes in progress.
    pending: Arc<crate::ops::pending::Pending>,
    cert: ServerCert,
    current: trust::Current,
    /// The config built for the trust it was built for.
    cached: Mutex<Option<(Arc<Trust>, Arc<ServerConfig>)>>,
}

impl Tls {
    /// The trust now, and a TLS config that verifies (but does not require:
    /// a request without one gets a 401 that says why) client certificates
    /// of its front-proxy CA.
    fn config(&self) -> Result<(Option<Arc<Trust>>, Arc<ServerConfig>), rustls::Error> {
        let trust = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(t), Some((ct, config))) = (&trust, cached.as_ref())
            && Arc::ptr_eq(t, ct)
        {
            return Ok((trust, config.clone()));
        }
        let provider = crate::serve::suites::provider();
        let verifier = match &trust {
            Some(t) => WebPkiClientVerifier::builder_with_provider(
                Arc::new(t.root_store()?),
                provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?,
            None => WebPkiClientVerifier::no_client_auth(),
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.cert.clone())));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.ignore_client_order = true;
        let config = Arc::new(config);
        if let Some(t) = &trust {
            *cached = Some((t.clone(), config.clone()));
        }
        Ok((trust, config))
    }
}

/// `slot`: the pending-handshake slot taken at accept.
async fn serve(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: crate::ops::pending::Permit,
    tls: Arc<Tls>,
    handler: Arc<Handler>,
) {
    let (trust, config) = match tls.config() {
        Ok(both) => both,
        Err(e) => {
            tracing::warn!(error = %e, "aggregated API: unusable front-proxy CA");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(config);
    let Some(stream) = handshake(
        Some(slot),
        &acceptor,
        tcp,
        peer,
        "aggregated API",
        &tls.pending,
        "aggregated",
    )
    .await
    else {
        return;
    };
    let cn = peer_common_name(stream.get_ref().1);
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(Source(peer.ip()));
        let (handler, trust, cn) = (handler.clone(), trust.clone(), cn.clone());
        async move { Ok::<_, Infallible>(handler.handle(req, trust, cn).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // Without it an idle connection was held for ever (tests/adversarial).
    http.timer(TokioTimer::new())
        .header_read_timeout(crate::serve::listener::REQUEST_HEADER_TIMEOUT)
        .max_buf_size(crate::serve::listener::MAX_HTTP_BUFFER);
    if let Err(e) = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "aggregated API connection ended with an error");
    }
}
