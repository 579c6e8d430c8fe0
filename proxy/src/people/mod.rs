//! Access for people: how a person, not a machine, gets into a member
//! cluster through the proxy.
//!
//! - [`csr`]: personal certificates. A user asks with a Kubernetes
//!   CertificateSigningRequest for the signer
//!   `tower.kubesphere.io/cluster-access`, an admin approves it, the proxy
//!   (the leader, with replicas) signs it with its CA. The certificate opens
//!   one cluster's port, where the member sees the person (impersonation),
//!   not the agent. What is accepted and issued is decided in
//!   [`crate::identity::signer`]; which door it opens in
//!   [`crate::identity::scope`].

pub mod csr;
