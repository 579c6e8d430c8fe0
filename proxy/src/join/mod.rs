//! `proxy join-command --cluster NAME`: prints everything a member cluster
//! needs to join, as one manifest for `kubectl apply -f -` on the member
//! (the agent's namespace, service account, RBAC, the token Secret and the
//! Deployment with the proxy's address and host-key fingerprint filled in).
//!
//! It reads, from the host cluster: the Cluster's token (with `--create`, it
//! first creates the Cluster and waits for the proxy to give it one), the
//! proxy's SSH host key from Secret `<namespace>/tower-proxy`, and, unless
//! given as flags, `--publish-service-address` and the image from the
//! proxy's Deployment `<namespace>/tower`. With `--register` it makes a
//! bootstrap token instead (a Secret in the host's `kube-system`,
//! [`bootstrap_token`]) and the member's agent registers itself with it
//! (docs/registration.md). What to print is decided in [`render`] and
//! [`register`]; this module only fetches and creates.

pub mod register;
pub mod render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;

use crate::clusters::crd::Cluster;
use crate::identity::secret::{HOST_KEY, HOST_KEY_NEXT, SECRET_NAME};

/// The first argument that selects this command instead of the proxy.
pub const COMMAND: &str = "join-command";
/// The proxy's Deployment in config/proxy, read for its address and image.
const PROXY_DEPLOYMENT: &str = "tower";
/// Who created a Cluster with `--create` (its managedFields).
const FIELD_MANAGER: &str = "tower-join-command";

/// Print the manifest that joins a member cluster to this proxy.
#[derive(clap::Parser, Debug)]
#[command(name = "proxy join-command", version, about)]
pub struct JoinFlags {
    /// The Cluster (in the host cluster) the member joins as; with
    /// --register, the name it asks for (default: derived from its cluster ID).
    #[arg(long, value_name = "NAME", required_unless_present = "register")]
    pub cluster: Option<String>,
    /// Create the Cluster (joinFederation, connection type proxy) if it does
    /// not exist, and wait for the proxy to give it a token.
    #[arg(long, conflicts_with = "register")]
    pub create: bool,
    /// Make a new bootstrap token (Secret kube-system/bootstrap-token-<id> on
    /// the host) and print a member that registers itself with it
    /// (docs/registration.md): no Cluster needs to exist.
    #[arg(long)]
    pub register: bool,
    /// With --register: the token's requests are approved at once (else a
    /// person approves each ClusterRegistrationRequest).
    #[arg(long, requires = "register")]
    pub auto_approve: bool,
    /// With --register: how long the bootstrap token can register members.
    #[arg(long, default_value = "24h", value_parser = tunnel::cli::parse_go_duration, value_name = "DURATION")]
    pub token_ttl: Duration,
    /// Kubeconfig of the host cluster (empty: in-cluster config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The proxy's namespace (its Secret tower-proxy and Deployment tower).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubesphere-system")]
    pub namespace: String,
    /// What agents dial, HOST[:PORT] or a URL (default: the proxy
    /// Deployment's --publish-service-address).
    #[arg(long, value_name = "ADDRESS")]
    pub publish_service_address: Option<String>,
    /// The agent's image (default: the proxy Deployment's image, which
    /// holds both binaries).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// How long --create waits for the proxy to give the Cluster a token.
    #[arg(long, default_value = "60s", value_parser = tunnel::cli::parse_go_duration, value_name = "DURATION")]
    pub wait: Duration,
}

/// Run the command with `args` (the program name first); prints the
/// manifest on stdout, and what to do with it on stderr.
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let flags = match JoinFlags::try_parse_from(args) {
        Ok(flags) => flags,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("proxy join-command: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&flags)) {
        Ok(manifest) => {
            print!("{manifest}");
            eprintln!(
                "# apply it on the member cluster: proxy join-command ... | kubectl --context MEMBER apply -f -"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("proxy join-command: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).with_context(|| {
                format!("--kubeconfig {}: not a readable kubeconfig", path.display())
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("--kubeconfig {} is unusable", path.display()))?
        }
        None => kube::Config::incluster()
            .context("not running in a pod: give --kubeconfig for the host cluster")?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// The Cluster's token, creating the Cluster first with `--create`.
async fn token(api: &Api<Cluster>, name: &str, flags: &JoinFlags) -> anyhow::Result<String> {
    let existing = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Cluster {name}"))?;
    if existing.is_none() {
        if !flags.create {
            bail!("there is no Cluster {name} in the host cluster: create it, or add --create");
        }
        // A server-side apply of just these fields: the typed Cluster would
        // also send its empty fields, which the CRD refuses (an empty
        // kubeconfig is not base64 bytes).
        let cluster = serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": name},
            "spec": {"joinFederation": true, "connection": {"type": "proxy"}},
        });
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&cluster),
        )
        .await
        .with_context(|| format!("creating Cluster {name}"))?;
        eprintln!("# created Cluster {name}");
    }
    let has_token = |c: Option<&Cluster>| c.is_some_and(|c| !c.spec.connection.token.is_empty());
    let cluster = tokio::time::timeout(flags.wait, await_condition(api.clone(), name, has_token))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "Cluster {name} got no token within {:?}: is the proxy running, and does the \
                 Cluster have spec.joinFederation true and connection.type proxy?",
                flags.wait
            )
        })?
        .with_context(|| format!("watching Cluster {name}"))?;
    cluster
        .map(|c| c.spec.connection.token)
        .context("the Cluster was deleted while waiting for its token")
}

/// `--publish-service-address` and `--port` from the proxy's Deployment, and its image.
fn from_deployment(deployment: &Deployment) -> (Option<String>, u16, Option<String>) {
    let container = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first());
    let args: Vec<&str> = container
        .into_iter()
        .flat_map(|c| c.command.iter().flatten().chain(c.args.iter().flatten()))
        .map(String::as_str)
        .collect();
    let value = |flag: &str| {
        args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&format!("{flag}="))
                .map(str::to_string)
                .or_else(|| {
                    (*a == flag)
                        .then(|| args.get(i + 1).map(|v| v.to_string()))
                        .flatten()
                })
        })
    };
    let port = value("--port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    let image = container.and_then(|c| c.image.clone());
    (value("--publish-service-address"), port, image)
}

async fn run(flags: &JoinFlags) -> anyhow::Result<String> {
    let client = client(flags.kubeconfig.as_ref()).await?;
    let clusters: Api<Cluster> = Api::all(client.clone());
    let bootstrap;
    let token;
    let join = match (&flags.cluster, flags.register) {
        (name, true) => {
            bootstrap = bootstrap_token(&client, flags).await?;
            render::Join::Register {
                name: name.as_deref(),
                bootstrap_token: &bootstrap,
            }
        }
        (Some(name), false) => {
            token = self::token(&clusters, name, flags).await?;
            render::Join::Cluster {
                cluster: name,
                token: &token,
            }
        }
        (None, false) => bail!("give --cluster NAME, or --register"),
    };

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &flags.namespace);
    let deployment = deployments.get_opt(PROXY_DEPLOYMENT).await.ok().flatten();
    let (address, port, image) = deployment
        .as_ref()
        .map(from_deployment)
        .unwrap_or((None, 8080, None));
    let address = flags
        .publish_service_address
        .clone()
        .or(address)
        .with_context(|| {
            format!(
                "no --publish-service-address: give the address agents dial, or run the proxy as \
             Deployment {}/{PROXY_DEPLOYMENT} with that flag",
                flags.namespace
            )
        })?;
    let proxy_url = crate::config::publish_url(&address, port)?;
    let image = flags
        .image
        .clone()
        .or(image)
        .unwrap_or_else(|| "tower-rs:latest".to_string());

    let secrets: Api<Secret> = Api::namespaced(client, &flags.namespace);
    let fingerprints = match secrets.get_opt(SECRET_NAME).await.with_context(|| {
        format!(
            "reading Secret {}/{SECRET_NAME} (the proxy's host key)",
            flags.namespace
        )
    })? {
        Some(secret) => host_key_fingerprints(&secret)?,
        None => Vec::new(),
    };
    if fingerprints.is_empty() {
        eprintln!(
            "# warning: no host key in Secret {}/{SECRET_NAME}: the agent will not pin the proxy \
             (add --proxy-host-key-fingerprint from the proxy's log)",
            flags.namespace
        );
    }
    Ok(render::render(&render::Inputs {
        join,
        proxy_url: &proxy_url,
        fingerprints: &fingerprints,
        image: &image,
    })?)
}

/// The fingerprints of the host keys kept in the proxy's Secret.
fn host_key_fingerprints(secret: &Secret) -> anyhow::Result<Vec<String>> {
    let data = secret.data.clone().unwrap_or_default();
    let mut out = Vec::new();
    // During a host key rotation the next key is pinned too, so the agent
    // follows the switch (docs/ca-rotation.md).
    for name in [HOST_KEY, HOST_KEY_NEXT] {
        if let Some(pem) = data.get(name) {
            let text = std::str::from_utf8(&pem.0)
                .with_context(|| format!("{name} in the proxy's Secret is not text"))?;
            let key = russh::keys::PrivateKey::from_openssh(text).with_context(|| {
                format!("{name} in the proxy's Secret is not an OpenSSH private key")
            })?;
            out.push(tunnel::ssh::fingerprint(key.public_key()));
        }
    }
    Ok(out)
}

/// A new bootstrap token for Tower: its Secret in the host's `kube-system`
/// (Kubernetes' bootstrap-token format, `usage-bootstrap-tower`, an
/// expiration `--token-ttl` from now, auto-approval if asked).
async fn bootstrap_token(client: &kube::Client, flags: &JoinFlags) -> anyhow::Result<String> {
    use crate::registration::bootstrap::{AUTO_APPROVE, NAMESPACE, SECRET_TYPE, USAGE_KEY};
    use rand::RngExt as _;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let mut pick = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect()
    };
    let (id, secret) = (pick(6), pick(16));
    let ttl = jiff::SignedDuration::try_from(flags.token_ttl).context("--token-ttl is too long")?;
    let expiration = jiff::Timestamp::now()
        .checked_add(ttl)
        .context("--token-ttl is too long")?;
    let mut object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": format!("bootstrap-token-{id}"),
            "namespace": NAMESPACE,
            "labels": {"app": "tower"},
        },
        "type": SECRET_TYPE,
        "stringData": {
            "token-id": id,
            "token-secret": secret,
            "expiration": expiration.to_string(),
            USAGE_KEY: "true",
            "description": "Tower self-registration, made by proxy join-command",
        },
    });
    if flags.auto_approve {
        object["metadata"]["annotations"] = serde_json::json!({ AUTO_APPROVE: "true" });
    }
    let secret_object: Secret =
        serde_json::from_value(object).context("building the bootstrap token's Secret")?;
    let api: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    api.create(&PostParams::default(), &secret_object)
        .await
        .with_context(|| {
            format!("creating Secret {NAMESPACE}/bootstrap-token-{id} (the bootstrap token)")
        })?;
    eprintln!(
        "# created bootstrap token {id} (Secret {NAMESPACE}/bootstrap-token-{id}), valid until {expiration}{}",
        if flags.auto_approve {
            ", its requests approved at once"
        } else {
            "; approve the member's request with kubectl patch clsrr (docs/registration.md)"
        }
    );
    Ok(format!("{id}.{secret}"))
}
