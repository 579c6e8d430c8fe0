//! Letting a client in at an HTTPS front door that serves clusters (a
//! cluster's own port, the path form of [`super::access`]): the TLS
//! handshake with a deadline, who the client certificate says the client
//! is ([`Client`]), whether that opens the cluster asked for, and the
//! refusal when it does not.
//!
//! Both doors go through here so that what a certificate may open is decided
//! in one place: a richer identity than the certificate's common name
//! changes [`Client`] and nothing else.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use rustls::server::Acceptor;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use super::listener::Io;
use super::listener::status::{Body, text};
use super::suites;
use crate::identity::ca::peer_identity;
use crate::identity::scope::{Holder, PeerIdentity, admit};
use crate::ops::audit::{Audit, Caller, Record};
use crate::ops::pending::{Pending, Permit, Refusal};

/// How long a client may take with its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS handshake with `tcp`, within [`TLS_HANDSHAKE_TIMEOUT`] and in a
/// slot of `pending` (the caps on handshakes in progress, and when it may
/// start: its source's rate): `slot` when the
/// caller took it already (at accept, so a connection over the caps is
/// closed before it costs a task), else taken here. `None` (logged, naming
/// `port`, and counted at `door`) when it failed or had no slot.
pub async fn handshake<T: Io>(
    slot: Option<Permit>,
    acceptor: &TlsAcceptor,
    tcp: T,
    peer: SocketAddr,
    port: &str,
    pending: &Arc<Pending>,
    door: &'static str,
) -> Option<TlsStream<T>> {
    let slot = match slot {
        Some(slot) => slot,
        None => pending.enter(peer.ip(), door)?,
    };
    // On the handshake threads (ops::handshakes): the CPU it costs waits
    // behind forwarding when the CPU is short. It starts at its source's
    // turn (ops::rate), within the deadline.
    let (start, acceptor) = (slot.start(), acceptor.clone());
    let accept = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, async move {
        if let Some(at) = start {
            tokio::time::sleep_until(at.into()).await;
        }
        // The ClientHello first: the suite order depends on it
        // (crate::serve::suites::choose).
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        let config = suites::choose(acceptor.config(), start.client_hello().cipher_suites());
        start.into_stream(config).await
    });
    match pending.runner().run(accept).await? {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            // Port probes and health checks that connect and leave.
            tracing::debug!(port, %peer, error = %e, "client left during TLS handshake");
            None
        }
        Ok(Err(e)) => {
            pending.refused(door, Refusal::BadHandshake);
            tracing::warn!(port, %peer, error = %e, "TLS handshake with client failed");
            None
        }
        Err(_) => {
            pending.refused(door, Refusal::HandshakeTimeout);
            tracing::warn!(port, %peer, limit = ?TLS_HANDSHAKE_TIMEOUT,
                "client did not finish the TLS handshake in time: connection closed");
            None
        }
    }
}

/// Who a client is, as its certificate (signed by our CA: the handshake
/// checked that) says.
#[derive(Debug, Clone)]
pub struct Client {
    id: PeerIdentity,
}

impl Client {
    /// The client of a finished handshake.
    pub fn of<T>(tls: &TlsStream<T>) -> Self {
        Self {
            id: peer_identity(tls.get_ref().1),
        }
    }

    /// The caller to forward and audit as when this client may open
    /// `cluster`, or why it may not. A machine kubeconfig acts as the agent
    /// (audited as the cluster's kubeconfig); a person's certificate is
    /// impersonated on the member, so the member's RBAC judges them.
    pub fn opens(&self, cluster: &str) -> Result<Caller, String> {
        Ok(match admit(&self.id, cluster)? {
            Holder::Person { user, groups, .. } => Caller {
                groups,
                impersonated: true,
                ..Caller::named(user)
            },
            _ => Caller {
                cn: self.id.common_name.clone(),
                ..Caller::named(format!("kubeconfig of {cluster}"))
            },
        })
    }

    /// The caller as its certificate names it, for a request that opens no
    /// cluster.
    pub fn named(&self) -> Caller {
        Caller {
            groups: self.id.organizations.clone(),
            ..Caller::named(
                self.id
                    .common_name
                    .clone()
                    .unwrap_or_else(|| "a certificate without a common name".into()),
            )
        }
    }

    /// The answer to a request this client may not send to `cluster`
    /// (`why`, from [`Client::opens`]): 403 in plain text (kubectl's
    /// discovery prints a text body as the error, but only "unknown" for a
    /// JSON Status), audited as refused at `door`.
    pub fn refuse(
        &self,
        audit: &Audit,
        door: &'static str,
        cluster: &str,
        req: &hyper::Request<impl Sized>,
        why: &str,
    ) -> hyper::Response<Body> {
        let resp = text(StatusCode::FORBIDDEN, why);
        let record = Record::http(
            door,
            cluster,
            self.named(),
            req.uri(),
            req.method().as_str(),
        );
        audit.log(record.answered(resp.status().as_u16(), why));
        resp
    }
}
