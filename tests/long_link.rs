//! The tunnel socket's unsent mark over a real long, lossy link
//! (`tunnel::socket::TunnelSocket`, docs/protocol.md 9.3.2): a TUN device
//! in the test's own network namespace delays each packet 25 ms each way
//! and drops 1 % ([`e2e::lossy::TunLink`]), so the kernel's TCP sees a 50 ms
//! round trip and the loss. A tunnel socket sending through it without pause
//! must raise its `TCP_NOTSENT_LOWAT` from the floor towards what the link
//! holds in a round trip: with only the floor ready, TCP has too little to
//! send after each loss and the link idles (`make bench`, `wan-lossy`: about
//! 10 % of the throughput). Judged on the mark, not on time.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::in_own_netns;
use e2e::lossy::{LOCAL, PEER, TunLink};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tunnel::socket::{NOTSENT_LOWAT, NOTSENT_LOWAT_MAX, TunnelSocket};

/// Sent through the link at most (a few seconds at its rate).
const SEND: usize = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unsent_mark_grows_to_a_round_trip_on_a_long_lossy_link() -> Result<()> {
    if !in_own_netns("the_unsent_mark_grows_to_a_round_trip_on_a_long_lossy_link").await? {
        return Ok(());
    }
    let _link = TunLink::start(Duration::from_millis(25), 1.0).await?;
    let listener = TcpListener::bind((LOCAL, 0)).await?;
    let port = listener.local_addr()?.port();
    let reader = tokio::spawn(async move {
        let (mut far, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while let n @ 1.. = far.read(&mut buf).await? {
            got += n;
        }
        Ok::<usize, std::io::Error>(got)
    });
    let tcp = TcpStream::connect((PEER, port))
        .await
        .context("connecting across the lossy link")?;
    let mut socket = TunnelSocket::new(tcp);
    ensure!(
        socket.lowat() == NOTSENT_LOWAT,
        "a new tunnel socket starts at {} bytes unsent, not {}",
        NOTSENT_LOWAT,
        socket.lowat()
    );
    let chunk = vec![7u8; 256 << 10];
    let (mut sent, mut marks) = (0usize, vec![socket.lowat()]);
    while sent < SEND {
        socket.write_all(&chunk).await?;
        sent += chunk.len();
        if marks.last() != Some(&socket.lowat()) {
            marks.push(socket.lowat());
        }
    }
    socket.shutdown().await?;
    let got = reader.await??;
    println!(
        "LONG LINK | {} MiB across 50 ms, 1 % loss; unsent marks: {marks:?}",
        got >> 20
    );
    ensure!(got == sent, "sent {sent} bytes, {got} arrived");
    let top = marks.iter().copied().max().unwrap_or_default();
    ensure!(
        top > NOTSENT_LOWAT,
        "the unsent mark stayed at the floor ({NOTSENT_LOWAT} bytes) on a 50 ms link: after a loss \
         TCP finds too little ready to send and the link idles (marks: {marks:?})"
    );
    ensure!(
        top <= NOTSENT_LOWAT_MAX,
        "the mark passed its cap: {marks:?}"
    );
    Ok(())
}
