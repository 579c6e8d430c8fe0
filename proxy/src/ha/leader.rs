//! Leader election among proxy replicas (`--leader-elect`).
//!
//! Only the leader writes to the host cluster (tokens, ports, Services,
//! kubeconfigs, conditions); every replica serves agents and clients. The lock
//! is Tower's: Lease `<namespace>/tower`, 30 s, renewed 15 s before it
//! expires. The lease is released on shutdown so the next leader need not wait
//! for it to expire.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Tower's leader-election Lease.
pub const LEASE_NAME: &str = "tower";

/// Whether this replica leads. Cheap to clone.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
    /// For [`Leadership::always`]: keeps the channel open.
    _fixed: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// A single replica: always the leader.
    pub fn always() -> Self {
        let (tx, rx) = watch::channel(true);
        Self {
            rx,
            _fixed: Some(std::sync::Arc::new(tx)),
        }
    }

    /// Contend for the Lease until `stop` is cancelled, then release it. The
    /// returned task ends after the release.
    pub async fn elect(
        client: Client,
        namespace: &str,
        identity: &str,
        lease_duration: Duration,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), kube_lease_manager::LeaseManagerError> {
        let secs = lease_duration.as_secs().max(2);
        let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
            .with_namespace(namespace)
            .with_parameters(LeaseParams::new(identity, secs, secs / 2))
            .build()
            .await?;
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            // After an error this replica says "not leading" while the
            // manager may still believe it holds the Lease, and then never
            // reports a change: it would never write again (found by
            // tests/outages.rs, the host's kube-apiserver down past the
            // Lease). So once the API answers, give the Lease up and contend
            // anew: a fresh "leading" then makes the controllers go over
            // every Cluster and write what is true now.
            let mut unsure = false;
            loop {
                if unsure {
                    match manager.release().await {
                        Ok(()) => {
                            unsure = false;
                            tracing::info!(
                                lease = LEASE_NAME,
                                "the API answers again: contending for the lease anew"
                            );
                        }
                        Err(e) => {
                            if !back_off(&mut failures, &e, &stop).await {
                                break;
                            }
                            continue;
                        }
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    changed = manager.changed() => match changed {
                        Ok(leading) => {
                            failures = 0;
                            tracing::info!(leading, lease = LEASE_NAME, "leadership changed");
                            let _ = tx.send(leading);
                        }
                        Err(e) => {
                            // Can't tell whether we still hold it: stop writing.
                            let _ = tx.send(false);
                            unsure = true;
                            if !back_off(&mut failures, &e, &stop).await {
                                break;
                            }
                        }
                    },
                }
            }
            let _ = tx.send(false);
            match manager.release().await {
                Ok(()) => tracing::info!(lease = LEASE_NAME, "leadership released"),
                Err(e) => tracing::warn!(error = %e, "could not release the leader lease"),
            }
        });
        Ok((Self { rx, _fixed: None }, task))
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves at the next change (pending forever for [`Leadership::always`]).
    pub async fn changed(&mut self) -> bool {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.rx.borrow_and_update()
    }

    /// A stream that yields each time this replica becomes the leader: what
    /// a leader-only controller passes to `reconcile_all_on`, so a new
    /// leader goes over every object once.
    pub fn elections(&self) -> impl futures_util::Stream<Item = ()> + Send + 'static {
        futures_util::stream::unfold(self.clone(), |mut leader| async move {
            loop {
                if leader.changed().await {
                    return Some(((), leader));
                }
            }
        })
    }
}

/// Count a failure, log it and wait a second per failure in a row (at most
/// 5 s); false when `stop` came first.
async fn back_off(
    failures: &mut u32,
    error: &(dyn std::fmt::Display + Sync),
    stop: &CancellationToken,
) -> bool {
    *failures += 1;
    tracing::warn!(error = %error, "leader election failed, retrying");
    let wait = Duration::from_secs(u64::from((*failures).min(5)));
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}
