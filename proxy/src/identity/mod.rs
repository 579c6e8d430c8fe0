//! The proxy's identity: its CA ([`ca`]), the Secret that keeps its SSH host
//! key and generated CA across restarts and replicas ([`secret`]), and the
//! names it signs its Kubernetes writes with ([`names`]); which cluster a
//! client certificate opens ([`scope`]), and what the CSR signer accepts and
//! issues for people ([`signer`]).

pub mod ca;
pub mod names;
pub mod scope;
pub mod secret;
pub mod signer;
