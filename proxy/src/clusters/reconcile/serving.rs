//! What serving a Cluster takes besides the Cluster itself: a port pair no
//! other Cluster uses, the Service `mc-<name>` in front of it (or none, with
//! `--cluster-ports none`), the names its serving certificate must cover, and
//! a kubeconfig whose client certificate is renewed well before it expires.
//!
//! A pair handed out is reserved in the [`Context`] until the store shows it
//! in the Cluster's spec, so two passes never pick the same free ports.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};

use super::{Context, Error, lock};
use crate::clusters::crd::Cluster;
use crate::clusters::decide::{self, PortChoice};
use crate::clusters::service::{self, Addresses, Exposure};
use crate::clusters::{Ports, kubeconfig};
use crate::identity::names::{MANAGED_BY, MANAGER};

/// How long the client certificates in written kubeconfigs are valid...
const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// ...and how long before expiry they are renewed.
const CLIENT_CERT_RENEW: Duration = Duration::from_secs(30 * 24 * 3600);

impl<P: Ports> Context<P> {
    /// Ports of `cluster` per [`decide::ports`]; a new pair is reserved.
    pub(super) fn ports_for(&self, cluster: &Cluster) -> Result<(u16, u16), Error> {
        let name = cluster.name_any();
        let used: HashSet<u16> = self
            .store
            .state()
            .iter()
            .filter(|c| c.name_any() != name)
            .flat_map(|c| {
                [
                    c.spec.connection.kubernetes_api_server_port,
                    c.spec.connection.kubesphere_api_server_port,
                ]
            })
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let others: HashSet<u16> = reserved
            .iter()
            .filter(|(n, _)| **n != name)
            .flat_map(|(_, (a, b))| [*a, *b])
            .collect();
        let conn = &cluster.spec.connection;
        let choice = decide::ports(
            (
                conn.kubernetes_api_server_port,
                conn.kubesphere_api_server_port,
            ),
            reserved.get(&name).copied(),
            &used,
            &others,
            self.options.ports.clone(),
            |port| self.bindable(port),
        )
        .ok_or_else(|| Error::NoPorts(self.options.ports.clone()))?;
        if let PortChoice::New(pair) = choice {
            reserved.insert(name, pair);
        }
        Ok(choice.pair())
    }

    /// Proven free by binding it (and letting go at once).
    fn bindable(&self, port: u16) -> bool {
        std::net::TcpListener::bind((self.options.bind_host.as_str(), port)).is_ok()
    }

    fn selector(&self) -> BTreeMap<String, String> {
        self.options.selector.iter().cloned().collect()
    }

    /// Create or fix Service mc-<name>; writes only when our fields differ.
    pub(super) async fn apply_service(
        &self,
        cluster: &Cluster,
        ports: (u16, u16),
        exposure: &Exposure,
    ) -> Result<Service, Error> {
        let name = service::name(&cluster.name_any());
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.options.namespace);
        let selector = self.selector();
        if let Some(current) = api.get_opt(&name).await?
            && service::matches(&current, &selector, ports, exposure)
        {
            return Ok(current);
        }
        let svc = service::desired(cluster, &self.options.namespace, &selector, ports, exposure);
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&svc),
            )
            .await
        {
            Ok(svc) => {
                tracing::info!(cluster = %cluster.name_any(), service = %name, "service applied");
                Ok(svc)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                Err(Error::Namespace(name, self.options.namespace.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `--cluster-ports none`: a Service left from per-cluster ports is
    /// deleted (clients are told the path form instead).
    pub(super) async fn remove_service(&self, cluster: &str) -> Result<(), Error> {
        // A Service is left only by a run with per-cluster ports before this
        // one, so ours are listed once per process. Asked per cluster it was a
        // read per cluster, 10,000 at a fleet's start.
        let left = self
            .services_left
            .get_or_try_init(|| async {
                let api: Api<Service> =
                    Api::namespaced(self.client.clone(), &self.options.namespace);
                let ours = api
                    .list(&ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}")))
                    .await?;
                let names = ours.items.iter().map(ResourceExt::name_any).collect();
                Ok::<_, Error>(Mutex::new(names))
            })
            .await?;
        let name = service::name(cluster);
        if !lock(left).contains(&name) {
            return Ok(());
        }
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.options.namespace);
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {
                tracing::info!(%cluster, service = %name, "service deleted: --cluster-ports none")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        lock(left).remove(&name);
        Ok(())
    }

    /// The names of the cluster's serving certificate, remembered for agents
    /// that connect before the next reconcile.
    pub(super) fn listener_names(&self, cluster: &str, addresses: &Addresses) -> Vec<String> {
        let names = decide::sans(
            cluster,
            &self.options.namespace,
            self.options.advertise_address.as_deref(),
            addresses,
        );
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.to_string(), names.clone());
        names
    }

    /// The kubeconfig to publish, or None when the current one is still good.
    pub(super) fn kubeconfig(
        &self,
        cluster: &Cluster,
        server: &str,
    ) -> Result<Option<String>, Error> {
        let current = &cluster.spec.connection.kubeconfig;
        // Every trusted CA: during a rotation clients must accept either.
        let ca = &self.ca.bundle_pem();
        let name = cluster.name_any();
        if kubeconfig::is_current(
            current,
            &name,
            server,
            ca,
            SystemTime::now(),
            CLIENT_CERT_RENEW,
        ) {
            return Ok(None);
        }
        let issued = self
            .ca
            .issue_client(
                &format!("tower:{name}"),
                &["tower:clients"],
                CLIENT_CERT_VALIDITY,
            )
            .map_err(|e| Error::Cert(e.to_string()))?;
        self.metrics
            .set_cert_expiry(&name, "client", issued.not_after);
        let yaml = kubeconfig::render(&name, server, ca, &issued.cert_pem, &issued.key_pem);
        Ok(Some(B64.encode(yaml)))
    }

    /// An agent on another replica counts: clients reach it through any replica.
    pub(super) fn elsewhere(&self, cluster: &str) -> Option<String> {
        self.owners
            .as_ref()
            .and_then(|o| o.owner(cluster))
            .map(|o| o.replica)
    }
}
