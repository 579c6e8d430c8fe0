//! The one-line join (issue #16, part 2): `proxy join-command --cluster beta
//! --create` against the host prints a manifest; `kubectl apply -f -` of it
//! on the member passes the real apiserver; the agent it describes, run as
//! the kubelet would run its container, joins, and `kubectl get clusters`
//! on the host shows beta available with a kubeconfig that works. And
//! `--register`: a bootstrap token made on the host, a member that registers
//! itself with it (docs/registration.md).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{Proc, Tower, TowerOptions, bin, clean_env, run_agent_like_a_kubelet, wait_for_ok};
use tokio::process::Command;

const DEADLINE: Duration = Duration::from_secs(60);

async fn join_command(tower: &Tower, args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = Command::new(bin("proxy"));
    cmd.arg("join-command")
        .arg("--kubeconfig")
        .arg(tower.host().kubeconfig())
        .args(args);
    clean_env(&mut cmd);
    cmd.output().await.context("running proxy join-command")
}

/// Joined: Cluster `name` available, its kubeconfig works.
async fn works(tower: &Tower, name: &str, agent: &Proc, dir: &Path) -> Result<()> {
    tower.host().prove_joined(name, agent, dir, DEADLINE).await
}

/// A proxy and agent for alpha, and `host:port` of the agents' endpoint.
async fn start() -> Result<(Tower, String)> {
    let tower = Tower::start_with(TowerOptions {
        kubelet: false,
        ..Default::default()
    })
    .await?;
    let address = format!("127.0.0.1:{}", tower.proxy_port());
    Ok((tower, address))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_manifest_joins_a_member() -> Result<()> {
    let (tower, address) = start().await?;

    // Without --create, a missing Cluster is named, with what to do.
    let missing = join_command(
        &tower,
        &["--cluster", "beta", "--publish-service-address", &address],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    ensure!(
        !missing.status.success()
            && stderr.contains("no Cluster beta")
            && stderr.contains("--create"),
        "join-command for a missing Cluster: {stderr}"
    );

    // The one line, on the host.
    let out = join_command(
        &tower,
        &[
            "--cluster",
            "beta",
            "--create",
            "--publish-service-address",
            &address,
        ],
    )
    .await?;
    ensure!(
        out.status.success(),
        "proxy join-command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = String::from_utf8(out.stdout).context("the manifest is not UTF-8")?;
    ensure!(
        manifest.contains(tower.fingerprint()),
        "the manifest does not pin the proxy's host key {}:\n{manifest}",
        tower.fingerprint()
    );

    // The other line, on the member: every object passes the real apiserver.
    let applied = tower.member().apply_manifest(&manifest).await?;
    for object in [
        "namespace/kubesphere-system",
        "serviceaccount/tower-agent",
        "secret/tower-agent-token",
        "deployment.apps/tower-agent",
    ] {
        ensure!(applied.contains(object), "{object} not applied:\n{applied}");
    }

    let dir = tempfile::tempdir()?;
    let token = tower.member().secret_token("tower-agent-token")?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token)?;
    let agent =
        run_agent_like_a_kubelet(tower.member(), &[("/etc/tower/token", &token_file)], &[])?;

    // Back on the host: beta is available and its kubeconfig works.
    let host = tower.host();
    works(&tower, "beta", &agent, dir.path()).await?;
    let listed = host.kubectl_ok(&["get", "clusters"]);
    ensure!(listed.contains("beta"), "{listed}");
    Ok(())
}

/// `join-command --register`: no Cluster yet; the host gets a bootstrap token
/// (auto-approved), the member's manifest an agent that registers with it,
/// and the Cluster appears with its token stored in the member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_registers_itself_from_the_printed_manifest() -> Result<()> {
    let (tower, address) = start().await?;

    // A flag of --register without it is refused before anything is made.
    let bad = join_command(&tower, &["--cluster", "gamma", "--auto-approve"]).await?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        bad.status.code() == Some(2) && stderr.contains("--register"),
        "--auto-approve without --register: {stderr}"
    );

    let out = join_command(
        &tower,
        &[
            "--register",
            "--auto-approve",
            "--cluster",
            "gamma",
            "--publish-service-address",
            &address,
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "join-command --register: {stderr}");
    ensure!(stderr.contains("created bootstrap token"), "{stderr}");
    let host = tower.host();
    let tokens: Value = serde_json::from_str(&host.kubectl_ok(&[
        "-n",
        "kube-system",
        "get",
        "secrets",
        "-l",
        "app=tower",
        "-o",
        "json",
    ]))?;
    let made = &tokens["items"][0];
    ensure!(
        made["type"] == "bootstrap.kubernetes.io/token"
            && made["metadata"]["annotations"]["tower.kubesphere.io/auto-approve"] == "true",
        "the bootstrap token's Secret: {made}"
    );
    let manifest = String::from_utf8(out.stdout).context("the manifest is not UTF-8")?;
    ensure!(
        manifest.contains(tower.fingerprint()) && !manifest.contains("--token-file"),
        "{manifest}"
    );

    let applied = tower.member().apply_manifest(&manifest).await?;
    for object in [
        "secret/tower-agent-bootstrap",
        "deployment.apps/tower-agent",
    ] {
        ensure!(applied.contains(object), "{object} not applied:\n{applied}");
    }
    let bootstrap = String::from_utf8(tower.member().secret_token("tower-agent-bootstrap")?)?;
    let agent = run_agent_like_a_kubelet(
        tower.member(),
        &[],
        &[("AGENT_BOOTSTRAP_TOKEN", &bootstrap)],
    )?;

    // The Cluster gamma was made by the registration, and works.
    let dir = tempfile::tempdir()?;
    works(&tower, "gamma", &agent, dir.path()).await?;
    // The member keeps gamma's own token, handed over the tunnel.
    let token = host.kubectl_ok(&[
        "get",
        "cluster",
        "gamma",
        "-o",
        "jsonpath={.spec.connection.token}",
    ]);
    let stored = wait_for_ok(DEADLINE, || async {
        let stored = String::from_utf8(tower.member().secret_token("tower-agent-token")?)?;
        ensure!(
            stored == token,
            "the member's Secret does not hold gamma's token yet"
        );
        Ok(stored)
    })
    .await?;
    ensure!(!stored.is_empty());
    Ok(())
}
