//! `/readyz` turns ready once the controller's Cluster cache has synced (the
//! agents' port that answers it is bound by then: readiness is asked there).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::runtime::reflector::Store;

use super::crd::Cluster;

/// Sets `ready` once `store` has synced.
///
/// `Store::wait_until_ready` cannot be awaited by two tasks at once: its
/// one-shot channel keeps only the last waiter's waker, and the controller
/// waits on the same store, so a single await here may never wake. Polling
/// it again every [`RECHECK`] sees the value once it is there.
pub async fn mark_when_synced(store: Store<Cluster>, ready: Arc<AtomicBool>) {
    const RECHECK: Duration = Duration::from_millis(250);
    loop {
        match tokio::time::timeout(RECHECK, store.wait_until_ready()).await {
            Ok(Ok(())) => {
                ready.store(true, Ordering::Relaxed);
                tracing::info!("Cluster cache synced: ready");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the Cluster cache stopped before it synced");
                return;
            }
            Err(_) => {}
        }
    }
}
