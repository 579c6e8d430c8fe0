//! The proxy's identity: its CA ([`ca`]), the Secret that keeps its SSH host
//! key and generated CA across restarts and replicas ([`secret`]), and the
//! names it signs its Kubernetes writes with ([`names`]), and which cluster a
//! client certificate opens ([`scope`]).

pub mod ca;
pub mod names;
pub mod scope;
pub mod secret;
