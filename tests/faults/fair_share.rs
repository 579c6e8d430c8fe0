//! The fair share of a slow link, end to end (docs/protocol.md 9.3.2): the
//! member's veth is held to 16 Mbit/s each way by `tc tbf`, a bulk transfer
//! from the member to the host fills the tunnel without pause, and a
//! `kubectl get configmaps -w` beside it must still see a new ConfigMap
//! promptly. Two transfers ([`Flow`]): `kubectl exec box -- cat /dev/zero`
//! (the proxy's channel), and pull mode's upload of a member process to a
//! hub service through the agent's `--hub-listen` (the agent's hub stream,
//! which took no turns before 2026-12-06). Judged in bytes, not time: how
//! many bytes of the transfer reached the host between the ConfigMap's
//! creation in the member and its watch event. Both leave the member
//! through the agent's one tunnel connection, so that count is what queued
//! in front of the event. Without the turns and `TCP_NOTSENT_LOWAT` it was
//! the transfer's whole window and the socket buffer (several MiB: seconds
//! at this rate); the test allows at most 2 MiB, the window a channel
//! starts with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Tower, wait_until};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;
use tokio::time::Instant;

use crate::kernel;
use crate::observe::{Seen, Session};

/// The link each way: 2 MB/s, a queue of 20 ms in the bucket.
const RATE: &str = "16mbit";
/// Download before measuring: windows and queues have filled by then.
const WARM: u64 = 8 << 20;
/// Events measured; the median is judged.
const EVENTS: usize = 7;
/// The most of the transfer an event may wait behind.
const AHEAD_MAX: u64 = 2 << 20;
/// Generous: at 2 MB/s even the build before delivered within seconds.
const DEADLINE: Duration = Duration::from_secs(60);

/// What fills the tunnel's way from the member to the host without pause.
pub enum Flow {
    /// `kubectl exec box -- cat /dev/zero` through the tunnel, counted at
    /// kubectl's stdout.
    Download,
    /// Pull mode: a process in the member writing zeros into the agent's
    /// `--hub-listen` listener at `listen` (an address inside the member's
    /// namespace), to a hub service the proxy publishes as `sink`, counted
    /// where `sink` accepts them.
    HubUpload {
        listen: String,
        sink: tokio::net::TcpListener,
    },
}

impl Flow {
    fn label(&self) -> &'static str {
        match self {
            Flow::Download => "download",
            Flow::HubUpload { .. } => "hub upload",
        }
    }
}

/// A [`Flow`] running, its bytes counted where they arrive.
struct Bulk {
    bytes: Arc<AtomicU64>,
    child: Option<Child>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Bulk {
    async fn start(tower: &Tower, flow: Flow) -> Result<Bulk> {
        let bytes = Arc::new(AtomicU64::new(0));
        match flow {
            Flow::Download => {
                let mut cmd = tower.kubectl_command();
                cmd.args(["exec", "box", "--", "cat", "/dev/zero"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null());
                let mut child = cmd.spawn().context("spawning kubectl exec")?;
                let out = child.stdout.take().context("kubectl exec's stdout")?;
                let count = tokio::spawn(count_into(out, bytes.clone()));
                Ok(Bulk {
                    bytes,
                    child: Some(child),
                    tasks: vec![count],
                })
            }
            Flow::HubUpload { listen, sink } => {
                let ns = tower
                    .member_net()
                    .context("the Tower has no member namespace")?
                    .name()
                    .to_string();
                let count = bytes.clone();
                let sink = tokio::spawn(async move {
                    while let Ok((conn, _)) = sink.accept().await {
                        tokio::spawn(count_into(conn, count.clone()));
                    }
                });
                let count = bytes.clone();
                // The proxy refuses hub channels until its cache has the
                // Cluster's annotation (milliseconds after it was set): a
                // connection's bytes reach the sink once it has.
                wait_until(DEADLINE, || async {
                    if count.load(Ordering::Relaxed) > 0 {
                        return true;
                    }
                    if let Ok(mut probe) = e2e::connect_in(&ns, &listen) {
                        let _ = probe.write_all(&[0u8; 1024]).await;
                    }
                    false
                })
                .await
                .context("no bytes through the hub listener reached the sink")?;
                let mut conn = e2e::connect_in(&ns, &listen)?;
                let upload = tokio::spawn(async move {
                    let zeros = vec![0u8; 64 << 10];
                    while conn.write_all(&zeros).await.is_ok() {}
                });
                Ok(Bulk {
                    bytes,
                    child: None,
                    tasks: vec![sink, upload],
                })
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    async fn stop(mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill().await;
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Reads `from` to its end, adding what arrives to `count`.
async fn count_into(mut from: impl tokio::io::AsyncRead + Unpin, count: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Runs the measurement on a Tower whose member has its own namespace and a
/// pod `box`; the link is unlimited again afterwards.
pub async fn measure(tower: &Tower, flow: Flow) -> Result<()> {
    let ns = tower
        .member_net()
        .context("the Tower has no member namespace")?
        .name()
        .to_string();
    let mut watch = Session::watch(tower)?;
    // The watch is running once it delivers an event.
    create_configmap(tower, "fair-share-ready").await?;
    ensure!(
        matches!(
            watch
                .expect(
                    "fair-share-ready",
                    Instant::now(),
                    Instant::now() + DEADLINE
                )
                .await,
            Some(Seen::Delivered(_))
        ),
        "the watch never delivered its first event"
    );
    kernel::limit_rate_queued(&ns, RATE, "64kb", "20ms").await?;
    let result = measure_limited(tower, flow, &mut watch).await;
    kernel::unlimit_rate(&ns).await?;
    watch.stop().await;
    result
}

async fn measure_limited(tower: &Tower, flow: Flow, watch: &mut Session) -> Result<()> {
    let what = flow.label();
    let bulk = Bulk::start(tower, flow).await?;
    wait_until(DEADLINE, || async { bulk.bytes() >= WARM })
        .await
        .with_context(|| {
            format!(
                "the {what} did not reach {} MiB ({} bytes so far)",
                WARM >> 20,
                bulk.bytes()
            )
        })?;
    let mut aheads = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let name = format!("fair-share-{i}");
        create_configmap(tower, &name).await?;
        let (before, since) = (bulk.bytes(), Instant::now());
        let seen = watch.expect(&name, since, since + DEADLINE).await;
        let ahead = bulk.bytes().saturating_sub(before);
        match seen {
            Some(Seen::Delivered(after)) => {
                println!(
                    "FAIR SHARE | {what} | event {i}: {:.2} MiB of it ahead, {} ms",
                    ahead as f64 / (1 << 20) as f64,
                    after.as_millis()
                );
                aheads.push(ahead);
            }
            Some(ended) => anyhow::bail!("the watch ended: {}", ended.describe()),
            None => anyhow::bail!("no watch event for {name} within {DEADLINE:?}"),
        }
    }
    let total = bulk.bytes();
    bulk.stop().await;
    ensure!(
        total > WARM,
        "the {what} stopped while the events were measured ({total} bytes)"
    );
    aheads.sort_unstable();
    let median = aheads[aheads.len() / 2];
    println!(
        "FAIR SHARE | {what} | median {:.2} MiB ahead of a watch event (at most {} MiB), {:.1} MiB in all",
        median as f64 / (1 << 20) as f64,
        AHEAD_MAX >> 20,
        total as f64 / (1 << 20) as f64
    );
    ensure!(
        median <= AHEAD_MAX,
        "a watch event waited behind {median} bytes of a {what} on the same tunnel (median of \
         {EVENTS}; at most {AHEAD_MAX}): the tunnel's channels do not take turns on a slow link"
    );
    Ok(())
}

/// `kubectl create configmap NAME` in the member (inside its namespace,
/// not through the tunnel).
async fn create_configmap(tower: &Tower, name: &str) -> Result<()> {
    let out = tower
        .member()
        .kubectl_command()
        .args(["create", "configmap", name, "-n", "default"])
        .output()
        .await
        .context("running kubectl create configmap in the member")?;
    ensure!(
        out.status.success(),
        "kubectl create configmap {name} in the member: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
