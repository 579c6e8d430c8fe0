//! Acceptance tests of the tunnel, with `bin/proxy` and `bin/agent` as real
//! processes: an agent dials the proxy (websocket -> SSH -> `config`), and the
//! proxy's `--forward` port turns every TCP connection into a `kubesphere`
//! channel through the agent to an [`EchoServer`] on the agent's side.
//!
//! What is checked:
//! - bytes: 1 GiB each way through one channel, and 100 channels at once,
//!   every byte compared with what was sent;
//! - bad input (wrong token, unknown cluster, junk before the websocket, junk
//!   instead of SSH, oversized and malformed `config`, no `config` at all) is
//!   refused with a clear log line, a good agent stays usable throughout, and
//!   the proxy is left with no extra file descriptor;
//! - dead agents (frozen or killed) are dropped; an agent follows a restarted
//!   proxy by itself and refuses one whose host key is not the pinned one;
//! - with two agents for one cluster, losing one mid-transfer leaves the
//!   cluster reachable through the other;
//! - when a tunnel dies, the streams through it end on both sides: the proxy
//!   closes the forwarded connections, the agent its target connections, also
//!   when they were waiting for SSH window space; an agent that gives up on
//!   a tunnel (its pings unanswered) closes that connection for sure;
//! - the agent reaches the proxy through an HTTP CONNECT proxy.
//!
//! Deadlines below are generous upper bounds for "eventually" on a slow CI
//! machine, never performance assertions.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use e2e::{
    EchoServer, PATTERN_BLOCK, Proc, bin, clean_env, echo_transfer, fill_pattern, log_field,
    verify_pattern, wait_until,
};
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::ws::WsStream;

/// The cluster every test registers, and its agent token.
const CLUSTER: &str = "alpha";
const TOKEN: &str = "e2e-4f7c1a9b3d5e8f20a6c4b2d1e9f8a7b6";

/// Upper bound for anything that takes seconds on an idle machine.
const SOON: Duration = Duration::from_secs(60);
/// Upper bound for the big transfers.
const BULK: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// True when the log line is about the connection from `local`.
fn from_peer(line: &str, local: SocketAddr) -> bool {
    log_field(line, "peer").is_some_and(|p| p == local.to_string())
}

/// How many lines of `proc` satisfy `pred` so far.
fn count(proc: &Proc, pred: impl Fn(&str) -> bool) -> usize {
    proc.lines().iter().filter(|l| pred(l)).count()
}

/// Waits until at least `n` lines of `proc` satisfy `pred`.
async fn wait_count(
    proc: &Proc,
    n: usize,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<()> {
    wait_until(timeout, || {
        let seen = count(proc, &pred);
        async move { seen >= n }
    })
    .await
    .map_err(|e| {
        anyhow!(
            "{e}: {} logged {} line(s) {what}, expected {n}; last lines:\n{}",
            proc.name(),
            count(proc, &pred),
            proc.tail(40)
        )
    })
}

/// A running `bin/proxy` with cluster `alpha` and a `--forward` port for it.
struct Proxy {
    proc: Proc,
    /// The agents' port (websocket, /health, /metrics).
    port: u16,
    /// `--forward alpha=...`: each connection is a channel to the agent's
    /// kubernetes service address.
    forward: SocketAddr,
    /// `SHA256:...` of the SSH host key.
    fingerprint: String,
}

impl Proxy {
    /// Starts a proxy keeping its host key in `<dir>/data`, on `port` (0: any).
    async fn start(name: &str, dir: &Path, port: u16) -> Result<Proxy> {
        let clusters = dir.join("clusters.json");
        std::fs::write(&clusters, format!(r#"{{"{CLUSTER}": "{TOKEN}"}}"#))?;
        let mut cmd = Command::new(bin("proxy"));
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--clusters-file")
            .arg(&clusters)
            .args(["--forward", &format!("{CLUSTER}=127.0.0.1:0")])
            .args(["--keepalive", "1s"]);
        clean_env(&mut cmd);
        log_level(&mut cmd);
        let proc = Proc::spawn(name, cmd)?;
        let listening = proc
            .wait_for_line(|l| l.contains("listening for agents"), SOON)
            .await?;
        let addr: SocketAddr = log_field(&listening, "addr")
            .context("no addr= in the listening line")?
            .parse()?;
        let line = |needle: &str| {
            proc.lines()
                .into_iter()
                .find(|l| l.contains(needle))
                .with_context(|| format!("{name} did not log {needle:?} before listening"))
        };
        let forward = log_field(&line("forward listening")?, "addr")
            .context("no addr= in the forward line")?
            .parse()?;
        let fingerprint =
            log_field(&line("SSH host key")?, "fingerprint").context("no fingerprint=")?;
        ensure!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
        Ok(Proxy {
            proc,
            port: addr.port(),
            forward,
            fingerprint,
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `--proxy-server` for agents.
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `tower_agent_sessions{cluster="alpha"}` from /metrics (0 when absent).
    async fn sessions(&self) -> Result<usize> {
        let metrics = http_get(self.addr(), "/metrics").await?;
        let prefix = format!("tower_agent_sessions{{cluster=\"{CLUSTER}\"}} ");
        match metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
        {
            Some(n) => n.trim().parse().context("session count"),
            None => Ok(0),
        }
    }

    async fn wait_sessions(&self, n: usize) -> Result<()> {
        wait_until(SOON, || async { self.sessions().await.ok() == Some(n) })
            .await
            .with_context(|| {
                format!(
                    "/metrics never showed {n} session(s) of {CLUSTER}; last proxy lines:\n{}",
                    self.proc.tail(30)
                )
            })
    }

    /// The proxy's open file descriptors.
    fn fds(&self) -> Result<Vec<String>> {
        let dir = format!("/proc/{}/fd", self.proc.pid());
        let mut fds = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
            let entry = entry?;
            let target = std::fs::read_link(entry.path())
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            fds.push(format!(
                "{} -> {target}",
                entry.file_name().to_string_lossy()
            ));
        }
        Ok(fds)
    }
}

/// The TCP connections (IPv4) of process `pid`, as (local, remote), from
/// /proc: which sockets a process still holds.
fn tcp_connections(pid: u32) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    // "0100007F:1F90" is 127.0.0.1:8080: the address as a host-order u32.
    let parse = |hex: &str| -> Option<SocketAddr> {
        let (ip, port) = hex.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?.to_le_bytes();
        Some(SocketAddr::from((ip, u16::from_str_radix(port, 16).ok()?)))
    };
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    let mut conns = Vec::new();
    // The kernel reads the table out in chunks: while other tests open and
    // close connections, one socket can be listed twice. Count each once.
    let mut seen = std::collections::HashSet::new();
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st ... inode (10th column); 0A is LISTEN.
        if cols.len() > 9
            && cols[3] != "0A"
            && inodes.contains(cols[9])
            && seen.insert(cols[9])
            && let (Some(local), Some(remote)) = (parse(cols[1]), parse(cols[2]))
        {
            conns.push((local, remote));
        }
    }
    Ok(conns)
}

/// `bin/agent` for cluster `name` with `token`, serving `target` as both its
/// kubernetes and kubesphere service; keepalive 1 s, retries at most 2 s apart.
fn agent_cmd(name: &str, token: &str, proxy: &Proxy, target: SocketAddr) -> Command {
    let mut cmd = Command::new(bin("agent"));
    cmd.args([
        "--name",
        name,
        "--token",
        token,
        "--proxy-server",
        &proxy.url(),
    ])
    .args(["--kubernetes-service", &target.to_string()])
    .args(["--kubesphere-service", &target.to_string()])
    .args(["--keepalive", "1s", "--max-retry-interval", "2s"]);
    clean_env(&mut cmd);
    log_level(&mut cmd);
    cmd
}

/// Spawns an agent and waits until it says it is connected.
async fn start_agent(name: &str, cmd: Command) -> Result<Proc> {
    let agent = Proc::spawn(name, cmd)?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    Ok(agent)
}

// ---------------------------------------------------------------------------
// Bytes
// ---------------------------------------------------------------------------

/// A short transfer (64 KiB) that must succeed.
async fn round_trip(addr: SocketAddr) -> Result<()> {
    static SEED: AtomicU64 = AtomicU64::new(1);
    let seed = SEED.fetch_add(1, Ordering::Relaxed);
    tokio::time::timeout(SOON, echo_transfer(addr, 64 * 1024, seed, None))
        .await
        .context("round trip through the tunnel timed out")?
        .context("round trip through the tunnel")
}

/// Reads until the peer closes; a reset counts as closed too.
async fn read_until_closed(rd: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(SOON, read)
        .await
        .context("the connection was not closed")?;
    Ok(all)
}

/// GET `path` on `addr`; the body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(SOON, tcp.read_to_end(&mut resp))
        .await
        .context("GET timed out")??;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_string())
}

// ---------------------------------------------------------------------------
// Speaking the protocol by hand
// ---------------------------------------------------------------------------

/// Upgrades a new connection to `addr` to a `kubesphere-v1` websocket;
/// returns it as a byte stream, and the local address (the proxy logs it as
/// `peer=`).
async fn ws_connect(addr: SocketAddr) -> Result<(WsStream<TcpStream>, SocketAddr)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let local = tcp.local_addr()?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: kubesphere-v1\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    // Byte by byte: what follows the head already belongs to the websocket.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 16 * 1024, "endless upgrade answer");
        let n = tokio::time::timeout(SOON, tcp.read(&mut byte))
            .await
            .context("no upgrade answer")??;
        ensure!(
            n == 1,
            "closed during the upgrade: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    Ok((WsStream::from_upgraded(tcp, Role::Client).await, local))
}

/// An SSH client that takes any host key.
struct AnyHostKey;

impl russh::client::Handler for AnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Websocket + SSH handshake + password login as Tower's agents do it; no
/// `config` yet.
async fn ssh_login(addr: SocketAddr) -> Result<(russh::client::Handle<AnyHostKey>, SocketAddr)> {
    let (ws, local) = ws_connect(addr).await?;
    let config = Arc::new(tunnel::ssh::client_config());
    let mut handle =
        tokio::time::timeout(SOON, russh::client::connect_stream(config, ws, AnyHostKey))
            .await
            .context("SSH handshake timed out")?
            .context("SSH handshake")?;
    let login = handle
        .authenticate_password("", "")
        .await
        .context("password login")?;
    ensure!(login.success(), "the proxy refused the empty password");
    Ok((handle, local))
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// One proxy, one agent, an echo server behind the agent.
async fn setup(dir: &Path) -> Result<(Proxy, Proc, EchoServer)> {
    let echo = EchoServer::start().await?;
    let proxy = Proxy::start("proxy", dir, 0).await?;
    let agent = start_agent("agent", agent_cmd(CLUSTER, TOKEN, &proxy, echo.addr())).await?;
    proxy
        .proc
        .wait_for_line(
            |l| {
                l.contains("agent connected") && log_field(l, "cluster").as_deref() == Some(CLUSTER)
            },
            SOON,
        )
        .await?;
    Ok((proxy, agent, echo))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_through_one_channel() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let (proxy, agent, echo) = setup(dir.path()).await?;

    const GIB: u64 = 1 << 30;
    let t1 = Instant::now();
    tokio::time::timeout(BULK, echo_transfer(proxy.forward, GIB, 0x5eed, None))
        .await
        .context("1 GiB transfer did not finish")??;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "1 GiB each way in {secs:.1}s ({:.0} MiB/s per direction)",
        1024.0 / secs
    );
    ensure!(
        echo.connections() == 1,
        "one channel, one target connection"
    );
    ensure!(
        count(&agent, |l| l.contains("tunnel lost")) == 0,
        "the agent lost its tunnel"
    );
    proxy.wait_sessions(1).await?;
    eprintln!(
        "one_gib_each_way_through_one_channel took {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_channels_at_once() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let (proxy, agent, echo) = setup(dir.path()).await?;

    const CHANNELS: u64 = 100;
    const EACH: u64 = 1 << 20;
    let mut set = JoinSet::new();
    for i in 0..CHANNELS {
        let forward = proxy.forward;
        set.spawn(async move {
            echo_transfer(forward, EACH, 1000 + i, None)
                .await
                .with_context(|| format!("channel {i}"))
        });
    }
    let all = async {
        let mut done = 0;
        while let Some(joined) = set.join_next().await {
            joined.context("transfer task panicked")??;
            done += 1;
        }
        anyhow::Ok(done)
    };
    let done = tokio::time::timeout(BULK, all)
        .await
        .context("100 concurrent channels did not all finish")??;
    ensure!(done == CHANNELS, "{done} of {CHANNELS} channels finished");
    ensure!(
        echo.connections() == CHANNELS as usize,
        "the echo server saw {} connections, expected {CHANNELS}",
        echo.connections()
    );
    ensure!(count(&agent, |l| l.contains("tunnel lost")) == 0);
    proxy.wait_sessions(1).await?;
    eprintln!("a_hundred_channels_at_once took {:?}", t0.elapsed());
    Ok(())
}

/// The good agent is still connected (once, never lost) and usable.
async fn good_agent_still_serves(proxy: &Proxy, agent: &Proc, after: &str) -> Result<()> {
    round_trip(proxy.forward)
        .await
        .with_context(|| format!("after {after}"))?;
    ensure!(
        proxy.sessions().await? == 1,
        "after {after}: /metrics does not show exactly one session"
    );
    ensure!(
        count(agent, |l| l.contains("tunnel lost")) == 0
            && count(agent, |l| l.contains("connected to proxy")) == 1,
        "after {after}: the good agent reconnected; its last lines:\n{}",
        agent.tail(20)
    );
    Ok(())
}

/// Waits for the proxy's line about the connection from `local` that
/// satisfies `pred`, and returns it.
async fn proxy_line_about(
    proxy: &Proxy,
    local: SocketAddr,
    pred: impl Fn(&str) -> bool,
) -> Result<String> {
    proxy
        .proc
        .wait_for_line(|l| from_peer(l, local) && pred(l), SOON)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_leaves_nothing_behind() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let (proxy, good, echo) = setup(dir.path()).await?;
    proxy.wait_sessions(1).await?;
    let baseline = proxy.fds()?;
    round_trip(proxy.forward).await?;

    // Logged in, and then silent: the proxy waits 10 s for `config`. It runs
    // while the other cases go.
    let (idle, idle_local) = ssh_login(proxy.addr()).await?;

    // Wrong token, then unknown cluster: the same answer for both.
    for (case, name, token) in [
        ("wrong token", CLUSTER, "not-the-token"),
        ("unknown cluster", "no-such-cluster", TOKEN),
    ] {
        let rejected_before = count(&proxy.proc, |l| l.contains("agent rejected"));
        let bad = Proc::spawn(case, agent_cmd(name, token, &proxy, echo.addr()))?;
        let line = bad
            .wait_for_line(|l| l.contains("rejected by proxy"), SOON)
            .await?;
        ensure!(line.contains("Unauthorized agent"), "{case}: {line}");
        wait_count(
            &proxy.proc,
            rejected_before + 1,
            "agent rejected ... Unauthorized agent",
            SOON,
            |l| l.contains("agent rejected") && l.contains("reason=Unauthorized agent"),
        )
        .await?;
        ensure!(
            count(&bad, |l| l.contains("connected to proxy")) == 0,
            "{case}: the agent says it is connected"
        );
        drop(bad);
        good_agent_still_serves(&proxy, &good, case).await?;
    }

    // Junk before the websocket: not HTTP at all.
    {
        let mut tcp = TcpStream::connect(proxy.addr()).await?;
        let local = tcp.local_addr()?;
        tcp.write_all(b"\x16\x03\x01\x02\x00\x01 this is not HTTP \xff\xfe\r\n\r\n")
            .await?;
        let answer = read_until_closed(&mut tcp).await?;
        let line = proxy_line_about(&proxy, local, |l| l.contains("bad HTTP request")).await?;
        eprintln!(
            "junk before the websocket: answer {:?}; proxy: {line}",
            String::from_utf8_lossy(&answer)
        );
        good_agent_still_serves(&proxy, &good, "junk before the websocket").await?;
    }

    // Junk instead of SSH, after a proper websocket upgrade: an endless first
    // line, and a proper identification line followed by a nonsense packet.
    let mut endless = Vec::new();
    while endless.len() < 8192 {
        endless.extend_from_slice(b"no SSH here, ");
    }
    let mut bad_packet = b"SSH-2.0-junk\r\n".to_vec();
    bad_packet.extend(std::iter::repeat_n(0xffu8, 4096));
    for (case, junk) in [
        ("junk instead of SSH", endless),
        ("junk after the SSH identification", bad_packet),
    ] {
        let (mut ws, local) = ws_connect(proxy.addr()).await?;
        // The proxy may close before all of it is written.
        let _ = ws.write_all(&junk).await;
        read_until_closed(&mut ws)
            .await
            .with_context(|| format!("{case}: the proxy kept the connection"))?;
        let line = proxy_line_about(&proxy, local, |l| l.contains("tunnel ended")).await?;
        eprintln!("{case}: proxy: {line}");
        good_agent_still_serves(&proxy, &good, case).await?;
    }

    // A `config` request of 10 MB: more than any SSH packet may be.
    {
        let (handle, local) = ssh_login(proxy.addr()).await?;
        let mut config = format!(r#"{{"Name":"{CLUSTER}","Token":"{TOKEN}","Pad":""#).into_bytes();
        config.resize(10_000_000 - 2, b'x');
        config.extend_from_slice(b"\"}");
        let answer = tokio::time::timeout(SOON, handle.global_request("config", &config))
            .await
            .context("10 MB config: no answer and no disconnect")?;
        ensure!(!matches!(answer, Ok(Ok(_))), "a 10 MB config was accepted");
        wait_until(SOON, || async { handle.is_closed() })
            .await
            .context("10 MB config: the SSH connection stays open")?;
        let line = proxy_line_about(&proxy, local, |l| {
            l.contains("tunnel ended") || l.contains("agent rejected")
        })
        .await?;
        eprintln!("10 MB config: answer {answer:?}; proxy: {line}");
        good_agent_still_serves(&proxy, &good, "a 10 MB config").await?;
    }

    // A `config` that fits in a packet but is over the proxy's limit, and one
    // that is not JSON: refused with the reason, then disconnected.
    let mut big = format!(r#"{{"Name":"{CLUSTER}","Token":"{TOKEN}","Pad":""#).into_bytes();
    big.resize(100 * 1024, b'x');
    big.extend_from_slice(b"\"}");
    for (case, config, reason) in [
        ("a 100 KiB config", big, "more than"),
        (
            "a config that is not JSON",
            b"{\"Name\": nope".to_vec(),
            "not valid JSON",
        ),
    ] {
        let (handle, local) = ssh_login(proxy.addr()).await?;
        let answer = tokio::time::timeout(SOON, handle.global_request("config", &config))
            .await
            .with_context(|| format!("{case}: no answer"))?
            .with_context(|| format!("{case}: no answer"))?;
        let text = match answer {
            Ok(_) => bail!("{case}: accepted"),
            Err(text) => String::from_utf8_lossy(&text).into_owned(),
        };
        ensure!(
            text.contains("invalid config") && text.contains(reason),
            "{case}: the failure says {text:?}"
        );
        wait_until(SOON, || async { handle.is_closed() })
            .await
            .with_context(|| format!("{case}: the SSH connection stays open"))?;
        let line = proxy_line_about(&proxy, local, |l| l.contains("agent rejected")).await?;
        ensure!(line.contains("invalid config"), "{case}: {line}");
        good_agent_still_serves(&proxy, &good, case).await?;
    }

    // The silent one: dropped after the config timeout.
    wait_until(SOON, || async { idle.is_closed() })
        .await
        .context("a session that never sent config is still open")?;
    let line = proxy_line_about(&proxy, idle_local, |l| l.contains("tunnel ended")).await?;
    ensure!(line.contains("no config request"), "{line}");
    drop(idle);
    good_agent_still_serves(&proxy, &good, "a session without config").await?;

    // Nothing left behind: as many descriptors as before all this.
    let fds_ok = wait_until(SOON, || async {
        proxy
            .fds()
            .map(|f| f.len() <= baseline.len())
            .unwrap_or(false)
    })
    .await;
    if fds_ok.is_err() {
        bail!(
            "the proxy holds {} file descriptors, {} before the bad input:\nbefore:\n  {}\nnow:\n  {}",
            proxy.fds()?.len(),
            baseline.len(),
            baseline.join("\n  "),
            proxy.fds()?.join("\n  ")
        );
    }
    ensure!(proxy.sessions().await? == 1);
    good_agent_still_serves(&proxy, &good, "everything").await?;
    eprintln!(
        "bad_input_is_refused_and_leaves_nothing_behind took {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn dead_agents_are_dropped() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let (proxy, mut agent, _echo) = setup(dir.path()).await?;
    proxy.wait_sessions(1).await?;
    let disconnected = |l: &str| {
        l.contains("agent disconnected") && log_field(l, "cluster").as_deref() == Some(CLUSTER)
    };

    // Frozen: its TCP connection stays open, only the keepalive can tell.
    agent.signal(Signal::SIGSTOP)?;
    let frozen = Instant::now();
    wait_count(
        &proxy.proc,
        1,
        "agent disconnected",
        Duration::from_secs(30),
        disconnected,
    )
    .await
    .context("a frozen agent was not dropped (--keepalive 1s)")?;
    eprintln!("frozen agent dropped after {:?}", frozen.elapsed());
    proxy.wait_sessions(0).await?;
    // Without an agent, forwarded connections are closed, not left hanging.
    let mut tcp = TcpStream::connect(proxy.forward).await?;
    let _ = tcp.write_all(b"anyone?").await;
    let got = read_until_closed(&mut tcp).await?;
    ensure!(got.is_empty(), "got {got:?} without an agent");

    // Thawed, it notices and comes back by itself.
    agent.signal(Signal::SIGCONT)?;
    wait_count(&agent, 2, "connected to proxy", SOON, |l| {
        l.contains("connected to proxy")
    })
    .await?;
    proxy.wait_sessions(1).await?;
    round_trip(proxy.forward).await?;

    // Killed: the proxy notices too.
    agent.signal(Signal::SIGKILL)?;
    agent.wait(SOON).await?;
    let killed = Instant::now();
    wait_count(
        &proxy.proc,
        2,
        "agent disconnected",
        Duration::from_secs(30),
        disconnected,
    )
    .await
    .context("a killed agent was not dropped")?;
    eprintln!("killed agent dropped after {:?}", killed.elapsed());
    proxy.wait_sessions(0).await?;
    eprintln!("dead_agents_are_dropped took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn agent_follows_a_restarted_proxy_and_refuses_another_host_key() -> Result<()> {
    let t0 = Instant::now();
    let (dir_a, dir_b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let echo = EchoServer::start().await?;
    let mut first = Proxy::start("proxy-1", dir_a.path(), 0).await?;
    let (port, pinned) = (first.port, first.fingerprint.clone());
    let mut cmd = agent_cmd(CLUSTER, TOKEN, &first, echo.addr());
    cmd.args(["--proxy-host-key-fingerprint", &pinned]);
    let mut agent = start_agent("agent", cmd).await?;
    round_trip(first.forward).await?;

    // Killed and restarted on the same port and data dir: same host key, and
    // the agent comes back without help.
    first.proc.signal(Signal::SIGKILL)?;
    first.proc.wait(SOON).await?;
    wait_count(&agent, 1, "tunnel lost", SOON, |l| {
        l.contains("tunnel lost")
    })
    .await?;
    let second = Proxy::start("proxy-2", dir_a.path(), port).await?;
    ensure!(
        second.fingerprint == pinned,
        "the host key changed across a restart: {} then {}",
        pinned,
        second.fingerprint
    );
    wait_count(&agent, 2, "connected to proxy", SOON, |l| {
        l.contains("connected to proxy")
    })
    .await?;
    second.wait_sessions(1).await?;
    round_trip(second.forward).await?;
    drop(second);
    drop(first);

    // Another proxy (another host key) on the same address: the agent refuses
    // to talk to it, says why, and stops.
    let other = Proxy::start("proxy-other-key", dir_b.path(), port).await?;
    ensure!(other.fingerprint != pinned);
    let status = agent
        .wait(SOON)
        .await
        .context("the agent keeps going with a proxy whose host key is not pinned")?;
    ensure!(status.code() == Some(1), "agent exited with {status}");
    let line = agent.wait_for_line(|l| l.contains("pins"), SOON).await?;
    ensure!(
        line.contains(&pinned) && line.contains(&other.fingerprint),
        "the refusal does not name both fingerprints: {line}"
    );
    ensure!(count(&agent, |l| l.contains("connected to proxy")) == 2);
    ensure!(count(&other.proc, |l| l.contains("agent connected")) == 0);
    ensure!(other.sessions().await? == 0);
    eprintln!(
        "agent_follows_a_restarted_proxy_and_refuses_another_host_key took {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_for_one_cluster_survive_losing_one() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let proxy = Proxy::start("proxy", dir.path(), 0).await?;
    // Each agent serves its own echo server, so we can tell which carries what.
    let echoes = [EchoServer::start().await?, EchoServer::start().await?];
    let mut agents = Vec::new();
    for (i, echo) in echoes.iter().enumerate() {
        let name = format!("agent-{}", i + 1);
        agents.push(start_agent(&name, agent_cmd(CLUSTER, TOKEN, &proxy, echo.addr())).await?);
    }
    proxy.wait_sessions(2).await?;

    // An endless transfer through one of them: write forever, check the echo.
    let tcp = TcpStream::connect(proxy.forward).await?;
    let (mut rd, mut wr) = tcp.into_split();
    let progress = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let progress = progress.clone();
        async move { verify_pattern(&mut rd, u64::MAX, 7, Some(&progress)).await }
    });
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; PATTERN_BLOCK];
        for index in 0.. {
            fill_pattern(7, index, &mut buf);
            if let Err(e) = wr.write_all(&buf).await {
                return e;
            }
        }
        unreachable!()
    });
    wait_until(SOON, || async {
        progress.load(Ordering::Relaxed) >= 32 << 20
    })
    .await
    .context("the long transfer does not move")?;
    let carriers: Vec<usize> = (0..2).filter(|&i| echoes[i].connections() == 1).collect();
    ensure!(
        carriers.len() == 1,
        "expected exactly one agent to carry the transfer, connections: {} and {}",
        echoes[0].connections(),
        echoes[1].connections()
    );
    let (victim, survivor) = (carriers[0], 1 - carriers[0]);

    // Kill the agent carrying it...
    agents[victim].signal(Signal::SIGKILL)?;
    agents[victim].wait(SOON).await?;
    let killed = tokio::time::Instant::now();
    proxy
        .proc
        .wait_for_line(
            |l| l.contains("agent disconnected") && l.contains("sessions_left=1"),
            SOON,
        )
        .await?;
    proxy.wait_sessions(1).await?;

    // ...new channels go through the other one, one after another and at once...
    let before = echoes[survivor].connections();
    for i in 0..10 {
        round_trip(proxy.forward)
            .await
            .with_context(|| format!("round trip {i} after losing an agent"))?;
    }
    let mut set = JoinSet::new();
    for i in 0..10 {
        let forward = proxy.forward;
        set.spawn(async move { echo_transfer(forward, 1 << 20, 100 + i, None).await });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    ensure!(
        echoes[survivor].connections() == before + 20,
        "the surviving agent carried {} of 20 channels",
        echoes[survivor].connections() - before
    );

    // ...and the transfer through the dead one failed both ways: the proxy
    // closed the forwarded connection rather than leave it hanging.
    let read_end = tokio::time::timeout_at(killed + SOON, reader)
        .await
        .context("reads through the killed agent hang")?
        .context("reader task")?;
    eprintln!(
        "reading through the killed agent ended after {} MiB: {read_end:?}",
        progress.load(Ordering::Relaxed) >> 20
    );
    let write_end = tokio::time::timeout_at(killed + SOON, writer)
        .await
        .context(
            "the proxy half-closed the forwarded connection of the dead session but never \
             closed it: writes to it hang (the proxy stopped reading it; its socket stays in \
             FIN-WAIT-2)",
        )?
        .context("writer task")?;
    eprintln!("writing through the killed agent ended: {write_end}");
    ensure!(count(&agents[survivor], |l| l.contains("tunnel lost")) == 0);
    eprintln!(
        "two_agents_for_one_cluster_survive_losing_one took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// A target that writes without end to whoever connects and never reads.
/// Counts connections, bytes written, and connections that ended (a write
/// failed: the peer closed).
struct Talker {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    written: Arc<AtomicU64>,
    /// When a write last completed.
    last_write: Arc<Mutex<Instant>>,
    ended: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl Talker {
    async fn start() -> Result<Talker> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let last_write = Arc::new(Mutex::new(Instant::now()));
        let ended = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let counters = (
            accepted.clone(),
            written.clone(),
            last_write.clone(),
            ended.clone(),
        );
        tasks.spawn(async move {
            let (accepted, written, last_write, ended) = counters;
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    res = listener.accept() => {
                        let Ok((mut tcp, _)) = res else { continue };
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let (written, last_write, ended) =
                            (written.clone(), last_write.clone(), ended.clone());
                        conns.spawn(async move {
                            let chunk = vec![b'z'; 16 * 1024];
                            while tcp.write_all(&chunk).await.is_ok() {
                                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                                if let Ok(mut t) = last_write.lock() {
                                    *t = Instant::now();
                                }
                            }
                            ended.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Talker {
            addr,
            accepted,
            written,
            last_write,
            ended,
            _tasks: tasks,
        })
    }

    /// True when no write completed for a second: every buffer between the
    /// talker and the reader that does not read is full.
    fn stalled(&self) -> bool {
        self.written.load(Ordering::SeqCst) > 0
            && self
                .last_write
                .lock()
                .map(|t| t.elapsed() > Duration::from_secs(1))
                .unwrap_or(false)
    }
}

/// A channel whose reader on the proxy's side stopped reading, so that the
/// agent waits for window space to write into it; then the proxy dies. The
/// agent must give up that channel and close its connection to the target.
#[tokio::test]
async fn agent_lets_go_of_its_targets_when_the_proxy_dies() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let talker = Talker::start().await?;
    let mut proxy = Proxy::start("proxy", dir.path(), 0).await?;
    let agent = start_agent("agent", agent_cmd(CLUSTER, TOKEN, &proxy, talker.addr)).await?;

    // Connected through the tunnel to the talker, and never reading.
    let client = TcpStream::connect(proxy.forward).await?;
    wait_until(SOON, || async { talker.stalled() })
        .await
        .context("the talker's writes never stalled")?;
    eprintln!(
        "{} MiB are in flight before the proxy dies",
        talker.written.load(Ordering::SeqCst) >> 20
    );
    ensure!(talker.accepted.load(Ordering::SeqCst) == 1);

    proxy.proc.signal(Signal::SIGKILL)?;
    proxy.proc.wait(SOON).await?;
    drop(client);
    wait_count(&agent, 1, "tunnel lost", SOON, |l| {
        l.contains("tunnel lost")
    })
    .await?;
    wait_until(SOON, || async { talker.ended.load(Ordering::SeqCst) == 1 })
        .await
        .context(
            "the agent keeps its connection to the target of a channel of a dead tunnel \
             (a write into the channel waits for window space that never comes)",
        )?;
    eprintln!(
        "agent_lets_go_of_its_targets_when_the_proxy_dies took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// The proxy stops reading (frozen) while the agent has plenty to send: the
/// agent's pings go unanswered, it gives up on the tunnel, and it must then
/// close that connection for sure, even though nothing can be written to it
/// any more (a websocket close frame cannot go out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_closes_a_tunnel_it_gave_up_on() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let talker = Talker::start().await?;
    let mut proxy = Proxy::start("proxy", dir.path(), 0).await?;
    let agent = start_agent("agent", agent_cmd(CLUSTER, TOKEN, &proxy, talker.addr)).await?;
    let proxy_addr = proxy.addr();
    let to_proxy = |pid| -> Result<Vec<SocketAddr>> {
        Ok(tcp_connections(pid)?
            .into_iter()
            .filter(|(_, remote)| *remote == proxy_addr)
            .map(|(local, _)| local)
            .collect())
    };
    let tunnel = to_proxy(agent.pid())?;
    ensure!(
        tunnel.len() == 1,
        "agent connections to the proxy: {tunnel:?}"
    );
    let tunnel = tunnel[0];

    // 64 channels, each the talker's endless output, read as fast as we can:
    // 64 windows of 2 MiB are more than the socket buffers can hold.
    let mut readers = JoinSet::new();
    for _ in 0..64 {
        let mut tcp = TcpStream::connect(proxy.forward).await?;
        readers.spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
    wait_until(SOON, || async {
        talker.accepted.load(Ordering::SeqCst) == 64
            && talker.written.load(Ordering::SeqCst) >= 256 << 20
    })
    .await
    .context("the talker's output does not flow through the tunnel")?;

    // Frozen mid-flow: the agent fills the connection and hears nothing back.
    proxy.proc.signal(Signal::SIGSTOP)?;
    let result = async {
        wait_count(&agent, 1, "tunnel lost", SOON, |l| {
            l.contains("tunnel lost")
        })
        .await?;
        wait_until(SOON, || async {
            to_proxy(agent.pid()).is_ok_and(|c| !c.contains(&tunnel))
        })
        .await
        .with_context(|| {
            format!(
                "the agent gave up on its tunnel ({tunnel} -> {}) but keeps the connection \
                 open; agent connections to the proxy now: {:?}",
                proxy_addr,
                to_proxy(agent.pid())
            )
        })
    }
    .await;
    proxy.proc.signal(Signal::SIGCONT)?;
    result?;
    eprintln!(
        "agent_closes_a_tunnel_it_gave_up_on took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// A minimal HTTP CONNECT proxy: reads the request head, connects, answers
/// 200, then copies both ways. Counts the CONNECTs and records their targets.
struct ConnectProxy {
    addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    connects: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl ConnectProxy {
    async fn start() -> Result<ConnectProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let targets = Arc::new(Mutex::new(Vec::new()));
        let connects = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        let (seen, n) = (targets.clone(), connects.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let (seen, n) = (seen.clone(), n.clone());
                        conns.spawn(async move {
                            if let Err(e) = Self::serve(client, &seen, &n).await {
                                eprintln!("[connect-proxy] {e:#}");
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(ConnectProxy {
            addr,
            targets,
            connects,
            _tasks: tasks,
        })
    }

    async fn serve(
        mut client: TcpStream,
        seen: &Mutex<Vec<String>>,
        n: &AtomicUsize,
    ) -> Result<()> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            ensure!(head.len() < 16 * 1024, "endless request head");
            ensure!(client.read(&mut byte).await? == 1, "closed in the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut words = head.split_whitespace();
        let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
            client
                .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                .await?;
            bail!("not a CONNECT: {head:?}");
        };
        n.fetch_add(1, Ordering::SeqCst);
        seen.lock()
            .map_err(|_| anyhow!("poisoned"))?
            .push(target.to_string());
        let mut upstream = match TcpStream::connect(target).await {
            Ok(s) => s,
            Err(e) => {
                client
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                    .await?;
                bail!("CONNECT {target}: {e}");
            }
        };
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        Ok(())
    }
}

#[tokio::test]
async fn agent_reaches_the_proxy_through_an_http_connect_proxy() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let echo = EchoServer::start().await?;
    let proxy = Proxy::start("proxy", dir.path(), 0).await?;
    let egress = ConnectProxy::start().await?;
    let egress_url = format!("http://{}", egress.addr);

    let mut cmd = agent_cmd(CLUSTER, TOKEN, &proxy, echo.addr());
    // --proxy-server is http://, so HTTP_PROXY is the one that applies (see
    // agent/src/proxy_env.rs); HTTPS_PROXY is set too, as people do.
    cmd.env("HTTP_PROXY", &egress_url)
        .env("HTTPS_PROXY", &egress_url)
        .env("NO_PROXY", "");
    let agent = start_agent("agent", cmd).await?;

    ensure!(
        egress.connects.load(Ordering::SeqCst) >= 1,
        "the agent connected without CONNECT"
    );
    let targets = egress
        .targets
        .lock()
        .map_err(|_| anyhow!("poisoned"))?
        .clone();
    ensure!(
        targets.iter().all(|t| *t == proxy.addr().to_string()),
        "CONNECT targets: {targets:?}, expected {}",
        proxy.addr()
    );
    proxy.wait_sessions(1).await?;
    round_trip(proxy.forward).await?;
    let starting = agent
        .wait_for_line(|l| l.contains("starting agent"), SOON)
        .await?;
    ensure!(
        starting.contains(&egress.addr.to_string()),
        "the agent does not say it goes through the egress proxy: {starting}"
    );
    eprintln!(
        "agent_reaches_the_proxy_through_an_http_connect_proxy took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// E2E_RUST_LOG: more detail from the processes under test when debugging.
fn log_level(cmd: &mut Command) {
    let level = std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info,russh=warn".into());
    cmd.env("RUST_LOG", level);
}
