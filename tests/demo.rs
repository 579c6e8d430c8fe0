//! `make demo`, the first thing a new user runs: `hack/demo.sh` starts two
//! real kube-apiservers and the proxy, joins the member with the line
//! `proxy join-command --cluster alpha --create` prints (applied with
//! kubectl, the agent run with the applied Deployment's command line), and
//! reaches the member through the kubeconfig in the Cluster. Then
//! `hack/demo-down.sh` stops every process it started.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{clean_env, free_port, kubectl_binary, wait_until, workspace_root};
use tokio::process::Command;

/// Runs `hack/demo-down.sh` for `dir` when dropped, so a failing test
/// leaves no apiserver, proxy or agent behind.
struct Down<'a> {
    dir: &'a Path,
    config: &'a Path,
}

impl Down<'_> {
    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(workspace_root().join("hack/demo-down.sh"));
        cmd.env("DEMO_DIR", self.dir)
            .env("DEMO_CONFIG", self.config);
        cmd
    }
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = self.command().output();
    }
}

/// The pids `hack/demo.sh` recorded, by name.
fn pids(dir: &Path) -> Result<Vec<(String, i32)>> {
    let mut pids = Vec::new();
    for name in ["host", "member", "proxy", "agent"] {
        let file = dir.join(format!("{name}.pid"));
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("the demo recorded no {}", file.display()))?;
        pids.push((name.to_string(), text.trim().parse()?));
    }
    Ok(pids)
}

/// Running, not a zombie (the demo's processes outlive the script that
/// started them, and whoever adopts them may reap them late).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, after_name) = stat.rsplit_once(')')?;
            after_name
                .split_whitespace()
                .next()
                .map(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_demo_joins_the_member_with_the_printed_line_and_demo_down_stops_it() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("demo");
    let config = tmp.path().join("config_alpha");
    let down = Down {
        dir: &dir,
        config: &config,
    };

    let mut demo = Command::new(workspace_root().join("hack/demo.sh"));
    clean_env(&mut demo);
    demo.env("DEMO_DIR", &dir)
        .env("DEMO_CONFIG", &config)
        .env("PROXY_PORT", free_port().to_string())
        .env("KUBECTL", kubectl_binary())
        .env_remove("KUBECONFIG");
    let out = demo.output().await.context("running hack/demo.sh")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "hack/demo.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The one line did the join: its manifest went to the member.
    for step in ["proxy join-command", "deployment.apps/tower-agent created"] {
        ensure!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }
    // The kubeconfig the proxy wrote into the Cluster reaches the member
    // (only the member has namespace only-in-member).
    let through = std::process::Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(&config)
        .args(["get", "ns", "only-in-member", "-o", "name"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&through.stdout).trim() == "namespace/only-in-member",
        "kubectl through the tunnel: {}",
        String::from_utf8_lossy(&through.stderr)
    );

    let running = pids(&dir)?;
    for (name, pid) in &running {
        ensure!(alive(*pid), "the demo's {name} is not running");
    }
    let stopped = down.command().output()?;
    ensure!(stopped.status.success(), "hack/demo-down.sh failed");
    for (name, pid) in running {
        wait_until(Duration::from_secs(30), || async { !alive(pid) })
            .await
            .with_context(|| format!("the demo's {name} still runs after demo-down"))?;
    }
    ensure!(!config.exists(), "demo-down left alpha's kubeconfig");
    Ok(())
}
