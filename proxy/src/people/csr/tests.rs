use super::*;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequestSpec, CertificateSigningRequestStatus,
};
use rcgen::string::Ia5String;
use rcgen::{CertificateParams, KeyPair, SanType};

use crate::identity::ca::client_subject;

fn pem(uri: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = client_subject("jane", &["dev"]);
    params.subject_alt_names = uri
        .map(|u| SanType::URI(Ia5String::try_from(u).unwrap()))
        .into_iter()
        .collect();
    params
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
        .into_bytes()
}

fn csr(request: Vec<u8>, conditions: &[(&str, &str)]) -> CertificateSigningRequest {
    CertificateSigningRequest {
        spec: CertificateSigningRequestSpec {
            request: ByteString(request),
            signer_name: SIGNER_NAME.into(),
            usages: Some(vec!["client auth".into()]),
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        status: Some(CertificateSigningRequestStatus {
            certificate: None,
            conditions: Some(
                conditions
                    .iter()
                    .map(|(t, s)| CertificateSigningRequestCondition {
                        type_: t.to_string(),
                        status: s.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    }
}

#[test]
fn only_approved_unanswered_requests_are_signed() {
    let good = || pem(Some("tower://alpha"));
    let approved = csr(good(), &[("Approved", "True")]);
    match next_step(&approved) {
        Step::Sign(checked, validity) => {
            assert_eq!(checked.user, "jane");
            assert_eq!(checked.groups, ["dev"]);
            assert_eq!(checked.cluster, "alpha");
            assert_eq!(validity, Duration::from_secs(3600));
        }
        other => panic!("{other:?}"),
    }
    // Pending, denied, failed: nothing, ever.
    for conditions in [
        &[][..],
        &[("Approved", "False")][..],
        &[("Denied", "True")][..],
        &[("Denied", "True"), ("Approved", "True")][..],
        &[("Approved", "True"), ("Failed", "True")][..],
    ] {
        assert_eq!(
            next_step(&csr(good(), conditions)),
            Step::Nothing,
            "{conditions:?}"
        );
    }
    // Already issued.
    let mut issued = csr(good(), &[("Approved", "True")]);
    if let Some(s) = issued.status.as_mut() {
        s.certificate = Some(ByteString(b"-----BEGIN CERTIFICATE-----".to_vec()));
    }
    assert_eq!(next_step(&issued), Step::Nothing);
    // Another signer's.
    let mut other = csr(good(), &[("Approved", "True")]);
    other.spec.signer_name = "kubernetes.io/kube-apiserver-client".into();
    assert_eq!(next_step(&other), Step::Nothing);
}

#[test]
fn approved_but_malformed_requests_fail_with_the_reason() {
    match next_step(&csr(pem(None), &[("Approved", "True")])) {
        Step::Fail(refusal) => {
            assert_eq!(refusal.reason, signer::INVALID_REQUEST);
            assert!(refusal.message.contains("names no cluster"), "{refusal:?}");
        }
        other => panic!("{other:?}"),
    }
    // A malformed request that is not approved is left alone.
    assert_eq!(next_step(&csr(pem(None), &[])), Step::Nothing);
}
