//! The kube-apiserver port's TLS: a serving certificate from our CA that can
//! be replaced at runtime ([`ServerCert`]), and client certificates signed
//! by our CA required (unlike Tower): any other client is refused in the
//! handshake.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use tokio_util::sync::CancellationToken;

use crate::identity::ca::{Ca, CaError, Issued};

/// A listener's serving certificate. Clones share it: [`ServerCert::set`]
/// replaces it for every new TLS connection of the listeners that use it, live
/// connections keep the one they started with.
#[derive(Clone)]
pub struct ServerCert(Arc<RwLock<CurrentCert>>);

struct CurrentCert {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

impl ServerCert {
    pub fn new(issued: Issued) -> Result<Self, CaError> {
        Ok(Self(Arc::new(RwLock::new(current_cert(&issued)?))))
    }

    /// Serve `issued` from now on (e.g. when the cluster's addresses changed or
    /// the certificate nears its end).
    pub fn set(&self, issued: Issued) -> Result<(), CaError> {
        let next = current_cert(&issued)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// When the certificate served now expires.
    pub fn not_after(&self) -> SystemTime {
        self.0.read().unwrap_or_else(|e| e.into_inner()).not_after
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).key.clone()
    }
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

fn current_cert(issued: &Issued) -> Result<CurrentCert, CaError> {
    let certs = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Issued(format!("certificate is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(CaError::Issued("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())
        .map_err(|e| CaError::Issued(format!("key is not PEM: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| CaError::Issued(format!("unusable certificate and key: {e}")))?;
    Ok(CurrentCert {
        key: Arc::new(key),
        not_after: issued.not_after,
    })
}

/// Serves whatever certificate a [`ServerCert`] holds now.
#[derive(Debug)]
pub struct Resolver(pub ServerCert);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
}

/// TLS for the kube-apiserver port: our serving certificate, client
/// certificates signed by a CA `ca` trusts now required (checked at each
/// handshake, so a CA rotation needs no new config), HTTP/1.1 only.
pub fn server_tls(ca: &Ca, cert: ServerCert) -> Result<ServerConfig, rustls::Error> {
    let provider = crate::serve::suites::provider();
    let verifier = Arc::new(TrustedNow::new(ca.clone(), provider.clone())?);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Resolver(cert)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Our order, AES-128-GCM first, unless the client's says otherwise
    // (crate::serve::suites::choose, at each handshake).
    config.ignore_client_order = true;
    Ok(config)
}

/// Client certificates checked against the CAs the [`Ca`] trusts at the
/// moment of the handshake (one webpki verifier per rotation step, cached).
/// It sends no CA names in its request: clients send their one certificate
/// whatever CA names they would be shown.
pub struct TrustedNow {
    ca: Ca,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cached: RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for TrustedNow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedNow").finish_non_exhaustive()
    }
}

impl TrustedNow {
    pub fn new(
        ca: Ca,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let generation = ca.generation();
        let verifier = webpki_for(&ca, &provider)?;
        Ok(Self {
            ca,
            provider,
            cached: RwLock::new((generation, verifier)),
        })
    }

    fn now(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let generation = self.ca.generation();
        {
            let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
            if cached.0 == generation {
                return Ok(cached.1.clone());
            }
        }
        let verifier = webpki_for(&self.ca, &self.provider)?;
        *self.cached.write().unwrap_or_else(|e| e.into_inner()) = (generation, verifier.clone());
        Ok(verifier)
    }
}

fn webpki_for(
    ca: &Ca,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    for der in ca.trusted() {
        roots.add(der)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))
}

impl ClientCertVerifier for TrustedNow {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.now()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.now()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A port of the proxy's own (not a cluster's) keeps its serving certificate
/// this long, renewed [`OWN_PORT_CERT_RENEW`] before it ends ([`keep_renewed`]).
pub const OWN_PORT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
pub const OWN_PORT_CERT_RENEW: Duration = Duration::from_secs(30 * 24 * 3600);

/// TLS for a port of the proxy's own (the CONNECT port, the access port):
/// [`server_tls`] with a certificate from `ca` for loopback, `bind` when it
/// is a specific address, and `names` (the addresses clients are told),
/// renewed until `stop` (`port` names it in the logs).
pub fn own_port_tls(
    ca: &Arc<Ca>,
    bind: IpAddr,
    names: impl IntoIterator<Item = String>,
    port: &'static str,
    stop: &CancellationToken,
) -> Result<ServerConfig, String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !bind.is_unspecified() {
        sans.push(bind.to_string());
    }
    for name in names {
        if !sans.contains(&name) {
            sans.push(name);
        }
    }
    let issued = ca
        .issue_server(&sans, OWN_PORT_CERT_VALIDITY)
        .map_err(|e| e.to_string())?;
    let cert = ServerCert::new(issued).map_err(|e| e.to_string())?;
    let config = server_tls(ca, cert.clone()).map_err(|e| e.to_string())?;
    let renewing = keep_renewed(cert, ca.clone(), sans, port);
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = renewing => {}
        }
    });
    Ok(config)
}

/// Serve a new certificate [`OWN_PORT_CERT_RENEW`] before `cert` ends, and
/// at once at every CA rotation step (the CA that signs serving
/// certificates may have changed). New connections get it; live ones keep theirs.
/// Runs until dropped.
pub async fn keep_renewed(cert: ServerCert, ca: Arc<Ca>, sans: Vec<String>, port: &'static str) {
    let mut rotations = ca.subscribe();
    let mut generation = ca.generation();
    loop {
        let due = cert
            .not_after()
            .checked_sub(OWN_PORT_CERT_RENEW)
            .unwrap_or(std::time::UNIX_EPOCH);
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        // Woken at least daily: a suspended machine's clock may jump.
        tokio::select! {
            () = tokio::time::sleep(wait.min(Duration::from_secs(24 * 3600))) => {}
            changed = rotations.changed() => if changed.is_err() { return },
        }
        let rotated = ca.generation() != generation;
        if SystemTime::now() < due && !rotated {
            continue;
        }
        generation = ca.generation();
        match ca
            .issue_server(&sans, OWN_PORT_CERT_VALIDITY)
            .map_err(|e| e.to_string())
            .and_then(|issued| cert.set(issued).map_err(|e| e.to_string()))
        {
            Ok(()) if rotated => {
                tracing::info!(
                    port,
                    "serving certificate re-issued for the CA rotation step"
                );
                continue;
            }
            Ok(()) => tracing::info!(port, "serving certificate renewed"),
            Err(e) => tracing::warn!(port, error = %e, "cannot renew the serving certificate"),
        }
        // A failure retries after an hour, not in a spin.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_certificate_near_its_end_is_renewed() {
        let ca = Arc::new(Ca::generate().unwrap());
        let sans = vec!["localhost".to_string()];
        let short = ca
            .issue_server(&sans, Duration::from_secs(24 * 3600))
            .unwrap();
        let cert = ServerCert::new(short).unwrap();
        let before = cert.not_after();
        let renewing = tokio::spawn(keep_renewed(cert.clone(), ca, sans, "test"));
        let renewed = tokio::time::timeout(Duration::from_secs(30), async {
            while cert.not_after() == before {
                tokio::task::yield_now().await;
            }
        })
        .await;
        renewing.abort();
        assert!(renewed.is_ok(), "not renewed");
        assert!(cert.not_after() > before + Duration::from_secs(300 * 24 * 3600));
    }

    #[test]
    fn the_listeners_trust_follows_the_rotation_steps() {
        use crate::identity::ca::Authority;
        use crate::identity::rotation::{Phase, Plan};

        let old = Authority::generate().unwrap();
        let new = Authority::generate().unwrap();
        let client = |ca: &Authority| {
            let issued = ca
                .issue_client("tower:alpha", &["tower:clients"], Duration::from_secs(3600))
                .unwrap();
            CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
        };
        let (of_old, of_new) = (client(&old), client(&new));
        let load = |a: &Authority| Authority::load(a.cert_pem(), a.key_pem()).unwrap();
        let ca = Ca::from(load(&old));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = TrustedNow::new(ca.clone(), provider).unwrap();
        let accepts = |cert: &CertificateDer<'static>| {
            verifier
                .verify_client_cert(cert, &[], rustls_pki_types::UnixTime::now())
                .is_ok()
        };
        assert!(accepts(&of_old) && !accepts(&of_new), "steady");

        let step = |signer: &Authority, other: &Authority, phase| Plan {
            signer: load(signer),
            others: vec![other.cert_der().clone()],
            serving: None,
            phase,
        };
        assert!(ca.rotate(step(&old, &new, Phase::Added)));
        assert!(accepts(&of_old) && accepts(&of_new), "added");
        assert!(ca.rotate(step(&new, &old, Phase::Switched)));
        assert!(accepts(&of_old) && accepts(&of_new), "switched");
        assert!(ca.rotate(Plan {
            signer: load(&new),
            others: Vec::new(),
            serving: None,
            phase: Phase::Steady,
        }));
        assert!(!accepts(&of_old) && accepts(&of_new), "dropped");
    }
}
