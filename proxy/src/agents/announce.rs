//! Tells every connected agent which SSH host keys the proxy holds (OpenSSH's
//! `hostkeys-00@openssh.com`): once after it joins, and again whenever the
//! set changes ([`crate::identity::host_keys`]). That is how a next host key
//! reaches agents before the switch; ours log it and warn when they do not pin
//! it, Go Tower agents ignore it. Kept apart from admission: it follows the
//! registry's changes, so joining never waits on it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::registry::Registry;
use crate::identity::host_keys::HostKeys;

/// Announce until `stop`.
pub async fn run(registry: Registry, keys: Arc<HostKeys>, stop: CancellationToken) {
    let mut sessions = registry.subscribe();
    let mut generations = keys.subscribe();
    // Session id -> generation of the set it was last told.
    let mut told: HashMap<u64, u64> = HashMap::new();
    loop {
        let generation = *generations.borrow_and_update();
        sessions.borrow_and_update();
        let announced = keys.announced();
        let mut live = HashMap::new();
        for (id, cluster, session) in registry.all_sessions() {
            if told.get(&id) != Some(&generation) {
                session.announce_host_keys(&announced).await;
                tracing::debug!(%cluster, keys = announced.len(), "host keys announced");
            }
            live.insert(id, generation);
        }
        told = live;
        tokio::select! {
            () = stop.cancelled() => return,
            changed = sessions.changed() => if changed.is_err() { return },
            changed = generations.changed() => if changed.is_err() { return },
        }
    }
}
