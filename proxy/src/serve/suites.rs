//! Which TLS cipher suite the proxy's TLS connections use. The https doors
//! decrypt and re-encrypt every byte twice (the client's TLS and the member's),
//! so the suite is a large part of their CPU per byte.
//!
//! [`provider`] is ring's, with the same suites in Go's order: AES-128-GCM
//! before AES-256-GCM (10 AES rounds where AES-256 takes 14). The proxy's
//! servers choose in that order ([`choose`]) unless a client's own first choice
//! is not AES-GCM: such a client likely has no AES instructions and keeps its
//! order, which is Go's rule (`crypto/tls`, `aesgcmPreferred`). kubectl and Go
//! kube-apiservers already settle on AES-128-GCM; rustls peers (kube-rs
//! clients) offer AES-256-GCM first.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, ServerConfig};

/// ring's provider with each AES-256-GCM suite moved behind its AES-128-GCM
/// sibling; nothing added or removed.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let suites = &mut provider.cipher_suites;
    for i in 1..suites.len() {
        if is_aes_256(suites[i - 1].suite()) && is_aes_128(suites[i].suite()) {
            suites.swap(i - 1, i);
        }
    }
    Arc::new(provider)
}

/// The config to finish a handshake with, given the suites the client offered
/// in its order: `config` (built with [`provider`] and
/// `ignore_client_order`), or a copy that keeps the client's order.
pub fn choose(config: &Arc<ServerConfig>, offered: &[CipherSuite]) -> Arc<ServerConfig> {
    if !config.ignore_client_order || aes_preferred(config, offered) {
        return config.clone();
    }
    let mut theirs = ServerConfig::clone(config);
    theirs.ignore_client_order = false;
    Arc::new(theirs)
}

/// Whether the first offered suite `config` supports is AES-GCM.
fn aes_preferred(config: &ServerConfig, offered: &[CipherSuite]) -> bool {
    let ours = &config.crypto_provider().cipher_suites;
    offered
        .iter()
        .find(|s| ours.iter().any(|o| o.suite() == **s))
        .is_some_and(|s| is_aes_128(*s) || is_aes_256(*s))
}

fn is_aes_128(s: CipherSuite) -> bool {
    matches!(
        s,
        CipherSuite::TLS13_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

fn is_aes_256(s: CipherSuite) -> bool {
    matches!(
        s,
        CipherSuite::TLS13_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(p: &CryptoProvider) -> Vec<CipherSuite> {
        p.cipher_suites.iter().map(|s| s.suite()).collect()
    }

    #[test]
    fn the_same_suites_with_aes_128_before_aes_256() {
        let ours = ids(&provider());
        let mut sorted = ours.clone();
        let mut default = ids(&rustls::crypto::ring::default_provider());
        sorted.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, default, "suites added or removed");
        assert_eq!(ours[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let at = |s| ours.iter().position(|x| *x == s).unwrap();
        for (fast, slow) in [
            (
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_AES_256_GCM_SHA384,
            ),
            (
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ),
            (
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            ),
        ] {
            assert!(at(fast) < at(slow), "{fast:?} after {slow:?}");
        }
    }

    #[test]
    fn clients_that_put_chacha_first_keep_their_order() {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        config.ignore_client_order = true;
        let config = Arc::new(config);
        // Unknown (GREASE) values are skipped, as Go does.
        let grease = CipherSuite::Unknown(0x0a0a);
        let aes_first = [
            grease,
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        assert!(choose(&config, &aes_first).ignore_client_order);
        let chacha_first = [
            grease,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            CipherSuite::TLS13_AES_128_GCM_SHA256,
        ];
        assert!(!choose(&config, &chacha_first).ignore_client_order);
    }
}
