//! Start, serve, stop: the proxy's parts built in dependency order, then
//! served until SIGTERM, then drained.
//!
//! Build order (nothing is filled in later): metrics, the audit log and the
//! session registry; the member dialer over the registry; with Kubernetes, the
//! proxy's identity, the HA pieces (replica records, the peer port, the
//! leader election), the cluster ports over the dialer, the CSR signer, the
//! registration controller, the Cluster controller over the ports, the status
//! refresher; last the admission gate (registry + the controller's view of the
//! Clusters + the registrar), the doors that ask
//! it which clusters exist (CONNECT, the access port) and the agents' port.
//!
//! Shutdown: the agents' port closes, readiness turns false, agents are asked
//! to move to another replica and in-flight requests get `--shutdown-grace`
//! to finish, then the remaining tunnels are closed with a reason and the
//! background tasks are stopped.
//!
//! Here: what every mode shares ([`Core`]) and the choice of mode; the
//! Cluster-resource mode's start in [`kubernetes`], the agents' port and the
//! drain, which both modes end with, in [`agents`].

mod agents;
mod kubernetes;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;

use crate::agents::admission::Gate;
use crate::agents::hub::HubServices;
use crate::agents::registry::Registry;
use crate::config::{Config, Mode};
use crate::identity::host_keys::HostKeys;
use crate::member::MemberDialer;
use crate::ops::audit::Audit;
use crate::ops::handshakes::Runner;
use crate::ops::in_flight::InFlight;
use crate::ops::metrics::Metrics;
use crate::ops::pending::Pending;
use crate::serve::listener::{Relay, Shared};

/// What every mode shares.
struct Core {
    config: Config,
    registry: Registry,
    dialer: MemberDialer,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    audit: Audit,
    /// HA: the replicas that hold other clusters' agents.
    relay: Option<Arc<dyn Relay>>,
    /// The caps on clients' TLS handshakes in progress (every HTTPS door).
    client_pending: Arc<Pending>,
    /// Each client's request-body rate (every door that forwards HTTP).
    uploads: Option<Arc<crate::ops::uploads::Pacer>>,
}

impl Core {
    /// What the doors that forward HTTP to members share.
    fn shared(&self) -> Shared {
        Shared {
            dialer: self.dialer.clone(),
            relay: self.relay.clone(),
            in_flight: self.in_flight.clone(),
            metrics: self.metrics.clone(),
            audit: self.audit.clone(),
            pending: self.client_pending.clone(),
            uploads: self.uploads.clone(),
        }
    }
}

/// Run the proxy until SIGTERM or SIGINT, then drain.
pub async fn run(mut config: Config, handshakes: Runner) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(metrics.clone());
    let dialer = MemberDialer::new(registry.clone());
    let mode = std::mem::replace(&mut config.mode, Mode::Kubernetes { kubeconfig: None });
    // Lines are flushed as they are written; at exit what is queued is
    // written before the process ends (`finish_audit`).
    let (audit, audit_writer) = match config.audit_log.take() {
        Some(output) => {
            let (audit, writer) = Audit::start(output, metrics.clone());
            (audit, Some(writer))
        }
        None => (Audit::Off, None),
    };
    let client_pending = Pending::running_on(handshakes, config.pending, metrics.clone());
    let uploads = crate::ops::uploads::Pacer::of(config.uploads);
    let core = Core {
        client_pending,
        uploads,
        config,
        registry,
        dialer,
        in_flight: InFlight::default(),
        metrics,
        audit,
        relay: None,
    };
    let audit = core.audit.clone();
    let served = serve_mode(core, mode).await;
    finish_audit(&audit, audit_writer).await;
    served
}

/// Write the audit records still queued, for at most a few seconds.
async fn finish_audit(audit: &Audit, writer: Option<tokio::task::JoinHandle<()>>) {
    audit.close();
    if let Some(writer) = writer
        && tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .is_err()
    {
        tracing::warn!("the audit log's last records were not written within 5s");
    }
}

async fn serve_mode(core: Core, mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::File(store) => {
            let mut core = core;
            let host_key = host_key_from_file(&core.config)?;
            let host_keys = Arc::new(HostKeys::new(host_key, None, core.config.keepalive));
            let gate = Gate::new(core.registry.clone(), Arc::new(store), hub_services(&core));
            let ready = Arc::new(AtomicBool::new(true));
            let ca = core.config.ca.take().map(Arc::new);
            agents::serve_agents(&core, gate, host_keys, ready, ca, None, None).await
        }
        Mode::Kubernetes { kubeconfig } => kubernetes::with_kubernetes(core, kubeconfig).await,
    }
}

/// `--hub-service`, logged once: what agents may reach on this side.
fn hub_services(core: &Core) -> HubServices {
    for (service, addr) in &core.config.hub_services {
        tracing::info!(%service, %addr, "publishing hub service");
    }
    HubServices::new(
        core.config.hub_services.clone(),
        core.metrics.clone(),
        core.audit.clone(),
    )
}

fn host_key_from_file(config: &Config) -> anyhow::Result<russh::keys::PrivateKey> {
    tunnel::ssh::load_or_create_host_key(&config.host_key)
        .context("set --host-key to a writable path, or --data-dir to a writable directory")
}
