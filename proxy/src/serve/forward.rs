//! `--forward NAME=ADDR`: a plain TCP port per cluster whose connections go
//! through the tunnel to the agent's kube-apiserver address, bytes untouched.
//! For debugging and for measuring the raw tunnel; the per-cluster HTTPS proxy
//! is the way clients are meant to reach members. Each connection is one
//! audit line (door `forward`): whoever reaches this port acts as the agent.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::member::{MemberDialer, Target};
use crate::ops::accept::accept_loop;
use crate::ops::audit::{Audit, Caller, Record};

/// The audit records' door.
const DOOR: &str = "forward";

/// Serve `listener` for `cluster` until `stop`.
pub async fn run(
    listener: TcpListener,
    cluster: String,
    dialer: MemberDialer,
    audit: Audit,
    stop: CancellationToken,
) {
    accept_loop(listener, "forward", stop, |tcp, peer| {
        let (dialer, cluster, audit) = (dialer.clone(), cluster.clone(), audit.clone());
        tokio::spawn(async move {
            let mut record = audit.begin(|| {
                let caller = Caller::named(format!("client of the --forward port of {cluster}"));
                Record::new(DOOR, &cluster, caller, "connect").from(Some(peer.ip()))
            });
            let mut stream = match dialer.open(&cluster, Target::KubeApiserver).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%cluster, %peer, error = %e, "closing forwarded connection");
                    if let Some(record) = record.record() {
                        record.status = 502;
                        record.reason = Some(e.to_string());
                    }
                    return;
                }
            };
            if let Some(record) = record.record() {
                record.status = 200;
            }
            let copied = tunnel::copy::join_tcp(tcp, &mut stream, None).await;
            if let Some(record) = record.record() {
                record.bytes_in += copied.up;
                record.bytes_out += copied.down;
            }
            if let Err(e) = copied.end {
                tracing::debug!(%cluster, %peer, error = %e, "forwarded connection ended");
            }
        });
        async {}
    })
    .await;
}
