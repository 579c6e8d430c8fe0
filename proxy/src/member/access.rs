//! How to talk to a member's API server through one agent's session, built
//! from the config that agent sent: the address it advertised, TLS verified
//! against its CA (`CAData`, never unverified) for the kube-apiserver, and
//! the credentials to present (its bearer token, else its client
//! certificate). A client's own credentials never reach the member.

use std::sync::Arc;

use hyper::header::HeaderValue;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tunnel::AgentConfig;
use tunnel::addr::host_of;

use super::Target;

/// What a stream to one target of one session needs.
pub struct Access {
    /// `host:port` as the agent advertised it (the channel target and the
    /// `Host` header).
    pub address: String,
    /// TLS to the member, with the name its certificate must carry; `None`
    /// for plain HTTP (the ks-apiserver).
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// `Authorization` to send instead of the client's.
    pub authorization: Option<HeaderValue>,
}

impl Access {
    /// Prepare access to `target` from an agent's `config`, or say (naming
    /// `cluster` and the config field) why it is impossible.
    pub fn prepare(config: &AgentConfig, cluster: &str, target: Target) -> Result<Self, String> {
        match target {
            Target::KubeApiserver => kube_apiserver(config, cluster),
            Target::KsApiserver if config.kubesphere_svc_host.is_empty() => Err(format!(
                "the agent of cluster {cluster:?} advertised no ks-apiserver address \
                 (KubeSphereSvcHost)"
            )),
            Target::KsApiserver => Ok(Self {
                address: config.kubesphere_svc_host.clone(),
                tls: None,
                authorization: None,
            }),
        }
    }
}

fn kube_apiserver(config: &AgentConfig, cluster: &str) -> Result<Access, String> {
    let target = &config.kubernetes_svc_host;
    if target.is_empty() {
        return Err(format!(
            "the agent of cluster {cluster:?} advertised no kube-apiserver address \
             (KubernetesSvcHost)"
        ));
    }
    if config.ca_data.is_empty() {
        return Err(format!(
            "the agent of cluster {cluster:?} sent no CA for its kube-apiserver (CAData), so its \
             certificate cannot be verified; run the agent with a service account or a \
             kubeconfig that includes the cluster's CA"
        ));
    }
    let mut roots = RootCertStore::empty();
    let mut bad = None;
    for cert in CertificateDer::pem_slice_iter(&config.ca_data) {
        match cert {
            Ok(cert) => {
                if let Err(e) = roots.add(cert) {
                    bad = Some(e.to_string());
                }
            }
            Err(e) => bad = Some(e.to_string()),
        }
    }
    if roots.is_empty() {
        return Err(format!(
            "the CA the agent of cluster {cluster:?} sent (CAData) holds no usable PEM \
             certificate{}",
            bad.map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }
    let host = host_of(target);
    let server_name = ServerName::try_from(host.to_string()).map_err(|_| {
        format!(
            "the kube-apiserver address {target:?} the agent of cluster {cluster:?} advertised \
             has no valid host name"
        )
    })?;
    // AES-128-GCM offered first (crate::serve::suites).
    let provider = crate::serve::suites::provider();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let token = String::from_utf8_lossy(&config.bearer_token);
    let token = token.trim();
    let (mut tls, authorization) = if !token.is_empty() {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            format!(
                "the bearer token the agent of cluster {cluster:?} sent has characters a \
                 header cannot carry"
            )
        })?;
        value.set_sensitive(true);
        (builder.with_no_client_auth(), Some(value))
    } else if !config.cert_data.is_empty() && !config.key_data.is_empty() {
        let certs = CertificateDer::pem_slice_iter(&config.cert_data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                format!("the client certificate of cluster {cluster:?}'s agent (CertData): {e}")
            })?;
        let key = PrivateKeyDer::from_pem_slice(&config.key_data)
            .map_err(|e| format!("the client key of cluster {cluster:?}'s agent (KeyData): {e}"))?;
        let tls = builder.with_client_auth_cert(certs, key).map_err(|e| {
            format!(
                "the client certificate and key of cluster {cluster:?}'s agent are unusable: {e}"
            )
        })?;
        (tls, None)
    } else {
        // Anonymous: the member decides (usually 401/403, passed through).
        (builder.with_no_client_auth(), None)
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Access {
        address: target.clone(),
        tls: Some((Arc::new(tls), server_name)),
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        AgentConfig {
            name: "alpha".into(),
            kubernetes_svc_host: "[::1]:6443".into(),
            ..Default::default()
        }
    }

    #[test]
    fn no_ca_no_access() {
        let err = Access::prepare(&config(), "alpha", Target::KubeApiserver)
            .err()
            .unwrap();
        assert!(err.contains("CAData"), "{err}");
    }

    #[test]
    fn no_address_is_named() {
        let err = Access::prepare(&AgentConfig::default(), "alpha", Target::KubeApiserver)
            .err()
            .unwrap();
        assert!(err.contains("KubernetesSvcHost"), "{err}");
        let err = Access::prepare(&config(), "alpha", Target::KsApiserver)
            .err()
            .unwrap();
        assert!(err.contains("KubeSphereSvcHost"), "{err}");
    }

    #[test]
    fn garbage_ca_is_explained() {
        let mut c = config();
        c.ca_data = b"not a certificate".to_vec();
        let err = Access::prepare(&c, "alpha", Target::KubeApiserver)
            .err()
            .unwrap();
        assert!(err.contains("no usable PEM"), "{err}");
    }
}
