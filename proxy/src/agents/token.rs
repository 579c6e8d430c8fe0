//! Handing an agent a new token over its open tunnel
//! (`token@tower.kubesphere.io`, docs/protocol.md section 9): for token
//! rotation, and for the per-cluster token of an agent that registered
//! itself. Our agents store it, confirm, and connect again with it while the
//! old tunnel still serves (make before break); Go Tower agents refuse the
//! unknown channel type and keep working with the token they have.

use tunnel::server::{Session, TokenAnswer, TokenError};

use super::registry::Registry;

/// What became of a token handed to one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// The agent stored it and connects again with it.
    Stored,
    /// The agent does not know the request (a Go Tower agent): it keeps its
    /// token, and must be given the new one by a person.
    NotUnderstood,
}

/// Why a token did not reach an agent.
pub type Error = TokenError;

/// Hand `token` to the agent of `session`. Never logs the token.
pub async fn deliver_token(session: &Session, token: &str) -> Result<Delivered, Error> {
    let cluster = &session.config().name;
    match session.hand_token(token).await {
        Ok(TokenAnswer::Stored) => {
            tracing::info!(%cluster, peer = session.peer(), "agent stored its new token");
            Ok(Delivered::Stored)
        }
        Ok(TokenAnswer::NotUnderstood) => {
            tracing::info!(%cluster, peer = session.peer(), "agent cannot be handed a token (a Go Tower agent?): it keeps its current one");
            Ok(Delivered::NotUnderstood)
        }
        Err(e) => {
            tracing::warn!(%cluster, peer = session.peer(), error = %e, "could not hand the agent its new token");
            Err(e)
        }
    }
}

/// Hand `token` to every live agent of `cluster` on this replica, at once;
/// one answer per session.
#[allow(dead_code)] // for token rotation (issue #13 part 2)
pub async fn deliver_to_cluster(
    registry: &Registry,
    cluster: &str,
    token: &str,
) -> Vec<Result<Delivered, Error>> {
    let sessions = registry.sessions(cluster);
    futures_util::future::join_all(sessions.iter().map(|s| deliver_token(s, token))).await
}
