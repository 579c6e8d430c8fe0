//! Handing a registered agent its per-cluster token, over the tunnel it
//! registered through (the `token@tower.kubesphere.io` channel,
//! `docs/protocol.md` 9.5). The agent stores it (its `--token-secret`) and
//! connects again with it, then closes this tunnel itself; the proxy closes
//! it after [`LINGER`] in case it does not.
//!
//! The one seam between registration and token delivery: swapping how the
//! token travels changes only this file.

use std::time::Duration;

use tunnel::server::{Session, TokenAnswer};

/// How long a registration tunnel stays open after the token went over.
const LINGER: Duration = Duration::from_secs(30);

/// Hand `token` (Cluster `cluster`'s) to the agent of `session`, in the
/// background; logs the outcome and closes the session.
pub fn spawn(session: Session, cluster: String, token: String) {
    tokio::spawn(async move {
        let answer = session.hand_token(&token).await;
        let reason = match answer {
            Ok(TokenAnswer::Stored) => {
                tracing::info!(%cluster, peer = %session.peer(),
                    "registered agent stored its cluster token; it connects again with it");
                tokio::select! {
                    () = tokio::time::sleep(LINGER) => {}
                    () = closed(&session) => return,
                }
                "registered: connect with the delivered token"
            }
            Ok(TokenAnswer::NotUnderstood) => {
                tracing::warn!(%cluster, peer = %session.peer(),
                    "a registering agent does not take tokens over the tunnel");
                "registered, but this agent cannot take its token over the tunnel: \
                 give it the Cluster's token (spec.connection.token)"
            }
            Err(e) => {
                tracing::warn!(%cluster, peer = %session.peer(), error = %e,
                    "could not hand a registered agent its token");
                "registered, but the token could not be handed over; connect again"
            }
        };
        session.close(reason).await;
    });
}

/// Resolves once the session has ended.
async fn closed(session: &Session) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while !session.is_closed() {
        tick.tick().await;
    }
}
