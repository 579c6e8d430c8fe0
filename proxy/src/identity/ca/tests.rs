use super::*;

use std::sync::Arc;

// These tests are about one CA's certificates; the rotating handle has its own.
type Ca = Authority;

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::UnixTime;
use x509_parser::extensions::GeneralName;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn sans_of(pem: &str) -> Vec<String> {
    let der = der_of(pem);
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let ext = x509.subject_alternative_name().unwrap().unwrap();
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("dns:{d}"),
            GeneralName::IPAddress(b) => match b.len() {
                4 => format!("ip:{}", IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())),
                16 => format!("ip:{}", IpAddr::from(<[u8; 16]>::try_from(*b).unwrap())),
                _ => panic!("bad IP SAN"),
            },
            other => format!("{other:?}"),
        })
        .collect()
}

fn client_verifier(ca: &Ca) -> Arc<dyn ClientCertVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap()
}

fn verify_client(ca: &Ca, issued: &Issued) -> Result<(), rustls::Error> {
    client_verifier(ca)
        .verify_client_cert(&der_of(&issued.cert_pem), &[], UnixTime::now())
        .map(|_| ())
}

#[test]
fn server_certificate_sans() {
    let ca = Ca::generate().unwrap();
    let sans: Vec<String> = [
        "mc-alpha.kubesphere-system.svc",
        "10.96.0.12",
        "fd00::12",
        "[::1]",
        "localhost",
        "lb-1234.elb.example.com",
    ]
    .map(String::from)
    .to_vec();
    let issued = ca.issue_server(&sans, 30 * DAY).unwrap();
    assert_eq!(
        sans_of(&issued.cert_pem),
        [
            "dns:mc-alpha.kubesphere-system.svc",
            "ip:10.96.0.12",
            "ip:fd00::12",
            "ip:::1",
            "dns:localhost",
            "dns:lb-1234.elb.example.com",
        ]
    );
    let der = der_of(&issued.cert_pem);
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn: Vec<_> = x509.subject().iter_common_name().collect();
    assert_eq!(cn[0].as_str().unwrap(), "mc-alpha.kubesphere-system.svc");
    assert!(!x509.is_ca());
    assert!(
        x509.extended_key_usage()
            .unwrap()
            .unwrap()
            .value
            .server_auth
    );
    // Usable as a rustls server key.
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    rustls::crypto::ring::sign::any_supported_type(&key).unwrap();

    // Valid for the requested time, give or take the backdating.
    let left = issued.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(left > 29 * DAY && left <= 30 * DAY, "{left:?}");
    let not_after = unix_to_system(x509.validity().not_after.timestamp());
    assert_eq!(not_after, issued.not_after);
}

#[test]
fn bad_names_are_refused() {
    let ca = Ca::generate().unwrap();
    assert!(matches!(
        ca.issue_server(&[], DAY).unwrap_err(),
        CaError::NoNames
    ));
    for bad in ["https://x.example.com", "x.example.com:6443", "a b", ""] {
        let err = ca.issue_server(&[bad.to_string()], DAY).unwrap_err();
        assert!(matches!(err, CaError::Name { .. }), "{bad}: {err}");
    }
}

#[test]
fn client_certificate_is_accepted_by_a_verifier_with_the_ca_as_root() {
    let ca = Ca::generate().unwrap();
    let issued = ca
        .issue_client("kubernetes-admin", &["system:masters", "ops"], DAY)
        .unwrap();
    verify_client(&ca, &issued).unwrap();

    let der = der_of(&issued.cert_pem);
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    let orgs: Vec<_> = x509
        .subject()
        .iter_organization()
        .map(|o| o.as_str().unwrap().to_string())
        .collect();
    assert_eq!(orgs, ["system:masters", "ops"]);
    let cn: Vec<_> = x509.subject().iter_common_name().collect();
    assert_eq!(cn[0].as_str().unwrap(), "kubernetes-admin");
    assert!(
        x509.extended_key_usage()
            .unwrap()
            .unwrap()
            .value
            .client_auth
    );

    // Another CA's certificate is refused; so is a serving certificate.
    let other = Ca::generate().unwrap();
    let foreign = other.issue_client("kubernetes-admin", &[], DAY).unwrap();
    assert!(verify_client(&ca, &foreign).is_err());
    let server = ca.issue_server(&["localhost".into()], DAY).unwrap();
    assert!(verify_client(&ca, &server).is_err());

    assert!(matches!(
        ca.issue_client("u", &["a", "b", "c"], DAY).unwrap_err(),
        CaError::TooManyOrganizations(3)
    ));
}

#[test]
fn issued_certificates_never_outlive_the_ca() {
    let ca = Ca::generate().unwrap();
    let issued = ca
        .issue_server(&["localhost".into()], 100 * 365 * DAY)
        .unwrap();
    assert_eq!(issued.not_after, ca.not_after());
}

#[test]
fn generated_ca_round_trips_through_pem() {
    let ca = Ca::generate().unwrap();
    let again = Ca::load(ca.cert_pem(), ca.key_pem()).unwrap();
    assert_eq!(again.cert_der(), ca.cert_der());
    let issued = again.issue_client("u", &["g"], DAY).unwrap();
    verify_client(&ca, &issued).unwrap();

    let other = Ca::generate().unwrap();
    assert!(matches!(
        Ca::load(ca.cert_pem(), other.key_pem()).unwrap_err(),
        CaError::KeyMismatch
    ));
    let leaf = ca.issue_server(&["localhost".into()], DAY).unwrap();
    let err = Ca::load(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
    let err = Ca::load("junk", ca.key_pem()).unwrap_err();
    assert!(matches!(err, CaError::Cert(_)), "{err}");
    let err = Ca::load(ca.cert_pem(), "junk").unwrap_err();
    assert!(matches!(err, CaError::Key(_)), "{err}");
}

fn openssl(args: &[&str]) -> bool {
    match std::process::Command::new("openssl").args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => panic!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => false,
    }
}

/// CAs as openssl makes them: certs/gen-ca.sh (PKCS#8 P-256) and keys in
/// the SEC1, PKCS#1 RSA and Ed25519 forms.
#[test]
fn loads_openssl_made_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../certs/gen-ca.sh");
    let gen_ca = dir.join("gen-ca");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(&gen_ca)
        .output();
    match status {
        Ok(out) if out.status.success() => {}
        Ok(out) if String::from_utf8_lossy(&out.stderr).contains("openssl not found") => {
            eprintln!("skipping: openssl not installed");
            return;
        }
        Ok(out) => panic!("gen-ca.sh failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("cannot run bash: {e}"),
    }
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let mut cases = vec![(
        "gen-ca.sh",
        read(&gen_ca.join("ca.crt")),
        read(&gen_ca.join("ca.key")),
    )];

    let d = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let mut make = |label: &'static str, genkey: &[&str]| {
        let key = d(&format!("{label}.key"));
        let crt = d(&format!("{label}.crt"));
        // The subcommand, then -out (genrsa wants the key size last).
        let mut args = vec![genkey[0], "-out", &key];
        args.extend(&genkey[1..]);
        if !openssl(&args) {
            return;
        }
        assert!(openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &key,
            "-days",
            "30",
            "-subj",
            "/O=Example/CN=other-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &crt,
        ]));
        cases.push((label, read(crt.as_ref()), read(key.as_ref())));
    };
    make("sec1-p256", &["ecparam", "-genkey", "-name", "prime256v1"]);
    make("sec1-p384", &["ecparam", "-genkey", "-name", "secp384r1"]);
    make("pkcs1-rsa", &["genrsa", "-traditional", "2048"]);
    make(
        "pkcs8-rsa",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
    );
    make("ed25519", &["genpkey", "-algorithm", "ed25519"]);

    let kinds: Vec<_> = cases.iter().map(|c| c.0).collect();
    for (label, _, key) in &cases {
        let want = match *label {
            "sec1-p256" | "sec1-p384" => "BEGIN EC PRIVATE KEY",
            "pkcs1-rsa" => "BEGIN RSA PRIVATE KEY",
            _ => "BEGIN PRIVATE KEY",
        };
        assert!(key.contains(want), "{label}: expected a {want} key");
    }
    eprintln!("loaded CAs: {kinds:?}");
    for (label, crt, key) in cases {
        let ca = Ca::load(&crt, &key).unwrap_or_else(|e| panic!("{label}: {e}"));
        let client = ca
            .issue_client("kubernetes-admin", &["system:masters"], DAY)
            .unwrap();
        verify_client(&ca, &client).unwrap_or_else(|e| panic!("{label}: {e}"));
        // The issuer name is copied byte for byte from the CA's subject.
        let ca_der = der_of(&crt);
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let leaf_der = der_of(&client.cert_pem);
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        assert_eq!(
            leaf.issuer().as_raw(),
            ca_x509.subject().as_raw(),
            "{label}"
        );
        let server = ca.issue_server(&["127.0.0.1".into()], DAY).unwrap();
        assert_eq!(sans_of(&server.cert_pem), ["ip:127.0.0.1"], "{label}");
    }
}
