//! The kubeconfig the proxy publishes in a Cluster's
//! `spec.connection.kubeconfig` (base64 of YAML): written by [`render`], read
//! back by [`read`] (is it still current? when does its certificate expire?).

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::identity::ca::cluster_of;

/// A kubeconfig for one cluster; YAML, as kubectl writes them.
pub fn render(cluster: &str, server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: tower-{cluster}\ncurrent-context: {cluster}\nusers:\n- name: tower-{cluster}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\npreferences: {{}}\n",
        ca = B64.encode(ca_pem),
        cert = B64.encode(cert_pem),
        key = B64.encode(key_pem),
    )
}

/// What a published kubeconfig says, as far as the proxy cares.
#[derive(Debug, PartialEq)]
pub struct Published {
    pub server: Option<String>,
    /// `certificate-authority-data` as written (base64).
    pub ca_data: Option<String>,
    /// Expiry of the first user's client certificate.
    pub cert_not_after: Option<SystemTime>,
    /// The cluster that certificate was issued for (CN `tower:<cluster>`).
    pub cert_cluster: Option<String>,
}

/// Read a published kubeconfig (base64 of YAML); `None` if it is not one.
pub fn read(b64: &str) -> Option<Published> {
    let yaml = String::from_utf8(B64.decode(b64.trim()).ok()?).ok()?;
    let config = kube::config::Kubeconfig::from_yaml(&yaml).ok()?;
    let cluster = config.clusters.first().and_then(|c| c.cluster.as_ref());
    let cert = config
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.client_certificate_data.as_ref())
        .and_then(|cert| B64.decode(cert).ok())
        .and_then(|pem| pem_cert(&pem));
    Some(Published {
        server: cluster.and_then(|c| c.server.clone()),
        ca_data: cluster.and_then(|c| c.certificate_authority_data.clone()),
        cert_not_after: cert.as_ref().map(|(not_after, _)| *not_after),
        cert_cluster: cert.and_then(|(_, cn)| cluster_of(&cn?).map(str::to_string)),
    })
}

/// True when the published kubeconfig points at `server`, trusts `ca_pem`
/// and its client certificate is for `cluster` (one written by Go Tower or
/// an older release is not: it is rewritten) and not due for renewal
/// (`renew` before expiry).
pub fn is_current(
    b64: &str,
    cluster: &str,
    server: &str,
    ca_pem: &str,
    now: SystemTime,
    renew: Duration,
) -> bool {
    let Some(published) = read(b64) else {
        return false;
    };
    published.cert_cluster.as_deref() == Some(cluster)
        && published.server.as_deref() == Some(server)
        && published.ca_data.as_deref() == Some(B64.encode(ca_pem).as_str())
        && published
            .cert_not_after
            .is_some_and(|expiry| expiry > now + renew)
}

/// Expiry and subject CN of the first certificate in a PEM block.
fn pem_cert(pem: &[u8]) -> Option<(SystemTime, Option<String>)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    Some((SystemTime::UNIX_EPOCH + Duration::from_secs(secs), cn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::Authority as Ca;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn rendered_kubeconfigs_read_back() {
        let ca = Ca::generate().unwrap();
        let id = ca
            .issue_client("tower:alpha", &["tower:clients"], 90 * DAY)
            .unwrap();
        let yaml = render(
            "alpha",
            "https://10.0.0.1:6443",
            ca.cert_pem(),
            &id.cert_pem,
            &id.key_pem,
        );
        let b64 = B64.encode(yaml);
        let read = read(&b64).unwrap();
        assert_eq!(read.server.as_deref(), Some("https://10.0.0.1:6443"));
        let expiry = read.cert_not_after.unwrap();
        let now = SystemTime::now();
        assert_eq!(read.cert_cluster.as_deref(), Some("alpha"));
        assert!(is_current(
            &b64,
            "alpha",
            "https://10.0.0.1:6443",
            ca.cert_pem(),
            now,
            30 * DAY
        ));
        // Another server, another CA, or a certificate due for renewal: not current.
        assert!(!is_current(
            &b64,
            "alpha",
            "https://10.0.0.2:6443",
            ca.cert_pem(),
            now,
            30 * DAY
        ));
        let other = Ca::generate().unwrap();
        assert!(!is_current(
            &b64,
            "alpha",
            "https://10.0.0.1:6443",
            other.cert_pem(),
            now,
            30 * DAY
        ));
        let late = expiry - 10 * DAY;
        assert!(!is_current(
            &b64,
            "alpha",
            "https://10.0.0.1:6443",
            ca.cert_pem(),
            late,
            30 * DAY
        ));
        // Another cluster's kubeconfig (or Go Tower's, whose certificate
        // names no cluster) is rewritten.
        assert!(!is_current(
            &b64,
            "beta",
            "https://10.0.0.1:6443",
            ca.cert_pem(),
            now,
            30 * DAY
        ));
        let go = ca.issue_client("kubesphere", &[], 90 * DAY).unwrap();
        let go = B64.encode(render(
            "alpha",
            "https://10.0.0.1:6443",
            ca.cert_pem(),
            &go.cert_pem,
            &go.key_pem,
        ));
        assert!(!is_current(
            &go,
            "alpha",
            "https://10.0.0.1:6443",
            ca.cert_pem(),
            now,
            30 * DAY
        ));
        assert!(read_garbage_is_none());
    }

    #[test]
    fn switching_between_ports_and_the_path_form_rewrites_the_kubeconfig() {
        let ca = Ca::generate().unwrap();
        let id = ca
            .issue_client("tower:alpha", &["tower:clients"], 90 * DAY)
            .unwrap();
        let port = "https://10.0.0.1:16000";
        let path = crate::serve::access::path::server("10.0.0.1", 9443, "alpha");
        let now = SystemTime::now();
        for (written, wanted) in [(port, path.as_str()), (path.as_str(), port)] {
            let b64 = B64.encode(render(
                "alpha",
                written,
                ca.cert_pem(),
                &id.cert_pem,
                &id.key_pem,
            ));
            assert!(is_current(
                &b64,
                "alpha",
                written,
                ca.cert_pem(),
                now,
                30 * DAY
            ));
            assert!(
                !is_current(&b64, "alpha", wanted, ca.cert_pem(), now, 30 * DAY),
                "{written} is stale once clients are sent to {wanted}"
            );
        }
    }

    fn read_garbage_is_none() -> bool {
        read("not base64!").is_none() && read(&B64.encode("not: [yaml")).is_none()
    }
}
