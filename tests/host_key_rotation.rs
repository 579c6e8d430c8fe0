//! SSH host key rotation (issue #13 part 3) as an operator does it, with
//! kubectl on the proxy's Secret: a next key is added (`ssh-host-key-next`),
//! the proxy announces it to the connected agents (`hostkeys-00@openssh.com`),
//! then the switch (the next key moved into `ssh-host-key`). Existing
//! sessions keep going; an agent pinned to {old, new} reconnects after the
//! switch, one pinned to the old key only is refused, with a message naming
//! the proxy's new fingerprint, and exits 1.
//!
//! And an agent that stops reading its connection (issue #14 part 5, window
//! abuse) while a next key is added: the announcement to it waits for as long
//! as it stays, the other agents' (connected before, or joining after) do not.

// The adversarial tests' hostile agent; this file uses its stalling part only.
#[allow(dead_code)]
#[path = "adversarial/peers.rs"]
mod peers;
#[allow(dead_code)]
#[path = "adversarial/rogue.rs"]
mod rogue;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::{Proc, Tower, bin, metric_sample, scrape_metrics, wait_for_ok};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::Command;

const SOON: Duration = Duration::from_secs(60);

/// `kubectl patch` the proxy's Secret with a merge patch of its `data`.
fn patch_secret(tower: &Tower, data: e2e::k8s_openapi::serde_json::Value) {
    let patch = json!({ "data": data }).to_string();
    tower.host().kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "patch",
        "secret",
        "tower-proxy",
        "--type",
        "merge",
        "-p",
        &patch,
    ]);
}

/// A next host key in the proxy's Secret, as an operator adds it; its fingerprint.
async fn add_next_key(tower: &Tower) -> Result<(String, String)> {
    let next = tunnel::ssh::generate_host_key()?;
    let new = tunnel::ssh::fingerprint(next.public_key());
    let next_pem = tunnel::ssh::encode_host_key(&next)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(next_pem);
    patch_secret(tower, json!({ "ssh-host-key-next": b64 }));
    tower
        .proxy()
        .wait_for_line(|l| l.contains("next SSH host key added"), SOON)
        .await?;
    Ok((new, b64))
}

/// A second agent of alpha (same token), pinned to `pins` only.
fn agent_pinned(tower: &Tower, name: &str, pins: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(bin("agent"));
    cmd.args(["--name", e2e::CLUSTER])
        .arg("--token-file")
        .arg(tower.dir().join("alpha.token"))
        .arg("--proxy-server")
        .arg(format!("http://127.0.0.1:{}", tower.proxy_port()))
        .arg("--kubeconfig")
        .arg(tower.member().kubeconfig())
        .args(["--kubesphere-service", "127.0.0.1:9"]);
    for pin in pins {
        cmd.args(["--proxy-host-key-fingerprint", pin]);
    }
    Proc::spawn(name, cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_a_host_key_rotation_and_old_pins_are_refused() -> Result<()> {
    let mut tower = Tower::start().await?;
    let old = tower.fingerprint().to_string();
    let old_only = agent_pinned(&tower, "agent-old-only", &[&old])?;
    old_only
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;

    // 1. The next key, beside the current one: announced, not yet shown.
    let (new, b64) = add_next_key(&tower).await?;
    // The agent that will not follow hears of the key while connected, and warns.
    let warned = old_only
        .wait_for_line(|l| l.contains(&new) && l.contains("does not pin"), SOON)
        .await?;
    eprintln!("old-only agent: {warned}");

    // An agent pinned to both keys: told of both, both pinned.
    tower
        .restart_agent(&["--proxy-host-key-fingerprint", &new])
        .await?;
    tower
        .agent()
        .wait_for_line(
            |l| {
                l.contains(&new)
                    && l.contains("announced a host key")
                    && !l.contains("does not pin")
            },
            SOON,
        )
        .await?;

    // 2. The switch: new handshakes show the new key.
    patch_secret(
        &tower,
        json!({ "ssh-host-key": b64, "ssh-host-key-next": null }),
    );
    tower
        .proxy()
        .wait_for_line(|l| l.contains("SSH host key switched"), SOON)
        .await?;
    // Sessions made before it keep going.
    let out = tower
        .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
        .await?;
    ensure!(out.contains("kube-system"), "{out}");

    // A forced reconnect: pinned to {old, new}, the agent follows.
    tower
        .restart_agent(&["--proxy-host-key-fingerprint", &new])
        .await?;
    let out = tower
        .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
        .await?;
    ensure!(out.contains("kube-system"), "{out}");

    // Pinned to the old key only: refused, naming the proxy's fingerprint.
    drop(old_only);
    let mut refused = agent_pinned(&tower, "agent-old-only-again", &[&old])?;
    let status = refused.wait(SOON).await?;
    let line = refused
        .wait_for_line(|l| l.contains("--proxy-host-key-fingerprint pins"), SOON)
        .await
        .context("the refusal names the pins")?;
    ensure!(
        line.contains(&new) && line.contains(&old),
        "the refusal names the proxy's key {new} and the pinned {old}: {line}"
    );
    ensure!(status.code() == Some(1), "exit status {status}");
    Ok(())
}

/// Uploads into the stalled agent's cluster, each a channel it accepts and
/// then never reads: 2 MiB of SSH window each, so together well past what
/// its socket and the proxy's write queue for it hold.
const UPLOADS: usize = 16;
const UPLOAD_BYTES: usize = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_holds_back_no_other_agents_announcement() -> Result<()> {
    let tower = Tower::start().await?;
    let old = tower.fingerprint().to_string();
    let (token, ks_port) = cluster_without_agent(&tower, "beta").await?;

    // A valid agent of beta, on a socket with a small receive buffer.
    let agents = SocketAddr::from(([127, 0, 0, 1], tower.proxy_port()));
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(64 * 1024)?;
    let tcp = socket.connect(agents).await?;
    let rogue_port = tcp.local_addr()?.port();
    let rogue = rogue::Rogue::login_on(tcp, agents, "beta", &token, "127.0.0.1:9").await?;

    // Uploads through beta's ks-apiserver port: the agent accepts their
    // channels, then stops reading its connection, then the bodies follow.
    let target = SocketAddr::from(([127, 0, 0, 1], ks_port));
    let mut uploads = tokio::task::JoinSet::new();
    let mut heads = Vec::new();
    for _ in 0..UPLOADS {
        let mut tcp = TcpStream::connect(target).await?;
        let head =
            format!("POST /kapis/x HTTP/1.1\r\nHost: x\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n");
        tcp.write_all(head.as_bytes()).await?;
        heads.push(tcp);
    }
    wait_for_ok(SOON, || async {
        ensure!(
            rogue.held() >= UPLOADS,
            "{} of {UPLOADS} upload channels accepted",
            rogue.held()
        );
        Ok(())
    })
    .await?;
    rogue.stop_reading();
    let before = sent_to(&tower, "beta").await?;
    for mut tcp in heads {
        uploads.spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..UPLOAD_BYTES / chunk.len() {
                if tcp.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            tcp
        });
    }
    // Stalled, as the proxy sees it: beta's write queue is at its limit (the
    // session's next write waits) and its connection takes nothing more (the
    // queue's writer waits too); and the proxy holds uploads the agent did
    // not read: it was handed more than the connection's sockets hold. Not
    // "sockets + limit": the queue counts a write whole until all of it is
    // written, though the sockets may hold part of it (tunnel::write_behind).
    // (The counter first, the sockets after: they only fill, never drain.)
    let stalled = wait_for_ok(SOON, || async {
        let (handed, queued, stalled) = beta_queue(&tower, before).await?;
        let in_sockets = in_sockets(rogue_port, agents.port())?;
        let seen = format!(
            "{handed} bytes handed to the session, {in_sockets} in its sockets, \
             {queued} in its write queue (limit {}), stalled sessions: {stalled}",
            tunnel::server::WRITE_QUEUE_LIMIT
        );
        ensure!(
            stalled == 1 && queued >= tunnel::server::WRITE_QUEUE_LIMIT as u64,
            "not stalled: {seen}"
        );
        ensure!(handed > in_sockets, "nothing held back: {seen}");
        Ok(seen)
    })
    .await
    .context("the agent that stopped reading never stalled its session")?;
    eprintln!("stalled: {stalled}");

    // A next key while it is stalled: the agent connected before is told.
    let (new, _) = add_next_key(&tower).await?;
    let told = |l: &str| l.contains(&new) && l.contains("announced a host key");
    tower
        .agent()
        .wait_for_line(told, SOON)
        .await
        .context("alpha's agent was not told of the next key: it waits behind the stalled one")?;
    // So is one of another cluster that joins after it.
    let joined = tower.join(&["gamma".to_string()]).await?;
    let gamma = joined.first().context("gamma joined")?;
    gamma
        .agent
        .wait_for_line(told, SOON)
        .await
        .context("a joining agent was not told the host keys: it waits behind the stalled one")?;
    // The stalled agent was connected throughout, and is still stalled.
    let metrics = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    ensure!(
        metric_sample(&metrics, "tower_agent_sessions{cluster=\"beta\"}") == 1.0,
        "the stalled agent's session is gone: the test proved nothing"
    );
    let (_, queued, stalled) = beta_queue(&tower, before).await?;
    ensure!(
        stalled == 1,
        "the stalled agent's session moved again ({queued} bytes in its write queue): \
         the test proved nothing"
    );

    // Reading again, it is told too, the set as it is now last.
    uploads.abort_all();
    rogue.resume_reading();
    wait_for_ok(SOON, || async {
        let announced = rogue.announced();
        let last: Vec<String> = announced
            .last()
            .map(|keys| keys.iter().map(tunnel::ssh::fingerprint).collect())
            .unwrap_or_default();
        ensure!(
            last == [old.clone(), new.clone()],
            "the stalled agent's last announcement: {last:?}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// A Cluster on the host whose agent the test plays: its token and
/// ks-apiserver port once the proxy gave them.
async fn cluster_without_agent(tower: &Tower, name: &str) -> Result<(String, u16)> {
    tower.create_cluster(name)?;
    wait_for_ok(SOON, || async {
        let out = tower
            .host()
            .kubectl_ok(&["get", "cluster", name, "-o", "json"]);
        let c: Value = serde_json::from_str(&out)?;
        let connection = &c["spec"]["connection"];
        let token = connection["token"].as_str().unwrap_or_default();
        let port = connection["kubesphereAPIServerPort"].as_u64();
        match (token, port) {
            ("", _) | (_, None) => anyhow::bail!("no token and ks-apiserver port for {name} yet"),
            (token, Some(port)) => Ok((token.to_string(), u16::try_from(port)?)),
        }
    })
    .await
}

/// Beta's session as the proxy counts it: channel data handed to it since
/// `before` (what [`sent_to`] said then), the bytes in its write queue, and
/// whether it is stalled (0 or 1).
async fn beta_queue(tower: &Tower, before: u64) -> Result<(u64, u64, u64)> {
    let metrics = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    let sample = |name: &str| metric_sample(&metrics, name) as u64;
    Ok((
        sample("tower_tunnel_bytes_total{cluster=\"beta\",direction=\"to_agent\"}")
            .saturating_sub(before),
        sample("tower_agent_write_queue_bytes{cluster=\"beta\"}"),
        sample("tower_agent_stalled_sessions{cluster=\"beta\"}"),
    ))
}

/// What the proxy has handed the sessions of `cluster` to send (channel data).
async fn sent_to(tower: &Tower, cluster: &str) -> Result<u64> {
    let metrics = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    let prefix =
        format!("tower_tunnel_bytes_total{{cluster=\"{cluster}\",direction=\"to_agent\"}}");
    Ok(metric_sample(&metrics, &prefix) as u64)
}

/// Bytes in the kernel on the agent's connection (from its port to the
/// proxy's): not read on the agent's side, not yet acknowledged on the
/// proxy's (`/proc/net/tcp`).
fn in_sockets(agent: u16, proxy: u16) -> Result<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let mut sum = 0;
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |i: usize| -> Option<u16> {
            let hex = fields.get(i)?.rsplit(':').next()?;
            u16::from_str_radix(hex, 16).ok()
        };
        let queues = fields
            .get(4)
            .and_then(|q| q.split_once(':'))
            .context("/proc/net/tcp: no tx_queue:rx_queue")?;
        let queue = |hex: &str| u64::from_str_radix(hex, 16).context("/proc/net/tcp: a queue");
        match (port(1), port(2)) {
            (Some(l), Some(r)) if l == agent && r == proxy => sum += queue(queues.1)?,
            (Some(l), Some(r)) if l == proxy && r == agent => sum += queue(queues.0)?,
            _ => {}
        }
    }
    Ok(sum)
}
