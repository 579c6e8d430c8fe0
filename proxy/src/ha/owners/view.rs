//! The view of every replica's records, kept from the Lease watch: who is
//! alive, who holds which cluster.

use super::*;

impl Owners {
    pub(super) fn apply(&self, lease: &Lease) {
        let labels = lease.labels();
        let spec = lease.spec.clone().unwrap_or_default();
        let mut changed = Vec::new();
        {
            let mut state = self.lock();
            match labels.get(ROLE_LABEL).map(String::as_str) {
                Some("replica") => {
                    let Some(id) = spec.holder_identity.clone() else {
                        return;
                    };
                    let annotations = lease.annotations();
                    let replica = Replica {
                        peer_address: annotations
                            .get(PEER_ANNOTATION)
                            .cloned()
                            .unwrap_or_default(),
                        draining: annotations.get(DRAINING_ANNOTATION).map(String::as_str)
                            == Some("true"),
                        renewed: spec.renew_time.map(|t| t.0),
                        duration: Duration::from_secs(
                            spec.lease_duration_seconds
                                .and_then(|s| u64::try_from(s).ok())
                                .unwrap_or(REPLICA_LEASE.as_secs()),
                        ),
                    };
                    let before = state.replicas.insert(id.clone(), replica.clone());
                    if before.is_none_or(|b| b.draining != replica.draining) {
                        changed.extend(state.held_by(&id));
                    }
                }
                Some("cluster") => {
                    let Some(cluster) = labels.get(CLUSTER_LABEL).cloned() else {
                        return;
                    };
                    let holder = spec.holder_identity.filter(|h| !h.is_empty());
                    let before = match &holder {
                        Some(h) => state.holders.insert(cluster.clone(), h.clone()),
                        None => state.holders.remove(&cluster),
                    };
                    if before != holder {
                        changed.push(cluster);
                    }
                }
                _ => {}
            }
        }
        for cluster in changed {
            let _ = self.changes.send(cluster);
        }
    }

    pub(super) fn forget(&self, lease: &Lease) {
        let labels = lease.labels();
        let mut changed = Vec::new();
        {
            let mut state = self.lock();
            match labels.get(ROLE_LABEL).map(String::as_str) {
                Some("replica") => {
                    if let Some(id) = lease.spec.as_ref().and_then(|s| s.holder_identity.clone()) {
                        state.replicas.remove(&id);
                        changed.extend(state.held_by(&id));
                    }
                }
                Some("cluster") => {
                    if let Some(cluster) = labels.get(CLUSTER_LABEL)
                        && state.holders.remove(cluster).is_some()
                    {
                        changed.push(cluster.clone());
                    }
                }
                _ => {}
            }
        }
        for cluster in changed {
            let _ = self.changes.send(cluster);
        }
    }

    /// Replicas whose Lease went stale since the last check: their clusters
    /// changed availability (a death produces no watch event).
    pub(super) fn check_deaths(&self) {
        let changed: Vec<String> = {
            let mut state = self.lock();
            let now = Timestamp::now();
            let alive: HashSet<String> = state
                .replicas
                .iter()
                .filter(|(_, r)| r.alive(now))
                .map(|(id, _)| id.clone())
                .collect();
            let flipped: HashSet<&String> = alive.symmetric_difference(&state.alive).collect();
            let clusters = state
                .holders
                .iter()
                .filter(|(_, h)| flipped.contains(h))
                .map(|(c, _)| c.clone())
                .collect();
            state.alive = alive;
            clusters
        };
        for cluster in changed {
            let _ = self.changes.send(cluster);
        }
    }
}
