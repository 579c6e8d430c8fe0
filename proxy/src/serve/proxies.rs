//! One [`Proxy`] per cluster a door without per-cluster ports serves (the
//! path form of [`super::access`], the aggregated API of
//! [`super::aggregated`]), made on the first request for it and dropped once
//! the cluster has no agent session here (its pooled connections ran through
//! those sessions): the same forwarding, pooling and upgrades as a cluster's
//! own port, without a port per cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::agents::registry::Registry;
use crate::member::Target;
use crate::serve::listener::Shared;
use crate::serve::listener::forward::Proxy;

pub struct Proxies {
    /// The audit records' door.
    door: &'static str,
    shared: Shared,
    /// Ends every cluster's upgraded streams when the access port closes.
    stop: CancellationToken,
    map: Mutex<HashMap<String, Arc<Proxy>>>,
}

impl Proxies {
    pub fn new(door: &'static str, shared: Shared, stop: CancellationToken) -> Self {
        Self {
            door,
            shared,
            stop,
            map: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Proxy>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handler of `cluster`'s kube-apiserver, made now if there is none.
    pub fn get(&self, cluster: &str) -> Arc<Proxy> {
        let mut map = self.lock();
        if let Some(proxy) = map.get(cluster) {
            return proxy.clone();
        }
        let cancel = self.stop.child_token();
        let proxy = Arc::new(Proxy::new(
            cluster,
            Target::KubeApiserver,
            self.door,
            &self.shared,
            cancel,
        ));
        map.insert(cluster.to_string(), proxy.clone());
        proxy
    }

    /// Drop `cluster`'s handler now (the cluster is gone).
    pub fn forget(&self, cluster: &str) {
        if let Some(proxy) = self.lock().remove(cluster) {
            proxy.cancel.cancel();
        }
    }

    /// Drop the handlers of clusters without a live session here.
    pub fn sweep(&self, registry: &Registry) {
        self.lock().retain(|cluster, proxy| {
            let keep = registry.live(cluster) > 0;
            if !keep {
                proxy.cancel.cancel();
                tracing::debug!(%cluster, door = self.door, "no agent session left, handler dropped");
            }
            keep
        });
    }

    /// [`Self::sweep`] whenever the sessions change, until `stop`.
    pub async fn sweep_on_changes(self: Arc<Self>, registry: Registry, stop: CancellationToken) {
        let mut changes = registry.subscribe();
        loop {
            self.sweep(&registry);
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }
}
