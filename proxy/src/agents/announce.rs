//! Tells every connected agent which SSH host keys the proxy holds (OpenSSH's
//! `hostkeys-00@openssh.com`): once after it joins, and again whenever the
//! set changes ([`crate::identity::host_keys`]). That is how a next host key
//! reaches agents before the switch; ours log it and warn when they do not pin
//! it, Go Tower agents ignore it. Kept apart from admission: it follows the
//! registry's joins, so joining never waits on it.

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::registry::Registry;
use crate::identity::host_keys::HostKeys;

/// Announce until `stop`.
pub async fn run(registry: Registry, keys: Arc<HostKeys>, stop: CancellationToken) {
    // Subscribed before the first round: a session that joins in between is
    // told twice, which is harmless; none is missed.
    let mut joins = registry.joins();
    let mut generations = keys.subscribe();
    generations.borrow_and_update();
    announce_all(&registry, &keys).await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = generations.changed() => {
                if changed.is_err() {
                    return;
                }
                generations.borrow_and_update();
                announce_all(&registry, &keys).await;
            }
            joined = joins.recv() => match joined {
                Ok((_, cluster, session)) if !session.is_closed() => {
                    let announced = keys.announced();
                    session.announce_host_keys(&announced).await;
                    tracing::debug!(%cluster, keys = announced.len(), "host keys announced");
                }
                Ok(_) => {}
                // Fell behind a burst of joins: tell everyone once.
                Err(RecvError::Lagged(_)) => announce_all(&registry, &keys).await,
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Every live session, the current set.
async fn announce_all(registry: &Registry, keys: &HostKeys) {
    let announced = keys.announced();
    for (_, cluster, session) in registry.all_sessions() {
        session.announce_host_keys(&announced).await;
        tracing::debug!(%cluster, keys = announced.len(), "host keys announced");
    }
}
