//! A busy channel must not queue its bytes in front of every other channel's
//! (docs/protocol.md 9.3.2, "Fair share of a slow link"). Over a link slower
//! than the tunnel ends (a relay that passes 20 MB/s each way, with a small
//! buffer of its own), channel A sends without pause, one test each way, and
//! channel B round-trips 1 KiB. What B waits behind is counted in bytes, not
//! time: the bytes of A that arrived at A's far end between B's request and
//! its answer. Before, that was A's whole window (4 MiB measured: everything
//! A could send sat in the sender's write queue and socket); now about what
//! the link drains in 10 ms, a packet or two and the kernel's unsent bytes.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tunnel::client::TcpDialer;
use tunnel::hub::HubLink;
use tunnel::server::Session;

use common::{echo_server, firehose};

/// The link's rate each way.
const RATE: f64 = 20e6;

/// Reads and drops whatever is sent to it; the bytes so far on `progress`.
async fn sink(progress: tokio::sync::watch::Sender<u64>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut total = 0u64;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
                progress.send_replace(total);
            }
        }
    });
    addr
}

/// Copies `from` to `to` at [`RATE`]: reads only as fast as it writes, so
/// what the sender may not send yet waits in the sender's own socket.
async fn paced(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 16 * 1024];
    let start = Instant::now();
    let mut sent = 0f64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n as f64;
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent / RATE)).await;
    }
    let _ = to.shutdown().await;
}

/// The link's own buffer: what the relay's sockets may hold unread each way
/// (a router's queue; loopback's default would be megabytes).
const LINK_BUFFER: u32 = 64 * 1024;

/// Listens; each connection goes to `target` through [`paced`] copies.
async fn slow_link(target: std::net::SocketAddr) -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(LINK_BUFFER).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(LINK_BUFFER).unwrap();
            let outbound = socket.connect(target).await.unwrap();
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            tokio::spawn(paced(ir, ow));
            tokio::spawn(paced(or, iw));
        }
    });
    addr
}

async fn tunnel_over_slow_link(targets: Vec<String>) -> Session {
    common::tunnel(TcpDialer, targets, slow_link).await
}

/// What B's answer may wait behind: less than the window a channel starts
/// with (2 MiB), which is what it waited behind before, and more (4 MiB
/// measured, the window had grown). Now: what the connection drains in
/// `write_behind::TURN_TARGET` (at least `TURN_MIN`, 256 KiB), a packet or
/// two per busy channel, the session's batch, the kernel's unsent bytes
/// (`socket::NOTSENT_LOWAT`) and the link's buffer: under 1 MiB measured.
const AHEAD_AT_MOST: u64 = tunnel::ssh::WINDOW_SIZE as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_download_does_not_queue_in_front_of_other_channels() {
    let echo = echo_server().await;
    let hose = firehose().await;
    let session = tunnel_over_slow_link(vec![echo.clone(), hose.clone()]).await;

    // A: read without pause; how much arrived so far is on `got`.
    let (progress, got) = tokio::sync::watch::channel(0u64);
    let mut bulk = session.dial(&hose).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        while let Ok(n) = bulk.read(&mut buf).await {
            if n == 0 {
                break;
            }
            total += n as u64;
            progress.send_replace(total);
        }
    });
    let b = session.dial(&echo).await.unwrap();
    round_trips_beside(got, b, "download").await;
}

/// The same the other way: the proxy's side sends A without pause (an
/// upload: `kubectl cp` into a pod) and B's request must not wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_upload_does_not_queue_in_front_of_other_channels() {
    let echo = echo_server().await;
    let (progress, got) = tokio::sync::watch::channel(0u64);
    let drop_all = sink(progress).await;
    let session = tunnel_over_slow_link(vec![echo.clone(), drop_all.clone()]).await;

    let mut bulk = session.dial(&drop_all).await.unwrap();
    tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while bulk.write_all(&chunk).await.is_ok() {}
    });
    let b = session.dial(&echo).await.unwrap();
    round_trips_beside(got, b, "upload").await;
}

/// Pull mode (docs/protocol.md 9.4): the agent's side sends A without pause
/// on a hub channel (a member pushing to a hub service) and B's answer, which
/// leaves the agent through the same connection, must not wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_mode_upload_does_not_queue_in_front_of_other_channels() {
    let echo = echo_server().await;
    let (progress, got) = tokio::sync::watch::channel(0u64);
    let link = HubLink::default();
    let hub = common::HubSink {
        link: link.clone(),
        addr: sink(progress).await,
    };
    let session =
        common::tunnel_with_hub(TcpDialer, vec![echo.clone()], slow_link, Some(hub)).await;

    let mut bulk = link.open("sink").await.unwrap();
    tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while bulk.write_all(&chunk).await.is_ok() {}
    });
    let b = session.dial(&echo).await.unwrap();
    round_trips_beside(got, b, "pull-mode upload").await;
}

/// Once channel A moved 8 MiB (`got`: A's bytes at its far end so far), 20
/// round trips of 1 KiB on channel B: how many bytes of A arrived between
/// each request and its answer, the median at most [`AHEAD_AT_MOST`].
async fn round_trips_beside(
    got: tokio::sync::watch::Receiver<u64>,
    mut b: impl AsyncReadExt + AsyncWriteExt + Unpin,
    what: &str,
) {
    // Let A fill what it may (its window, the queues, the sockets) first.
    let mut filled = got.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        filled.wait_for(|&n| n >= 8 * 1024 * 1024),
    )
    .await
    .expect("channel A did not get 8 MiB through the link in 60 s")
    .expect("channel A ended early");

    let mut ahead = Vec::new();
    let mut waited = Vec::new();
    let mut buf = [0u8; 1024];
    for i in 0..20u8 {
        let before = *got.borrow();
        let t = Instant::now();
        b.write_all(&[i; 1024]).await.unwrap();
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [i; 1024]);
        waited.push(t.elapsed());
        ahead.push(*got.borrow() - before);
    }
    ahead.sort_unstable();
    waited.sort_unstable();
    let median = ahead[ahead.len() / 2];
    // The time is printed for the reader, never judged.
    eprintln!(
        "{what}: bytes of A ahead of B's answer: median {} KiB, max {} KiB; B's round trip median {:?}, max {:?}",
        median >> 10,
        ahead[ahead.len() - 1] >> 10,
        waited[waited.len() / 2],
        waited[waited.len() - 1]
    );
    assert!(
        median <= AHEAD_AT_MOST,
        "{what}: B's answers waited behind {} KiB of A (median of 20), more than {} KiB: channel A's bytes queue in front of everyone's",
        median >> 10,
        AHEAD_AT_MOST >> 10
    );
}
