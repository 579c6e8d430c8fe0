//! The proxy's identity kept in the host cluster: Secret `<namespace>/tower-proxy`
//! holds the SSH host key (so agents' pinned fingerprints survive restarts and
//! replicas share one key) and, unless `--ca-cert`/`--ca-key` are given, the CA.
//! The first replica to start creates it; the others read it. Rotations are
//! edits of it ([`super::host_keys`]: `ssh-host-key-next`; [`super::rotation`]:
//! `ca-next.*`, `ca-previous.*`), which every
//! replica follows ([`super::watch`]).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use russh::keys::PrivateKey;

use super::ca::Ca;
use super::rotation::{CA_CERT, CA_KEY, plan};

pub const SECRET_NAME: &str = "tower-proxy";
pub const HOST_KEY: &str = "ssh-host-key";
/// The SSH host key that follows the current one (announced, not yet shown).
pub const HOST_KEY_NEXT: &str = "ssh-host-key-next";

/// What the Secret holds.
pub struct Identity {
    pub host_key: PrivateKey,
    pub host_key_next: Option<PrivateKey>,
    pub ca: Option<Ca>,
}

/// The current and next SSH host keys in the Secret's `data`.
pub fn host_keys_in(
    data: &BTreeMap<String, ByteString>,
    namespace: &str,
) -> anyhow::Result<(PrivateKey, Option<PrivateKey>)> {
    let shown = |key: &str| format!("Secret {namespace}/{SECRET_NAME} key {key}");
    let pem = get(data, HOST_KEY).ok_or_else(|| {
        anyhow::anyhow!(
            "{} is missing: delete the Secret to have it recreated",
            shown(HOST_KEY)
        )
    })?;
    let current = tunnel::ssh::parse_host_key(pem, &shown(HOST_KEY))?;
    let next = match get(data, HOST_KEY_NEXT).filter(|p| !p.trim().is_empty()) {
        Some(pem) => Some(tunnel::ssh::parse_host_key(pem, &shown(HOST_KEY_NEXT))?),
        None => None,
    };
    Ok((current, next))
}

fn get<'a>(data: &'a BTreeMap<String, ByteString>, key: &str) -> Option<&'a str> {
    data.get(key).and_then(|v| std::str::from_utf8(&v.0).ok())
}

/// Read the Secret, creating it first if it does not exist. `with_ca`: also keep a CA there.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    with_ca: bool,
) -> anyhow::Result<Identity> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(SECRET_NAME).await? {
            let data = secret.data.unwrap_or_default();
            let (host_key, host_key_next) = host_keys_in(&data, namespace)?;
            let ca = match (with_ca, get(&data, CA_CERT), get(&data, CA_KEY)) {
                (false, ..) => None,
                // Mid-rotation too: the phase the Secret is in (docs/ca-rotation.md).
                (true, Some(_), Some(_)) => Some(Ca::from(plan(&data).map_err(|e| {
                    anyhow::anyhow!("the CA in Secret {namespace}/{SECRET_NAME} is unusable: {e}")
                })?)),
                (true, ..) => anyhow::bail!(
                    "Secret {namespace}/{SECRET_NAME} has no {CA_CERT}/{CA_KEY}: give --ca-cert and --ca-key, or delete the Secret"
                ),
            };
            return Ok(Identity {
                host_key,
                host_key_next,
                ca,
            });
        }
        let host_key = tunnel::ssh::generate_host_key()?;
        let mut data = BTreeMap::new();
        data.insert(
            HOST_KEY.to_string(),
            ByteString(tunnel::ssh::encode_host_key(&host_key)?.into_bytes()),
        );
        if with_ca {
            let ca = Ca::generate().map_err(|e| anyhow::anyhow!("cannot create a CA: {e}"))?;
            data.insert(
                CA_CERT.to_string(),
                ByteString(ca.cert_pem().as_bytes().to_vec()),
            );
            data.insert(
                CA_KEY.to_string(),
                ByteString(ca.key_pem().as_bytes().to_vec()),
            );
        }
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(SECRET_NAME.to_string()),
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(%namespace, name = SECRET_NAME, "created the proxy's identity Secret")
            }
            // Another replica won the race: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!(
                "namespace {namespace:?} does not exist: create it or set --namespace"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("Secret {namespace}/{SECRET_NAME} could not be read or created")
}
