//! A TCP relay that delays every byte by a fixed time each way: a long link
//! (RTT = 2 x delay) between an agent and its proxy, without touching the
//! machine's network settings. It buffers without limit, so it adds latency
//! and nothing else: what limits a stream over it is the tunnel's own flow
//! control (SSH channel windows), as on a real long link.
//!
//! With a [`TunLink`] the delay and loss happen below TCP instead: the relay
//! listens behind the link and copies without delay (see `e2e::lossy`).

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use e2e::lossy::{self, TunLink};

/// What lies between an agent and its proxy.
#[derive(Clone)]
pub struct Link {
    /// One-way delay (RTT / 2).
    pub delay: Duration,
    /// Delay and loss below TCP instead of in the relay.
    pub lossy: Option<Arc<TunLink>>,
}

impl Link {
    pub fn delay(delay: Duration) -> Link {
        Link { delay, lossy: None }
    }
}

pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
    _link: Option<Arc<TunLink>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listen on 127.0.0.1:0; each connection goes to `target`, `delay` later
    /// in each direction. Through a lossy link: listen behind it, no delay
    /// here, and `addr` is the link's side.
    pub async fn start(target: SocketAddr, link: &Link) -> Result<Relay> {
        let (listener, addr, delay) = match &link.lossy {
            None => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                (listener, addr, link.delay)
            }
            Some(_) => {
                let listener = TcpListener::bind((lossy::LOCAL, 0)).await?;
                let port = listener.local_addr()?.port();
                let addr = SocketAddr::V4(SocketAddrV4::new(lossy::PEER, port));
                (listener, addr, Duration::ZERO)
            }
        };
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((inbound, _)) = accepted else { continue };
                        conns.spawn(async move {
                            let Ok(outbound) = TcpStream::connect(target).await else { return };
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let (ir, iw) = inbound.into_split();
                            let (or, ow) = outbound.into_split();
                            tokio::join!(pump(ir, ow, delay), pump(or, iw, delay));
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Relay {
            addr,
            task,
            _link: link.lossy.clone(),
        })
    }
}

/// Copy `from` to `to`, each chunk written `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    if tx.send((Instant::now() + delay, chunk)).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
