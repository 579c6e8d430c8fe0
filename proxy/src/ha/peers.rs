//! The port replicas relay client connections through (HA, `--leader-elect`).
//!
//! A client connection for a cluster whose agent is on another replica
//! ([`super::owners`]) is relayed before any TLS: this replica opens a mutual
//! TLS connection to the other's peer port (both sides show a certificate of
//! the proxy CA with CN [`PEER_COMMON_NAME`]; the CA's other certificates are
//! refused), sends one line naming the cluster, the port kind and the
//! client's address, then copies bytes both ways. The serving replica counts,
//! paces and audits the connection by that address, as if the client had
//! connected there; a line without it (a replica of a version before) counts
//! as the relaying replica's. The client's own TLS, client certificate included, ends at
//! the serving replica's listener exactly as if it had connected there, so a
//! relay adds no trust and sees no plaintext.
//!
//! Anyone who reaches the peer port can connect to it, so it is a client's
//! door like the others: a slot of the clients' pending-handshake caps is
//! taken at accept, and the TLS handshake runs on the handshake threads
//! ([`crate::serve::admit::handshake`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tunnel::addr::host_of;

use super::owners::Owners;
use crate::identity::ca::{Ca, CaError, PEER_COMMON_NAME, common_name};
use crate::member::Target;
use crate::ops::accept::accept_loop;
use crate::ops::pending::{Pending, Permit};
use crate::serve::admit::handshake;
use crate::serve::listener::Relay;
use crate::serve::ports::ListenerPorts;

/// Peer certificates live this long; a replica issues its own at start and
/// at each CA rotation step.
const PEER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the other replica may take to name the cluster, once its TLS
/// handshake (10 s, [`crate::serve::admit::TLS_HANDSHAKE_TIMEOUT`]) is done.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PREFACE: u64 = 512;
/// The peer port, as logs and `tower_refused_connections_total{door}` name it.
const DOOR: &str = "peer";
const PREFACE_VERSION: &str = "TOWER-PEER/1";

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot issue the peer certificate: {0}")]
    Cert(#[from] CaError),
    #[error("peer TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("peer TLS: {0}")]
    Verifier(String),
}

/// This replica's side of the peer port: it relays out and accepts relays in.
pub struct Peers {
    owners: Arc<Owners>,
    ca: Ca,
    /// The names in this replica's certificate.
    sans: Vec<String>,
    /// Rebuilt at each CA rotation step: a certificate of the signer, the
    /// CAs trusted now.
    tls: std::sync::RwLock<PeerTls>,
    /// The clients' caps on pending handshakes, and where they run.
    pending: Arc<Pending>,
}

struct PeerTls {
    generation: u64,
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

fn kind_name(kind: Target) -> &'static str {
    match kind {
        Target::KubeApiserver => "kube",
        Target::KsApiserver => "ks",
    }
}

/// A fresh peer certificate and both sides' TLS, as `ca` stands now.
fn peer_tls(ca: &Ca, sans: &[String]) -> Result<PeerTls, PeerError> {
    let generation = ca.generation();
    let issued = ca.issue_peer(sans, PEER_CERT_VALIDITY)?;
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PeerError::Verifier(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| PeerError::Verifier(e.to_string()))?;
    // Relays carry client bytes: AES-128-GCM, as every door (crate::serve::suites).
    let provider = crate::serve::suites::provider();
    let mut roots = RootCertStore::empty();
    for der in ca.trusted() {
        roots.add(der)?;
    }
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| PeerError::Verifier(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.ignore_client_order = true;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(PeerTls {
        generation,
        connector: TlsConnector::from(Arc::new(client)),
        acceptor: TlsAcceptor::from(Arc::new(server)),
    })
}

impl Peers {
    /// `peer_address` is where the others reach this replica (`host:port`);
    /// its host goes into this replica's certificate. `pending`: the clients'
    /// pending-handshake caps, which the peer port shares.
    pub fn new(
        ca: &Ca,
        owners: Arc<Owners>,
        peer_address: &str,
        pending: Arc<Pending>,
    ) -> Result<Self, PeerError> {
        let sans = vec![host_of(peer_address).to_string()];
        let tls = peer_tls(ca, &sans)?;
        Ok(Self {
            owners,
            ca: ca.clone(),
            sans,
            tls: std::sync::RwLock::new(tls),
            pending,
        })
    }

    /// The TLS of the CA rotation step in force (rebuilt on the first use
    /// after a step; the previous one if that fails, with a warning).
    fn tls(&self) -> (TlsConnector, TlsAcceptor) {
        let generation = self.ca.generation();
        {
            let tls = self.tls.read().unwrap_or_else(|e| e.into_inner());
            if tls.generation == generation {
                return (tls.connector.clone(), tls.acceptor.clone());
            }
        }
        let mut tls = self.tls.write().unwrap_or_else(|e| e.into_inner());
        if tls.generation != generation {
            match peer_tls(&self.ca, &self.sans) {
                Ok(next) => {
                    *tls = next;
                    tracing::info!(
                        "peer port: certificate and trusted CAs of the CA rotation step"
                    );
                }
                Err(e) => {
                    // Not retried at every connection: until the next step.
                    tls.generation = generation;
                    tracing::warn!(error = %e, "peer port: cannot follow the CA rotation step, \
                        keeping the certificate in use");
                }
            }
        }
        (tls.connector.clone(), tls.acceptor.clone())
    }

    /// Accept relays from other replicas until `stop`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        ports: Arc<ListenerPorts>,
        stop: CancellationToken,
    ) {
        accept_loop(listener, DOOR, stop, |tcp, from| {
            // Over the caps: closed before it costs a task.
            if let Some(slot) = self.pending.enter_unrated(from.ip(), DOOR) {
                let (peers, ports) = (self.clone(), ports.clone());
                tokio::spawn(async move {
                    if let Err(e) = peers.accept(slot, tcp, from, &ports).await {
                        tracing::warn!(%from, error = %e, "peer port: relay refused");
                    }
                });
            }
            async {}
        })
        .await;
    }

    async fn accept(
        &self,
        slot: Permit,
        tcp: TcpStream,
        from: SocketAddr,
        ports: &ListenerPorts,
    ) -> Result<(), String> {
        let acceptor = self.tls().1;
        // A failed handshake is logged and counted there.
        let Some(tls) =
            handshake(Some(slot), &acceptor, tcp, from, DOOR, &self.pending, DOOR).await
        else {
            return Ok(());
        };
        let cn = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(common_name);
        if cn.as_deref() != Some(PEER_COMMON_NAME) {
            return Err(format!(
                "client certificate CN {cn:?} is not a proxy replica's ({PEER_COMMON_NAME})"
            ));
        }
        let mut reader = BufReader::new(tls);
        let mut line = String::new();
        let mut limited = (&mut reader).take(MAX_PREFACE);
        tokio::time::timeout(PREFACE_TIMEOUT, limited.read_line(&mut line))
            .await
            .map_err(|_| "no preface in time".to_string())?
            .map_err(|e| format!("reading the preface: {e}"))?;
        let mut words = line.split_whitespace();
        let (version, kind, cluster) = (words.next(), words.next(), words.next());
        let client = match words.next() {
            None => from,
            Some(addr) => addr
                .parse::<SocketAddr>()
                .map_err(|e| format!("client address {addr:?} in the preface: {e}"))?,
        };
        if version != Some(PREFACE_VERSION) {
            return Err(format!("unknown preface {line:?}"));
        }
        let kind = match kind {
            Some("kube") => Target::KubeApiserver,
            Some("ks") => Target::KsApiserver,
            _ => return Err(format!("unknown port kind in {line:?}")),
        };
        let cluster = cluster.ok_or_else(|| format!("no cluster in {line:?}"))?;
        // The reader may hold bytes of the client's TLS already: keep it.
        if !ports
            .serve_relayed(cluster, kind, Box::new(reader), client)
            .await
        {
            return Err(format!(
                "cluster {cluster} has no {} port here",
                kind_name(kind)
            ));
        }
        Ok(())
    }
}

/// A mutual-TLS connection to a peer replica's port, the preface sent for
/// `client`'s connection.
async fn connect(
    connector: &TlsConnector,
    target: &str,
    cluster: &str,
    kind: Target,
    client: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = ServerName::try_from(host_of(target).to_string())
        .map_err(|e| format!("peer address {target:?}: {e}"))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let preface = preface(kind, cluster, client);
    tls.write_all(preface.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls)
}

/// The line that opens a relay: version, port kind, cluster, the client's
/// address (a word the replicas of a version before ignore).
fn preface(kind: Target, cluster: &str, client: SocketAddr) -> String {
    format!("{PREFACE_VERSION} {} {cluster} {client}\n", kind_name(kind))
}

impl Relay for Peers {
    fn target(&self, cluster: &str, local_sessions: usize) -> Option<String> {
        self.owners.relay_target(cluster, local_sessions)
    }

    fn relay(
        &self,
        target: String,
        cluster: String,
        kind: Target,
        mut tcp: TcpStream,
    ) -> Pin<Box<dyn Future<Output = Option<TcpStream>> + Send>> {
        let connector = self.tls().0;
        Box::pin(async move {
            let client = match tcp.peer_addr() {
                Ok(client) => client,
                Err(e) => {
                    tracing::debug!(%cluster, error = %e, "relayed client already gone");
                    return None;
                }
            };
            let mut peer = match connect(&connector, &target, &cluster, kind, client).await {
                Ok(peer) => peer,
                Err(e) => {
                    tracing::warn!(%cluster, %target, error = %e, "cannot reach the replica with the agent; serving here");
                    return Some(tcp);
                }
            };
            if let Err(e) = tokio::io::copy_bidirectional(&mut tcp, &mut peer).await {
                tracing::debug!(%cluster, %target, error = %e, "relayed connection ended");
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_names_the_client() {
        let client: SocketAddr = "[fd00::7]:51234".parse().unwrap();
        let line = preface(Target::KubeApiserver, "alpha", client);
        assert_eq!(line, "TOWER-PEER/1 kube alpha [fd00::7]:51234\n");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[3].parse::<SocketAddr>().unwrap(), client);
    }

    #[test]
    fn hosts_of_peer_addresses() {
        assert_eq!(host_of("10.0.0.5:8443"), "10.0.0.5");
        assert_eq!(host_of("[fd00::5]:8443"), "fd00::5");
        assert_eq!(host_of("peer.example:8443"), "peer.example");
    }
}
