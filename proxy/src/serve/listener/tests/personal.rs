//! A personal certificate (signed from a CSR, `identity::signer`) at a
//! cluster's port, against the fake member: the member sees the person
//! (impersonation on top of the agent's credentials), whatever the client
//! claims; the certificate opens its own cluster only.

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;
use crate::identity::ca::client_subject;
use crate::identity::signer;

/// A key and a CSR for `user`/`groups` naming `cluster`, signed by `ca` as
/// the signer controller would.
fn personal(ca: &Ca, user: &str, groups: &[&str], cluster: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = client_subject(user, groups);
    let uri = Ia5String::try_from(format!("tower://{cluster}")).unwrap();
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let checked = signer::check(csr.as_bytes(), &["client auth".to_string()]).unwrap();
    Issued {
        cert_pem: signer::sign(ca, &checked, DAY).unwrap(),
        key_pem: key.serialize_pem(),
        not_after: std::time::SystemTime::now() + DAY,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_member_sees_the_person_of_a_personal_certificate() {
    let (_member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    let jane = personal(&proxy.ca, "jane", &["dev", "ops"], CLUSTER);
    let tls = Some(client_tls(&proxy.ca, Some(&jane)));

    // The client's own impersonation is replaced by the certificate's.
    let req = Request::get("/whoami")
        .header("Impersonate-User", "system:admin")
        .header("Impersonate-Group", "system:masters")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send(addr, tls.clone(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        body_text(resp).await,
        format!("user=jane groups=dev,ops auth=Bearer {BEARER}")
    );

    // The machine kubeconfig still acts as the agent.
    let (code, body) = proxy.get("/whoami").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body, format!("user= groups= auth=Bearer {BEARER}"));

    // Another cluster's personal certificate is refused here.
    let beta = personal(&proxy.ca, "jane", &["dev"], "beta");
    let resp = send(
        addr,
        Some(client_tls(&proxy.ca, Some(&beta))),
        get("/whoami"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let message = body_text(resp).await;
    assert!(message.contains("issued for cluster \"beta\""), "{message}");
}
