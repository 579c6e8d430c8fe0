//! The agents' side: the port agents dial ([`endpoint`]), who may join
//! ([`admission`], with tokens from a [`store::ClusterStore`]), and who is
//! connected ([`registry`]), and how a stopping replica lets them go
//! ([`drain`]), and which hub services their agents may reach ([`hub`], pull mode),
//! and how an agent is handed a new token over its tunnel ([`token`]) while
//! the previous one still works for a while ([`grace`]), and which SSH host
//! keys they are told the proxy holds ([`announce`]).

pub mod admission;
pub mod announce;
pub mod drain;
pub mod endpoint;
pub mod grace;
pub mod hub;
pub mod registry;
pub mod store;
pub mod token;
