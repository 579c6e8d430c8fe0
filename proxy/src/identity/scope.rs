//! Which cluster a client certificate opens. Every client certificate the
//! proxy issues names its cluster, and a cluster's doors take only the
//! certificates naming it, so alpha's credentials cannot open beta even
//! though one CA signs both:
//!
//! - a machine kubeconfig (written into the Cluster) has CN
//!   `tower:<cluster>`; it acts as the cluster's agent;
//! - a personal certificate (signed from a CertificateSigningRequest,
//!   [`super::signer`]) has exactly one URI SAN `tower://<cluster>`, the
//!   person's name as CN and groups as O; the member sees that person;
//! - a replica's certificate ([`PEER_COMMON_NAME`]) opens no cluster.
//!
//! Anything else opens nothing. (With `--ca-cert` set to the host cluster's
//! CA, its admin certificates are signed by it too: they open no member.)

use super::ca::{PEER_COMMON_NAME, cluster_of};

/// The URI SAN scheme that names a personal certificate's cluster.
pub const CLUSTER_URI_SCHEME: &str = "tower://";

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_name: Option<String>,
    /// The subject's O values, in order.
    pub organizations: Vec<String>,
    /// The URI subject alternative names.
    pub uris: Vec<String>,
}

impl PeerIdentity {
    /// An identity known only by its common name.
    #[cfg(test)]
    pub fn named(common_name: Option<&str>) -> Self {
        Self {
            common_name: common_name.map(str::to_string),
            ..Self::default()
        }
    }

    /// The name to audit a refused holder by.
    pub fn label(&self) -> String {
        self.common_name
            .clone()
            .unwrap_or_else(|| "a certificate without a common name".into())
    }
}

/// Who holds a certificate, as far as the clusters are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A kubeconfig the proxy wrote for this cluster (acts as its agent).
    Machine { cluster: String },
    /// A person: the member judges `user` and `groups`.
    Person {
        cluster: String,
        user: String,
        groups: Vec<String>,
    },
    /// A proxy replica: opens no cluster.
    Replica,
    /// Names clusters in a way no certificate of ours does (several
    /// `tower://` URIs, one without a cluster, a `tower:` CN without one, a
    /// `tower://` URI without a CN): opens no cluster.
    Invalid,
    /// Signed by the CA but naming no cluster.
    Unbound,
}

impl Holder {
    /// The one cluster this holder may open.
    pub fn cluster(&self) -> Option<&str> {
        match self {
            Holder::Machine { cluster } | Holder::Person { cluster, .. } => Some(cluster),
            Holder::Replica | Holder::Invalid | Holder::Unbound => None,
        }
    }
}

/// The cluster named by a `tower://<cluster>` URI, if it is one.
pub fn cluster_of_uri(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix(CLUSTER_URI_SCHEME)?;
    // A bare name: no path, port, user or query.
    let ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    ok.then_some(rest)
}

/// Who holds the certificate `id` describes. A CN `tower:` is the proxy's
/// machine certificate (the CSR signer never signs such a CN); otherwise
/// exactly one `tower://` URI makes a person.
pub fn holder(id: &PeerIdentity) -> Holder {
    let cn = id.common_name.as_deref();
    if cn == Some(PEER_COMMON_NAME) {
        return Holder::Replica;
    }
    if let Some(cluster) = cn.and_then(cluster_of) {
        return Holder::Machine {
            cluster: cluster.to_string(),
        };
    }
    if cn.is_some_and(|cn| cn.starts_with("tower:")) {
        return Holder::Invalid;
    }
    let named: Vec<&str> = id
        .uris
        .iter()
        .filter(|u| u.starts_with(CLUSTER_URI_SCHEME))
        .map(|u| cluster_of_uri(u).unwrap_or(""))
        .collect();
    match (cn, named.as_slice()) {
        (Some(user), [cluster]) if !user.is_empty() && !cluster.is_empty() => Holder::Person {
            cluster: (*cluster).to_string(),
            user: user.to_string(),
            groups: id.organizations.clone(),
        },
        (_, []) => Holder::Unbound,
        _ => Holder::Invalid,
    }
}

/// The holder of `id` if it opens `cluster`, else why not.
pub fn admit(id: &PeerIdentity, cluster: &str) -> Result<Holder, String> {
    let use_instead = format!(
        "use the kubeconfig in Cluster {cluster:?} (spec.connection.kubeconfig) or a personal \
         certificate for it (docs/personal-access.md)"
    );
    let holder = holder(id);
    match holder.cluster() {
        Some(c) if c == cluster => Ok(holder),
        Some(other) => Err(format!(
            "this certificate was issued for cluster {other:?} and opens only that one, \
             not {cluster:?}: {use_instead}"
        )),
        None if holder == Holder::Replica => Err(format!(
            "a proxy replica's certificate opens no cluster: {use_instead}"
        )),
        None if holder == Holder::Invalid => Err(format!(
            "this certificate does not name one cluster the way the proxy's certificates do \
             (CN tower:<cluster>, or a CN and one URI tower://<cluster>): {use_instead}"
        )),
        None => match &id.common_name {
            Some(cn) => Err(format!(
                "this certificate (CN {cn:?}) was not issued for cluster {cluster:?}: {use_instead}"
            )),
            None => Err(format!("this certificate names no cluster: {use_instead}")),
        },
    }
}

/// Why a certificate with this common name (and nothing else) does not open
/// `cluster`, or `Ok`: [`admit`] for the tests of machine certificates.
#[cfg(test)]
pub fn opens(common_name: Option<&str>, cluster: &str) -> Result<(), String> {
    admit(&PeerIdentity::named(common_name), cluster).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(cn: &str, orgs: &[&str], uris: &[&str]) -> PeerIdentity {
        PeerIdentity {
            common_name: Some(cn.to_string()),
            organizations: orgs.iter().map(|s| s.to_string()).collect(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
        }
    }

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

    #[test]
    fn a_personal_certificate_opens_the_cluster_of_its_uri() {
        let jane = person("jane", &["dev", "ops"], &["tower://alpha"]);
        assert_eq!(
            admit(&jane, "alpha"),
            Ok(Holder::Person {
                cluster: "alpha".into(),
                user: "jane".into(),
                groups: vec!["dev".into(), "ops".into()],
            })
        );
        let beta = admit(&jane, "beta").unwrap_err();
        assert!(beta.contains("issued for cluster \"alpha\""), "{beta}");
        // Other URIs do not matter; another tower:// one makes it ambiguous.
        let other = person("jane", &[], &["spiffe://x/y", "tower://alpha"]);
        assert!(admit(&other, "alpha").is_ok());
        let two = person("jane", &[], &["tower://alpha", "tower://beta"]);
        assert_eq!(holder(&two), Holder::Invalid);
        assert!(admit(&two, "alpha").is_err());
        assert!(admit(&two, "beta").is_err());
        // A name, nothing else.
        for bad in [
            "tower://",
            "tower://alpha/x",
            "tower://alpha:1",
            "tower://u@alpha",
        ] {
            assert!(
                admit(&person("jane", &[], &[bad]), "alpha").is_err(),
                "{bad}"
            );
        }
        // No URI: nothing, whatever the name.
        assert_eq!(holder(&person("jane", &[], &[])), Holder::Unbound);
        assert!(admit(&person("jane", &[], &[]), "alpha").is_err());
        // A person needs a name.
        assert!(admit(&person("", &[], &["tower://alpha"]), "alpha").is_err());
        let nameless = PeerIdentity {
            uris: vec!["tower://alpha".into()],
            ..PeerIdentity::default()
        };
        assert_eq!(holder(&nameless), Holder::Invalid);
        assert!(admit(&nameless, "alpha").is_err());
    }

    #[test]
    fn reserved_names_are_never_people() {
        // A machine CN wins over a URI (the signer never signs such a CN).
        let machine = person("tower:alpha", &["dev"], &["tower://beta"]);
        assert_eq!(
            admit(&machine, "alpha"),
            Ok(Holder::Machine {
                cluster: "alpha".into()
            })
        );
        assert!(admit(&machine, "beta").is_err());
        // A replica with a URI still opens nothing.
        let replica = person(PEER_COMMON_NAME, &[], &["tower://alpha"]);
        assert!(admit(&replica, "alpha").unwrap_err().contains("replica"));
        // "tower:" alone is reserved too.
        let bare = person("tower:", &[], &["tower://alpha"]);
        assert_eq!(holder(&bare), Holder::Invalid);
        assert!(admit(&bare, "alpha").is_err());
    }
}
