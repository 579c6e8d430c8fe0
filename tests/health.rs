//! Clusternet-style health in the Cluster status, end to end: a host and a
//! member cluster (real kube-apiservers), `bin/proxy` with a short
//! `--cluster-status-update-frequency`, `bin/agent` in the member.
//!
//! Once the agent is connected the Cluster shows `healthz`, `readyz` and
//! `livez` true (probed through the tunnel), the agent's `platform` and the
//! tunnel's round trip (`tunnelRTT`). The member's kube-apiserver stopped,
//! the tunnel stays but `readyz` turns false at a following refresh; the agent
//! stopped, the health goes (absent: nobody can tell) while `platform` stays.
//! That unchanged health does not write is shown by the unit tests of
//! `proxy/src/clusters/status`.
//!
//! Run: `cargo test -p e2e --release --test health` after `make build harness`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{CLUSTER, Tower, TowerOptions, wait_until};

/// The proxy's `--cluster-status-update-frequency` here.
const FREQUENCY: &str = "2s";
/// Deadlines: generous bounds (this machine is small and busy) for what
/// normally holds within one or two update periods.
const SETTLE: Duration = Duration::from_secs(60);
const CHANGE: Duration = Duration::from_secs(30);

/// `GOOS/GOARCH` of this machine, as the agent reports it.
fn expected_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// Cluster alpha's `status`, read with the real kubectl from the host.
fn status(tower: &Tower) -> Result<Value> {
    let out = tower
        .host()
        .kubectl(&["get", "cluster", CLUSTER, "-o", "json"]);
    ensure!(out.status.success(), "kubectl get cluster failed");
    let cluster: Value = serde_json::from_slice(&out.stdout).context("cluster JSON")?;
    Ok(cluster["status"].clone())
}

/// Waits until `cond` holds for alpha's status; on timeout says what it was.
async fn wait_status(
    tower: &Tower,
    what: &str,
    deadline: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let waited = wait_until(deadline, || async {
        status(tower).map(|s| cond(&s)).unwrap_or(false)
    })
    .await;
    let last = status(tower)?;
    waited.with_context(|| format!("{what}; last status: {last:#}"))?;
    Ok(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_member_health_platform_and_rtt() -> Result<()> {
    let mut tower = Tower::start_with(TowerOptions {
        kubelet: false,
        proxy_args: vec![format!("--cluster-status-update-frequency={FREQUENCY}")],
        ..Default::default()
    })
    .await?;
    let platform = expected_platform();

    let up = wait_status(&tower, "health, platform and RTT", SETTLE, |s| {
        s["healthz"] == true
            && s["readyz"] == true
            && s["livez"] == true
            && s["platform"] == platform.as_str()
            && s["tunnelRTT"].as_str().is_some_and(|t| !t.is_empty())
    })
    .await?;
    eprintln!("member up: tunnelRTT {}", up["tunnelRTT"]);

    // The member's kube-apiserver stops; its agent and the tunnel stay.
    tower
        .member_mut()
        .terminate(Duration::from_secs(10))
        .await
        .context("stopping the member's kube-apiserver")?;
    let down = wait_status(&tower, "readyz false", CHANGE, |s| s["readyz"] == false).await?;
    ensure!(
        down["healthz"] == false && down["livez"] == false,
        "an unreachable apiserver is neither healthy nor live: {down:#}"
    );
    ensure!(down["platform"] == platform.as_str(), "{down:#}");

    // The agent stops: nobody can tell the member's health any more.
    tower
        .agent_mut()
        .terminate(Duration::from_secs(10))
        .await
        .context("stopping the agent")?;
    let gone = wait_status(&tower, "health removed", CHANGE, |s| {
        s.get("readyz").is_none() && s.get("tunnelRTT").is_none()
    })
    .await?;
    ensure!(
        gone.get("healthz").is_none() && gone.get("livez").is_none(),
        "{gone:#}"
    );
    // The last thing known of the agent stays, like the Kubernetes version.
    ensure!(gone["platform"] == platform.as_str(), "{gone:#}");
    Ok(())
}
