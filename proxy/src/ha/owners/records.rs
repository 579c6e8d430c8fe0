//! This replica's own records: its heartbeat Lease, and the cluster Leases
//! it holds (claimed while it has a live session, released when it has none
//! or stops).

use super::*;

impl Owners {
    pub(super) async fn heartbeat(&self) -> Result<(), kube::Error> {
        let now = MicroTime(Timestamp::now());
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(PEER_ANNOTATION.to_string(), self.peer_address.clone());
        annotations.insert(
            DRAINING_ANNOTATION.to_string(),
            self.draining.load(Ordering::Relaxed).to_string(),
        );
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(replica_lease_name(&self.me)),
                labels: Some(
                    [
                        (MANAGED_BY.to_string(), MANAGER.to_string()),
                        (ROLE_LABEL.to_string(), "replica".to_string()),
                    ]
                    .into(),
                ),
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.me.clone()),
                lease_duration_seconds: Some(REPLICA_LEASE.as_secs() as i32),
                renew_time: Some(now),
                ..Default::default()
            }),
        };
        let mut value = serde_json::to_value(&lease).map_err(kube::Error::SerdeError)?;
        value["apiVersion"] = "coordination.k8s.io/v1".into();
        value["kind"] = "Lease".into();
        self.api
            .patch(
                &replica_lease_name(&self.me),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(value),
            )
            .await?;
        Ok(())
    }

    /// Make this replica the holder of `cluster`'s Lease unless a live,
    /// non-draining replica holds it. Compare-and-swap on resourceVersion.
    pub(super) async fn claim(&self, cluster: &str) -> Result<bool, kube::Error> {
        let name = cluster_lease_name(cluster);
        let now = MicroTime(Timestamp::now());
        match self.api.get_opt(&name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name),
                        labels: Some(
                            [
                                (MANAGED_BY.to_string(), MANAGER.to_string()),
                                (ROLE_LABEL.to_string(), "cluster".to_string()),
                                (CLUSTER_LABEL.to_string(), cluster.to_string()),
                            ]
                            .into(),
                        ),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.me.clone()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await?;
                Ok(true)
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                let holder = spec.holder_identity.clone().unwrap_or_default();
                if holder == self.me {
                    return Ok(true);
                }
                if !holder.is_empty() {
                    let state = self.lock();
                    let busy = state
                        .replicas
                        .get(&holder)
                        .is_some_and(|r| r.alive(Timestamp::now()) && !r.draining);
                    if busy {
                        return Ok(false);
                    }
                }
                spec.holder_identity = Some(self.me.clone());
                spec.acquire_time = Some(now.clone());
                spec.renew_time = Some(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                self.api
                    .replace(&lease.name_any(), &PostParams::default(), &lease)
                    .await?;
                Ok(true)
            }
        }
    }

    /// Clear the holder of `cluster`'s Lease if it is this replica.
    pub(super) async fn release(&self, cluster: &str) -> Result<(), kube::Error> {
        let name = cluster_lease_name(cluster);
        let Some(mut lease) = self.api.get_opt(&name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.me.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api
            .replace(&name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }

    /// Claim the clusters this replica has sessions of, release the others it
    /// holds once they have had none for [`RELEASE_GRACE`]; returns when the
    /// next held-back release falls due.
    pub(super) async fn sync(&self, live: &[String]) -> Option<tokio::time::Instant> {
        let draining = self.draining.load(Ordering::Relaxed);
        let (to_claim, to_release, next) = {
            let mut state = self.lock();
            let now = Timestamp::now();
            let claim: Vec<String> = live
                .iter()
                .filter(|c| match state.holders.get(*c) {
                    Some(h) if *h == self.me => false,
                    Some(h) => {
                        // Take over from a dead or draining holder, never
                        // while draining ourselves.
                        !draining
                            && state
                                .replicas
                                .get(h)
                                .is_none_or(|r| !r.alive(now) || r.draining)
                    }
                    None => !draining,
                })
                .cloned()
                .collect();
            let held = state.held_by(&self.me);
            let now = tokio::time::Instant::now();
            let (release, next) = due_releases(&held, live, &mut state.gone, now, draining);
            (claim, release, next)
        };
        for cluster in to_claim {
            match self.claim(&cluster).await {
                Ok(true) => tracing::info!(%cluster, "this replica now serves the cluster"),
                Ok(false) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {} // raced: next round
                Err(e) => {
                    tracing::warn!(%cluster, error = %e, "could not record this replica as the cluster's holder")
                }
            }
        }
        for cluster in to_release {
            if let Err(e) = self.release(&cluster).await {
                tracing::warn!(%cluster, error = %e, "could not release the cluster's lease");
            }
        }
        next
    }

    /// Without `--leader-elect`: only this replica's Lease, renewed every
    /// [`RENEW`] until `stop`, then deleted. It stands for the liveness of
    /// every cluster this proxy serves (their status is written only when
    /// something changes).
    pub async fn renew_only(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.heartbeat().await {
                        tracing::warn!(error = %e, "could not renew this replica's lease");
                    }
                }
            }
        }
        if let Err(e) = self
            .api
            .delete(&replica_lease_name(&self.me), &DeleteParams::default())
            .await
        {
            tracing::warn!(error = %e, "could not delete this replica's lease");
        }
    }

    /// On shutdown: give up every cluster and the heartbeat.
    pub(super) async fn release_all(&self) {
        let held = self.lock().held_by(&self.me);
        for cluster in held {
            if let Err(e) = self.release(&cluster).await {
                tracing::warn!(%cluster, error = %e, "could not release the cluster's lease");
            }
        }
        if let Err(e) = self
            .api
            .delete(&replica_lease_name(&self.me), &DeleteParams::default())
            .await
        {
            tracing::warn!(error = %e, "could not delete this replica's lease");
        }
    }
}
