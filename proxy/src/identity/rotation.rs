//! Which CA signs and which CAs are trusted, as the Secret `tower-proxy`
//! says: the phases of a CA rotation are edits of its keys, so the state is
//! the Secret's content and every replica reads it the same way (pure:
//! [`plan`]; followed by [`super::watch`]; commands in docs/ca-rotation.md).
//!
//! | phase    | keys                                   | client certs | serving certs | trusted  |
//! |----------|----------------------------------------|--------------|---------------|----------|
//! | steady   | `ca.crt`/`ca.key`                      | CA           | CA            | CA       |
//! | added    | + `ca-next.crt`/`ca-next.key`          | CA           | CA            | CA, next |
//! | switched | `ca.*` = new, `ca-previous.*` = old    | new          | old           | new, old |
//!
//! Dropping is removing `ca-previous.*`: steady again, with the new CA, which
//! then signs the serving certificates too. Until then the previous CA's
//! key (`ca-previous.key`, optional) keeps signing them, so clients that
//! still trust only the old CA (a kubeconfig copied before the rotation)
//! validate the proxy: a cross-signed chain would not do, CAs made with
//! a path length of 0 (the proxy's own) cannot have an intermediate.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::ca::Authority;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NEXT_CERT: &str = "ca-next.crt";
pub const NEXT_KEY: &str = "ca-next.key";
pub const PREVIOUS_CERT: &str = "ca-previous.crt";
pub const PREVIOUS_KEY: &str = "ca-previous.key";

/// Where a CA rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Steady,
    /// A next CA is trusted, not yet signing.
    Added,
    /// The new CA signs, the previous one is still trusted.
    Switched,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Added => "added",
            Phase::Switched => "switched",
        }
    }
}

/// What the proxy should do with the CAs.
pub struct Plan {
    pub signer: Authority,
    /// Trusted besides the signer.
    pub others: Vec<CertificateDer<'static>>,
    /// Signs the serving certificates instead of the signer: the previous
    /// CA (switched phase, with `ca-previous.key`).
    pub serving: Option<Authority>,
    pub phase: Phase,
}

fn text<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<&'a str> {
    data.get(key)
        .and_then(|v| std::str::from_utf8(&v.0).ok())
        .filter(|s| !s.trim().is_empty())
}

fn cert(data: &BTreeMap<String, ByteString>, key: &str) -> Result<CertificateDer<'static>, String> {
    let pem = text(data, key).ok_or_else(|| format!("{key} is empty"))?;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("{key} is not a PEM certificate: {e}"))
}

/// The plan the Secret's `data` describes, or why it describes none (the
/// proxy then keeps what it uses).
pub fn plan(data: &BTreeMap<String, ByteString>) -> Result<Plan, String> {
    let pair = |cert_key: &str, key_key: &str| {
        let (Some(c), Some(k)) = (text(data, cert_key), text(data, key_key)) else {
            return Err(format!("{cert_key} and {key_key} must both be set"));
        };
        Authority::load(c, k).map_err(|e| format!("{cert_key}/{key_key}: {e}"))
    };
    let signer = pair(CA_CERT, CA_KEY)?;
    let has_next = text(data, NEXT_CERT).is_some() || text(data, NEXT_KEY).is_some();
    let has_previous = text(data, PREVIOUS_CERT).is_some() || text(data, PREVIOUS_KEY).is_some();
    match (has_next, has_previous) {
        (true, true) => Err(format!(
            "both {NEXT_CERT} and {PREVIOUS_CERT} are set: finish one rotation (drop \
             {PREVIOUS_CERT}) before adding the next CA"
        )),
        (true, false) => {
            // The key too: it must be usable when the switch comes.
            let next = pair(NEXT_CERT, NEXT_KEY)?;
            Ok(Plan {
                others: vec![next.cert_der().clone()],
                signer,
                serving: None,
                phase: Phase::Added,
            })
        }
        (false, true) => {
            let previous = cert(data, PREVIOUS_CERT)?;
            let serving = match text(data, PREVIOUS_KEY) {
                Some(_) => Some(pair(PREVIOUS_CERT, PREVIOUS_KEY)?),
                None => None,
            };
            Ok(Plan {
                others: vec![previous],
                signer,
                serving,
                phase: Phase::Switched,
            })
        }
        (false, false) => Ok(Plan {
            signer,
            others: Vec::new(),
            serving: None,
            phase: Phase::Steady,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn the_phases_of_a_rotation() {
        let old = Authority::generate().unwrap();
        let new = Authority::generate().unwrap();
        let steady = plan(&data(&[(CA_CERT, old.cert_pem()), (CA_KEY, old.key_pem())])).unwrap();
        assert_eq!(steady.phase, Phase::Steady);
        assert!(steady.others.is_empty());

        let added = plan(&data(&[
            (CA_CERT, old.cert_pem()),
            (CA_KEY, old.key_pem()),
            (NEXT_CERT, new.cert_pem()),
            (NEXT_KEY, new.key_pem()),
        ]))
        .unwrap();
        assert_eq!(added.phase, Phase::Added);
        assert_eq!(added.signer.cert_der(), old.cert_der());
        assert_eq!(added.others, [new.cert_der().clone()]);

        let switched = plan(&data(&[
            (CA_CERT, new.cert_pem()),
            (CA_KEY, new.key_pem()),
            (PREVIOUS_CERT, old.cert_pem()),
            (PREVIOUS_KEY, old.key_pem()),
        ]))
        .unwrap();
        assert_eq!(switched.phase, Phase::Switched);
        assert_eq!(switched.signer.cert_der(), new.cert_der());
        assert_eq!(switched.others, [old.cert_der().clone()]);
        assert_eq!(
            switched.serving.as_ref().map(|s| s.cert_der()),
            Some(old.cert_der())
        );
        // Without the previous key: trusted, the new CA serves.
        let without_key = plan(&data(&[
            (CA_CERT, new.cert_pem()),
            (CA_KEY, new.key_pem()),
            (PREVIOUS_CERT, old.cert_pem()),
        ]))
        .unwrap();
        assert_eq!(without_key.phase, Phase::Switched);
        assert!(without_key.serving.is_none());

        let dropped = plan(&data(&[(CA_CERT, new.cert_pem()), (CA_KEY, new.key_pem())])).unwrap();
        assert_eq!(dropped.phase, Phase::Steady);
    }

    #[test]
    fn unusable_edits_are_refused_with_the_reason() {
        let old = Authority::generate().unwrap();
        let new = Authority::generate().unwrap();
        let no_key = plan(&data(&[
            (CA_CERT, old.cert_pem()),
            (CA_KEY, old.key_pem()),
            (NEXT_CERT, new.cert_pem()),
        ]));
        assert!(no_key.err().unwrap().contains(NEXT_KEY));
        let both = plan(&data(&[
            (CA_CERT, old.cert_pem()),
            (CA_KEY, old.key_pem()),
            (NEXT_CERT, new.cert_pem()),
            (NEXT_KEY, new.key_pem()),
            (PREVIOUS_CERT, old.cert_pem()),
        ]));
        assert!(both.err().unwrap().contains("finish one rotation"));
        let mismatched = plan(&data(&[
            (CA_CERT, old.cert_pem()),
            (CA_KEY, old.key_pem()),
            (NEXT_CERT, new.cert_pem()),
            (NEXT_KEY, old.key_pem()),
        ]));
        assert!(mismatched.is_err());
        let wrong_previous_key = plan(&data(&[
            (CA_CERT, new.cert_pem()),
            (CA_KEY, new.key_pem()),
            (PREVIOUS_CERT, old.cert_pem()),
            (PREVIOUS_KEY, new.key_pem()),
        ]));
        assert!(wrong_previous_key.err().unwrap().contains(PREVIOUS_KEY));
    }
}
