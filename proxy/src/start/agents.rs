//! The agents' port and the doors that ask it which clusters exist (the
//! CONNECT doors, `--access-port`, `--forward`), served until SIGTERM or
//! SIGINT; then the drain: the port closes, readiness turns false, agents
//! are asked to move, in-flight requests get `--shutdown-grace`, the
//! remaining sessions are closed and the background tasks stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agents::admission::Gate;
use crate::agents::drain::drain;
use crate::agents::endpoint::{self, Endpoint};
use crate::agents::store::ClusterStore;
use crate::ha::owners::Owners;
use crate::identity::ca::Ca;
use crate::identity::host_keys::HostKeys;
use crate::ops::pending::{Limits, Pending};
use crate::ops::signals;
use crate::serve::access::Access;
use crate::serve::connect::{Door, Doors, TargetRefusals};

use super::Core;

/// Tasks stopped once this replica has drained.
pub(super) struct Background {
    /// HA: this replica's holder records.
    pub(super) owners: Option<Arc<Owners>>,
    pub(super) stop: CancellationToken,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

/// The agents' port (and any --forward ports) until SIGTERM or SIGINT, then
/// the drain.
pub(super) async fn serve_agents<S: ClusterStore>(
    core: &Core,
    gate: Gate<S>,
    host_keys: Arc<HostKeys>,
    ready: Arc<AtomicBool>,
    ca: Option<Arc<Ca>>,
    background: Option<Background>,
    report: Option<Arc<dyn TargetRefusals>>,
) -> anyhow::Result<()> {
    let config = &core.config;
    tracing::info!(
        fingerprint = %host_keys.fingerprint(),
        "SSH host key (agents pin it with --proxy-host-key-fingerprint)"
    );
    if let Some(url) = &config.publish_url {
        tracing::info!(proxy_server = %url, "agents dial this proxy with --proxy-server {url}");
    }
    let endpoint = Arc::new(Endpoint {
        gate: Arc::new(gate),
        metrics: core.metrics.clone(),
        ssh: host_keys.clone(),
        ready,
        // No rate at the agents' port: agents behind one NAT reconnect all
        // at once after a restart; the pending caps bound them.
        pending: Pending::new(
            Limits {
                rate_per_source: 0,
                ..config.pending
            },
            core.metrics.clone(),
        ),
    });
    let ports_stop = CancellationToken::new();
    tokio::spawn(crate::ops::trim::run(ports_stop.clone()));
    tokio::spawn(crate::agents::announce::run(
        core.registry.clone(),
        host_keys,
        ports_stop.clone(),
    ));
    for (cluster, addr) in &config.forwards {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --forward {cluster}={addr}"))?;
        tracing::info!(%cluster, addr = %listener.local_addr()?, "forward listening");
        tokio::spawn(crate::serve::forward::run(
            listener,
            cluster.clone(),
            core.dialer.clone(),
            core.audit.clone(),
            ports_stop.clone(),
        ));
    }
    if config.connect_port.is_some() || config.connect_socket_dir.is_some() {
        let gate = endpoint.gate.clone();
        let door = Arc::new(Door {
            dialer: core.dialer.clone(),
            known: Arc::new(move |cluster: &str| gate.knows(cluster)),
            metrics: core.metrics.clone(),
            in_flight: core.in_flight.clone(),
            report,
            audit: core.audit.clone(),
            handshakes: core.client_pending.clone(),
        });
        let doors = Doors {
            port: config.connect_port,
            socket_dir: config.connect_socket_dir.clone(),
            bind: config.bind,
            advertise_address: config.clusters.advertise_address.clone(),
        };
        door.open(doors, ca.as_ref(), core.registry.clone(), &ports_stop)
            .await?;
    }
    if let Some(options) = &config.access {
        let gate = endpoint.gate.clone();
        let shared = core.shared();
        let known = Arc::new(move |cluster: &str| gate.knows(cluster));
        Arc::new(Access::new(shared, known, &ports_stop))
            .open(options, config.bind, ca.as_ref(), &ports_stop)
            .await?;
    }
    let addr = std::net::SocketAddr::new(config.bind, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--host, --port)"))?;
    tracing::info!(addr = %listener.local_addr()?, "listening for agents");
    let agents = tokio::spawn(endpoint::run(
        listener,
        endpoint.clone(),
        ports_stop.clone(),
    ));
    signals::terminated().await;
    // No new agents from here on: the port closes with its accept loop.
    ports_stop.cancel();
    let _ = agents.await;
    endpoint.ready.store(false, Ordering::Relaxed);
    let owners = background.as_ref().and_then(|b| b.owners.clone());
    if let Some(owners) = &owners {
        owners.set_draining().await;
    }
    let moved = |cluster: &str| owners.as_ref().is_none_or(|o| o.owner(cluster).is_some());
    drain(
        &core.registry,
        &core.in_flight,
        config.shutdown_grace,
        moved,
    )
    .await;
    // Agents hear why and reconnect at once (to another replica, if any)
    // instead of waiting for their keepalive to notice a dead socket.
    tracing::info!("shutting down: closing agent sessions");
    core.registry
        .close_all("the proxy is shutting down, reconnect")
        .await;
    if let Some(background) = background {
        background.stop.cancel();
        let finished = futures_util::future::join_all(background.tasks);
        if tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .is_err()
        {
            tracing::warn!("background tasks not done within 5 s; leases expire by themselves");
        }
    }
    Ok(())
}
