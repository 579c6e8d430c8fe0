//! What a pre-start hook prints: nothing (keep the agent's own credentials)
//! or one JSON object whose fields replace them:
//!
//! | field         | value                                   | replaces          |
//! |---------------|-----------------------------------------|-------------------|
//! | `bearerToken` | the token                               | `BearerToken`     |
//! | `caData`      | base64 of PEM (kubeconfig's `certificate-authority-data`) | `CAData` |
//! | `certData`    | base64 of PEM, with `keyData`           | `CertData`        |
//! | `keyData`     | base64 of PEM, with `certData`          | `KeyData`         |
//!
//! The identity is replaced as a whole: a hook giving `bearerToken` drops the
//! agent's client certificate, one giving `certData`/`keyData` drops its
//! token. Unknown fields are refused (a typo must not silently leave the
//! agent's own, maybe broader, credentials in place). Error messages name
//! fields and positions, never values.

use base64::Engine as _;
use serde_json::Value;

use super::HookError;
use crate::credentials::Credentials;

const FIELDS: [&str; 4] = ["bearerToken", "caData", "certData", "keyData"];

/// Credentials a pre-start hook printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    bearer_token: Option<Vec<u8>>,
    ca_data: Option<Vec<u8>>,
    cert_data: Option<Vec<u8>>,
    key_data: Option<Vec<u8>>,
}

/// Never print secrets.
impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Overrides({})", self.fields())
    }
}

impl Overrides {
    /// Parse a pre-start hook's stdout.
    pub fn parse(stdout: &[u8]) -> Result<Self, HookError> {
        let invalid = |m: String| HookError::Invalid(m);
        let text = std::str::from_utf8(stdout).map_err(|_| invalid("not UTF-8".into()))?;
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let object = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(object)) => object,
            Ok(_) => return Err(invalid("expected a JSON object".into())),
            // serde_json's syntax errors give a position, not the text.
            Err(e) => return Err(invalid(format!("not JSON: {e}"))),
        };
        let mut overrides = Self::default();
        for (key, value) in object {
            let Value::String(value) = value else {
                return Err(invalid(format!("{key:?} is not a string")));
            };
            let decode = |v: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .map_err(|_| invalid(format!("{key:?} is not base64")))
            };
            match key.as_str() {
                "bearerToken" if value.trim().is_empty() => {
                    return Err(invalid("\"bearerToken\" is empty".into()));
                }
                "bearerToken" => overrides.bearer_token = Some(value.trim().as_bytes().to_vec()),
                "caData" => overrides.ca_data = Some(decode(&value)?),
                "certData" => overrides.cert_data = Some(decode(&value)?),
                "keyData" => overrides.key_data = Some(decode(&value)?),
                _ => {
                    return Err(invalid(format!(
                        "unknown field {key:?}; expected {}",
                        FIELDS.join(", ")
                    )));
                }
            }
        }
        if overrides.cert_data.is_some() != overrides.key_data.is_some() {
            return Err(invalid("\"certData\" and \"keyData\" go together".into()));
        }
        Ok(overrides)
    }

    /// The fields set, for logs: `bearerToken,caData`, or `none`.
    pub fn fields(&self) -> String {
        let set = [
            self.bearer_token.is_some(),
            self.ca_data.is_some(),
            self.cert_data.is_some(),
            self.key_data.is_some(),
        ];
        let names: Vec<&str> = FIELDS
            .iter()
            .zip(set)
            .filter_map(|(name, set)| set.then_some(*name))
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(",")
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The agent's credentials with these in place.
    pub fn apply(&self, mut credentials: Credentials) -> Credentials {
        if let Some(token) = &self.bearer_token {
            credentials.bearer_token = token.clone();
            credentials.cert_data.clear();
            credentials.key_data.clear();
        }
        if let (Some(cert), Some(key)) = (&self.cert_data, &self.key_data) {
            credentials.cert_data = cert.clone();
            credentials.key_data = key.clone();
            if self.bearer_token.is_none() {
                credentials.bearer_token.clear();
            }
        }
        if let Some(ca) = &self.ca_data {
            credentials.ca_data = ca.clone();
        }
        credentials
    }
}

/// The string values of a JSON object in `stdout` (and stdout itself), to
/// redact from the hook's stderr.
pub fn secrets(stdout: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stdout);
    let mut secrets: Vec<String> = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(object)) => object
            .values()
            .filter_map(|v| v.as_str().map(|s| s.trim().to_string()))
            .collect(),
        _ => Vec::new(),
    };
    secrets.push(text.trim().to_string());
    // Short values would redact ordinary words.
    secrets.retain(|s| s.len() >= 8);
    secrets
}
