//! TLS material: a bench CA and the upstream server's certificate (for
//! `127.0.0.1`), client configs for the direct and raw-forward paths (trust the
//! bench CA) and for the per-cluster listener (the proxy's CA and the client
//! certificate from the Cluster's kubeconfig).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use secrecy::ExposeSecret as _;

/// The bench CA, the upstream's serving certificate (also the peers' servers'),
/// and a client certificate (the peers' agents and CONNECT clients), PEM.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl Pki {
    pub fn generate() -> Result<Pki> {
        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tower bench CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().context("server key")?;
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "bench upstream");
        let cert = params.signed_by(&key, &issuer).context("signing")?;
        let client_key = KeyPair::generate().context("client key")?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client
            .distinguished_name
            .push(DnType::CommonName, "bench client");
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .context("signing the client certificate")?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        })
    }

    /// A kubeconfig for the upstream at `addr` (the bench agent hands its CA and
    /// token to the proxy, which then verifies the upstream like a member).
    pub fn upstream_kubeconfig(&self, addr: std::net::SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: upstream\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {}\nusers:\n- name: bench\n  user:\n    token: bench-upstream-token\ncontexts:\n- name: upstream\n  context:\n    cluster: upstream\n    user: bench\ncurrent-context: upstream\n",
            B64.encode(self.ca_pem.as_bytes())
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &[u8]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.context("CA PEM")?)
            .context("adding a root")?;
    }
    if roots.is_empty() {
        bail!("no certificate in the CA PEM");
    }
    Ok(roots)
}

/// A client that trusts `ca_pem`, without a client certificate.
pub fn client_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem.as_bytes())?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client that trusts `ca_pem` and presents the bench client certificate
/// (for a peer's front door that wants mutual TLS).
pub fn mtls_client_config(pki: &Pki) -> Result<Arc<ClientConfig>> {
    let certs = CertificateDer::pem_slice_iter(pki.client_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("client certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(pki.client_key_pem.as_bytes()).context("key PEM")?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(pki.ca_pem.as_bytes())?)
        .with_client_auth_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// The server config of the upstream.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("key PEM")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a kubeconfig says about reaching its cluster.
pub struct KubeconfigTarget {
    pub addr: std::net::SocketAddr,
    pub tls: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Read a kubeconfig with a server `https://IP:PORT`, inline CA and client
/// certificate (what the proxy writes into a Cluster).
pub fn from_kubeconfig(path: &Path) -> Result<KubeconfigTarget> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kc = e2e::kube::config::Kubeconfig::from_yaml(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    let cluster = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .context("no cluster in the kubeconfig")?;
    let user = kc
        .auth_infos
        .first()
        .and_then(|u| u.auth_info.as_ref())
        .context("no user in the kubeconfig")?;
    let server = cluster.server.clone().context("no server")?;
    let hostport = server
        .strip_prefix("https://")
        .context("server is not https://")?
        .trim_end_matches('/');
    let addr: std::net::SocketAddr = hostport
        .parse()
        .with_context(|| format!("server {server} is not https://IP:PORT"))?;
    let ca = B64
        .decode(
            cluster
                .certificate_authority_data
                .as_deref()
                .context("no certificate-authority-data")?,
        )
        .context("CA base64")?;
    let cert = B64
        .decode(
            user.client_certificate_data
                .as_deref()
                .context("no client-certificate-data")?,
        )
        .context("client certificate base64")?;
    let key = B64
        .decode(
            user.client_key_data
                .as_ref()
                .context("no client-key-data")?
                .expose_secret(),
        )
        .context("client key base64")?;
    let certs = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .context("client certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(&key).context("client key PEM")?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&ca)?)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(KubeconfigTarget {
        addr,
        tls: Arc::new(config),
        server_name: ServerName::IpAddress(addr.ip().into()),
    })
}
