//! The HTTP CONNECT front doors: `CONNECT host:port` opens a stream through
//! a member's tunnel to `host:port` as its agent sees it, byte for byte.
//!
//! - `--connect-port`: TCP with mutual TLS; client certificates from the
//!   proxy CA are required. A certificate the proxy issued for a cluster (CN
//!   `tower:<cluster>`, as in the kubeconfigs it writes, or a personal one
//!   with URI `tower://<cluster>`, [`crate::identity::scope`]) opens that
//!   cluster only; another certificate of the CA must name the cluster in a
//!   `Tower-Cluster` header. Replicas' peer certificates open nothing.
//! - `--connect-socket-dir`: one Unix socket per connected cluster
//!   ([`sockets`]), the same protocol without TLS: the file's permissions are
//!   the access control. This is what a kube-apiserver's
//!   `EgressSelectorConfiguration` (`HTTPConnect` over `uds`) speaks.
//!
//! `CONNECT <cluster>:443` (or `:6443`) reaches the member's kube-apiserver
//! (the address its agent advertised); any other target is dialled by the
//! agent only if its `--allow-dial` rules allow it: the proxy never decides
//! that for it. Every refusal is an HTTP answer with a one-line reason
//! ([`request::Refusal`]), never a silent close.

pub mod request;
pub mod sockets;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tunnel::server::{DialError, TunnelStream};

use self::request::{CLUSTER_HEADER, Connect, Refusal};
use super::admit::handshake;
use super::listener::Io;
use super::listener::tls::own_port_tls;
use crate::agents::registry::Registry;
use crate::identity::ca::{Ca, peer_identity};
use crate::identity::scope::{Holder, PeerIdentity, holder};
use crate::member::{MemberDialer, ReachError, Target};
use crate::ops::accept::accept_loop;
use crate::ops::audit::{Audit, Caller, Counting, Pending, Record};
use crate::ops::in_flight::InFlight;
use crate::ops::metrics::{DoorBytesLabel, DoorLabel, Metrics, RefusalLabel};
use crate::ops::pending;

/// After a refusal: how long, and how much, the client's leftover input is
/// read and dropped before closing.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Is this a cluster the proxy serves (it has a token)?
pub type Known = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Which doors to open, from the flags.
pub struct Doors {
    /// `--connect-port`.
    pub port: Option<u16>,
    /// `--connect-socket-dir`.
    pub socket_dir: Option<PathBuf>,
    /// `--host`, and `--advertise-address` for the port's certificate.
    pub bind: IpAddr,
    pub advertise_address: Option<String>,
}

/// Why a door could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--connect-port needs the proxy CA: give --ca-cert and --ca-key")]
    NoCa,
    #[error("cannot listen on {0} (--connect-port): {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("the CONNECT port's certificate: {0}")]
    Cert(String),
    #[error("--connect-socket-dir {0}: cannot create it: {1}")]
    SocketDir(String, std::io::Error),
}

/// Where refused targets are told to the people who run the cluster (Events
/// on its Cluster: `clusters::refusals`). Called for refusals of a target of
/// a cluster the proxy serves (`not_allowed`, `dial_failed`, `timeout`),
/// never for a request that named no such cluster.
pub trait TargetRefusals: Send + Sync {
    fn refused(&self, cluster: &str, door: &str, target: &str, refusal: &Refusal);
}

/// What both doors share.
pub struct Door {
    pub dialer: MemberDialer,
    pub known: Known,
    pub metrics: Arc<Metrics>,
    pub in_flight: InFlight,
    /// Without Kubernetes (`--clusters-file`): none.
    pub report: Option<Arc<dyn TargetRefusals>>,
    pub audit: Audit,
    /// The caps on clients' TLS handshakes in progress (shared with every
    /// HTTPS door): the TLS port takes a slot at accept.
    pub handshakes: Arc<pending::Pending>,
}

/// What the connection itself says about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// The Unix socket of this cluster.
    Socket(String),
    /// A client certificate issued for this cluster.
    Cluster(String),
    /// A client certificate of the CA bound to no cluster: the request names it.
    Unbound,
}

impl Door {
    /// Open the doors `doors` asks for; they take connections until `stop`.
    pub async fn open(
        self: Arc<Self>,
        doors: Doors,
        ca: Option<&Arc<Ca>>,
        registry: Registry,
        stop: &CancellationToken,
    ) -> Result<(), OpenError> {
        if let Some(port) = doors.port {
            let ca = ca.ok_or(OpenError::NoCa)?;
            let addr = SocketAddr::new(doors.bind, port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| OpenError::Listen(addr, e))?;
            let tls = own_port_tls(ca, doors.bind, doors.advertise_address, "CONNECT", stop)
                .map_err(OpenError::Cert)?;
            let local = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %local, "CONNECT port listening (mutual TLS)");
            tokio::spawn(self.clone().serve_tls(
                listener,
                TlsAcceptor::from(Arc::new(tls)),
                stop.clone(),
            ));
        }
        if let Some(dir) = doors.socket_dir {
            std::fs::create_dir_all(&dir)
                .map_err(|e| OpenError::SocketDir(dir.display().to_string(), e))?;
            tokio::spawn(sockets::run(dir, self, registry, stop.clone()));
        }
        Ok(())
    }

    /// Serve the TLS door on `listener` until `stop`.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
        stop: CancellationToken,
    ) {
        // Streams outlive `stop` (the port closing): they end with their tunnel.
        accept_loop(listener, "connect", stop, |tcp, peer| {
            // The caps on pending TLS handshakes, checked here: a connection
            // over them is closed before it costs a task.
            let Some(slot) = self.handshakes.enter(peer.ip(), "connect") else {
                return std::future::ready(());
            };
            let (door, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                let pending = &door.handshakes;
                let handshaken = handshake(
                    Some(slot),
                    &acceptor,
                    tcp,
                    peer,
                    "CONNECT",
                    pending,
                    "connect",
                );
                let Some(tls) = handshaken.await else {
                    door.refused("tls", "", "tls");
                    return;
                };
                let id = peer_identity(tls.get_ref().1);
                let (bound, caller) = bound_by(&id);
                let mut tls = tls;
                let Some(bound) = bound else {
                    let mut audit = door
                        .audit
                        .begin(|| Record::new("tls", "", caller, "connect").from(Some(peer.ip())));
                    door.refuse(
                        &mut audit,
                        &mut tls,
                        "tls",
                        "",
                        Refusal::new(
                            403,
                            "forbidden",
                            "this certificate (a proxy replica's, or one naming its cluster \
                             unlike the proxy's certificates) opens no CONNECT stream",
                        ),
                    )
                    .await;
                    return;
                };
                door.serve(tls, "tls", bound, caller, Some(peer.ip())).await;
            });
            std::future::ready(())
        })
        .await;
    }

    /// Serve one client connection: read its CONNECT, open the stream, copy;
    /// audited when it ends.
    /// `source`: the address the connection came from (none at a socket).
    pub async fn serve<T: Io>(
        &self,
        mut io: T,
        door: &'static str,
        bound: Bound,
        caller: Caller,
        source: Option<IpAddr>,
    ) {
        let mut audit = self.audit.begin(|| {
            let cluster = match &bound {
                Bound::Socket(c) | Bound::Cluster(c) => c.as_str(),
                Bound::Unbound => "",
            };
            Record::new(door, cluster, caller, "connect").from(source)
        });
        let (connect, early) = match request::read(&mut io).await {
            Ok(read) => read,
            Err(refusal) => return self.refuse(&mut audit, &mut io, door, "", refusal).await,
        };
        if let Some(record) = audit.record() {
            record.target = Some(connect.authority.clone());
        }
        let cluster = match self.cluster(&bound, &connect) {
            Ok(cluster) => cluster,
            Err(refusal) => return self.refuse(&mut audit, &mut io, door, "", refusal).await,
        };
        if let Some(record) = audit.record() {
            record.cluster.clone_from(&cluster);
        }
        let stream = match self.open_stream(&cluster, &connect).await {
            Ok(stream) => stream,
            Err(refusal) => {
                tracing::info!(%cluster, target = %connect.authority, door, reason = %refusal.message, "CONNECT refused");
                if let Some(report) = self
                    .report
                    .as_ref()
                    .filter(|_| matches!(refusal.reason, "not_allowed" | "dial_failed" | "timeout"))
                {
                    report.refused(&cluster, door, &connect.authority, &refusal);
                }
                return self
                    .refuse(&mut audit, &mut io, door, &cluster, refusal)
                    .await;
            }
        };
        let _in_flight = self.in_flight.enter();
        self.metrics
            .connect_streams
            .get_or_create(&DoorLabel {
                door: door.into(),
                cluster: cluster.clone(),
            })
            .inc();
        tracing::debug!(%cluster, target = %connect.authority, door, "CONNECT stream open");
        if let Some(record) = audit.record() {
            record.status = 200;
        }
        let mut io = Counting::new(io);
        if let Err(e) = pipe(&mut io, stream, &early).await {
            tracing::debug!(%cluster, target = %connect.authority, error = %e, "CONNECT stream ended");
        }
        // What went through the stream, without the CONNECT exchange itself.
        let to = io.read + early.len() as u64;
        let from = io.written.saturating_sub(ESTABLISHED.len() as u64);
        if let Some(record) = audit.record() {
            record.bytes_in = to;
            record.bytes_out = from;
        }
        for (direction, n) in [("to_member", to), ("from_member", from)] {
            self.metrics
                .connect_bytes
                .get_or_create(&DoorBytesLabel {
                    door: door.into(),
                    cluster: cluster.clone(),
                    direction: direction.into(),
                })
                .inc_by(n);
        }
    }

    /// The cluster the request is for: the one the connection is bound to
    /// (a header, if any, must agree), else the header's.
    fn cluster(&self, bound: &Bound, connect: &Connect) -> Result<String, Refusal> {
        let cluster = match (bound, &connect.cluster) {
            (Bound::Socket(c) | Bound::Cluster(c), Some(asked)) if asked != c => {
                return Err(Refusal::new(
                    403,
                    "forbidden",
                    format!("this credential opens cluster {c:?} only, not {asked:?}"),
                ));
            }
            (Bound::Socket(c) | Bound::Cluster(c), _) => c.clone(),
            (Bound::Unbound, Some(asked)) => asked.clone(),
            (Bound::Unbound, None) => {
                return Err(Refusal::new(
                    400,
                    "bad_request",
                    format!(
                        "this certificate is not bound to a cluster: name one with a \
                         {CLUSTER_HEADER} header"
                    ),
                ));
            }
        };
        if !(self.known)(&cluster) {
            return Err(Refusal::new(
                404,
                "unknown_cluster",
                format!("cluster {cluster:?} is not served by this proxy"),
            ));
        }
        Ok(cluster)
    }

    /// Open the stream: the kube-apiserver for `<cluster>:443|6443`, any
    /// other address as the agent allows.
    async fn open_stream(&self, cluster: &str, connect: &Connect) -> Result<TunnelStream, Refusal> {
        let kube = connect.host.eq_ignore_ascii_case(cluster) && matches!(connect.port, 443 | 6443);
        let opened = if kube {
            self.dialer.open(cluster, Target::KubeApiserver).await
        } else {
            self.dialer.open_to(cluster, &connect.authority).await
        };
        let target = if kube {
            format!("its kube-apiserver ({})", connect.authority)
        } else {
            connect.authority.clone()
        };
        opened.map_err(|e| refusal_of(cluster, &target, &e))
    }

    /// Answer `refusal` and close. `cluster`: "" unless the request is for a
    /// cluster this proxy serves.
    async fn refuse<T: Io>(
        &self,
        audit: &mut Pending,
        io: &mut T,
        door: &'static str,
        cluster: &str,
        refusal: Refusal,
    ) {
        self.refused(door, cluster, refusal.reason);
        if let Some(record) = audit.record() {
            record.status = refusal.status;
            record.reason = Some(refusal.message.clone());
        }
        let _ = io.write_all(&refusal.answer()).await;
        let _ = io.shutdown().await;
        // Read on for a moment what the client still sends (the rest of an
        // oversized head, say): closing with unread data resets the
        // connection, and the client might never read the answer.
        let mut sink = [0u8; 8192];
        let mut left = LINGER_BYTES;
        let drain = async {
            while left > 0 {
                match io.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    fn refused(&self, door: &str, cluster: &str, reason: &str) {
        self.metrics
            .connect_refusals
            .get_or_create(&RefusalLabel {
                door: door.into(),
                cluster: cluster.into(),
                reason: reason.into(),
            })
            .inc();
    }
}

/// What a client certificate binds a TLS connection to (`None`: nothing may
/// be opened), and who to audit: a person by name and groups (a raw stream
/// carries no impersonation: only the scope applies), else the CN.
pub fn bound_by(id: &PeerIdentity) -> (Option<Bound>, Caller) {
    let holder = holder(id);
    let bound = match &holder {
        Holder::Machine { cluster } | Holder::Person { cluster, .. } => {
            Some(Bound::Cluster(cluster.clone()))
        }
        Holder::Unbound => Some(Bound::Unbound),
        Holder::Replica | Holder::Invalid => None,
    };
    let caller = match holder {
        Holder::Person { user, groups, .. } => Caller {
            groups,
            ..Caller::named(user)
        },
        _ => Caller::named(id.label()),
    };
    (bound, caller)
}

/// The answer for a stream that could not be opened.
fn refusal_of(cluster: &str, target: &str, e: &ReachError) -> Refusal {
    match e {
        ReachError::NoAgent(_) | ReachError::SessionGone | ReachError::Dial(DialError::Closed) => {
            Refusal::new(
                503,
                "no_agent",
                format!("no agent of cluster {cluster:?} is connected to the proxy"),
            )
        }
        ReachError::Dial(DialError::Refused { reason, .. }) if reason.contains("Prohibited") => {
            Refusal::new(
                403,
                "not_allowed",
                format!(
                    "the agent of cluster {cluster:?} does not dial {target}: allow it with the \
                     agent's --allow-dial (CIDR:PORT, HOST:PORT or *.DNS-SUFFIX:PORT)"
                ),
            )
        }
        ReachError::Dial(DialError::Refused { .. }) => Refusal::new(
            502,
            "dial_failed",
            format!("the agent of cluster {cluster:?} could not connect to {target}"),
        ),
        ReachError::Dial(DialError::Timeout(t)) | ReachError::TlsTimeout(t) => Refusal::new(
            504,
            "timeout",
            format!("the agent of cluster {cluster:?} did not open {target} within {t:?}"),
        ),
        other => Refusal::new(
            502,
            "dial_failed",
            format!("cannot reach {target}: {other}"),
        ),
    }
}

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Answer 200, send what the client sent early, then copy both ways.
async fn pipe<T: Io>(io: &mut T, mut stream: TunnelStream, early: &[u8]) -> std::io::Result<()> {
    io.write_all(ESTABLISHED).await?;
    io.flush().await?;
    if !early.is_empty() {
        stream.write_all(early).await?;
    }
    tunnel::copy::join(io, &mut stream).await?;
    Ok(())
}
