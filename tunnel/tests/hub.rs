//! Pull mode at the protocol level: the agent's side opens
//! `tower-hub@kubesphere.io` channels through a [`HubLink`]; the proxy's side
//! asks its `Admission`, which connects to a published service or refuses,
//! and the refusal's text reaches the agent (russh patch 11). One session
//! holds at most `Admission::max_hub_channels` open: the opens over it are
//! refused as a resource shortage, the session kept, until some close.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::client::{ClientOptions, TcpDialer};
use tunnel::hub::{HubError, HubLink, HubRefusal, HubUpstream};
use tunnel::server::{Admission, MAX_HUB_CHANNELS, ServeError, Session};
use tunnel::ws::WsStream;

use common::echo_server;

/// Admits everyone; publishes `echo` at `addr`; reports bytes of ended streams.
struct Hub {
    admitted: mpsc::UnboundedSender<()>,
    ended: mpsc::UnboundedSender<(u64, u64)>,
    addr: String,
    max_channels: usize,
}

impl Admission for Hub {
    type Guard = ();
    async fn admit(&self, _: Session) -> Result<(), String> {
        let _ = self.admitted.send(());
        Ok(())
    }

    async fn open_hub(&self, _: &Session, service: &str) -> Result<HubUpstream, HubRefusal> {
        if service != "echo" {
            return Err(HubRefusal::prohibited(format!(
                "hub service {service:?} is not published"
            )));
        }
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| HubRefusal::unreachable(e.to_string()))?;
        let ended = self.ended.clone();
        Ok(HubUpstream {
            stream,
            on_end: Box::new(move |to, from| {
                let _ = ended.send((to, from));
            }),
        })
    }

    fn max_hub_channels(&self) -> usize {
        self.max_channels
    }
}

/// A proxy serving `hub` and an agent with `link`, over an in-memory
/// connection, once the agent is admitted; the proxy's end of `serve`.
async fn connected(hub: Arc<Hub>, link: &HubLink) -> oneshot::Receiver<Result<(), ServeError>> {
    let (proxy_end, agent_end) = tokio::io::duplex(1 << 16);
    let key = tunnel::ssh::generate_host_key().unwrap();
    let config = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
    let (served_tx, served) = oneshot::channel();
    tokio::spawn(async move {
        let ws = WsStream::from_upgraded(proxy_end, Role::Server).await;
        let _ = served_tx.send(tunnel::server::serve(ws, config, hub, "test".to_string()).await);
    });
    let options = ClientOptions {
        hub: link.clone(),
        ..common::options(Vec::new())
    };
    let (connected_tx, connected) = oneshot::channel();
    tokio::spawn(async move {
        let ws = WsStream::from_upgraded(agent_end, Role::Client).await;
        let on_connected = move || {
            let _ = connected_tx.send(());
        };
        tunnel::client::run(ws, &options, Arc::new(TcpDialer), on_connected).await
    });
    connected.await.expect("connected");
    served
}

/// A hub publishing `echo`, allowing `max_channels` per session; what it
/// reports of admissions and ended streams.
async fn hub(
    max_channels: usize,
) -> (
    Arc<Hub>,
    mpsc::UnboundedReceiver<()>,
    mpsc::UnboundedReceiver<(u64, u64)>,
) {
    let (admitted_tx, admitted) = mpsc::unbounded_channel();
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let hub = Arc::new(Hub {
        admitted: admitted_tx,
        ended: ended_tx,
        addr: echo_server().await,
        max_channels,
    });
    (hub, admitted, ended)
}

/// Writes `word` and reads it back.
async fn echoes(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), word: &[u8]) {
    stream.write_all(word).await.unwrap();
    let mut buf = vec![0u8; word.len()];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, word);
}

#[tokio::test]
async fn hub_channels_reach_published_services_only() {
    let link = HubLink::default();
    assert!(matches!(link.open("echo").await, Err(HubError::NoTunnel)));

    let (hub, mut admitted, mut ended) = hub(MAX_HUB_CHANNELS).await;
    let _served = connected(hub, &link).await;
    admitted.recv().await.expect("admitted");

    let mut stream = link.open("echo").await.expect("echo is published");
    echoes(&mut stream, b"ping").await;
    stream.shutdown().await.unwrap();
    drop(stream);
    assert_eq!(ended.recv().await, Some((4, 4)));

    match link.open("secret").await {
        Err(HubError::Refused { code, reason }) => {
            assert_eq!(code, 1);
            assert_eq!(reason, "hub service \"secret\" is not published")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // Final, not transient: the agent tells a TLS client so.
    assert!(
        link.open("secret")
            .await
            .err()
            .is_some_and(|e| e.prohibited())
    );
    // The refusal cost nothing: the tunnel still carries hub channels.
    assert!(link.open("echo").await.is_ok());
}

#[tokio::test]
async fn hub_channels_over_the_cap_are_refused_until_some_close() {
    const CAP: usize = 8;
    let link = HubLink::default();
    let (hub, mut admitted, mut ended) = hub(CAP).await;
    let mut served = connected(hub, &link).await;
    admitted.recv().await.expect("admitted");

    let mut open = Vec::new();
    for i in 0..CAP {
        let mut stream = link
            .open("echo")
            .await
            .unwrap_or_else(|e| panic!("hub channel {i} of {CAP}: {e}"));
        echoes(&mut stream, b"up").await;
        open.push(stream);
    }
    // Over the cap: each refused as a resource shortage, with why.
    for _ in 0..3 * CAP {
        match link.open("echo").await {
            Err(HubError::Refused { code, reason }) => {
                assert_eq!(code, 4, "SSH_OPEN_RESOURCE_SHORTAGE");
                assert_eq!(reason, format!("more than {CAP} hub channels open"));
            }
            other => panic!(
                "expected a refusal over the cap, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    // Transient: a client may retry.
    assert!(
        link.open("echo")
            .await
            .err()
            .is_some_and(|e| !e.prohibited())
    );
    // The session is kept, and so are its channels.
    assert!(matches!(
        served.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));
    for stream in &mut open {
        echoes(stream, b"still").await;
    }
    // Two close: two opens succeed again, the next is refused.
    for mut stream in open.drain(..2) {
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(ended.recv().await, Some((7, 7)));
    }
    for _ in 0..2 {
        let mut stream = link.open("echo").await.expect("a slot freed by a close");
        echoes(&mut stream, b"again").await;
        open.push(stream);
    }
    assert!(matches!(
        link.open("echo").await,
        Err(HubError::Refused { code: 4, .. })
    ));
    // All close: the whole cap is free again.
    for mut stream in open.drain(..) {
        stream.shutdown().await.unwrap();
        drop(stream);
        ended.recv().await.expect("ended");
    }
    for _ in 0..CAP {
        open.push(link.open("echo").await.expect("the cap is free again"));
    }
    assert!(matches!(
        served.try_recv(),
        Err(oneshot::error::TryRecvError::Empty)
    ));
}
