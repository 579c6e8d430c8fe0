//! The agents' side: the port agents dial ([`endpoint`]), who may join
//! ([`admission`], with tokens from a [`store::ClusterStore`]), and who is
//! connected ([`registry`]), and how a stopping replica lets them go
//! ([`drain`]).

pub mod admission;
pub mod drain;
pub mod endpoint;
pub mod registry;
pub mod store;
