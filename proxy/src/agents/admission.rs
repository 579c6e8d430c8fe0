//! Who may join: an agent's name and token are checked, in constant time,
//! against a [`ClusterStore`] (the current token, or the previous one during
//! a rotation's grace period, [`super::grace`]); the store may then prepare the cluster (open
//! its ports) before the agent hears success. An admitted session is kept in
//! the [`Registry`] for as long as its [`Registration`] lives.
//!
//! An agent with a bootstrap token and no token is registering: a
//! [`Registrar`] (`crate::registration`, later in the build order) decides,
//! and on success the agent is admitted only to be handed its cluster token,
//! never put in the registry (it serves nothing).

use std::sync::Arc;

use tunnel::hub::{HubRefusal, HubUpstream};
use tunnel::server::{Admission, Session};
use tunnel::wire::UNAUTHORIZED;

use super::hub::HubServices;
use super::registry::{Registry, tokens_match};
use super::store::ClusterStore;

/// Reads a Cluster's agent token (the store's view), for a [`Registrar`].
pub type TokenOf<'a> = &'a (dyn Fn(&str) -> Option<String> + Send + Sync);

/// Self-registration as the gate sees it: let the agent of `session` (it sent
/// a bootstrap token and no token) in, and hand it its cluster token once
/// admitted; or say why not (sent to the agent).
pub trait Registrar: Send + Sync + 'static {
    fn register<'a>(
        &'a self,
        session: &'a Session,
        token_of: TokenOf<'a>,
    ) -> futures_util::future::BoxFuture<'a, Result<(), String>>;
}

/// The tunnel's admission: a registry and the store that knows the tokens.
pub struct Gate<S> {
    registry: Registry,
    store: Arc<S>,
    hub: HubServices,
    /// Self-registration (with Kubernetes only).
    registrar: Option<Arc<dyn Registrar>>,
}

impl<S: ClusterStore> Gate<S> {
    pub fn new(registry: Registry, store: Arc<S>, hub: HubServices) -> Self {
        Self {
            registry,
            store,
            hub,
            registrar: None,
        }
    }

    /// Let agents with a bootstrap token register.
    pub fn with_registrar(mut self, registrar: Arc<dyn Registrar>) -> Self {
        self.registrar = Some(registrar);
        self
    }

    /// Whether `cluster` is one agents may join (it has a token).
    pub fn knows(&self, cluster: &str) -> bool {
        self.store.token(cluster).is_some_and(|t| !t.is_empty())
    }

    /// The registry admitted sessions go into.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Keeps a session registered; dropping it (the connection ended) removes it.
/// A registering agent's session holds none.
pub struct Registration<S: ClusterStore> {
    /// Held for its `Drop`.
    _entry: Option<Entry<S>>,
}

struct Entry<S: ClusterStore> {
    registry: Registry,
    store: Arc<S>,
    cluster: String,
    id: u64,
}

impl<S: ClusterStore> Drop for Entry<S> {
    fn drop(&mut self) {
        let left = self.registry.remove(&self.cluster, self.id);
        tracing::info!(cluster = %self.cluster, sessions_left = left, "agent disconnected");
        self.store.on_change(&self.cluster);
    }
}

impl<S: ClusterStore> Admission for Gate<S> {
    type Guard = Registration<S>;

    async fn admit(&self, session: Session) -> Result<Self::Guard, String> {
        let config = session.config();
        if config.token.is_empty() && !config.bootstrap_token.is_empty() {
            return self.register(session).await;
        }
        let cluster = config.name.clone();
        self.store.synced().await;
        // Same answer for unknown cluster and wrong token: don't reveal which.
        let expected = self.store.token(&cluster).unwrap_or_default();
        let admitted_with = if expected.is_empty() {
            None
        } else if tokens_match(&expected, &config.token) {
            Some(expected)
        } else if self
            .store
            .grace(&cluster)
            .is_some_and(|g| g.accepts(&config.token, jiff::Timestamp::now()))
        {
            // A rotation's grace period: the agent is told the new token
            // once registered, and closed when the grace ends.
            tracing::info!(%cluster, peer = session.peer(), "agent joined with the previous token (grace period)");
            Some(config.token.clone())
        } else {
            None
        };
        let Some(token) = admitted_with else {
            self.store.on_reject(&cluster, "wrong token");
            self.registry.metrics().auth_failures.inc();
            return Err(UNAUTHORIZED.to_string());
        };
        self.store.on_connect(&cluster).await?;
        let id = self.registry.insert(&cluster, session, token);
        self.store.on_change(&cluster);
        Ok(Registration {
            _entry: Some(Entry {
                registry: self.registry.clone(),
                store: self.store.clone(),
                cluster,
                id,
            }),
        })
    }

    async fn open_hub(&self, session: &Session, service: &str) -> Result<HubUpstream, HubRefusal> {
        // The session's name passed admission: it is the cluster's own.
        let cluster = &session.config().name;
        let opted = self.store.hub_services(cluster);
        self.hub.open(cluster, opted, service).await
    }
}

impl<S: ClusterStore> Gate<S> {
    /// A registering agent: its token is handed over once it is admitted.
    async fn register(&self, session: Session) -> Result<Registration<S>, String> {
        let Some(registrar) = &self.registrar else {
            return Err(
                "registration refused: this proxy takes no bootstrap tokens (it runs \
                 with --clusters-file); give the agent its cluster's --token"
                    .to_string(),
            );
        };
        let store = self.store.clone();
        let token_of = move |cluster: &str| store.token(cluster);
        match registrar.register(&session, &token_of).await {
            Ok(()) => Ok(Registration { _entry: None }),
            Err(reason) => {
                self.registry.metrics().auth_failures.inc();
                let config = session.config();
                tracing::info!(cluster = %config.name, cluster_id = %config.cluster_id,
                    %reason, "registration not admitted");
                Err(reason)
            }
        }
    }
}
