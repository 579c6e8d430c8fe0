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

/// A TCP port that was free a moment ago on every address. Taken below the
/// kernel's ephemeral range (`ip_local_port_range`): a port the OS picks for
/// a listener is in that range, and every outgoing connection of the
/// harness's kube-apiservers and etcd takes one from it too, so between the
/// pick and the program's bind it was sometimes taken ("Address already in
/// use", seen in CI). And between the blocks of cluster ports
/// ([`pick_ports`](crate::pick_ports)): 22000..30000. Another test may
/// still pick the same port: prefer letting the program under test bind
/// port 0 and report its address.
pub fn free_port() -> u16 {
    let (low, high) = (PORTS_FROM, ephemeral_low().min(PORTS_TO));
    let span = u64::from(high.saturating_sub(low).max(1));
    let mut seed = seed();
    for _ in 0..200 {
        seed = xorshift(seed);
        let port = low + u16::try_from(seed % span).unwrap_or(0);
        if StdListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    l.local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// Where [`free_port`] looks: above the kube API ports of cluster port
/// blocks (below them: well-known and registered services a machine may
/// run), below their ks ports.
const PORTS_FROM: u16 = crate::ports::BLOCKS.end;
const PORTS_TO: u16 = crate::ports::BLOCKS.start + crate::ports::KS_OFFSET;

/// The first port of the kernel's ephemeral range (32768 if unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|l| l.parse().ok()))
        .filter(|&l: &u16| l > PORTS_FROM)
        .unwrap_or(32768)
}

/// A random seed: std's hasher keys are random per process and differ per call.
pub(crate) fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1
}

/// xorshift64: no dependency for a few random numbers.
pub(crate) fn xorshift(mut seed: u64) -> u64 {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    seed
}

/// `127.0.0.1:<free port>`, see [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
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

    #[test]
    fn free_ports_are_bindable_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        for &port in &ports {
            assert!(
                (PORTS_FROM..low).contains(&port),
                "{port} outside {PORTS_FROM}..{low}"
            );
            StdListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("a free port binds");
        }
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert!(distinct.len() > 40, "free ports repeat: {ports:?}");
    }
}
