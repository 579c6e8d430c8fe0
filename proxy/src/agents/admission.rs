//! Who may join: an agent's name and token are checked, in constant time,
//! against a [`ClusterStore`] (the current token, or the previous one during
//! a rotation's grace period, [`super::grace`]); the store may then prepare the cluster (open
//! its ports) before the agent hears success. An admitted session is kept in
//! the [`Registry`] for as long as its [`Registration`] lives.

use std::sync::Arc;

use tunnel::hub::{HubRefusal, HubUpstream};
use tunnel::server::{Admission, Session};
use tunnel::wire::UNAUTHORIZED;

use super::hub::HubServices;
use super::registry::{Registry, tokens_match};
use super::store::ClusterStore;

/// The tunnel's admission: a registry and the store that knows the tokens.
pub struct Gate<S> {
    registry: Registry,
    store: Arc<S>,
    hub: HubServices,
}

impl<S: ClusterStore> Gate<S> {
    pub fn new(registry: Registry, store: Arc<S>, hub: HubServices) -> Self {
        Self {
            registry,
            store,
            hub,
        }
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
pub struct Registration<S: ClusterStore> {
    registry: Registry,
    store: Arc<S>,
    cluster: String,
    id: u64,
}

impl<S: ClusterStore> Drop for Registration<S> {
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
        let cluster = config.name.clone();
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
            registry: self.registry.clone(),
            store: self.store.clone(),
            cluster,
            id,
        })
    }

    async fn open_hub(&self, session: &Session, service: &str) -> Result<HubUpstream, HubRefusal> {
        // The session's name passed admission: it is the cluster's own.
        let cluster = &session.config().name;
        let opted = self.store.hub_services(cluster);
        self.hub.open(cluster, opted, service).await
    }
}
