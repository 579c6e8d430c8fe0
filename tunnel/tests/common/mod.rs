//! What the tunnel's integration tests share: the proxy's and the agent's
//! sides in process over a real websocket on loopback, optionally through a
//! link of the test's own between them, and simple targets.
#![allow(dead_code)] // each test uses what it needs

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::AgentConfig;
use tunnel::client::{ClientOptions, Dialer};
use tunnel::hub::{HubLink, HubRefusal, HubUpstream};
use tunnel::server::{Admission, Session};
use tunnel::ws::WsStream;

/// Admits everyone and hands each session to the test; publishes hub
/// service `sink` at `hub_sink`, if given.
pub struct Capture {
    pub sessions: mpsc::UnboundedSender<Session>,
    pub hub_sink: Option<String>,
}

impl Admission for Capture {
    type Guard = ();
    async fn admit(&self, session: Session) -> Result<(), String> {
        let _ = self.sessions.send(session);
        Ok(())
    }

    async fn open_hub(&self, _: &Session, service: &str) -> Result<HubUpstream, HubRefusal> {
        let (Some(addr), "sink") = (&self.hub_sink, service) else {
            return Err(HubRefusal::prohibited(format!(
                "{service:?} is not published"
            )));
        };
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| HubRefusal::unreachable(e.to_string()))?;
        Ok(HubUpstream {
            stream,
            on_end: Box::new(|_, _| {}),
        })
    }
}

/// Pull mode for [`tunnel_with_hub`]: the agent's link, and where the
/// proxy's side finds hub service `sink`.
pub struct HubSink {
    pub link: HubLink,
    pub addr: String,
}

/// Echoes whatever each connection sends.
pub async fn echo_server() -> String {
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
pub async fn firehose() -> String {
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

/// The agent's options for cluster `alpha`, serving `targets`.
pub fn options(targets: Vec<String>) -> ClientOptions {
    ClientOptions {
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
    }
}

/// A connected tunnel whose agent serves `targets` through `dialer`; the
/// agent reaches the proxy's address through what `link` returns for it
/// (the address itself, or a relay of the test's). Both TCP ends are tuned
/// as the binaries tune them.
pub async fn tunnel<D, L, F>(dialer: D, targets: Vec<String>, link: L) -> Session
where
    D: Dialer,
    L: FnOnce(SocketAddr) -> F,
    F: Future<Output = SocketAddr>,
{
    tunnel_with_hub(dialer, targets, link, None).await
}

/// [`tunnel`], with pull mode's hub service `sink` if `hub` is given.
pub async fn tunnel_with_hub<D, L, F>(
    dialer: D,
    targets: Vec<String>,
    link: L,
    hub: Option<HubSink>,
) -> Session
where
    D: Dialer,
    L: FnOnce(SocketAddr) -> F,
    F: Future<Output = SocketAddr>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (hub_link, hub_sink) = hub.map_or((HubLink::default(), None), |h| (h.link, Some(h.addr)));
    let key = tunnel::ssh::generate_host_key().unwrap();
    let config = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let tcp = tunnel::socket::TunnelSocket::new(tcp);
        // The websocket handshake itself is the proxy's business; here the
        // stream starts right after it.
        let ws = WsStream::from_upgraded(tcp, Role::Server).await;
        let capture = Capture {
            sessions: tx,
            hub_sink,
        };
        let _ = tunnel::server::serve(ws, config, Arc::new(capture), peer.to_string()).await;
    });
    let via = link(addr).await;
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let options = ClientOptions {
        hub: hub_link,
        ..options(targets)
    };
    tokio::spawn(async move {
        let tcp = TcpStream::connect(via).await.unwrap();
        let tcp = tunnel::socket::TunnelSocket::new(tcp);
        let ws = WsStream::from_upgraded(tcp, Role::Client).await;
        let on_connected = move || {
            let _ = connected_tx.send(());
        };
        let err = tunnel::client::run(ws, &options, Arc::new(dialer), on_connected).await;
        eprintln!("agent side ended: {err}");
    });
    let session = rx.recv().await.expect("agent was admitted");
    // Configured, hub link attached.
    connected.await.expect("the agent's side connected");
    session
}

/// No link of the test's own: the agent dials the proxy's address.
pub async fn direct(addr: SocketAddr) -> SocketAddr {
    addr
}
