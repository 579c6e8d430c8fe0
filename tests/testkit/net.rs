//! Local network helpers: free ports and a TCP echo server to tunnel to.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! let echo = e2e::EchoServer::start().await?;
//! let mut s = tokio::net::TcpStream::connect(echo.addr()).await?;
//! s.write_all(b"ping").await?;
//! s.shutdown().await?; // half-close: the server echoes the rest, then closes
//! let mut back = Vec::new();
//! s.read_to_end(&mut back).await?;
//! assert_eq!(back, b"ping");
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it;
/// another process may still take it before you bind: prefer letting the
/// program under test bind port 0 and report its address when it can).
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free port>`, see [`free_port`].
pub fn free_addr() -> SocketAddr {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    l.local_addr().expect("local_addr of a bound listener")
}

/// A TCP echo server on 127.0.0.1 (random port). Every connection gets its
/// bytes back; when the client half-closes (shuts down its write side), the
/// server finishes echoing and then shuts down its own write side. Dropping
/// the server stops it and closes all its connections.
pub struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl EchoServer {
    /// Binds 127.0.0.1:0 and starts serving. Call inside a tokio runtime.
    pub async fn start() -> Result<EchoServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the echo server")?;
        Self::serve(listener)
    }

    /// Serves on `listener` (e.g. one inside a [`crate::MemberNet`]).
    pub fn serve(listener: TcpListener) -> Result<EchoServer> {
        let addr = listener.local_addr().context("echo server address")?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let count = accepted.clone();
        tasks.spawn(async move {
            // Connection tasks live in this set: aborting the accept loop
            // (on drop) drops the set, which aborts them too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    res = listener.accept() => {
                        let Ok((stream, _)) = res else { continue };
                        count.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(async move {
                            let (mut rd, mut wr) = stream.into_split();
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                            let _ = wr.shutdown().await;
                        });
                    }
                    // Reap finished connections so the set doesn't grow.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(EchoServer {
            addr,
            accepted,
            _tasks: tasks,
        })
    }

    /// The address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections the server accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn echoes_and_honours_half_close() -> Result<()> {
        let echo = EchoServer::start().await?;
        let mut s = tokio::net::TcpStream::connect(echo.addr()).await?;
        let mut buf = [0u8; 5];
        s.write_all(b"hello").await?;
        s.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"hello");
        // Write and read concurrently so neither side's buffers fill up.
        let big = vec![7u8; 1 << 20];
        let (mut rd, mut wr) = s.into_split();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await?;
            wr.shutdown().await // half-close
        });
        let mut back = Vec::new();
        rd.read_to_end(&mut back).await?;
        writer.await??;
        assert_eq!(back, big);
        assert_eq!(echo.connections(), 1);
        assert_ne!(free_port(), 0);
        Ok(())
    }
}
