//! The client-facing servers: the per-cluster HTTPS/HTTP ports
//! ([`listener`]), opened and closed for the controller by [`ports`], and the
//! raw TCP `--forward` port ([`forward`]), and the HTTP CONNECT doors to any
//! address a member's agent allows ([`connect`]). All reach members through
//! [`crate::member::MemberDialer`]. The aggregated API ([`aggregated`]) serves
//! every cluster on one port, behind the host kube-apiserver.

pub mod aggregated;
pub mod connect;
pub mod forward;
pub mod listener;
pub mod ports;
