//! One stalled reader must not slow any other channel of the same tunnel
//! (docs/protocol.md, "Consumption-gated windows"). Proxy and agent sides run in process over a
//! real websocket on loopback; channel A's reader stops while its source keeps
//! writing, and channel B must keep round-tripping. Also: vectored writes through a
//! channel (one packet for many slices) keep every byte in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::AgentConfig;
use tunnel::client::{ClientOptions, TcpDialer};
use tunnel::server::{Admission, Session};
use tunnel::ws::WsStream;

/// Admits everyone and hands each session to the test.
struct Capture(mpsc::UnboundedSender<Session>);

impl Admission for Capture {
    type Guard = ();
    async fn admit(&self, session: Session) -> Result<(), String> {
        let _ = self.0.send(session);
        Ok(())
    }
}

async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Writes forever to whoever connects.
async fn firehose() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// A connected tunnel: the proxy's session plus the targets the agent serves.
async fn tunnel(targets: Vec<String>) -> Session {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let key = tunnel::ssh::generate_host_key().unwrap();
    let config = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        // The websocket handshake itself is the proxy's business; here the
        // stream starts right after it.
        let ws = WsStream::from_upgraded(tcp, Role::Server).await;
        let _ = tunnel::server::serve(ws, config, Arc::new(Capture(tx)), peer.to_string()).await;
    });
    let options = ClientOptions {
        config: AgentConfig {
            name: "alpha".into(),
            token: "t".into(),
            ..Default::default()
        },
        keepalive: Duration::from_secs(30),
        host_key_fingerprints: Vec::new(),
        allowed_targets: targets,
        allow_dial: Vec::new(),
        hub: Default::default(),
    };
    tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let ws = WsStream::from_upgraded(tcp, Role::Client).await;
        let err = tunnel::client::run(ws, &options, Arc::new(TcpDialer), || {}).await;
        eprintln!("agent side ended: {err}");
    });
    rx.recv().await.expect("agent was admitted")
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
