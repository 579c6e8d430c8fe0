//! Received data the session writes to the connection itself
//! (`tunnel::copy::join_tcp`): through a real tunnel, both ends take that
//! path for small messages, and bytes arrive complete and in order when
//! small messages (written directly) and large ones (queued for the copy
//! task) alternate. Proxy and agent in process over a real websocket; the
//! agent dials a real TCP echo server.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use russh::DirectSink;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnel::client::TcpDialer;
use tunnel::copy::ChannelIo;
use tunnel::server::TunnelStream;

/// The proxy's stream, counting what its session wrote directly.
struct Watched {
    inner: TunnelStream,
    direct: Arc<AtomicU64>,
}

/// A sink counting what the one it wraps took.
struct CountedSink {
    inner: Arc<dyn DirectSink>,
    taken: Arc<AtomicU64>,
}

impl DirectSink for CountedSink {
    fn try_take(&self, data: &[u8]) -> usize {
        let n = self.inner.try_take(data);
        self.taken.fetch_add(n as u64, Ordering::SeqCst);
        n
    }
}

impl ChannelIo for Watched {
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        self.inner.poll_write_bytes(cx, data)
    }
    fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        self.inner.poll_recv_bytes(cx)
    }
    fn deliver_directly(&mut self, sink: Arc<dyn DirectSink>) -> bool {
        let taken = self.direct.clone();
        self.inner
            .deliver_directly(Arc::new(CountedSink { inner: sink, taken }))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Message `i` of the test: sizes from one byte to beyond a full packet.
fn message(i: usize) -> Vec<u8> {
    let len = [1, 100, 1000, 5000, 20_000, 70_000][i % 6];
    (0..len).map(|j| ((i * 7 + j) % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_skip_the_queue_and_everything_arrives_in_order() {
    let echo = common::echo_server().await;
    let session = common::tunnel(TcpDialer, vec![echo.clone()], common::direct).await;
    let stream = session.dial(&echo).await.expect("the agent dials the echo");
    let direct = Arc::new(AtomicU64::new(0));
    let mut channel = Watched {
        inner: stream,
        direct: direct.clone(),
    };

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (ours, _) = listener.accept().await.unwrap();
    let copy = tokio::spawn(async move { tunnel::copy::join_tcp(ours, &mut channel, None).await });

    // Request and answer, one at a time: the copy tasks idle between them.
    let mut total = 0;
    for i in 0..300 {
        let sent = message(i);
        client.write_all(&sent).await.unwrap();
        let mut back = vec![0u8; sent.len()];
        client.read_exact(&mut back).await.unwrap();
        assert!(back == sent, "round {i}: the echo differs");
        total += sent.len() as u64;
    }
    assert!(
        direct.load(Ordering::SeqCst) > 0,
        "no answer was written by the proxy's session itself"
    );

    // Everything at once: small and large messages interleave on both ends.
    let all: Vec<u8> = (0..600).flat_map(message).collect();
    total += all.len() as u64;
    let (mut read, mut write) = client.into_split();
    let expected = all.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&all).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "the echo of the mixed stream differs");

    let copied = copy.await.unwrap();
    copied.end.expect("the copy ended cleanly");
    assert_eq!((copied.up, copied.down), (total, total));
}
