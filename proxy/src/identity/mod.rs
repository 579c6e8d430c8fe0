//! The proxy's identity: its CA ([`ca`]), the Secret that keeps its SSH host
//! key and generated CA across restarts and replicas ([`secret`]), and the
//! names it signs its Kubernetes writes with ([`names`]); which cluster a
//! client certificate opens ([`scope`]), and what the CSR signer accepts and
//! issues for people ([`signer`]). The SSH host keys in use and their
//! rotation ([`host_keys`]); the CAs in use ([`live`]) and the CA rotation's
//! phases ([`rotation`]); both rotations followed in the Secret by every
//! replica ([`watch`]).

pub mod ca;
pub mod host_keys;
pub mod live;
pub mod names;
pub mod rotation;
pub mod scope;
pub mod secret;
pub mod signer;
pub mod watch;

#[cfg(test)]
mod properties;
