//! The accept loop of every port the proxy listens on (agents, clusters,
//! peers, `--forward`): a failed accept (out of file descriptors and the like)
//! is logged and retried after a short pause instead of ending the port, and
//! the loop ends when `stop` is cancelled.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept, so a full fd table does not spin the loop.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Accept on `listener` until `stop`, handing each connection (`TCP_NODELAY`
/// set) to `on_accept`. `port` names the port in the warning.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    port: &str,
    stop: CancellationToken,
    mut on_accept: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let (tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(port, error = %e, "accept failed; retrying");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(RETRY_AFTER) => continue,
                    }
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        on_accept(tcp, peer).await;
    }
}
