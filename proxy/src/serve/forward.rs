//! `--forward NAME=ADDR`: a plain TCP port per cluster whose connections go
//! through the tunnel to the agent's kube-apiserver address, bytes untouched.
//! For debugging and for measuring the raw tunnel; the per-cluster HTTPS proxy
//! is the way clients are meant to reach members.

use tokio::net::TcpListener;

use crate::registry::{ClusterStore, Registry, Upstream};

/// Serve `listener` for `cluster` until the task is dropped.
pub async fn run<S: ClusterStore>(listener: TcpListener, cluster: String, registry: Registry<S>) {
    loop {
        let (mut tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let registry = registry.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut stream = match registry.dial(&cluster, Upstream::Kubernetes).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%cluster, %peer, error = %e, "closing forwarded connection");
                    return;
                }
            };
            if let Err(e) = tunnel::copy::join(&mut tcp, &mut stream).await {
                tracing::debug!(%cluster, %peer, error = %e, "forwarded connection ended");
            }
        });
    }
}
