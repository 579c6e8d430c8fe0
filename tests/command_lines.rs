//! Go Tower's command lines, run unchanged against `bin/proxy` and `bin/agent`.
//!
//! Our binaries replace Go Tower's in KubeSphere's manifests, so the exact
//! argument lists those manifests carry must start them: pflag syntax
//! (`--keepalive=10s`), klog's flags (`--v=0`). These tests start the real
//! processes with such lines and check the outcome from outside: the proxy's
//! `/metrics` counts the agent's session, and a bad value is a usage error
//! (exit 2) whose message names the flag.
//!
//! No Kubernetes here: the proxy takes its clusters from `--clusters-file`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Proc, bin, metric_sample, scrape_metrics, wait_for_ok, wait_until};
use tokio::process::Command;

const CLUSTER: &str = "alpha";
const TOKEN: &str = "e2e-cli-0d6f2b8a4c1e9f7352a0b4c6d8e1f3a5";
/// Upper bound for anything that takes seconds on an idle machine.
const SOON: Duration = Duration::from_secs(60);

/// Nothing from the test's environment that changes what the binaries do:
/// proxy variables, a service account, RUST_LOG (which would override --v).
fn clean_env(cmd: &mut Command) {
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "AGENT_TOKEN",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env(
        "AGENT_SERVICEACCOUNT_DIR",
        "/nonexistent/e2e-no-service-account",
    );
}

/// `bin/proxy` with cluster alpha from `--clusters-file`; its agents' address.
async fn start_proxy(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let clusters = dir.join("clusters.json");
    std::fs::write(&clusters, format!(r#"{{"{CLUSTER}": "{TOKEN}"}}"#))?;
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(["--host", "127.0.0.1", "--port", "0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--clusters-file")
        .arg(&clusters);
    clean_env(&mut cmd);
    let proxy = Proc::spawn("proxy", cmd)?;
    let line = proxy
        .wait_for_line(|l| l.contains("listening for agents"), SOON)
        .await?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .context("no addr= in the listening line")?
        .trim_matches('"')
        .parse()?;
    Ok((proxy, addr))
}

/// KubeSphere's agent arguments (its Deployment's `args`), word for word.
fn kubesphere_agent_args(proxy: SocketAddr) -> Vec<String> {
    [
        "--name=alpha".to_string(),
        format!("--token={TOKEN}"),
        format!("--proxy-server=http://{proxy}"),
        "--keepalive=10s".to_string(),
        "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80".to_string(),
        "--kubernetes-service=kubernetes.default.svc:443".to_string(),
        "--v=0".to_string(),
    ]
    .into()
}

/// Waits until the proxy's /metrics shows `n` sessions of alpha.
async fn wait_sessions(proxy: &Proc, addr: SocketAddr, n: f64) -> Result<()> {
    let prefix = format!("tower_agent_sessions{{cluster=\"{CLUSTER}\"}} ");
    wait_until(SOON, || async {
        scrape_metrics("127.0.0.1", addr.port())
            .await
            .is_ok_and(|m| metric_sample(&m, &prefix) == n)
    })
    .await
    .with_context(|| {
        format!(
            "/metrics never showed {n} session(s) of {CLUSTER}; last proxy lines:\n{}",
            proxy.tail(30)
        )
    })
}

#[tokio::test]
async fn kubesphere_agent_command_line_connects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (proxy, addr) = start_proxy(dir.path()).await?;

    let mut cmd = Command::new(bin("agent"));
    cmd.args(kubesphere_agent_args(addr));
    clean_env(&mut cmd);
    let agent = Proc::spawn("agent", cmd)?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    wait_sessions(&proxy, addr, 1.0).await?;
    // --v=0 is info: no debug lines, and no note about ignored flags.
    let lines = agent.lines();
    ensure!(
        !lines
            .iter()
            .any(|l| l.contains("DEBUG") || l.contains("ignoring")),
        "unexpected lines at --v=0:\n{}",
        agent.tail(40)
    );
    Ok(())
}

#[tokio::test]
async fn every_klog_flag_is_accepted_and_log_file_is_used() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (proxy, addr) = start_proxy(dir.path()).await?;

    let log_file = dir.path().join("agent.log");
    let mut cmd = Command::new(bin("agent"));
    cmd.args(kubesphere_agent_args(addr))
        .args([
            "-v",
            "2",
            "--vmodule=run=4",
            "--logtostderr=false",
            "--alsologtostderr",
            "--log-dir",
            "/var/log/tower",
        ])
        .arg(format!("--log-file={}", log_file.display()))
        .args([
            "--log-file-max-size=1800",
            "--skip-headers",
            "--skip-log-headers=true",
            "--stderrthreshold=ERROR",
            "--add-dir-header=false",
            "--log-backtrace-at=agent.go:1",
            "--one-output",
        ]);
    clean_env(&mut cmd);
    let agent = Proc::spawn("agent", cmd)?;
    // --alsologtostderr: the lines reach stderr as well as the file.
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    wait_sessions(&proxy, addr, 1.0).await?;
    let text = wait_for_ok(SOON, || async {
        let text = std::fs::read_to_string(&log_file)?;
        ensure!(text.contains("connected to proxy"), "not in the file yet");
        Ok(text)
    })
    .await?;
    // The flags with no effect are named once, in the start-up log.
    let notes: Vec<&str> = text.lines().filter(|l| l.contains("ignoring")).collect();
    ensure!(notes.len() == 1, "expected one note, got:\n{text}");
    for flag in ["--vmodule", "--log-dir", "--skip-headers", "--one-output"] {
        ensure!(notes[0].contains(flag), "{flag} not named: {}", notes[0]);
    }
    Ok(())
}

/// Runs `bin/agent` with `args` to completion; (exit code, stderr).
async fn agent_fails(args: &[&str]) -> Result<(Option<i32>, String)> {
    let mut cmd = Command::new(bin("agent"));
    cmd.args(args).kill_on_drop(true);
    clean_env(&mut cmd);
    let out = tokio::time::timeout(SOON, cmd.output())
        .await
        .context("the agent did not exit")??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn bad_values_exit_2_naming_the_flag() -> Result<()> {
    let base = [
        "--name=alpha",
        "--token=abc",
        "--proxy-server=http://127.0.0.1:9",
    ];

    let (code, stderr) = agent_fails(&[&base[..], &["--keepalive=soon"]].concat()).await?;
    ensure!(code == Some(2), "exit {code:?}, stderr:\n{stderr}");
    ensure!(stderr.contains("--keepalive"), "{stderr}");
    ensure!(stderr.contains("not a duration"), "{stderr}");

    let (code, stderr) = agent_fails(&[&base[..], &["--logtostderr=maybe"]].concat()).await?;
    ensure!(code == Some(2), "exit {code:?}, stderr:\n{stderr}");
    ensure!(stderr.contains("--logtostderr"), "{stderr}");

    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("no-such-dir").join("agent.log");
    let log_file = format!("--log-file={}", missing.display());
    let (code, stderr) =
        agent_fails(&[&base[..], &["--logtostderr=false", &log_file]].concat()).await?;
    ensure!(code == Some(2), "exit {code:?}, stderr:\n{stderr}");
    ensure!(stderr.contains("--log-file"), "{stderr}");
    Ok(())
}

// The proxy's literal line from KubeSphere's manifests,
// `proxy --ca-cert=/ca.crt --ca-key=/ca.key --v=4 --leader-elect=true`, goes
// here once the proxy takes tunnel::cli's flags; it needs a kube-apiserver
// (KubeCluster::start), unlike the tests above.
