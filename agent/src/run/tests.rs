use super::*;
use crate::credentials::Credentials;
use crate::options::Flags;
use bytes::Bytes;
use clap::Parser as _;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::server::{Admission, Session};

/// Admits agents with token `good`, reports every admitted session.
struct Registry {
    admitted: mpsc::UnboundedSender<Session>,
    rejections: mpsc::UnboundedSender<()>,
}

impl Admission for Registry {
    type Guard = ();
    async fn admit(&self, session: Session) -> Result<(), String> {
        if session.config().token.starts_with("good") {
            let _ = self.admitted.send(session);
            Ok(())
        } else {
            let _ = self.rejections.send(());
            Err(tunnel::wire::UNAUTHORIZED.into())
        }
    }
}

struct TestProxy {
    url: String,
    fingerprint: String,
    admitted: mpsc::UnboundedReceiver<Session>,
    rejections: mpsc::UnboundedReceiver<()>,
}

/// A proxy built from the tunnel crate's server side, answering the upgrade
/// like Go Tower (no subprotocol echo).
async fn test_proxy() -> TestProxy {
    let key = tunnel::ssh::generate_host_key().unwrap();
    let fingerprint = tunnel::ssh::fingerprint(key.public_key());
    let ssh = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
    let (admitted_tx, admitted) = mpsc::unbounded_channel();
    let (rejections_tx, rejections) = mpsc::unbounded_channel();
    let registry = Arc::new(Registry {
        admitted: admitted_tx,
        rejections: rejections_tx,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let (ssh, registry) = (ssh.clone(), registry.clone());
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    let (ssh, registry) = (ssh.clone(), registry.clone());
                    let key = req.headers()[header::SEC_WEBSOCKET_KEY].as_bytes().to_vec();
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let io = TokioIo::new(on.await.unwrap());
                        let ws = tunnel::ws::WsStream::from_upgraded(io, Role::Server).await;
                        let _ = tunnel::server::serve(ws, ssh, registry, peer.to_string()).await;
                    });
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header(header::UPGRADE, "websocket")
                                .header(header::CONNECTION, "Upgrade")
                                .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
                                .body(Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    TestProxy {
        url,
        fingerprint,
        admitted,
        rejections,
    }
}

fn config(proxy: &TestProxy, extra: &[&str]) -> Config {
    let mut args = vec![
        "agent",
        "--name",
        "member",
        "--token",
        "unused",
        "--proxy-server",
        &proxy.url,
    ];
    args.extend_from_slice(extra);
    Flags::try_parse_from(args)
        .unwrap()
        .check(&|_| None)
        .unwrap()
}

fn material(token: &str, bearer: &str) -> Arc<Material> {
    Arc::new(Material {
        token: token.into(),
        credentials: Credentials {
            bearer_token: bearer.as_bytes().to_vec(),
            ..Default::default()
        },
    })
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn rotated_credentials_make_before_break() {
    let mut proxy = test_proxy().await;
    let config = config(&proxy, &["--kubernetes-service", "10.0.0.1:6443"]);
    let (tx, rx) = watch::channel(material("good", "first"));
    let controls = Controls::default();
    let agent = tokio::spawn(run(config, rx, controls.clone(), None));

    let first = tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.config().bearer_token, b"first");
    assert_eq!(first.config().kubernetes_svc_host, "10.0.0.1:6443");
    assert_eq!(first.config().version, VERSION);

    tx.send_replace(material("good", "second"));
    let second = tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.config().bearer_token, b"second");
    // The old tunnel goes once the new one is in; the new one stays.
    tokio::time::timeout(WAIT, async {
        while !first.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the previous tunnel was not closed");
    assert!(!second.is_closed());

    controls.shutdown.cancel();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
        Exit::Terminated
    );
}

#[tokio::test]
async fn a_handed_token_is_kept_and_used_make_before_break() {
    let mut proxy = test_proxy().await;
    let config = config(&proxy, &[]);
    let handed = crate::handed::Handed::default();
    let loader = crate::credentials::Loader {
        token: crate::credentials::TokenSource::Literal("good".into()),
        source: crate::credentials::CredentialSource::None,
        handed: handed.clone(),
    };
    let reread = Arc::new(Notify::new());
    let rx = crate::credentials::watch(
        loader.clone(),
        loader.load().unwrap(),
        Duration::from_secs(3600),
        reread.clone(),
    );
    let keeper = crate::handed::Keeper {
        secret: None,
        handed: handed.clone(),
        reread,
    };
    let controls = Controls::default();
    let agent = tokio::spawn(run(config, rx, controls.clone(), Some(keeper)));
    let first = tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.config().token, "good");

    // A token that cannot be a token is refused, and nothing changes.
    let refused = first.hand_token("good but spaced").await;
    assert!(
        matches!(refused, Err(tunnel::server::TokenError::Refused(_))),
        "{refused:?}"
    );
    assert_eq!(handed.get(), None);

    let answer = first.hand_token("good-2").await.unwrap();
    assert_eq!(answer, tunnel::server::TokenAnswer::Stored);
    let second = tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.config().token, "good-2");
    tokio::time::timeout(WAIT, async {
        while !first.is_closed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the previous tunnel was not closed");
    // The periodic re-read keeps the handed token.
    assert_eq!(loader.load().unwrap().token, "good-2");

    controls.shutdown.cancel();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
        Exit::Terminated
    );
}

#[tokio::test]
async fn without_a_keeper_a_token_is_not_understood() {
    let mut proxy = test_proxy().await;
    let (_tx, rx) = watch::channel(material("good", ""));
    let controls = Controls::default();
    let agent = tokio::spawn(run(config(&proxy, &[]), rx, controls.clone(), None));
    let session = tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        session.hand_token("good-2").await.unwrap(),
        tunnel::server::TokenAnswer::NotUnderstood
    );
    assert!(!session.is_closed());
    controls.shutdown.cancel();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
        Exit::Terminated
    );
}

#[tokio::test]
async fn rejections_are_retried_until_max_retry() {
    let mut proxy = test_proxy().await;
    let config = config(
        &proxy,
        &["--max-retry", "3", "--max-retry-interval", "50ms"],
    );
    let (_tx, rx) = watch::channel(material("bad", ""));
    let exit = tokio::time::timeout(WAIT, run(config, rx, Controls::default(), None))
        .await
        .unwrap();
    assert_eq!(exit, Exit::GaveUp);
    for _ in 0..3 {
        proxy.rejections.try_recv().unwrap();
    }
    assert!(proxy.admitted.try_recv().is_err());
}

#[tokio::test]
async fn sighup_cuts_the_wait_short() {
    let mut proxy = test_proxy().await;
    // A long wait after the first rejection, unless SIGHUP says otherwise.
    let config = config(&proxy, &["--max-retry-interval", "1h"]);
    let (tx, rx) = watch::channel(material("bad", ""));
    let controls = Controls::default();
    let agent = tokio::spawn(run(config, rx, controls.clone(), None));
    tokio::time::timeout(WAIT, proxy.rejections.recv())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    controls.retry_now.notify_one();
    // The natural wait is at least 500 ms after the rejection; 100 ms went by.
    tokio::time::timeout(Duration::from_millis(300), proxy.rejections.recv())
        .await
        .expect("SIGHUP did not retry at once");
    // New credentials also end the wait, and get in.
    tx.send_replace(material("good", ""));
    tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    controls.shutdown.cancel();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
        Exit::Terminated
    );
}

#[tokio::test]
async fn a_host_key_mismatch_is_permanent() {
    let proxy = test_proxy().await;
    let other = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    assert_ne!(proxy.fingerprint, other);
    let config = config(&proxy, &["--proxy-host-key-fingerprint", other]);
    let (_tx, rx) = watch::channel(material("good", ""));
    let exit = tokio::time::timeout(WAIT, run(config, rx, Controls::default(), None))
        .await
        .unwrap();
    assert_eq!(exit, Exit::HostKeyMismatch);
}

#[tokio::test]
async fn the_right_host_key_is_accepted() {
    let mut proxy = test_proxy().await;
    let config = config(
        &proxy,
        &["--proxy-host-key-fingerprint", &proxy.fingerprint.clone()],
    );
    let (_tx, rx) = watch::channel(material("good", ""));
    let controls = Controls::default();
    let agent = tokio::spawn(run(config, rx, controls.clone(), None));
    tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    controls.shutdown.cancel();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
        Exit::Terminated
    );
}

#[tokio::test]
async fn the_pre_start_hooks_credentials_are_sent_and_its_failures_retried() {
    let mut proxy = test_proxy().await;
    let hook = r#"echo '{"bearerToken": "from-hook"}'"#;
    let hooked = config(&proxy, &["--pre-start-hook", hook]);
    let (_tx, rx) = watch::channel(material("good", "own"));
    let controls = Controls::default();
    let agent = tokio::spawn(run(hooked, rx, controls.clone(), None));
    let session = tokio::time::timeout(WAIT, proxy.admitted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.config().bearer_token, b"from-hook");
    controls.shutdown.cancel();
    assert_eq!(
        tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(),
        Exit::Terminated
    );

    // A failing hook is a failed attempt: the proxy never hears of it.
    let failing = config(
        &proxy,
        &[
            "--pre-start-hook=exit 1",
            "--max-retry=2",
            "--max-retry-interval=50ms",
        ],
    );
    let (_tx, rx) = watch::channel(material("good", "own"));
    let exit = tokio::time::timeout(WAIT, run(failing, rx, Controls::default(), None))
        .await
        .unwrap();
    assert_eq!(exit, Exit::GaveUp);
    assert!(proxy.admitted.try_recv().is_err() && proxy.rejections.try_recv().is_err());
}

#[test]
fn the_config_advertises_what_the_agent_dials() {
    let shared = Shared {
        name: "member".into(),
        dialer: ProxyDialer::new(
            crate::endpoint::Endpoint::parse("http://p").unwrap(),
            None,
            None,
        )
        .unwrap(),
        host_key_fingerprints: Vec::new(),
        keepalive: Duration::from_secs(30),
        kubernetes_service: None,
        kubesphere_service: "ks:80".into(),
        allow_dial: Vec::new(),
        pre_start_hook: None,
        post_start_hook: None,
        attempts: AtomicU64::new(0),
        hub: Default::default(),
        tokens: None,
        bootstrap: Some(("abcdef.0123456789abcdef".into(), "uid-1".into())),
    };
    let mut m = Material {
        token: "t".into(),
        credentials: Credentials::default(),
    };
    let options = shared.options(&m);
    assert_eq!(
        options.config.kubernetes_svc_host,
        DEFAULT_KUBERNETES_SERVICE
    );
    assert_eq!(
        options.allowed_targets,
        vec![DEFAULT_KUBERNETES_SERVICE.to_string(), "ks:80".into()]
    );
    // A kubeconfig's server is used unless --kubernetes-service says otherwise.
    m.credentials.server = Some("10.1.1.1:6443".into());
    assert_eq!(shared.options(&m).allowed_targets[0], "10.1.1.1:6443");
    let shared = Shared {
        kubernetes_service: Some("[::1]:6443".into()),
        ..shared
    };
    assert_eq!(shared.options(&m).config.kubernetes_svc_host, "[::1]:6443");
    // With a token the bootstrap token stays home; without, it registers.
    assert!(shared.options(&m).config.bootstrap_token.is_empty());
    assert!(shared.options(&m).config.cluster_id.is_empty());
    m.token.clear();
    let registering = shared.options(&m).config;
    assert_eq!(registering.bootstrap_token, "abcdef.0123456789abcdef");
    assert_eq!(registering.cluster_id, "uid-1");
    assert_eq!(Seconds(Duration::from_millis(1534)).to_string(), "1.5s");
}
