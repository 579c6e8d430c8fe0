//! Growing receive windows stay bounded (docs/architecture.md, "Windows"):
//! over a link with a round trip, one channel that was read fast (so its
//! window grew) and then stopped being read holds at most its cap of unread
//! data, while another channel of the same tunnel moves a large download to
//! the end, and a channel opened after the growth and read only once holds no
//! more than the initial window (the learnt window goes only to channels
//! that earn growth). Counted in bytes, not time. Proxy and agent run in process over a
//! real websocket through a relay that delays each direction.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tunnel::client::Dialer;
use tunnel::server::Session;
use tunnel::ssh::{WINDOW_MAX, WINDOW_SIZE};

const MIB: u64 = 1 << 20;
/// What the agent side itself may hold of a channel beyond the window: the
/// in-memory pipe to the source (64 KiB) and the copy buffer that waits for
/// window space.
const AGENT_SLACK: u64 = MIB;
const BULK: u64 = 64 * MIB;

/// Targets in memory: `hose` writes forever and counts what it could write;
/// `bulk` writes [`BULK`] bytes and ends.
struct Sources {
    hose_written: Arc<AtomicU64>,
    /// The same for `late.test`, a hose opened after the growth.
    late_written: Arc<AtomicU64>,
}

impl Dialer for Sources {
    type Stream = DuplexStream;
    async fn dial(&self, target: &str) -> std::io::Result<DuplexStream> {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let chunk = vec![7u8; 32 * 1024];
        match target {
            "hose.test:443" | "late.test:443" => {
                let written = if target == "hose.test:443" {
                    self.hose_written.clone()
                } else {
                    self.late_written.clone()
                };
                tokio::spawn(async move {
                    while far.write_all(&chunk).await.is_ok() {
                        written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    }
                });
            }
            "bulk.test:443" => {
                tokio::spawn(async move {
                    let mut left = BULK;
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if far.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = far.shutdown().await;
                    // Keep the pipe open until the agent has read it all.
                    let mut sink = [0u8; 1];
                    let _ = far.read(&mut sink).await;
                });
            }
            _ => return Err(std::io::ErrorKind::ConnectionRefused.into()),
        }
        Ok(near)
    }
}

/// Copies each direction `delay` late, without limit (as bench/src/relay.rs).
async fn relay(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (inbound, _) = listener.accept().await.unwrap();
        let outbound = TcpStream::connect(target).await.unwrap();
        let (ir, iw) = inbound.into_split();
        let (or, ow) = outbound.into_split();
        tokio::join!(pump(ir, ow, delay), pump(or, iw, delay));
    });
    addr
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx
                .send((Instant::now() + delay, Bytes::copy_from_slice(&buf[..n])))
                .is_err()
            {
                break;
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
    };
    tokio::join!(reader, writer);
}

async fn tunnel(sources: Sources, rtt: Duration) -> Session {
    let targets = ["hose.test:443", "late.test:443", "bulk.test:443"];
    let targets = targets.iter().map(|t| t.to_string()).collect();
    common::tunnel(sources, targets, |addr| relay(addr, rtt / 2)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_channel_holds_at_most_its_cap_while_another_completes() {
    let hose_written = Arc::new(AtomicU64::new(0));
    let late_written = Arc::new(AtomicU64::new(0));
    let session = tunnel(
        Sources {
            hose_written: hose_written.clone(),
            late_written: late_written.clone(),
        },
        Duration::from_millis(20),
    )
    .await;

    // Channel A is read fast first, so its window may grow to the cap...
    let mut stalled = session.dial("hose.test:443").await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut read_a = 0u64;
    while read_a < 32 * MIB {
        let n = stalled.read(&mut buf).await.unwrap();
        assert!(n > 0, "the source of channel A ended");
        read_a += n as u64;
    }
    // ... then nobody reads it any more. Channel C is opened now, read once
    // and then not again...
    let mut late = session.dial("late.test:443").await.unwrap();
    let read_c = late.read(&mut buf).await.unwrap() as u64;
    assert!(read_c > 0, "the source of channel C ended");
    // ... while channel B downloads to the end.
    let mut bulk = session.dial("bulk.test:443").await.unwrap();
    let mut read_b = 0u64;
    loop {
        let n = bulk.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        read_b += n as u64;
    }
    assert_eq!(read_b, BULK, "channel B's download is complete");

    // A's source was paced by A's window: what it wrote beyond what was read
    // is what the tunnel holds for A, and that is at most A's cap.
    let unread = hose_written.load(Ordering::SeqCst) - read_a;
    eprintln!(
        "channel A: {read_a} bytes read, {unread} unread (initial window {WINDOW_SIZE}, cap {WINDOW_MAX})"
    );
    assert!(
        unread <= u64::from(WINDOW_MAX) + AGENT_SLACK,
        "a stalled channel buffered {unread} bytes, more than its cap {WINDOW_MAX}"
    );

    // C never earned growth, so the window the session learnt from A
    // (PATCHES.md 14) did not reach it: it holds at most the initial window.
    let unread_c = late_written.load(Ordering::SeqCst) - read_c;
    eprintln!("channel C: {read_c} bytes read, {unread_c} unread");
    assert!(
        unread_c <= u64::from(WINDOW_SIZE) + AGENT_SLACK,
        "a new channel read once buffered {unread_c} bytes, more than the initial window \
         {WINDOW_SIZE}"
    );

    // A still works once read again: its data was held back, not lost.
    let mut rest = vec![0u8; 4 * MIB as usize];
    stalled.read_exact(&mut rest).await.unwrap();
    assert!(rest.iter().all(|&b| b == 7));
}
