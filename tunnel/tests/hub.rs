//! Pull mode at the protocol level: the agent's side opens
//! `tower-hub@kubesphere.io` channels through a [`HubLink`]; the proxy's side
//! asks its `Admission`, which connects to a published service or refuses,
//! and the refusal's text reaches the agent (russh patch 11).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::AgentConfig;
use tunnel::client::{ClientOptions, TcpDialer};
use tunnel::hub::{HubError, HubLink, HubRefusal, HubUpstream};
use tunnel::server::{Admission, Session};
use tunnel::ws::WsStream;

/// Admits everyone; publishes `echo` at `addr`; reports bytes of ended streams.
struct Hub {
    admitted: mpsc::UnboundedSender<()>,
    ended: mpsc::UnboundedSender<(u64, u64)>,
    addr: String,
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

#[tokio::test]
async fn hub_channels_reach_published_services_only() {
    let link = HubLink::default();
    assert!(matches!(link.open("echo").await, Err(HubError::NoTunnel)));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let (admitted_tx, mut admitted) = mpsc::unbounded_channel();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let hub = Arc::new(Hub {
        admitted: admitted_tx,
        ended: ended_tx,
        addr: echo_server().await,
    });
    let key = tunnel::ssh::generate_host_key().unwrap();
    let config = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let ws = WsStream::from_upgraded(tcp, Role::Server).await;
        let _ = tunnel::server::serve(ws, config, hub, peer.to_string()).await;
    });
    let options = ClientOptions {
        config: AgentConfig {
            name: "alpha".into(),
            token: "t".into(),
            ..Default::default()
        },
        keepalive: Duration::from_secs(30),
        host_key_fingerprints: Vec::new(),
        allowed_targets: Vec::new(),
        allow_dial: Vec::new(),
        hub: link.clone(),
    };
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let tcp = TcpStream::connect(proxy).await.unwrap();
        let ws = WsStream::from_upgraded(tcp, Role::Client).await;
        let on_connected = move || {
            let _ = connected_tx.send(());
        };
        tunnel::client::run(ws, &options, Arc::new(TcpDialer), on_connected).await
    });
    admitted.recv().await.expect("admitted");
    connected.await.expect("connected");

    let mut stream = link.open("echo").await.expect("echo is published");
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    stream.shutdown().await.unwrap();
    drop(stream);
    assert_eq!(ended.recv().await, Some((4, 4)));

    match link.open("secret").await {
        Err(HubError::Refused(text)) => {
            assert_eq!(text, "hub service \"secret\" is not published")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    // The refusal cost nothing: the tunnel still carries hub channels.
    assert!(link.open("echo").await.is_ok());
}
