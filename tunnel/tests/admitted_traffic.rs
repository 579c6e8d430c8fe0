//! An agent whose admission took a moment (the proxy waited for its Cluster
//! cache) hears the answer, and its first channel moves bytes both ways, at
//! once: not at the next keepalive or other timer of either end. The same
//! through rekeys. Paused time over an in-memory connection, with keepalives
//! far beyond the deadlines, so anything that waits for a timer to wake a
//! session misses them.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::AgentConfig;
use tunnel::client::{ClientOptions, Dialer};
use tunnel::server::{Admission, Session};
use tunnel::ws::WsStream;

/// Both ends' keepalive: far beyond every deadline below.
const KEEPALIVE: Duration = Duration::from_secs(3600);
/// What the admission takes (the proxy waiting for its cache).
const DECISION: Duration = Duration::from_secs(2);
/// Deadline for anything that needs no timer (virtual time).
const PROMPT: Duration = Duration::from_secs(1);
/// The proxy rekeys after writing or reading this much (russh times its rekey
/// period with the real clock, which paused time does not move).
const REKEY_BYTES: usize = 1 << 20;

/// Admits after [`DECISION`], handing the session to the test.
struct Delayed(mpsc::UnboundedSender<Session>);

impl Admission for Delayed {
    type Guard = ();
    async fn admit(&self, session: Session) -> Result<(), String> {
        tokio::time::sleep(DECISION).await;
        let _ = self.0.send(session);
        Ok(())
    }
}

/// Every target echoes what it reads.
struct Echo;

impl Dialer for Echo {
    type Stream = DuplexStream;
    async fn dial(&self, _: &str) -> std::io::Result<DuplexStream> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(far);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        Ok(near)
    }
}

struct Run {
    sessions: mpsc::UnboundedReceiver<Session>,
    connected: oneshot::Receiver<()>,
}

fn connect(rekey_bytes: Option<usize>) -> Run {
    let (proxy_end, agent_end) = tokio::io::duplex(1 << 16);
    let key = tunnel::ssh::generate_host_key().unwrap();
    let mut config = tunnel::ssh::server_config(key, KEEPALIVE);
    if let Some(bytes) = rekey_bytes {
        config.limits.rekey_write_limit = bytes;
        config.limits.rekey_read_limit = bytes;
    }
    let config = Arc::new(config);
    let (tx, sessions) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let ws = WsStream::from_upgraded(proxy_end, Role::Server).await;
        let _ = tunnel::server::serve(ws, config, Arc::new(Delayed(tx)), "test".to_string()).await;
    });
    let options = ClientOptions {
        config: AgentConfig {
            name: "alpha".into(),
            token: "t".into(),
            ..Default::default()
        },
        keepalive: KEEPALIVE,
        host_key_fingerprints: Vec::new(),
        allowed_targets: vec!["echo.test:443".into()],
        allow_dial: Vec::new(),
        hub: Default::default(),
    };
    let (connected_tx, connected) = oneshot::channel();
    tokio::spawn(async move {
        let ws = WsStream::from_upgraded(agent_end, Role::Client).await;
        let on_connected = move || {
            let _ = connected_tx.send(());
        };
        let ended = tunnel::client::run(ws, &options, Arc::new(Echo), on_connected).await;
        eprintln!("agent side ended: {ended}");
    });
    Run {
        sessions,
        connected,
    }
}

/// Open a channel through the agent and move `size` bytes there and back.
async fn round_trip(session: &Session, size: usize) {
    let stream = session
        .dial("echo.test:443")
        .await
        .expect("the agent opens the channel");
    let (mut read, mut write) = tokio::io::split(stream);
    let sent: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        write
            .write_all(&sent)
            .await
            .expect("written into the tunnel");
        write
    });
    let mut back = vec![0u8; size];
    read.read_exact(&mut back)
        .await
        .expect("the bytes came back through the tunnel");
    assert!(back == expected, "the echo differs from what was sent");
    drop(writer.await.expect("the writer ended"));
}

#[tokio::test(start_paused = true)]
async fn an_agent_admitted_after_a_wait_hears_it_and_moves_bytes_at_once() {
    let mut run = connect(None);
    let session = timeout(DECISION + PROMPT, run.sessions.recv())
        .await
        .expect("the admission decided")
        .expect("the agent was admitted");
    timeout(PROMPT, run.connected)
        .await
        .expect("the agent heard it was admitted at once, not at a keepalive")
        .expect("the agent was admitted");
    timeout(PROMPT, round_trip(&session, 64))
        .await
        .expect("a small exchange right after admission went through at once");
    timeout(PROMPT, round_trip(&session, 4 << 20))
        .await
        .expect("4 MiB went there and back at once");
}

#[tokio::test(start_paused = true)]
async fn through_rekeys_the_tunnel_still_moves_bytes_at_once() {
    let mut run = connect(Some(REKEY_BYTES));
    let session = timeout(DECISION + PROMPT, run.sessions.recv())
        .await
        .expect("the admission decided")
        .expect("the agent was admitted");
    timeout(PROMPT, round_trip(&session, 64 << 10))
        .await
        .expect("bytes moved after admission");
    // Each MiB the proxy writes or reads starts a key exchange, some with
    // data in flight; traffic after each uses the new keys (a wrong exchange
    // hash would end the session).
    for _ in 0..3 {
        timeout(PROMPT, round_trip(&session, 3 * REKEY_BYTES))
            .await
            .expect("bytes moved through the rekeys");
    }
    // Idle after a rekey, then traffic again: nothing waits for a timer.
    tokio::time::sleep(KEEPALIVE / 2).await;
    timeout(PROMPT, round_trip(&session, 64))
        .await
        .expect("bytes moved after the rekeys");
    assert!(!session.is_closed(), "the session survived the rekeys");
}
