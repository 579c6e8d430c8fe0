//! The proxy's identity: its CA ([`ca`]), the Secret that keeps its SSH host
//! key and generated CA across restarts and replicas ([`secret`]), and the
//! names it signs its Kubernetes writes with ([`names`]).

pub mod ca;
pub mod names;
pub mod secret;
