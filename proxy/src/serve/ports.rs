//! The per-cluster ports as the controller sees them: for each connected
//! cluster, an HTTPS port for its kube-apiserver and an HTTP port for its
//! ks-apiserver ([`crate::listener`]). Opening an open cluster again only
//! re-issues the serving certificate when its names changed or it nears expiry.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;

use crate::ca::Ca;
use crate::controller::{CrStore, Ports};
use crate::listener::{ClusterListener, Io, Relay, ServerCert};
use crate::registry::{Registry, Upstream};

/// Serving certificates live this long and are renewed a month before.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const SERVER_CERT_RENEW: Duration = Duration::from_secs(30 * 24 * 3600);

struct Open {
    ports: (u16, u16),
    sans: Vec<String>,
    cert: ServerCert,
    kube: ClusterListener,
    ks: ClusterListener,
}

/// All clusters' listeners.
pub struct ListenerPorts {
    ca: Arc<Ca>,
    bind: IpAddr,
    /// Set once the registry exists (it needs the controller, which needs us).
    pub registry: OnceLock<Registry<CrStore>>,
    /// HA: connections for clusters another replica serves go there.
    pub relay: OnceLock<Arc<dyn Relay>>,
    open: Mutex<HashMap<String, Open>>,
}

impl ListenerPorts {
    pub fn new(ca: Arc<Ca>, bind: IpAddr) -> Self {
        Self {
            ca,
            bind,
            registry: OnceLock::new(),
            relay: OnceLock::new(),
            open: Mutex::default(),
        }
    }

    /// Serve a connection a peer replica relayed for `cluster`'s port of
    /// `kind`; false when that port is not open here.
    pub async fn serve_relayed(
        &self,
        cluster: &str,
        kind: Upstream,
        io: Box<dyn Io>,
        peer: SocketAddr,
    ) -> bool {
        let open = self.open.lock().await;
        let Some(ports) = open.get(cluster) else {
            return false;
        };
        match kind {
            Upstream::Kubernetes => ports.kube.serve_relayed(io, peer),
            Upstream::KubeSphere => ports.ks.serve_relayed(io, peer),
        }
        true
    }

    fn issue(&self, sans: &[String]) -> Result<ServerCert, String> {
        let issued = self
            .ca
            .issue_server(sans, SERVER_CERT_VALIDITY)
            .map_err(|e| format!("cannot issue the listener certificate: {e}"))?;
        ServerCert::new(issued).map_err(|e| format!("unusable listener certificate: {e}"))
    }
}

impl Ports for ListenerPorts {
    async fn open(
        &self,
        cluster: &str,
        kube_port: u16,
        ks_port: u16,
        sans: &[String],
    ) -> Result<(), String> {
        let registry = self
            .registry
            .get()
            .ok_or_else(|| "the proxy is still starting, retry shortly".to_string())?
            .clone();
        let mut open = self.open.lock().await;
        if let Some(current) = open.get_mut(cluster) {
            if current.ports == (kube_port, ks_port) {
                let expiring = current.cert.not_after() < SystemTime::now() + SERVER_CERT_RENEW;
                if current.sans != sans || expiring {
                    let issued = self
                        .ca
                        .issue_server(sans, SERVER_CERT_VALIDITY)
                        .map_err(|e| format!("cannot issue the listener certificate: {e}"))?;
                    let not_after = issued.not_after;
                    current.cert.set(issued).map_err(|e| e.to_string())?;
                    crate::metrics::METRICS.set_cert_expiry(cluster, "serving", not_after);
                    current.sans = sans.to_vec();
                    tracing::info!(%cluster, ?sans, "listener certificate re-issued");
                }
                return Ok(());
            }
            // The ports moved: close the old ones first.
            if let Some(old) = open.remove(cluster) {
                old.kube.shutdown().await;
                old.ks.shutdown().await;
            }
        }
        let cert = self.issue(sans)?;
        crate::metrics::METRICS.set_cert_expiry(cluster, "serving", cert.not_after());
        let bind = |port| SocketAddr::new(self.bind, port);
        let kube = ClusterListener::start(
            cluster.to_string(),
            bind(kube_port),
            registry.clone(),
            self.ca.clone(),
            cert.clone(),
            self.relay.get().cloned(),
        )
        .await
        .map_err(|e| format!("cannot listen on port {kube_port} for {cluster}: {e}"))?;
        let ks = ClusterListener::start_kubesphere(
            cluster.to_string(),
            bind(ks_port),
            registry,
            self.relay.get().cloned(),
        )
        .await
        .map_err(|e| format!("cannot listen on port {ks_port} for {cluster}: {e}"))?;
        open.insert(
            cluster.to_string(),
            Open {
                ports: (kube_port, ks_port),
                sans: sans.to_vec(),
                cert,
                kube,
                ks,
            },
        );
        Ok(())
    }

    async fn close(&self, cluster: &str) {
        let closed = self.open.lock().await.remove(cluster);
        if let Some(old) = closed {
            old.kube.shutdown().await;
            old.ks.shutdown().await;
            tracing::info!(%cluster, "cluster ports closed");
        }
    }
}
