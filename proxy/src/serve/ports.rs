//! The per-cluster ports as the controller sees them: for each connected
//! cluster, an HTTPS port for its kube-apiserver and an HTTP port for its
//! ks-apiserver ([`super::listener`]). Opening an open cluster again only
//! re-issues the serving certificate when its names changed or it nears expiry.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Mutex;

use super::listener::tls::ServerCert;
use super::listener::{ClusterListener, Io, Shared};
use crate::identity::ca::Ca;
use crate::member::Target;

/// Serving certificates live this long and are renewed a month before.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const SERVER_CERT_RENEW: Duration = Duration::from_secs(30 * 24 * 3600);

struct Open {
    ports: (u16, u16),
    sans: Vec<String>,
    /// The CA rotation step (`Ca::generation`) `cert` was issued in.
    generation: u64,
    cert: ServerCert,
    kube: ClusterListener,
    ks: ClusterListener,
}

/// Opens and closes a cluster's ports (kube API over HTTPS, ks-apiserver over
/// HTTP). Implemented by [`ListenerPorts`]; the controller's seam (a fake in tests).
pub trait Ports: Send + Sync + 'static {
    /// Make sure both ports listen, with a serving certificate for `sans`.
    fn open(
        &self,
        cluster: &str,
        kube_port: u16,
        ks_port: u16,
        sans: &[String],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Close both ports at once.
    fn close(&self, cluster: &str) -> impl Future<Output = ()> + Send;
}

/// All clusters' listeners.
pub struct ListenerPorts {
    ca: Arc<Ca>,
    bind: IpAddr,
    shared: Shared,
    open: Mutex<HashMap<String, Open>>,
}

impl ListenerPorts {
    pub fn new(ca: Arc<Ca>, bind: IpAddr, shared: Shared) -> Self {
        Self {
            ca,
            bind,
            shared,
            open: Mutex::default(),
        }
    }

    /// Serve a connection a peer replica relayed for `cluster`'s port of
    /// `kind`; false when that port is not open here.
    pub async fn serve_relayed(
        &self,
        cluster: &str,
        kind: Target,
        io: Box<dyn Io>,
        peer: SocketAddr,
    ) -> bool {
        let open = self.open.lock().await;
        let Some(ports) = open.get(cluster) else {
            return false;
        };
        match kind {
            Target::KubeApiserver => ports.kube.serve_relayed(io, peer),
            Target::KsApiserver => ports.ks.serve_relayed(io, peer),
        }
        true
    }

    /// A serving certificate for `sans`, its expiry in /metrics.
    fn issue(&self, cluster: &str, sans: &[String]) -> Result<crate::identity::ca::Issued, String> {
        let issued = self
            .ca
            .issue_server(sans, SERVER_CERT_VALIDITY)
            .map_err(|e| format!("cannot issue the listener certificate: {e}"))?;
        self.shared
            .metrics
            .set_cert_expiry(cluster, "serving", issued.not_after);
        Ok(issued)
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
        let mut open = self.open.lock().await;
        if let Some(current) = open.get_mut(cluster) {
            if current.ports == (kube_port, ks_port) {
                let expiring = current.cert.not_after() < SystemTime::now() + SERVER_CERT_RENEW;
                // A CA rotation step: the CA signing serving certificates
                // may have changed.
                let generation = self.ca.generation();
                if current.sans != sans || expiring || current.generation != generation {
                    let issued = self.issue(cluster, sans)?;
                    current.cert.set(issued).map_err(|e| e.to_string())?;
                    current.generation = generation;
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
        let generation = self.ca.generation();
        let cert = ServerCert::new(self.issue(cluster, sans)?)
            .map_err(|e| format!("unusable listener certificate: {e}"))?;
        let bind = |port| SocketAddr::new(self.bind, port);
        let kube = ClusterListener::start(
            cluster.to_string(),
            bind(kube_port),
            &self.shared,
            &self.ca,
            cert.clone(),
        )
        .await
        .map_err(|e| format!("cannot listen on port {kube_port} for {cluster}: {e}"))?;
        let ks =
            ClusterListener::start_kubesphere(cluster.to_string(), bind(ks_port), &self.shared)
                .await
                .map_err(|e| format!("cannot listen on port {ks_port} for {cluster}: {e}"))?;
        open.insert(
            cluster.to_string(),
            Open {
                ports: (kube_port, ks_port),
                sans: sans.to_vec(),
                generation,
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
