//! Personal certificates from CertificateSigningRequests: what the signer
//! `tower.kubesphere.io/cluster-access` accepts and what it issues. Pure: the
//! controller (`crate::people::csr`) reads the CSR objects and writes the
//! answers.
//!
//! A request names its cluster with exactly one URI SAN `tower://<cluster>`;
//! its subject CN is the user and its O values the groups, as with
//! Kubernetes' `kubernetes.io/kube-apiserver-client` signer, so the approver
//! sees who is asking (`kubectl describe csr`). The certificate copies them
//! (nothing else the request asks for), is for client auth only and opens that
//! one cluster ([`super::scope`]), where the member judges the person.

use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, SanType, SubjectPublicKeyInfo};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::ca::{Ca, MAX_ORGANIZATIONS, client_subject};
use super::scope::{CLUSTER_URI_SCHEME, cluster_of_uri};

/// The `spec.signerName` the proxy signs for.
pub const SIGNER_NAME: &str = "tower.kubesphere.io/cluster-access";
/// Without `spec.expirationSeconds`.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// The most `spec.expirationSeconds` gets (never past the CA either).
pub const MAX_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Kubernetes' own floor for `spec.expirationSeconds`.
const MIN_VALIDITY: Duration = Duration::from_secs(600);
/// `spec.usages` a request may list; `client auth` is required.
pub const USAGES: [&str; 3] = ["client auth", "digital signature", "key encipherment"];

/// `reason` of the Failed condition for a request the signer will not sign.
pub const INVALID_REQUEST: &str = "InvalidRequest";
/// `reason` of the Failed condition for a request naming no Cluster we serve.
pub const UNKNOWN_CLUSTER: &str = "UnknownCluster";
/// `reason` of the Failed condition when the CA could not sign.
pub const SIGNING_FAILED: &str = "SigningFailed";

/// Why a request is not signed: the Failed condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            reason: INVALID_REQUEST,
            message: message.into(),
        }
    }
}

/// A request the signer accepts, read from its PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub user: String,
    pub groups: Vec<String>,
    pub cluster: String,
    /// The request's public key (SubjectPublicKeyInfo, DER).
    spki: Vec<u8>,
}

const HOW: &str = "make the request with `openssl req -new -key KEY -subj \"/CN=USER/O=GROUP\" \
                   -addext \"subjectAltName=URI:tower://CLUSTER\"` (docs/personal-access.md)";

/// Check a CSR object's `spec.request` (PEM) and `spec.usages`.
pub fn check(request_pem: &[u8], usages: &[String]) -> Result<Checked, Refusal> {
    check_usages(usages)?;
    let der = CertificateSigningRequestDer::from_pem_slice(request_pem).map_err(|e| {
        Refusal::invalid(format!(
            "spec.request is not a PEM CERTIFICATE REQUEST ({e}): {HOW}"
        ))
    })?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|e| {
        Refusal::invalid(format!(
            "spec.request is not a readable certificate request ({e}): {HOW}"
        ))
    })?;
    csr.verify_signature().map_err(|e| {
        Refusal::invalid(format!(
            "the request's signature does not verify ({e}): sign it with the key it names"
        ))
    })?;
    let info = &csr.certification_request_info;
    let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
        a.as_str()
            .map(str::to_string)
            .map_err(|_| Refusal::invalid("the subject holds a value that is not text"))
    };
    let cns = info
        .subject
        .iter_common_name()
        .map(text)
        .collect::<Result<Vec<_>, _>>()?;
    let user = match cns.as_slice() {
        [cn] => cn.clone(),
        [] => {
            return Err(Refusal::invalid(format!(
                "the subject has no CN (the user name): {HOW}"
            )));
        }
        _ => {
            return Err(Refusal::invalid(
                "the subject has several CNs: give one, the user name",
            ));
        }
    };
    check_name("user name (CN)", &user)?;
    if user.starts_with("tower:") {
        return Err(Refusal::invalid(format!(
            "the CN {user:?} starts with \"tower:\", which is reserved for the proxy's own \
             kubeconfigs: use the person's name"
        )));
    }
    let groups = info
        .subject
        .iter_organization()
        .map(text)
        .collect::<Result<Vec<_>, _>>()?;
    if groups.len() > MAX_ORGANIZATIONS {
        return Err(Refusal::invalid(format!(
            "the subject has {} O values (groups); at most {MAX_ORGANIZATIONS} are signed: bind \
             roles on the member to fewer groups",
            groups.len()
        )));
    }
    for group in &groups {
        check_name("group (O)", group)?;
    }
    let cluster = cluster_named(&csr)?;
    Ok(Checked {
        user,
        groups,
        cluster,
        spki: info.subject_pki.raw.to_vec(),
    })
}

fn check_usages(usages: &[String]) -> Result<(), Refusal> {
    if let Some(bad) = usages.iter().find(|u| !USAGES.contains(&u.as_str())) {
        return Err(Refusal::invalid(format!(
            "usage {bad:?} is not signed: spec.usages may list only {USAGES:?}"
        )));
    }
    if !usages.iter().any(|u| u == "client auth") {
        return Err(Refusal::invalid(
            "spec.usages must include \"client auth\": these certificates log a person in",
        ));
    }
    Ok(())
}

/// A name the member will see in an `Impersonate-*` header.
fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    if name.trim().is_empty() {
        return Err(Refusal::invalid(format!("the {what} is empty: {HOW}")));
    }
    if name.chars().any(char::is_control) {
        return Err(Refusal::invalid(format!(
            "the {what} {name:?} holds control characters"
        )));
    }
    Ok(())
}

/// The one cluster the request's SANs name.
fn cluster_named(csr: &X509CertificationRequest<'_>) -> Result<String, Refusal> {
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        let ParsedExtension::SubjectAlternativeName(san) = ext else {
            continue;
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(uri) if uri.starts_with(CLUSTER_URI_SCHEME) => {
                    names.push(cluster_of_uri(uri).map(str::to_string).ok_or_else(|| {
                        Refusal::invalid(format!(
                            "the URI {uri:?} does not name a cluster: write \
                             tower://<cluster name>"
                        ))
                    })?);
                }
                other => {
                    return Err(Refusal::invalid(format!(
                        "the subject alternative name {other} is not signed: give only \
                         URI:tower://<cluster>"
                    )));
                }
            }
        }
    }
    match names.as_slice() {
        [cluster] => Ok(cluster.clone()),
        [] => Err(Refusal::invalid(format!(
            "the request names no cluster: add a subject alternative name \
             URI:tower://<cluster>; {HOW}"
        ))),
        several => Err(Refusal::invalid(format!(
            "the request names {} clusters ({}); a personal certificate opens one: make one \
             request per cluster",
            several.len(),
            several.join(", ")
        ))),
    }
}

/// The Failed condition for a request naming a cluster the proxy does not serve.
pub fn unknown_cluster(cluster: &str) -> Refusal {
    Refusal {
        reason: UNKNOWN_CLUSTER,
        message: format!(
            "there is no Cluster {cluster:?} served by this proxy (joinFederation: true, \
             connection.type: proxy): check the name in URI:tower://{cluster} against \
             `kubectl get clusters`, and make a new request"
        ),
    }
}

/// How long the certificate lasts: `spec.expirationSeconds` within
/// [10 min, [`MAX_VALIDITY`]], [`DEFAULT_VALIDITY`] without it.
pub fn validity(expiration_seconds: Option<i32>) -> Duration {
    match expiration_seconds {
        None => DEFAULT_VALIDITY,
        Some(s) => {
            Duration::from_secs(u64::try_from(s).unwrap_or(0)).clamp(MIN_VALIDITY, MAX_VALIDITY)
        }
    }
}

/// Sign `checked` with the proxy's CA: CN, O and the URI copied, client auth
/// only, for `validity` (never past the CA). The PEM certificate.
pub fn sign(ca: &Ca, checked: &Checked, validity: Duration) -> Result<String, Refusal> {
    let failed = |e: String| Refusal {
        reason: SIGNING_FAILED,
        message: format!("the proxy could not sign this request: {e}"),
    };
    let key = SubjectPublicKeyInfo::from_der(&checked.spki).map_err(|e| {
        Refusal::invalid(format!(
            "the request's key is of a kind this signer does not support ({e}): use ECDSA \
             P-256/P-384, Ed25519 or RSA"
        ))
    })?;
    let uri = Ia5String::try_from(format!("{CLUSTER_URI_SCHEME}{}", checked.cluster))
        .map_err(|e| failed(e.to_string()))?;
    let groups: Vec<&str> = checked.groups.iter().map(String::as_str).collect();
    let mut params = CertificateParams::default();
    params.distinguished_name = client_subject(&checked.user, &groups);
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    ca.sign(params, &key, validity)
        .map(|(pem, _)| pem)
        .map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests;
