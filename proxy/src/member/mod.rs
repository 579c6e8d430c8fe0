//! Reaching a member: the one seam every way into a member cluster goes
//! through (the per-cluster listeners, the raw `--forward` port, the member
//! status probes), like remotedialer's `Server.Dialer(clusterKey)`.
//!
//! [`MemberDialer`] picks the cluster's least busy live session, opens a
//! channel through it to a [`Target`] with a deadline, and for the
//! kube-apiserver finishes a TLS handshake verified against the CA the agent
//! sent, handing back the stream and the credentials to present ([`Access`]).

pub mod access;
pub mod dialer;

pub use access::Access;
pub use dialer::{MemberDialer, MemberStream, ReachError};

use tunnel::AgentConfig;

/// What in the member a stream goes to: the addresses an agent advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `KubernetesSvcHost`: the member's kube-apiserver (TLS, the agent's credentials).
    KubeApiserver,
    /// `KubeSphereSvcHost`: the member's ks-apiserver (plain HTTP).
    KsApiserver,
}

impl Target {
    /// The address the agent advertised for this target (may be empty).
    pub fn address(self, config: &AgentConfig) -> &str {
        match self {
            Self::KubeApiserver => &config.kubernetes_svc_host,
            Self::KsApiserver => &config.kubesphere_svc_host,
        }
    }

    /// How users call it, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Self::KubeApiserver => "kube-apiserver",
            Self::KsApiserver => "ks-apiserver",
        }
    }
}
