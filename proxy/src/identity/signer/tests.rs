use super::*;
use crate::identity::ca::identity_of;
use crate::identity::scope::{Holder, admit};
use rcgen::{DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::CertificateDer;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn usages(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn client_auth() -> Vec<String> {
    usages(&["client auth", "digital signature", "key encipherment"])
}

/// A CSR (PEM) with subject CN `cn` (none without one), O values `orgs` and
/// SANs `sans`.
fn request(cn: Option<&str>, orgs: &[&str], sans: Vec<SanType>) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = client_subject(cn.unwrap_or(""), orgs);
    if cn.is_none() {
        params.distinguished_name.remove(DnType::CommonName);
    }
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn uri(u: &str) -> SanType {
    SanType::URI(Ia5String::try_from(u).unwrap())
}

fn refused(pem: &str, usages: &[String]) -> Refusal {
    check(pem.as_bytes(), usages).unwrap_err()
}

#[test]
fn a_request_for_one_cluster_is_signed_with_its_names() {
    let pem = request(Some("jane"), &["dev", "ops"], vec![uri("tower://alpha")]);
    let checked = check(pem.as_bytes(), &client_auth()).unwrap();
    assert_eq!(checked.user, "jane");
    assert_eq!(checked.groups, ["dev", "ops"]);
    assert_eq!(checked.cluster, "alpha");
    // "client auth" alone is enough.
    check(pem.as_bytes(), &usages(&["client auth"])).unwrap();

    let ca = Ca::generate().unwrap();
    let cert = sign(&ca, &checked, DAY).unwrap();
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let id = identity_of(&der);
    assert_eq!(id.common_name.as_deref(), Some("jane"));
    assert_eq!(id.organizations, ["dev", "ops"]);
    assert_eq!(id.uris, ["tower://alpha"]);
    assert_eq!(
        admit(&id, "alpha"),
        Ok(Holder::Person {
            cluster: "alpha".into(),
            user: "jane".into(),
            groups: vec!["dev".into(), "ops".into()],
        })
    );
    assert!(admit(&id, "beta").is_err());

    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let eku = x509.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(!x509.is_ca());
    // The requester's key, signed by the CA.
    let ca_der = ca.cert_der();
    let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(x509.issuer().as_raw(), ca_x509.subject().as_raw());
    x509.verify_signature(Some(ca_x509.public_key())).unwrap();
    assert_eq!(x509.public_key().raw, checked.spki.as_slice());
}

#[test]
fn requests_that_do_not_name_exactly_one_cluster_are_refused() {
    let none = refused(&request(Some("jane"), &["dev"], vec![]), &client_auth());
    assert_eq!(none.reason, INVALID_REQUEST);
    assert!(none.message.contains("names no cluster"), "{none:?}");
    assert!(none.message.contains("URI:tower://"), "{none:?}");

    let two = refused(
        &request(
            Some("jane"),
            &[],
            vec![uri("tower://alpha"), uri("tower://beta")],
        ),
        &client_auth(),
    );
    assert!(two.message.contains("2 clusters (alpha, beta)"), "{two:?}");

    for bad in ["tower://", "tower://alpha/x", "tower://a:1"] {
        let r = refused(&request(Some("jane"), &[], vec![uri(bad)]), &client_auth());
        assert!(
            r.message.contains("does not name a cluster"),
            "{bad}: {r:?}"
        );
    }
    let dns = refused(
        &request(
            Some("jane"),
            &[],
            vec![
                uri("tower://alpha"),
                SanType::DnsName("x.example.com".try_into().unwrap()),
            ],
        ),
        &client_auth(),
    );
    assert!(dns.message.contains("is not signed"), "{dns:?}");
}

#[test]
fn names_are_checked() {
    let alpha = || vec![uri("tower://alpha")];
    let no_cn = refused(&request(None, &["dev"], alpha()), &client_auth());
    assert!(no_cn.message.contains("no CN"), "{no_cn:?}");
    let empty = refused(&request(Some(""), &[], alpha()), &client_auth());
    assert!(empty.message.contains("empty"), "{empty:?}");
    let machine = refused(&request(Some("tower:alpha"), &[], alpha()), &client_auth());
    assert!(machine.message.contains("reserved"), "{machine:?}");
    let bare = refused(&request(Some("tower:"), &[], alpha()), &client_auth());
    assert!(bare.message.contains("reserved"), "{bare:?}");
    let control = refused(&request(Some("ja\nne"), &[], alpha()), &client_auth());
    assert!(control.message.contains("control"), "{control:?}");
}

#[test]
fn only_client_auth_is_signed() {
    let pem = request(Some("jane"), &[], vec![uri("tower://alpha")]);
    let server = refused(&pem, &usages(&["client auth", "server auth"]));
    assert!(server.message.contains("\"server auth\""), "{server:?}");
    let missing = refused(&pem, &usages(&["digital signature"]));
    assert!(missing.message.contains("must include"), "{missing:?}");
    assert!(refused(&pem, &[]).message.contains("must include"));
}

#[test]
fn unreadable_or_forged_requests_are_refused() {
    let junk = refused("not a request", &client_auth());
    assert_eq!(junk.reason, INVALID_REQUEST);
    assert!(junk.message.contains("PEM"), "{junk:?}");

    // A byte of the signature changed.
    let pem = request(Some("jane"), &[], vec![uri("tower://alpha")]);
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let forged = pem_of(&bytes);
    let r = refused(&forged, &client_auth());
    assert!(r.message.contains("signature"), "{r:?}");
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
}

#[test]
fn validity_is_capped() {
    assert_eq!(validity(None), DEFAULT_VALIDITY);
    assert_eq!(validity(Some(3600)), Duration::from_secs(3600));
    assert_eq!(validity(Some(i32::MAX)), MAX_VALIDITY);
    assert_eq!(validity(Some(-5)), MIN_VALIDITY);
    assert_eq!(validity(Some(1)), MIN_VALIDITY);
}

#[test]
fn unknown_clusters_say_what_to_do() {
    let r = unknown_cluster("gamma");
    assert_eq!(r.reason, UNKNOWN_CLUSTER);
    assert!(r.message.contains("\"gamma\"") && r.message.contains("kubectl get clusters"));
}
