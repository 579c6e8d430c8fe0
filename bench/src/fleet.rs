//! Many idle agents in this process: each dials the proxy as `bin/agent` does
//! (TCP_NODELAY, HTTP/1.1 websocket upgrade with hyper, `kubesphere-v1`), runs
//! `tunnel::client::run` (the agent's own tunnel code: SSH, `config`, pings
//! every keepalive period) and reconnects with the agent's backoff (1 s
//! doubling, equal jitter, cap 2 min, reset after a success).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::client::{ClientOptions, TcpDialer};
use tunnel::wire::{AgentConfig, SUBPROTOCOL};
use tunnel::ws::WsStream;

/// One agent's state, as the bench watches it.
#[derive(Default)]
pub struct AgentState {
    pub connected: AtomicBool,
    /// Nanoseconds after the fleet's epoch of the last successful connect.
    pub last_connect: AtomicU64,
}

pub struct Fleet {
    pub epoch: Instant,
    pub agents: Arc<Vec<AgentState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct FleetOptions {
    pub proxy: SocketAddr,
    pub fingerprint: String,
    /// (name, token) per agent.
    pub identities: Vec<(String, String)>,
    pub keepalive: Duration,
    /// At most this many first connections in flight (later reconnects are
    /// free, as real agents are).
    pub ramp: usize,
}

impl Fleet {
    pub fn start(options: FleetOptions) -> Fleet {
        let epoch = Instant::now();
        let agents: Arc<Vec<AgentState>> = Arc::new(
            (0..options.identities.len())
                .map(|_| AgentState::default())
                .collect(),
        );
        let gate = Arc::new(Semaphore::new(options.ramp));
        let dialer = Arc::new(TcpDialer);
        let tasks = options
            .identities
            .into_iter()
            .enumerate()
            .map(|(i, (name, token))| {
                let client = ClientOptions {
                    config: AgentConfig {
                        version: "bench".into(),
                        name,
                        token,
                        kubernetes_svc_host: "127.0.0.1:9".into(),
                        kubesphere_svc_host: "127.0.0.1:9".into(),
                        ..Default::default()
                    },
                    keepalive: options.keepalive,
                    host_key_fingerprints: vec![options.fingerprint.clone()],
                    allowed_targets: vec!["127.0.0.1:9".into()],
                    allow_dial: Vec::new(),
                    hub: Default::default(),
                };
                let agents = agents.clone();
                let gate = gate.clone();
                let dialer = dialer.clone();
                let proxy = options.proxy;
                tokio::spawn(async move {
                    agent_loop(i, proxy, client, agents, gate, dialer, epoch).await;
                })
            })
            .collect();
        Fleet {
            epoch,
            agents,
            tasks,
        }
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn connected(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.connected.load(Ordering::Relaxed))
            .count()
    }

    /// Agents connected with a connect after `since`.
    pub fn connected_since(&self, since: Instant) -> usize {
        let since = since.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.agents
            .iter()
            .filter(|a| {
                a.connected.load(Ordering::Relaxed)
                    && a.last_connect.load(Ordering::Relaxed) > since
            })
            .count()
    }

    /// Wait until `want` agents are connected after `since`, polling every
    /// 10 ms; returns when each fraction in `marks` was first reached.
    pub async fn wait_back(
        &self,
        since: Instant,
        marks: &[f64],
        timeout: Duration,
    ) -> Result<Vec<Duration>> {
        let n = self.len();
        let deadline = Instant::now() + timeout;
        let mut reached: Vec<Option<Duration>> = vec![None; marks.len()];
        loop {
            let c = self.connected_since(since);
            for (k, m) in marks.iter().enumerate() {
                if reached[k].is_none() && c as f64 >= m * n as f64 {
                    reached[k] = Some(since.elapsed());
                }
            }
            if reached.iter().all(Option::is_some) {
                return Ok(reached.into_iter().flatten().collect());
            }
            if Instant::now() > deadline {
                bail!("only {c} of {n} agents connected within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn agent_loop(
    i: usize,
    proxy: SocketAddr,
    options: ClientOptions,
    agents: Arc<Vec<AgentState>>,
    gate: Arc<Semaphore>,
    dialer: Arc<TcpDialer>,
    epoch: Instant,
) {
    let mut step = Duration::from_secs(1);
    let mut first = true;
    loop {
        let permit = if first {
            gate.clone().acquire_owned().await.ok()
        } else {
            None
        };
        first = false;
        let mut was_connected = false;
        if let Ok(ws) = dial(proxy).await {
            let state = &agents[i];
            let on_connected = || {
                state
                    .last_connect
                    .store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                state.connected.store(true, Ordering::Relaxed);
                drop(permit);
            };
            let _end = tunnel::client::run(ws, &options, dialer.clone(), on_connected).await;
            was_connected = state.connected.swap(false, Ordering::Relaxed);
        } else {
            drop(permit);
        }
        if was_connected {
            step = Duration::from_secs(1);
        }
        // The agent's backoff: uniform in [step/2, step], step doubles to 2 min.
        let half = step / 2;
        let delay = half + half.mul_f64(rand::random::<f64>());
        step = (step * 2).min(Duration::from_secs(120));
        tokio::time::sleep(delay).await;
    }
}

/// TCP, then the websocket upgrade, as the agent does it.
pub async fn dial(proxy: SocketAddr) -> Result<WsStream<TokioIo<hyper::upgrade::Upgraded>>> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(proxy))
        .await
        .context("connect timeout")??;
    tcp.set_nodelay(true)?;
    let upgraded = tokio::time::timeout(Duration::from_secs(10), async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp)).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
        let req = Request::get("/")
            .header(header::HOST, proxy.to_string())
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, &key)
            .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
            .body(Empty::new())?;
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            conn.abort();
            bail!("upgrade answered {}", resp.status());
        }
        let upgraded = hyper::upgrade::on(resp).await?;
        Ok::<_, anyhow::Error>(upgraded)
    })
    .await
    .context("upgrade timeout")??;
    Ok(WsStream::from_upgraded(TokioIo::new(upgraded), Role::Client).await)
}
