//! Interoperability with the Go stack Tower is built on (x/crypto/ssh and
//! gorilla/websocket), through the Go peers in `tests/go-peers`:
//! - the Go agent joins our proxy, and bytes flow through `--forward`;
//! - our agent joins the Go proxy, and bytes flow through its forward port;
//! - a wrong token is refused with Tower's `Unauthorized agent` both ways;
//! - the Go agent built against Tower's own 2020 library versions
//!   (`go.tower.mod`: no strict-kex, no ext-info, the old defaults) joins our
//!   proxy.
//!
//! Deadlines are generous upper bounds for "eventually", not performance
//! assertions.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::{EchoServer, Proc, Stream, bin, clean_env, echo_transfer, log_field, workspace_root};
use tokio::process::Command;

const CLUSTER: &str = "alpha";
const TOKEN: &str = "e2e-interop-9c2b7e1f4a6d8c0b3e5f7a9c1d2e4f60";

/// Upper bound for anything that takes seconds on an idle machine.
const SOON: Duration = Duration::from_secs(60);
/// Upper bound for the 64 MiB transfers.
const BULK: Duration = Duration::from_secs(600);
/// Bytes each way in the interop transfers.
const MIB_64: u64 = 64 << 20;

/// Our `bin/proxy` with cluster `alpha` and a `--forward` port for it.
struct OurProxy {
    proc: Proc,
    addr: SocketAddr,
    forward: SocketAddr,
    fingerprint: String,
}

impl OurProxy {
    async fn start(dir: &Path) -> Result<OurProxy> {
        std::fs::create_dir_all(dir)?;
        let clusters = dir.join("clusters.json");
        std::fs::write(&clusters, format!(r#"{{"{CLUSTER}": "{TOKEN}"}}"#))?;
        let mut cmd = Command::new(bin("proxy"));
        cmd.args(["--host", "127.0.0.1", "--port", "0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--clusters-file")
            .arg(&clusters)
            .args(["--forward", &format!("{CLUSTER}=127.0.0.1:0")])
            .args(["--keepalive", "1s"]);
        clean_env(&mut cmd);
        cmd.env("RUST_LOG", "info,russh=warn");
        let proc = Proc::spawn("proxy", cmd)?;
        let listening = proc
            .wait_for_line(|l| l.contains("listening for agents"), SOON)
            .await?;
        let addr = log_field(&listening, "addr").context("addr=")?.parse()?;
        let line = |needle: &str| {
            proc.lines()
                .into_iter()
                .find(|l| l.contains(needle))
                .with_context(|| format!("the proxy did not log {needle:?}"))
        };
        let forward = log_field(&line("forward listening")?, "addr")
            .context("addr=")?
            .parse()?;
        let fingerprint =
            log_field(&line("SSH host key")?, "fingerprint").context("fingerprint=")?;
        Ok(OurProxy {
            proc,
            addr,
            forward,
            fingerprint,
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_agent_connected(&self) -> Result<String> {
        self.proc
            .wait_for_line(
                |l| {
                    l.contains("agent connected")
                        && log_field(l, "cluster").as_deref() == Some(CLUSTER)
                },
                SOON,
            )
            .await
    }
}

/// A Go agent (`binary`) for `alpha` with `token`, serving `target`.
fn go_agent_cmd(binary: &Path, proxy_url: &str, token: &str, target: SocketAddr) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args([
        "--proxy-server",
        proxy_url,
        "--name",
        CLUSTER,
        "--token",
        token,
    ])
    .args(["--kubernetes-service", &target.to_string()])
    .args(["--kubesphere-service", &target.to_string()])
    .args(["--keepalive", "1s"]);
    clean_env(&mut cmd);
    cmd.env("RUST_LOG", "info,russh=warn");
    cmd
}

/// Our `bin/agent` for `alpha` with `token`, serving `target`.
fn our_agent_cmd(proxy_url: &str, token: &str, target: SocketAddr) -> Command {
    let mut cmd = Command::new(bin("agent"));
    cmd.args([
        "--name",
        CLUSTER,
        "--token",
        token,
        "--proxy-server",
        proxy_url,
    ])
    .args(["--kubernetes-service", &target.to_string()])
    .args(["--kubesphere-service", &target.to_string()])
    .args(["--keepalive", "1s", "--max-retry-interval", "2s"]);
    clean_env(&mut cmd);
    cmd.env("RUST_LOG", "info,russh=warn");
    cmd
}

/// `bin/go-proxy` for `alpha`: (process, websocket address, forward address).
async fn start_go_proxy() -> Result<(Proc, SocketAddr, SocketAddr)> {
    let mut cmd = Command::new(bin("go-proxy"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--name",
        CLUSTER,
        "--token",
        TOKEN,
    ])
    .args(["--forward", "127.0.0.1:0"]);
    clean_env(&mut cmd);
    cmd.env("RUST_LOG", "info,russh=warn");
    let proc = Proc::spawn("go-proxy", cmd)?;
    let listen = proc
        .wait_for_line(|l| l.starts_with("listening "), SOON)
        .await?;
    let forward = proc
        .wait_for_line(|l| l.starts_with("forward "), SOON)
        .await?;
    let listen = listen["listening ".len()..].trim().parse()?;
    let forward = forward["forward ".len()..].trim().parse()?;
    Ok((proc, listen, forward))
}

/// 64 MiB each way through `forward`, every byte checked.
async fn bulk(forward: SocketAddr, seed: u64) -> Result<()> {
    let t = Instant::now();
    tokio::time::timeout(BULK, echo_transfer(forward, MIB_64, seed, None))
        .await
        .context("64 MiB transfer did not finish")??;
    eprintln!("64 MiB each way in {:?}", t.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_agent_joins_our_proxy() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let echo = EchoServer::start().await?;
    let proxy = OurProxy::start(dir.path()).await?;

    // The Go agent checks our host key against the fingerprint we log: both
    // sides print it the same way.
    let mut cmd = go_agent_cmd(&bin("go-agent"), &proxy.url(), TOKEN, echo.addr());
    cmd.args(["--expect-host-key", &proxy.fingerprint]);
    let agent = Proc::spawn("go-agent", cmd)?;
    agent.wait_for_line(|l| l == "connected", SOON).await?;
    proxy.wait_agent_connected().await?;

    bulk(proxy.forward, 0x60).await?;
    // A few channels at once too.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let forward = proxy.forward;
        set.spawn(async move { echo_transfer(forward, 1 << 20, 0x600 + i, None).await });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    ensure!(echo.connections() == 9, "{} channels", echo.connections());
    ensure!(
        !agent.lines().iter().any(|l| l.contains("connection lost")),
        "the Go agent lost its connection"
    );
    eprintln!("go_agent_joins_our_proxy took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn go_agent_with_a_wrong_token_is_told_why() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let echo = EchoServer::start().await?;
    let proxy = OurProxy::start(dir.path()).await?;

    let cmd = go_agent_cmd(&bin("go-agent"), &proxy.url(), "not-the-token", echo.addr());
    let mut agent = Proc::spawn("go-agent", cmd)?;
    let status = agent.wait(SOON).await?;
    ensure!(status.code() == Some(1), "go-agent exited with {status}");
    // The exit may be seen before the reader thread has the last lines.
    agent
        .wait_for_line(|l| l.starts_with("config rejected"), SOON)
        .await?;
    let stderr = agent.stream_lines(Stream::Stderr);
    ensure!(
        stderr
            .iter()
            .any(|l| l == "config rejected: Unauthorized agent"),
        "go-agent's stderr: {stderr:#?}"
    );
    proxy
        .proc
        .wait_for_line(
            |l| l.contains("agent rejected") && l.contains("reason=Unauthorized agent"),
            SOON,
        )
        .await?;
    eprintln!(
        "go_agent_with_a_wrong_token_is_told_why took {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_joins_the_go_proxy() -> Result<()> {
    let t0 = Instant::now();
    let echo = EchoServer::start().await?;
    let (go_proxy, listen, forward) = start_go_proxy().await?;

    let agent = Proc::spawn(
        "agent",
        our_agent_cmd(&format!("http://{listen}"), TOKEN, echo.addr()),
    )?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    go_proxy
        .wait_for_line(|l| l == format!("agent {CLUSTER} connected"), SOON)
        .await?;

    bulk(forward, 0x70).await?;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        set.spawn(async move { echo_transfer(forward, 1 << 20, 0x700 + i, None).await });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    ensure!(echo.connections() == 9, "{} channels", echo.connections());
    ensure!(
        !agent.lines().iter().any(|l| l.contains("tunnel lost")),
        "our agent lost its tunnel"
    );
    eprintln!("our_agent_joins_the_go_proxy took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn our_agent_with_a_wrong_token_is_told_why_by_the_go_proxy() -> Result<()> {
    let t0 = Instant::now();
    let echo = EchoServer::start().await?;
    let (go_proxy, listen, _) = start_go_proxy().await?;

    let agent = Proc::spawn(
        "agent",
        our_agent_cmd(&format!("http://{listen}"), "not-the-token", echo.addr()),
    )?;
    let line = agent
        .wait_for_line(|l| l.contains("rejected by proxy"), SOON)
        .await?;
    ensure!(line.contains("Unauthorized agent"), "{line}");
    go_proxy
        .wait_for_line(
            |l| l == format!("agent {CLUSTER} rejected: Unauthorized agent"),
            SOON,
        )
        .await?;
    ensure!(
        !agent
            .lines()
            .iter()
            .any(|l| l.contains("connected to proxy")),
        "our agent says it is connected"
    );
    eprintln!(
        "our_agent_with_a_wrong_token_is_told_why_by_the_go_proxy took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// Builds `cmd/go-agent` against Tower's own library versions (`go.tower.mod`)
/// into `out`. Fails with the build output.
async fn build_tower_2020_agent(out: &Path) -> Result<PathBuf> {
    let binary = out.join("go-agent-2020");
    let go = std::env::var_os("GO").unwrap_or_else(|| "go".into());
    let t = Instant::now();
    let output = Command::new(&go)
        .current_dir(workspace_root().join("tests/go-peers"))
        .args(["build", "-modfile=go.tower.mod", "-trimpath", "-o"])
        .arg(&binary)
        .arg("./cmd/go-agent")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {go:?} (set GO=/path/to/go)"))?;
    ensure!(
        output.status.success(),
        "go build -modfile=go.tower.mod ./cmd/go-agent failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("built the 2020 go-agent in {:?}", t.elapsed());
    Ok(binary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_agent_with_towers_2020_libraries_joins_our_proxy() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let binary = build_tower_2020_agent(dir.path()).await?;
    let echo = EchoServer::start().await?;
    let proxy = OurProxy::start(&dir.path().join("proxy")).await?;

    // The library's own algorithm defaults: Tower's KEXINIT, without
    // strict-kex or ext-info.
    let mut cmd = go_agent_cmd(&binary, &proxy.url(), TOKEN, echo.addr());
    cmd.arg("--tower-v021-algos=false");
    let agent = Proc::spawn("go-agent-2020", cmd)?;
    agent.wait_for_line(|l| l == "connected", SOON).await?;
    proxy.wait_agent_connected().await?;
    bulk(proxy.forward, 0x2020).await?;

    // And a wrong token gets Tower's answer, as with the current library.
    let cmd = go_agent_cmd(&binary, &proxy.url(), "not-the-token", echo.addr());
    let mut rejected = Proc::spawn("go-agent-2020-wrong-token", cmd)?;
    let status = rejected.wait(SOON).await?;
    ensure!(status.code() == Some(1), "exited with {status}");
    rejected
        .wait_for_line(|l| l.starts_with("config rejected"), SOON)
        .await?;
    ensure!(
        rejected
            .stream_lines(Stream::Stderr)
            .iter()
            .any(|l| l == "config rejected: Unauthorized agent"),
        "stderr: {:#?}",
        rejected.stream_lines(Stream::Stderr)
    );
    eprintln!(
        "go_agent_with_towers_2020_libraries_joins_our_proxy took {:?}",
        t0.elapsed()
    );
    Ok(())
}
