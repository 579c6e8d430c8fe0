//! One [`Proxy`] per member reached through the aggregated API, made on
//! first use: the same request handler as a cluster's own port (its pool of
//! upstream connections through the tunnel, its upgrades, its audit), only
//! without a port. Clusters the host does not know get none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::member::Target;
use crate::serve::listener::Shared;
use crate::serve::listener::forward::{Proxy, RESPONSE_HEADER_TIMEOUT};
use crate::serve::listener::upstream::{Connector, Routes};

/// The handlers made so far, by cluster name.
pub struct Members {
    shared: Shared,
    cancel: CancellationToken,
    proxies: Mutex<HashMap<String, Arc<Proxy>>>,
}

impl Members {
    /// `cancel` ends the upgraded streams of every handler made here.
    pub fn new(shared: Shared, cancel: CancellationToken) -> Self {
        Self {
            shared,
            cancel,
            proxies: Mutex::default(),
        }
    }

    /// `cluster`'s handler, made now if it is the first request.
    pub fn proxy(&self, cluster: &str) -> Arc<Proxy> {
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        proxies
            .entry(cluster.to_string())
            .or_insert_with(|| {
                let routes = Arc::new(Routes::default());
                let target = Target::KubeApiserver;
                let client = Connector {
                    cluster: cluster.to_string(),
                    target,
                    dialer: self.shared.dialer.clone(),
                    routes: routes.clone(),
                }
                .pool();
                Arc::new(Proxy {
                    cluster: cluster.to_string(),
                    target,
                    dialer: self.shared.dialer.clone(),
                    routes,
                    client,
                    cancel: self.cancel.clone(),
                    response_header_timeout: RESPONSE_HEADER_TIMEOUT,
                    in_flight: self.shared.in_flight.clone(),
                    metrics: self.shared.metrics.clone(),
                    audit: self.shared.audit.clone(),
                })
            })
            .clone()
    }

    /// Forget `cluster`'s handler (the cluster was deleted): its idle
    /// connections go with it.
    pub fn forget(&self, cluster: &str) {
        self.proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cluster);
    }
}
