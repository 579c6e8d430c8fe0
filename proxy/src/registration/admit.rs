//! The door's side of registration: an agent sent a bootstrap token and no
//! cluster token. [`Registrar::register`] checks the token against its
//! Secret ([`bootstrap::check`]), finds or creates the cluster ID's request,
//! approves it when the token's Secret says so, and, once the leader has
//! made (or found) the Cluster and the Cluster controller has given it a
//! token, returns that token for delivery over the tunnel
//! ([`super::deliver`]). Every "not now" is a refusal with a text that says
//! why and what to do; nothing waits for a person.
//!
//! Any replica may create a request (its name is fixed by the cluster ID, so
//! two replicas cannot make two); only the leader makes Clusters.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tunnel::server::Session;
use tunnel::wire::AgentConfig;

use super::bootstrap::{self, Refusal, Token};
use super::crd::{ClusterRegistrationRequest, RequestSpec, request_name};
use super::decide::{self, Next};
use crate::agents::admission::{self, TokenOf};

/// How long the door waits, after approval, for the Cluster and its token.
/// Well inside the 10 s an agent has for its `config` answer.
const SETTLE: Duration = Duration::from_secs(6);
/// How often it looks meanwhile.
const POLL: Duration = Duration::from_millis(250);

/// A registration that succeeded: the Cluster to join and its agent token.
pub struct Joined {
    pub cluster: String,
    pub token: String,
}

/// Registers agents against the host cluster.
pub struct Registrar {
    client: Client,
}

impl Registrar {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Register the agent of `config` (it has a bootstrap token); `token_of`
    /// reads a Cluster's agent token from the controller's cache.
    pub async fn join(
        &self,
        config: &AgentConfig,
        token_of: TokenOf<'_>,
    ) -> Result<Joined, String> {
        let token = Token::parse(&config.bootstrap_token).ok_or(Refusal::Malformed.to_string())?;
        decide::check_identity(&config.name, &config.cluster_id)?;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), bootstrap::NAMESPACE);
        let secret = secrets
            .get_opt(&token.secret_name())
            .await
            .map_err(|e| unavailable("read the bootstrap token's Secret", &e))?;
        let valid = bootstrap::check(&token, secret.as_ref(), jiff::Timestamp::now())
            .map_err(|r| r.to_string())?;
        let requests: Api<ClusterRegistrationRequest> = Api::all(self.client.clone());
        let name = request_name(&config.cluster_id);
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let request = requests
                .get_opt(&name)
                .await
                .map_err(|e| unavailable("read the registration request", &e))?;
            match decide::next(
                request.as_ref(),
                &config.name,
                &valid.id,
                valid.auto_approve,
            ) {
                Next::Create { approved } => {
                    let spec = RequestSpec {
                        cluster_id: config.cluster_id.clone(),
                        cluster_name: config.name.clone(),
                        bootstrap_token_id: valid.id.clone(),
                        agent_version: config.version.chars().take(64).collect(),
                        decision: if approved {
                            "Approved".into()
                        } else {
                            String::new()
                        },
                    };
                    let request = ClusterRegistrationRequest::new(&name, spec);
                    match requests.create(&PostParams::default(), &request).await {
                        Ok(_) => tracing::info!(request = %name, cluster = %config.name,
                            cluster_id = %config.cluster_id, token_id = %valid.id,
                            auto_approved = approved, "registration requested"),
                        // Another replica or attempt made it: decide again.
                        Err(kube::Error::Api(e)) if e.code == 409 => {}
                        Err(e) => return Err(unavailable("create the registration request", &e)),
                    }
                }
                Next::Approve => {
                    let patch = serde_json::json!({"spec": {"decision": "Approved"}});
                    requests
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|e| unavailable("approve the registration request", &e))?;
                    tracing::info!(request = %name, token_id = %valid.id,
                        "registration auto-approved by the bootstrap token's Secret");
                }
                Next::Refuse(text) => return Err(text),
                Next::Join(cluster) => {
                    if let Some(token) = token_of(&cluster).filter(|t| !t.is_empty()) {
                        return Ok(Joined { cluster, token });
                    }
                }
                Next::Wait => {}
            }
            if tokio::time::Instant::now() >= deadline {
                let why = request
                    .as_ref()
                    .and_then(|r| r.status.as_ref())
                    .map(|s| s.message.as_str())
                    .filter(|m| !m.is_empty())
                    .unwrap_or("the Cluster is being set up");
                return Err(format!(
                    "registration approved ({name}), not ready yet: {why}; retry shortly"
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl admission::Registrar for Registrar {
    fn register<'a>(
        &'a self,
        session: &'a Session,
        token_of: TokenOf<'a>,
    ) -> futures_util::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let joined = self.join(session.config(), token_of).await?;
            tracing::info!(cluster = %joined.cluster, peer = %session.peer(),
                "registered agent admitted to take its token");
            super::deliver::spawn(session.clone(), joined.cluster, joined.token);
            Ok(())
        })
    }
}

/// The host's API failed: say what could not be done, retryable. (The
/// error text is the API server's; it carries no token.)
fn unavailable(what: &str, e: &kube::Error) -> String {
    tracing::warn!(error = %e, "registration: cannot {what}");
    format!(
        "registration failed: the proxy cannot {what} (the host cluster's API said: {}); \
         it needs config/crd and the RBAC in config/proxy; retry shortly",
        short(e)
    )
}

fn short(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
        other => other.to_string().chars().take(200).collect(),
    }
}
