//! The client-facing servers: the per-cluster HTTPS/HTTP ports
//! ([`listener`]), opened and closed for the controller by [`ports`], the
//! path form of every cluster on one port of the proxy's own ([`access`]),
//! what both HTTPS doors check of a client ([`admit`]), the raw TCP
//! `--forward` port ([`forward`]), the HTTP CONNECT doors to any address
//! a member's agent allows ([`connect`]), and the aggregated API
//! ([`aggregated`]) that serves every cluster on one port behind the host
//! kube-apiserver. The two doors without per-cluster ports share
//! [`proxies`]. All reach members through [`crate::member::MemberDialer`].
//! Every TLS connection of theirs, and to members, orders its cipher suites
//! as [`suites`] says.

pub mod access;
pub mod admit;
pub mod aggregated;
pub mod connect;
pub mod forward;
pub mod listener;
pub mod ports;
pub mod proxies;
pub mod suites;
