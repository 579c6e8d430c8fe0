//! The proxy's deadlines around admission, in paused time over an
//! in-memory connection: the agent has `CONFIG_TIMEOUT` to send its
//! `config`, but the time the proxy then takes to decide (waiting for its
//! Cluster cache or the cluster's ports) is not the agent's delay: it has a
//! bound of its own, `ADMISSION_TIMEOUT`, and the agent waits for the answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::AgentConfig;
use tunnel::client::{ClientError, ClientOptions, TcpDialer};
use tunnel::server::{ADMISSION_TIMEOUT, Admission, CONFIG_TIMEOUT, ServeError, Session};
use tunnel::ws::WsStream;

/// Decides only when `decide` is notified.
struct Slow {
    decide: Arc<Notify>,
}

impl Admission for Slow {
    type Guard = ();
    async fn admit(&self, _: Session) -> Result<(), String> {
        self.decide.notified().await;
        Ok(())
    }
}

struct Run {
    served: oneshot::Receiver<Result<(), ServeError>>,
    connected: oneshot::Receiver<()>,
    ended: tokio::task::JoinHandle<ClientError>,
}

fn connect(admission: Arc<Slow>) -> Run {
    let (proxy_end, agent_end) = tokio::io::duplex(1 << 16);
    let key = tunnel::ssh::generate_host_key().unwrap();
    let config = Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(3600)));
    let (served_tx, served) = oneshot::channel();
    tokio::spawn(async move {
        let ws = WsStream::from_upgraded(proxy_end, Role::Server).await;
        let _ =
            served_tx.send(tunnel::server::serve(ws, config, admission, "test".to_string()).await);
    });
    let options = ClientOptions {
        config: AgentConfig {
            name: "alpha".into(),
            token: "t".into(),
            ..Default::default()
        },
        keepalive: Duration::from_secs(3600),
        host_key_fingerprints: Vec::new(),
        allowed_targets: Vec::new(),
        allow_dial: Vec::new(),
        hub: Default::default(),
    };
    let (connected_tx, connected) = oneshot::channel();
    let ended = tokio::spawn(async move {
        let ws = WsStream::from_upgraded(agent_end, Role::Client).await;
        let on_connected = move || {
            let _ = connected_tx.send(());
        };
        tunnel::client::run(ws, &options, Arc::new(TcpDialer), on_connected).await
    });
    Run {
        served,
        connected,
        ended,
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_admission_is_not_the_agents_delay() {
    let decide = Arc::new(Notify::new());
    let run = connect(Arc::new(Slow {
        decide: decide.clone(),
    }));
    // The proxy takes twice the agent's config deadline to decide.
    tokio::time::sleep(CONFIG_TIMEOUT * 2).await;
    decide.notify_one();
    run.connected
        .await
        .expect("the agent is admitted after a decision that took longer than CONFIG_TIMEOUT");
    assert!(!run.ended.is_finished());
}

#[tokio::test(start_paused = true)]
async fn an_admission_that_never_decides_is_a_refusal_with_a_reason() {
    let run = connect(Arc::new(Slow {
        decide: Arc::new(Notify::new()),
    }));
    let start = tokio::time::Instant::now();
    let reason = match run.served.await.unwrap() {
        Err(ServeError::Rejected(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(reason.contains("could not decide"), "{reason}");
    assert!(start.elapsed() >= ADMISSION_TIMEOUT);
    // The agent hears why, before its own, longer patience runs out.
    match run.ended.await.unwrap() {
        ClientError::Rejected(heard) => assert_eq!(heard, reason),
        other => panic!("expected the proxy's reason, got {other}"),
    }
    assert!(run.connected.await.is_err(), "never admitted");
}
