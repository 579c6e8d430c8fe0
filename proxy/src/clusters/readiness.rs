//! Whether the controller's Cluster cache has synced: agents that arrive
//! before wait for it ([`super::store::CrStore`]), and `/readyz` turns ready
//! with it (the agents' port that answers it is bound by then: readiness is
//! asked there).

use std::time::Duration;

use kube::runtime::reflector::Store;
use tokio::sync::watch;

use super::crd::Cluster;

/// Turns true once `store` has synced; closed without turning true if the
/// cache stopped before. Any number of tasks may wait on clones.
///
/// `Store::wait_until_ready` itself cannot be awaited by two tasks at once:
/// its one-shot channel keeps only the last waiter's waker. Agents waiting on
/// it directly all slept their whole 30 s deadline but one (a fleet that
/// came back before the sync was admitted 30 s late). One task polls it
/// every [`RECHECK`] and tells everyone through a watch channel.
pub fn watch_sync(store: Store<Cluster>) -> watch::Receiver<bool> {
    const RECHECK: Duration = Duration::from_millis(250);
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                waited = tokio::time::timeout(RECHECK, store.wait_until_ready()) => match waited {
                    Ok(Ok(())) => {
                        tracing::info!("Cluster cache synced: ready");
                        let _ = tx.send(true);
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the Cluster cache stopped before it synced");
                        return;
                    }
                    Err(_) => {}
                },
                // Nobody is waiting any more (the proxy is stopping).
                _ = tx.closed() => return,
            }
        }
    });
    rx
}
