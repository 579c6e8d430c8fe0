//! One stalled reader must not slow any other channel of the same tunnel
//! (docs/protocol.md, "Consumption-gated windows"). Proxy and agent sides run in process over a
//! real websocket on loopback; channel A's reader stops while its source keeps
//! writing, and channel B must keep round-tripping. Also: vectored writes through a
//! channel (one packet for many slices) keep every byte in order.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel::client::TcpDialer;
use tunnel::server::Session;

use common::{direct, echo_server, firehose};

/// A connected tunnel: the proxy's session plus the targets the agent serves.
async fn tunnel(targets: Vec<String>) -> Session {
    common::tunnel(TcpDialer, targets, direct).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_block_other_channels() {
    let echo = echo_server().await;
    let hose = firehose().await;
    let session = tunnel(vec![echo.clone(), hose.clone()]).await;

    // Channel A: its source never stops, and nobody reads it.
    let stalled = session.dial(&hose).await.unwrap();

    // Channel B keeps working while A's window fills (before the fix, russh's
    // bounded queue for A filled too and then the whole session hung).
    let round_trips = async {
        let mut b = session.dial(&echo).await.unwrap();
        let mut buf = [0u8; 1024];
        for i in 0..200u32 {
            let msg = [i as u8; 1024];
            b.write_all(&msg).await.unwrap();
            b.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), round_trips)
        .await
        .expect("channel B stalled behind the unread channel A: head-of-line blocking");

    // A still works once read: its data was held back, not lost.
    let mut stalled = stalled;
    let mut buf = vec![0u8; 4 * 1024 * 1024];
    stalled.read_exact(&mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_the_agent_did_not_advertise_are_refused() {
    let echo = echo_server().await;
    let other = echo_server().await;
    let session = tunnel(vec![echo.clone()]).await;
    let err = session
        .dial(&other)
        .await
        .err()
        .expect("dial must be refused");
    assert!(err.to_string().contains("refused"), "{err}");
    // The tunnel still serves the advertised target.
    let mut s = session.dial(&echo).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ok");
}

/// A vectored write (a TLS stream's queued records) is gathered into packets
/// (PATCHES.md 31): every byte arrives, in order, whatever the slices' sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectored_writes_arrive_whole_and_in_order() {
    let echo = echo_server().await;
    let session = tunnel(vec![echo.clone()]).await;
    let mut s = session.dial(&echo).await.unwrap();
    assert!(tokio::io::AsyncWrite::is_write_vectored(&s));
    let parts: Vec<Vec<u8>> = [16 * 1024 + 22, 1, 16 * 1024 + 22, 70 * 1024, 5]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let want: Vec<u8> = parts.concat();
    let (mut rd, mut wr) = tokio::io::split(&mut s);
    let writer = async {
        let mut slices: Vec<std::io::IoSlice<'_>> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let n = wr.write_vectored(slices).await.unwrap();
            assert!(n > 0);
            std::io::IoSlice::advance_slices(&mut slices, n);
        }
    };
    let mut got = vec![0u8; want.len()];
    let read = rd.read_exact(&mut got);
    let (_, r) = tokio::join!(writer, read);
    r.unwrap();
    assert!(got == want, "the echoed bytes differ from those written");
}
