//! Property tests (issue #14 part 4) for the PEM and kubeconfig input the
//! proxy reads from files, Secrets and Clusters: the CA given with
//! `--ca-cert`/`--ca-key` or kept in Secret `tower-proxy`, the CSRs people
//! submit, and the kubeconfigs published in `spec.connection.kubeconfig`
//! (written by us, Go Tower or a person). Whatever the bytes, the answer is
//! a value or an error with a reason, never a panic; what we write reads
//! back as written.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use proptest::prelude::*;

use crate::clusters::kubeconfig;
use crate::identity::ca::Authority;
use crate::identity::signer;

/// One CA for the whole file: generating keys per case would make the
/// thousands of cases slow without testing more.
static CA: LazyLock<Authority> =
    LazyLock::new(|| Authority::generate().expect("generating a test CA"));

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Text that looks like PEM often enough to get past the armour.
fn pemish() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,300}",
        "[A-Za-z0-9+/=\n]{0,600}".prop_map(|body| format!(
            "-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
        )),
        "[A-Za-z0-9+/=\n]{0,600}".prop_map(|body| format!(
            "-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n"
        )),
    ]
}

/// `text` with the byte at `at` (modulo its length) replaced by `with`.
fn mangle(text: &str, at: usize, with: u8) -> String {
    let mut bytes = text.as_bytes().to_vec();
    if !bytes.is_empty() {
        let i = at % bytes.len();
        bytes[i] = with;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_ca_from_any_text_is_refused_with_a_reason(cert in pemish(), key in pemish()) {
        let refused = Authority::load(&cert, &key);
        prop_assert!(refused.is_err());
        if let Err(e) = refused {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// One byte changed anywhere in a real CA's certificate or key, or the
    /// file cut short: it is refused, or loads as the same CA: the same
    /// signed content (a change the PEM reader skips, or one in the DER
    /// wrapper outside what is signed), or a certificate that no longer
    /// claims to be self-signed (its issuer's name changed), whose signature
    /// cannot be checked without that issuer. A damaged certificate that
    /// still claims to be self-signed with other content is refused: this
    /// test found such ones loading before the CA's self-signature was checked.
    #[test]
    fn a_damaged_ca_loads_the_same_or_is_refused(
        in_key in any::<bool>(), at in any::<usize>(), with in any::<u8>(), cut in any::<bool>(),
    ) {
        let (mut cert, mut key) = (CA.cert_pem().to_string(), CA.key_pem().to_string());
        let target = if in_key { &mut key } else { &mut cert };
        *target = if cut {
            let end = at % target.len().max(1);
            target.get(..end).unwrap_or_default().to_string()
        } else {
            mangle(target, at, with)
        };
        if let Ok(loaded) = Authority::load(&cert, &key)
            && loaded.cert_pem() != CA.cert_pem()
        {
            let parse = |der| {
                x509_parser::parse_x509_certificate(der)
                    .map(|(_, x509)| x509)
                    .map_err(|e| TestCaseError::fail(format!("a loaded CA does not parse: {e}")))
            };
            let (x509, original) = (parse(loaded.cert_der())?, parse(CA.cert_der())?);
            prop_assert!(
                x509.subject() != x509.issuer()
                    || x509.tbs_certificate.as_ref() == original.tbs_certificate.as_ref(),
                "a damaged self-signed CA loaded:\n{}", loaded.cert_pem()
            );
        }
    }

    #[test]
    fn a_csr_from_any_bytes_is_refused_with_a_reason(pem in pemish()) {
        let pem = pem.replace("CERTIFICATE", "CERTIFICATE REQUEST");
        let refused = signer::check(pem.as_bytes(), &["client auth".to_string()]);
        prop_assert!(refused.is_err());
    }

    #[test]
    fn a_published_kubeconfig_from_any_text_reads_or_is_none(text in ".{0,400}", raw in any::<bool>()) {
        // Base64 of anything (a YAML that is not ours), or not base64 at all.
        let b64 = if raw { text.clone() } else { B64.encode(&text) };
        let _ = kubeconfig::read(&b64);
        // Not ours, so never taken for current (it would be kept).
        prop_assert!(!kubeconfig::is_current(
            &b64, "alpha", "https://10.0.0.1:6443", CA.cert_pem(), SystemTime::now(), DAY,
        ));
    }
}

proptest! {
    // Each case issues a certificate (a key generation): fewer cases.
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// What the proxy writes into a Cluster reads back as written, for any
    /// cluster name and server, and is current until its renewal is due.
    #[test]
    fn a_published_kubeconfig_reads_back_as_written(
        cluster in "[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?",
        host in "[a-z0-9]{1,20}(\\.[a-z0-9]{1,10}){0,3}",
        port in 1u16..,
    ) {
        let server = format!("https://{host}:{port}");
        let issued = CA.issue_client(&format!("tower:{cluster}"), &[], 90 * DAY).expect("issuing");
        let yaml = kubeconfig::render(&cluster, &server, CA.cert_pem(), &issued.cert_pem, &issued.key_pem);
        let b64 = B64.encode(&yaml);
        let read = kubeconfig::read(&b64).expect("our own kubeconfig reads back");
        prop_assert_eq!(read.server.as_deref(), Some(server.as_str()));
        prop_assert_eq!(read.cert_cluster.as_deref(), Some(cluster.as_str()));
        prop_assert_eq!(read.ca_data, Some(B64.encode(CA.cert_pem())));
        let now = SystemTime::now();
        prop_assert!(kubeconfig::is_current(&b64, &cluster, &server, CA.cert_pem(), now, 30 * DAY));
        prop_assert!(!kubeconfig::is_current(&b64, &cluster, &server, CA.cert_pem(), now, 91 * DAY));
        let other = format!("{cluster}x");
        prop_assert!(!kubeconfig::is_current(&b64, &other, &server, CA.cert_pem(), now, DAY));
    }
}
