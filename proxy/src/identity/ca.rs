//! The proxy's certificate authority.
//!
//! It signs the serving certificate of every per-cluster HTTPS listener, the
//! client certificates the proxy hands out in kubeconfigs and the personal
//! certificates of approved CSRs ([`super::signer`]); the listeners accept
//! only client certificates it signed. Either loaded (`--ca-cert`/`--ca-key`, as
//! `certs/gen-ca.sh` or openssl makes them) or generated (ECDSA P-256, 10 years).
//! Every issued certificate gets a fresh ECDSA P-256 key and never outlives the CA.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::scope::PeerIdentity;

pub use super::live::Ca;

/// Common name of a generated CA.
pub const GENERATED_CA_NAME: &str = "tower-proxy-ca";
/// Subject CN of the certificates replicas show each other; the peer port
/// accepts no other client certificate of the CA.
pub const PEER_COMMON_NAME: &str = "tower-proxy-peer";
/// Lifetime of a generated CA.
pub const GENERATED_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start this long before "now", for clocks that lag.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// rcgen keeps one value per subject attribute type; a second `O` goes in under
/// the same OID as a custom attribute, so at most two organizations fit.
pub const MAX_ORGANIZATIONS: usize = 2;

/// Why the CA could not be loaded or could not issue a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA certificate: {0}")]
    Cert(String),
    #[error("CA key: {0}")]
    Key(String),
    #[error(
        "the CA key does not belong to the CA certificate: give the private key the certificate \
         was made with (--ca-cert and --ca-key must be a pair)"
    )]
    KeyMismatch,
    #[error("cannot put {name:?} in a certificate: {reason}")]
    Name { name: String, reason: String },
    #[error("a serving certificate needs at least one DNS name or IP address")]
    NoNames,
    #[error(
        "a client certificate holds at most {MAX_ORGANIZATIONS} organizations (groups), got {0}"
    )]
    TooManyOrganizations(usize),
    #[error("the CA expired on {0}: make a new one (certs/gen-ca.sh) and restart the proxy")]
    Expired(String),
    #[error("issued certificate: {0}")]
    Issued(String),
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A certificate and its fresh private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// Never print the key.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// One CA: its certificate and the key that signs with it.
pub struct Authority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

/// Never print the key.
impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Load a CA from its PEM certificate (the first one in `cert_pem`) and its
    /// unencrypted PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE
    /// KEY`) or PKCS#1 (`RSA PRIVATE KEY`); ECDSA P-256/P-384, Ed25519 or RSA.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, CaError> {
        let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError::Cert("no PEM CERTIFICATE block found".into()))?
            .map_err(|e| CaError::Cert(format!("not a readable PEM certificate: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CaError::Cert(format!("not a valid X.509 certificate: {e}")))?;
        // A self-signed CA whose signature no longer verifies was damaged or
        // edited (found by identity::properties): one changed byte can still
        // parse as another certificate, which would then be handed out.
        if x509.subject() == x509.issuer() {
            match x509.verify_signature(None) {
                Ok(()) => {}
                Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => {
                    return Err(CaError::Cert(
                        "its self-signature uses an algorithm the proxy cannot check; use \
                         ECDSA P-256/P-384 with SHA-256/384, Ed25519 or RSA (certs/gen-ca.sh)"
                            .into(),
                    ));
                }
                Err(e) => {
                    return Err(CaError::Cert(format!(
                        "its self-signature does not verify ({e}): the file is damaged or was \
                         edited; give the original, or make a new CA with certs/gen-ca.sh"
                    )));
                }
            }
        }
        if !x509.is_ca() {
            return Err(CaError::Cert(
                "not a CA certificate (it lacks basicConstraints CA:TRUE); make one with \
                 certs/gen-ca.sh"
                    .into(),
            ));
        }
        if let Ok(Some(ku)) = x509.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(CaError::Cert(
                "its keyUsage does not allow signing certificates (keyCertSign)".into(),
            ));
        }
        let not_after = unix_to_system(x509.validity().not_after.timestamp());
        if not_after <= SystemTime::now() {
            return Err(CaError::Expired(x509.validity().not_after.to_string()));
        }
        let not_before = unix_to_system(x509.validity().not_before.timestamp());
        if not_before > SystemTime::now() + BACKDATE {
            return Err(CaError::Cert(format!(
                "not valid before {} (is this machine's clock right?)",
                x509.validity().not_before
            )));
        }

        let pkcs8 = read_private_key(key_pem, x509.public_key().raw)?;
        let key = KeyPair::try_from(&pkcs8).map_err(|e| {
            CaError::Key(format!(
                "unsupported key ({e}); use ECDSA P-256/P-384, Ed25519 or RSA"
            ))
        })?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let key_pem = key.serialize_pem();
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| CaError::Cert(format!("cannot use it as an issuer: {e}")))?;
        Ok(Authority {
            cert_pem: pem_of(&cert_der),
            cert_der: cert_der.into_owned(),
            key_pem,
            not_after,
            issuer,
        })
    }

    /// A new self-signed CA: ECDSA P-256, CN [`GENERATED_CA_NAME`], valid for
    /// [`GENERATED_CA_VALIDITY`].
    pub fn generate() -> Result<Authority, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, GENERATED_CA_NAME);
        // Path length 0: it signs leaf certificates only.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        let not_after = now + GENERATED_CA_VALIDITY;
        params.not_after = not_after.into();
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Authority {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem,
            not_after: truncate_to_secs(not_after),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM: what clients trust (kubeconfig
    /// `certificate-authority-data`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA's private key, PKCS#8 PEM (to keep a generated CA).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the CA expires; no issued certificate lasts longer.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A serving certificate for `sans`: each one that parses as an IP address
    /// (v4, v6, or v6 in brackets) becomes an IP SAN, any other a DNS SAN. The
    /// subject CN is the first of them.
    pub fn issue_server(&self, sans: &[String], validity: Duration) -> Result<Issued, CaError> {
        let first = sans.first().ok_or(CaError::NoNames)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, validity)
    }

    /// A certificate for the replica-to-replica port (HA): subject CN
    /// [`PEER_COMMON_NAME`], valid for `sans`, usable as server and client.
    pub fn issue_peer(&self, sans: &[String], validity: Duration) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, PEER_COMMON_NAME);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, validity)
    }

    /// A client certificate (clientAuth) with subject CN `common_name` and an O
    /// per organization: Kubernetes reads them as user name and groups.
    pub fn issue_client(
        &self,
        common_name: &str,
        organizations: &[&str],
        validity: Duration,
    ) -> Result<Issued, CaError> {
        if common_name.is_empty() {
            return Err(CaError::Name {
                name: String::new(),
                reason: "a client certificate needs a common name (the user name)".into(),
            });
        }
        if organizations.len() > MAX_ORGANIZATIONS {
            return Err(CaError::TooManyOrganizations(organizations.len()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = client_subject(common_name, organizations);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, validity)
    }

    fn issue(&self, params: CertificateParams, validity: Duration) -> Result<Issued, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (cert_pem, not_after) = self.sign(params, &key, validity)?;
        Ok(Issued {
            cert_pem,
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Sign `params` for a key someone else holds (a CSR's): a leaf certificate
    /// valid from now for `validity`, never past the CA. Returns the PEM
    /// certificate and when it expires.
    pub fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<(String, SystemTime), CaError> {
        let now = SystemTime::now();
        let ca_not_after = self.not_after();
        if ca_not_after <= now {
            return Err(CaError::Expired(format!("{ca_not_after:?}")));
        }
        let not_after = (now + validity).min(ca_not_after);
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok((cert.pem(), truncate_to_secs(not_after)))
    }
}

/// A client's subject: an O per organization (at most
/// [`MAX_ORGANIZATIONS`]: rcgen keeps one value per attribute type), then the CN.
pub fn client_subject(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    for (i, org) in organizations.iter().enumerate() {
        let ty = if i == 0 {
            DnType::OrganizationName
        } else {
            // Same OID as O (2.5.4.10); a distinct key for rcgen's map.
            DnType::CustomDnType(vec![2, 5, 4, 10])
        };
        name.push(ty, *org);
    }
    name.push(DnType::CommonName, common_name);
    name
}

/// One subject alternative name: an IP address if it parses as one, else a DNS name.
fn san(name: &str) -> Result<SanType, CaError> {
    let bare = name
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |reason: &str| CaError::Name {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    // Same rules clients apply (webpki): letters, digits, '-', '.', no port.
    if rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(bad(
            "not an IP address nor a valid DNS name (give a host name without scheme or port)",
        ));
    }
    Ok(SanType::DnsName(
        name.try_into()
            .map_err(|e: rcgen::Error| bad(&e.to_string()))?,
    ))
}

/// Read an unencrypted PEM private key as PKCS#8. SEC1 and PKCS#1 keys are
/// wrapped using the algorithm identifier of the certificate's public key
/// (`spki`), which is what PKCS#8 carries for EC and RSA keys.
fn read_private_key(pem: &str, spki: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, CaError> {
    if pem.contains("ENCRYPTED PRIVATE KEY") {
        return Err(CaError::Key(
            "the key is encrypted; decrypt it first (openssl pkey -in KEY -out PLAIN.key)".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        CaError::Key(format!(
            "no readable PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY): {e}"
        ))
    })?;
    match key {
        PrivateKeyDer::Pkcs8(k) => Ok(k.clone_key()),
        PrivateKeyDer::Sec1(k) => wrap_pkcs8(k.secret_sec1_der(), spki),
        PrivateKeyDer::Pkcs1(k) => wrap_pkcs8(k.secret_pkcs1_der(), spki),
        _ => Err(CaError::Key("unsupported private key format".into())),
    }
}

fn wrap_pkcs8(inner: &[u8], spki: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, CaError> {
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, ... }
    let bad = || CaError::Cert("cannot read the certificate's public key algorithm".into());
    let (tag, body, _) = der_tlv(spki).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let (tag, _, algorithm) = der_tlv(body).ok_or_else(bad)?;
    if tag != 0x30 {
        return Err(bad());
    }
    let mut content = vec![0x02, 0x01, 0x00]; // version 0
    content.extend_from_slice(algorithm);
    content.extend_from_slice(&der_encode(0x04, inner));
    Ok(PrivatePkcs8KeyDer::from(der_encode(0x30, &content)))
}

/// Split the first DER element of `input`: (tag, contents, whole element).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        (
            bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize),
            2 + n,
        )
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(..end)?))
}

fn der_encode(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

pub(super) fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Certificates hold whole seconds.
fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

/// The common name of a certificate (a client's, after the handshake).
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The subject CN of the client certificate a TLS connection was shown.
pub fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(common_name)
}

/// What the client certificate a TLS connection was shown says about its
/// holder (CN, O values, URI SANs); empty without one.
pub fn peer_identity(conn: &rustls::ServerConnection) -> PeerIdentity {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(identity_of)
        .unwrap_or_default()
}

/// A certificate's CN, O values and URI SANs.
pub fn identity_of(der: &CertificateDer<'_>) -> PeerIdentity {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return PeerIdentity::default();
    };
    let text =
        |a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().ok().map(str::to_string);
    let uris = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    PeerIdentity {
        common_name: cert.subject().iter_common_name().next().and_then(text),
        organizations: cert
            .subject()
            .iter_organization()
            .filter_map(text)
            .collect(),
        uris,
    }
}

/// The cluster a client certificate of ours was issued for: the kubeconfigs
/// the proxy writes carry CN `tower:<cluster>`.
pub fn cluster_of(common_name: &str) -> Option<&str> {
    common_name.strip_prefix("tower:").filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests;
