//! Byte-exact pieces of Tower's wire format: names, identification lines and the
//! `config` JSON the agent sends to authenticate.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Websocket subprotocol that marks a tunnel request.
pub const SUBPROTOCOL: &str = "kubesphere-v1";
/// SSH identification line of the proxy (SSH server), without CRLF.
pub const SERVER_ID: &str = "SSH-kubesphere-v1-server";
/// SSH identification line of the agent (SSH client), without CRLF.
pub const CLIENT_ID: &str = "SSH-kubesphere-v1-client";
/// Global request carrying the agent's [`AgentConfig`] as raw JSON.
pub const CONFIG_REQUEST: &str = "config";
/// Keepalive global request (want-reply) sent by the agent.
pub const PING_REQUEST: &str = "ping";
/// Channel type the proxy opens; its extra data is the raw `host:port` to dial.
pub const CHANNEL_TYPE: &str = "kubesphere";
/// Channel type the proxy opens to ask an agent to move to another replica
/// (our extension; Go agents refuse unknown channel types, and the proxy then
/// knows to wait for them to go idle instead).
pub const DRAIN_CHANNEL_TYPE: &str = "drain@tower.kubesphere.io";
/// Channel type the proxy opens to hand the agent a new token (our
/// extension); its extra data is the token, raw, to the end of the packet.
/// The agent confirms once it has stored the token and then connects again
/// with it; it refuses (reason 1) when it cannot store it. Go agents refuse
/// the unknown type (reason 3): the proxy then knows they cannot be told.
pub const TOKEN_CHANNEL_TYPE: &str = "token@tower.kubesphere.io";
/// Longest token the agent accepts over [`TOKEN_CHANNEL_TYPE`].
pub const MAX_TOKEN_LEN: usize = 4096;
/// Channel type the agent opens to reach a service the proxy publishes on the
/// hub's side (pull mode, our extension); its extra data is the raw service
/// name. Go agents never open it.
pub const HUB_CHANNEL_TYPE: &str = "tower-hub@kubesphere.io";
/// Failure text for a wrong name or token; Go agents print it.
pub const UNAUTHORIZED: &str = "Unauthorized agent";
/// Largest `config` payload accepted; real ones are a few KiB.
pub const MAX_CONFIG_LEN: usize = 64 * 1024;

/// What an agent tells the proxy in the `config` request. JSON keys are Go's field
/// names; byte fields are base64 strings, omitted when empty (Tower's struct
/// tags say `omitempty`; `null`, which other Go encoders write, reads as empty).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    #[serde(rename = "Version", default)]
    pub version: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Token", default)]
    pub token: String,
    /// `host:port` of the member's kube-apiserver, as the agent reaches it.
    #[serde(rename = "KubernetesSvcHost", default)]
    pub kubernetes_svc_host: String,
    /// `host:port` of the member's ks-apiserver.
    #[serde(rename = "KubeSphereSvcHost", default)]
    pub kubesphere_svc_host: String,
    /// PEM client certificate for the member kube-apiserver.
    #[serde(
        rename = "CertData",
        default,
        with = "b64",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cert_data: Vec<u8>,
    /// PEM client key for the member kube-apiserver.
    #[serde(
        rename = "KeyData",
        default,
        with = "b64",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub key_data: Vec<u8>,
    /// PEM CA bundle that signs the member kube-apiserver's serving certificate.
    #[serde(
        rename = "CAData",
        default,
        with = "b64",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ca_data: Vec<u8>,
    /// Bearer token for the member kube-apiserver.
    #[serde(
        rename = "BearerToken",
        default,
        with = "b64",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub bearer_token: Vec<u8>,
    /// `GOOS/GOARCH` of the agent, e.g. `linux/amd64` ([`crate::platform`]).
    /// Our extension: Go Tower agents send none, Go proxies ignore it.
    #[serde(rename = "Platform", default, skip_serializing_if = "String::is_empty")]
    pub platform: String,
    /// Self-registration (our extension): a Kubernetes bootstrap token
    /// (`[a-z0-9]{6}.[a-z0-9]{16}`) sent instead of `Token` by an agent
    /// that has no per-cluster token yet. Go proxies ignore the key.
    #[serde(
        rename = "BootstrapToken",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub bootstrap_token: String,
    /// Self-registration: the member's cluster ID (the UID of its
    /// `kube-system` namespace, as Clusternet's), so that a second
    /// registration of the same cluster finds the first one.
    #[serde(
        rename = "ClusterID",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub cluster_id: String,
}

/// Why a `config` payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config is {0} bytes, more than the {MAX_CONFIG_LEN} allowed")]
    TooLarge(usize),
    #[error("config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config has no Name")]
    NoName,
}

impl AgentConfig {
    /// Parse the raw payload of a `config` request.
    pub fn from_json(payload: &[u8]) -> Result<Self, ConfigError> {
        if payload.len() > MAX_CONFIG_LEN {
            return Err(ConfigError::TooLarge(payload.len()));
        }
        let config: Self = serde_json::from_slice(payload)?;
        if config.name.is_empty() {
            return Err(ConfigError::NoName);
        }
        Ok(config)
    }

    /// The raw payload of a `config` request.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and byte vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Never print secrets: token, key and bearer token are redacted.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("version", &self.version)
            .field("name", &self.name)
            .field("kubernetes_svc_host", &self.kubernetes_svc_host)
            .field("kubesphere_svc_host", &self.kubesphere_svc_host)
            .field("platform", &self.platform)
            .field("cert_data", &!self.cert_data.is_empty())
            .field("key_data", &!self.key_data.is_empty())
            .field("ca_data", &!self.ca_data.is_empty())
            .field("bearer_token", &!self.bearer_token.is_empty())
            .field("bootstrap_token", &!self.bootstrap_token.is_empty())
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(Vec::new()),
            Some(s) => B64.decode(s.as_bytes()).map_err(serde::de::Error::custom),
        }
    }
}

/// Split a channel's extra data into the `host:port` target it names.
pub fn parse_target(data: &[u8]) -> Result<&str, String> {
    let target = std::str::from_utf8(data).map_err(|_| "target is not UTF-8".to_string())?;
    match target.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(|c: char| c.is_control() || c == ' ')
                && port.parse::<u16>().is_ok() =>
        {
            Ok(target)
        }
        _ => Err(format!("target {target:?} is not host:port")),
    }
}

/// Check a token handed over [`TOKEN_CHANNEL_TYPE`]: non-empty printable
/// ASCII without spaces (it travels in JSON and lands in a Secret and a flag).
pub fn parse_token(data: &[u8]) -> Result<&str, String> {
    if data.is_empty() {
        return Err("the token is empty".into());
    }
    if data.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "the token is {} bytes, more than the {MAX_TOKEN_LEN} allowed",
            data.len()
        ));
    }
    if !data.iter().all(u8::is_ascii_graphic) {
        return Err("the token has bytes other than printable ASCII".into());
    }
    // All printable ASCII: valid UTF-8.
    std::str::from_utf8(data).map_err(|_| "the token is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_uses_go_names_and_base64() {
        let config = AgentConfig {
            version: "v0.2.1".into(),
            name: "alpha".into(),
            token: "t0k".into(),
            kubernetes_svc_host: "10.96.0.1:443".into(),
            kubesphere_svc_host: "ks-apiserver.kubesphere-system.svc:80".into(),
            ca_data: b"-----BEGIN CERTIFICATE-----\n".to_vec(),
            bearer_token: b"secret".to_vec(),
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::from_slice(&config.to_json()).unwrap();
        assert_eq!(json["Name"], "alpha");
        assert_eq!(json["Token"], "t0k");
        assert_eq!(json["KubernetesSvcHost"], "10.96.0.1:443");
        assert_eq!(json["CAData"], "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==");
        assert_eq!(json["BearerToken"], "c2VjcmV0");
        // Empty byte fields are omitted, as Go's omitempty does.
        assert!(json.get("CertData").is_none());
        assert!(json.get("KeyData").is_none());
        // And the registration keys: a plain config is Go Tower's, byte for byte.
        assert!(json.get("BootstrapToken").is_none());
        assert!(json.get("ClusterID").is_none());
        // So is an unknown platform: the JSON stays what Go Tower's agent sends.
        assert!(json.get("Platform").is_none());
        let ours = AgentConfig {
            platform: "linux/arm64".into(),
            ..config
        };
        let json: serde_json::Value = serde_json::from_slice(&ours.to_json()).unwrap();
        assert_eq!(json["Platform"], "linux/arm64");
    }

    #[test]
    fn registration_keys_round_trip() {
        let config = AgentConfig {
            name: "cluster-0a1b2c3d".into(),
            bootstrap_token: "abcdef.0123456789abcdef".into(),
            cluster_id: "0a1b2c3d-0000-4000-8000-000000000000".into(),
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::from_slice(&config.to_json()).unwrap();
        assert_eq!(json["BootstrapToken"], "abcdef.0123456789abcdef");
        assert_eq!(json["ClusterID"], "0a1b2c3d-0000-4000-8000-000000000000");
        assert_eq!(AgentConfig::from_json(&config.to_json()).unwrap(), config);
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn config_json_from_go() {
        // What Go's encoding/json writes for Tower's struct, nil slices as null.
        let go = br#"{"Version":"","Name":"alpha","Token":"abc","KubernetesSvcHost":"kubernetes.default.svc:443","KubeSphereSvcHost":"ks:80","CertData":null,"KeyData":null,"CAData":"Y2E=","BearerToken":"dG9r"}"#;
        let config = AgentConfig::from_json(go).unwrap();
        assert_eq!(config.name, "alpha");
        assert_eq!(config.token, "abc");
        assert_eq!(config.ca_data, b"ca");
        assert_eq!(config.bearer_token, b"tok");
        assert!(config.cert_data.is_empty());
        assert!(config.platform.is_empty());
        assert_eq!(AgentConfig::from_json(&config.to_json()).unwrap(), config);
    }

    #[test]
    fn config_errors_name_the_problem() {
        assert!(matches!(
            AgentConfig::from_json(b"{not json"),
            Err(ConfigError::Json(_))
        ));
        assert!(matches!(
            AgentConfig::from_json(b"{}"),
            Err(ConfigError::NoName)
        ));
        let huge = vec![b' '; MAX_CONFIG_LEN + 1];
        assert!(matches!(
            AgentConfig::from_json(&huge),
            Err(ConfigError::TooLarge(_))
        ));
        let bad_b64 = br#"{"Name":"a","CAData":"%%%"}"#;
        let err = AgentConfig::from_json(bad_b64).unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let config = AgentConfig {
            name: "alpha".into(),
            token: "supersecret".into(),
            bearer_token: b"bearersecret".to_vec(),
            key_data: b"keysecret".to_vec(),
            bootstrap_token: "abcdef.secretsecret12345".into(),
            ..Default::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn channel_extra_data_is_raw_host_port() {
        assert_eq!(parse_target(b"10.96.0.1:443"), Ok("10.96.0.1:443"));
        assert_eq!(parse_target(b"[::1]:6443"), Ok("[::1]:6443"));
        assert!(parse_target(b"nohost").is_err());
        assert!(parse_target(b"host:notaport").is_err());
        assert!(parse_target(&[0xff, 0xfe]).is_err());
        // Not an SSH string: a length prefix would make it invalid.
        assert!(parse_target(b"\0\0\0\x0d10.96.0.1:443").is_err());
        // found by fuzz/text_inputs: a C1 control character (U+0082) in the host
        assert!(parse_target("\u{82}:8".as_bytes()).is_err());
    }

    #[test]
    fn handed_tokens_are_printable_ascii() {
        assert_eq!(parse_token(b"abc.DEF-123"), Ok("abc.DEF-123"));
        assert!(parse_token(b"").is_err());
        assert!(parse_token(b"with space").is_err());
        assert!(parse_token(b"line\n").is_err());
        assert!(parse_token(&[0xff]).is_err());
        assert!(parse_token(&vec![b'a'; MAX_TOKEN_LEN + 1]).is_err());
    }
}
