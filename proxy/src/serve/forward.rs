//! `--forward NAME=ADDR`: a plain TCP port per cluster whose connections go
//! through the tunnel to the agent's kube-apiserver address, bytes untouched.
//! For debugging and for measuring the raw tunnel; the per-cluster HTTPS proxy
//! is the way clients are meant to reach members.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::member::{MemberDialer, Target};
use crate::ops::accept::accept_loop;

/// Serve `listener` for `cluster` until `stop`.
pub async fn run(
    listener: TcpListener,
    cluster: String,
    dialer: MemberDialer,
    stop: CancellationToken,
) {
    accept_loop(listener, "forward", stop, |mut tcp, peer| {
        let (dialer, cluster) = (dialer.clone(), cluster.clone());
        tokio::spawn(async move {
            let mut stream = match dialer.open(&cluster, Target::KubeApiserver).await {
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
        async {}
    })
    .await;
}
