//! The accept loop of every port the proxy listens on (agents, clusters,
//! peers, `--forward`, the CONNECT doors, their Unix sockets): a failed
//! accept (out of file descriptors and the like) is logged and retried after
//! a short pause instead of ending the port, and the loop ends when `stop` is
//! cancelled.

use std::future::Future;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept, so a full fd table does not spin the loop.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// A listening socket.
pub trait Listener {
    type Stream;
    type Addr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&self) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
        let (tcp, peer) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&self) -> std::io::Result<(UnixStream, Self::Addr)> {
        UnixListener::accept(self).await
    }
}

/// Accept on `listener` until `stop`, handing each connection (TCP ones with
/// `TCP_NODELAY` set) to `on_accept`. `port` names the port in the warning.
pub async fn accept_loop<L, F, Fut>(
    listener: L,
    port: &str,
    stop: CancellationToken,
    mut on_accept: F,
) where
    L: Listener,
    F: FnMut(L::Stream, L::Addr) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let (stream, peer) = tokio::select! {
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
        on_accept(stream, peer).await;
    }
}
