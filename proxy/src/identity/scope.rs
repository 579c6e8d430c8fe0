//! Which cluster a client certificate opens. Every client certificate the
//! proxy issues names its cluster (CN `tower:<cluster>`, as in the
//! kubeconfigs it writes); a cluster's port takes that certificate and no
//! other, so alpha's kubeconfig cannot open beta even though one CA signs
//! both. (With `--ca-cert` set to the host cluster's CA, its admin
//! certificates are signed by it too: they open no member either.)

use super::ca::{PEER_COMMON_NAME, cluster_of};

/// Why a certificate does not open `cluster`, or `Ok`.
pub fn opens(common_name: Option<&str>, cluster: &str) -> Result<(), String> {
    match common_name {
        Some(cn) => match cluster_of(cn) {
            Some(c) if c == cluster => Ok(()),
            Some(other) => Err(format!(
                "this certificate was issued for cluster {other:?} and opens only that one, \
                 not {cluster:?}: use the kubeconfig in Cluster {cluster:?} \
                 (spec.connection.kubeconfig)"
            )),
            None if cn == PEER_COMMON_NAME => Err(format!(
                "a proxy replica's certificate opens no cluster: use the kubeconfig in \
                 Cluster {cluster:?} (spec.connection.kubeconfig)"
            )),
            None => Err(format!(
                "this certificate (CN {cn:?}) was not issued for cluster {cluster:?}: use the \
                 kubeconfig in Cluster {cluster:?} (spec.connection.kubeconfig)"
            )),
        },
        None => Err(format!(
            "this certificate names no cluster: use the kubeconfig in Cluster {cluster:?} \
             (spec.connection.kubeconfig)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_opens_its_own_cluster_only() {
        assert_eq!(opens(Some("tower:alpha"), "alpha"), Ok(()));
        let beta = opens(Some("tower:alpha"), "beta").unwrap_err();
        assert!(
            beta.contains("\"alpha\"") && beta.contains("Cluster \"beta\""),
            "{beta}"
        );
        assert!(opens(Some("kubernetes-admin"), "alpha").is_err());
        assert!(opens(Some("tower:"), "alpha").is_err());
        assert!(
            opens(Some(PEER_COMMON_NAME), "alpha")
                .unwrap_err()
                .contains("replica")
        );
        assert!(opens(None, "alpha").is_err());
        // Prefixes are not enough.
        assert!(opens(Some("tower:alpha2"), "alpha").is_err());
        assert!(opens(Some("tower:alph"), "alpha").is_err());
    }
}
