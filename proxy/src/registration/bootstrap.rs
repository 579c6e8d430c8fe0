//! Bootstrap tokens: what an agent without a cluster token shows to be let
//! in for registration, checked against the host's Secret, as Kubernetes
//! checks its own (kubeadm's `token-id.token-secret`, a
//! `bootstrap.kubernetes.io/token` Secret named `bootstrap-token-<id>` in
//! `kube-system`). We add one usage, `usage-bootstrap-tower: "true"`, so a
//! token made for joining nodes does not also register clusters.
//!
//! Pure: the Secret and the time come in, a verdict goes out; the admission
//! ([`super::admit`]) fetches the Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use subtle::ConstantTimeEq as _;

/// The token's shape, in messages.
pub const TOKEN_FORMAT: &str = "[a-z0-9]{6}.[a-z0-9]{16}";
/// Where the tokens' Secrets live.
pub const NAMESPACE: &str = "kube-system";
/// The Secret type Kubernetes gives bootstrap tokens.
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// The data key that makes a token usable for Tower.
pub const USAGE_KEY: &str = "usage-bootstrap-tower";
/// The annotation on the token's Secret that approves its requests at once.
pub const AUTO_APPROVE: &str = "tower.kubesphere.io/auto-approve";

/// A well-formed bootstrap token: `id.secret`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id)
    }
}

fn lower_alnum(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl Token {
    /// Read `id.secret`; `None` unless it has the bootstrap-token shape.
    pub fn parse(token: &str) -> Option<Self> {
        let (id, secret) = token.split_once('.')?;
        (lower_alnum(id, 6) && lower_alnum(secret, 16)).then(|| Self {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    /// The name of its Secret in [`NAMESPACE`].
    pub fn secret_name(&self) -> String {
        format!("bootstrap-token-{}", self.id)
    }
}

/// Why a bootstrap token does not let an agent register. The texts go to the
/// agent (SSH refusal) and never hold the token's secret part.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("registration refused: the bootstrap token is malformed (expected {TOKEN_FORMAT})")]
    Malformed,
    /// No such Secret, not a bootstrap token's Secret, or the wrong secret
    /// part: one answer, so the text does not tell which token ids exist.
    #[error(
        "registration refused: bootstrap token {0} is unknown or wrong; ask the host's admin \
         for a valid one (a Secret {NAMESPACE}/bootstrap-token-<id> of type {SECRET_TYPE})"
    )]
    Unknown(String),
    #[error(
        "registration refused: bootstrap token {id} expired at {at}; ask the host's admin \
         for a new one"
    )]
    Expired { id: String, at: String },
    #[error(
        "registration refused: bootstrap token {0} is not for Tower (its Secret needs \
         {USAGE_KEY}: \"true\")"
    )]
    NotForTower(String),
}

/// A token that may register clusters.
#[derive(Debug, PartialEq, Eq)]
pub struct Valid {
    pub id: String,
    /// Its Secret carries [`AUTO_APPROVE`] `"true"`.
    pub auto_approve: bool,
}

/// Check `token` against its Secret (`None`: there is none) at `now`. The
/// secret part is compared in constant time, first: only its holder learns
/// that a token expired or is not for Tower.
pub fn check(
    token: &Token,
    secret: Option<&Secret>,
    now: jiff::Timestamp,
) -> Result<Valid, Refusal> {
    let unknown = || Refusal::Unknown(token.id.clone());
    let secret = secret.ok_or_else(unknown)?;
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        return Err(unknown());
    }
    let data = data_of(secret);
    let field = |key: &str| data.get(key).map(String::as_str).unwrap_or_default();
    let given_matches: bool = field("token-secret")
        .as_bytes()
        .ct_eq(token.secret.as_bytes())
        .into();
    if field("token-id") != token.id || !given_matches {
        return Err(unknown());
    }
    let expiration = field("expiration");
    if !expiration.is_empty() {
        // Kubernetes treats an expiration it cannot read as passed; so do we.
        let expired = expiration
            .parse::<jiff::Timestamp>()
            .map_or(true, |at| at <= now);
        if expired {
            return Err(Refusal::Expired {
                id: token.id.clone(),
                at: expiration.to_string(),
            });
        }
    }
    if field(USAGE_KEY) != "true" {
        return Err(Refusal::NotForTower(token.id.clone()));
    }
    let auto_approve = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUTO_APPROVE))
        .is_some_and(|v| v.trim() == "true");
    Ok(Valid {
        id: token.id.clone(),
        auto_approve,
    })
}

/// The Secret's data as text (`stringData` is write-only, but a Secret built
/// in a test may carry it).
fn data_of(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.entry(k.clone()).or_insert_with(|| v.clone());
    }
    out
}

#[cfg(test)]
mod tests;
