//! The one-line join (issue #16, part 2): `proxy join-command --cluster beta
//! --create` against the host prints a manifest; `kubectl apply -f -` of it
//! on the member passes the real apiserver; the agent it describes, run as
//! the kubelet would run its container, joins, and `kubectl get clusters`
//! on the host shows beta available with a kubeconfig that works. And
//! `--register`: a bootstrap token made on the host, a member that registers
//! itself with it (docs/registration.md).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{Proc, Tower, TowerOptions, bin, clean_env, kubectl_binary, wait_for_ok};
use tokio::io::AsyncWriteExt as _;
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

async fn apply_on_member(tower: &Tower, manifest: &str) -> Result<String> {
    let mut child = Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(tower.member().kubeconfig())
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl apply")?;
    let mut stdin = child.stdin.take().context("kubectl's stdin")?;
    stdin.write_all(manifest.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "kubectl apply of the join manifest failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn b64_decode(text: &str) -> Result<Vec<u8>> {
    let out = std::process::Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .map(|mut s| s.write_all(text.as_bytes()))
                .transpose()?;
            child.wait_with_output()
        })
        .context("running base64 -d")?;
    ensure!(out.status.success(), "base64 -d failed");
    Ok(out.stdout)
}

/// Key `token` of Secret `kubesphere-system/<name>` on the member.
fn member_secret(tower: &Tower, name: &str) -> Result<Vec<u8>> {
    let secret: Value = serde_json::from_str(&tower.member().kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "secret",
        name,
        "-o",
        "json",
    ]))?;
    b64_decode(
        secret["data"]["token"]
            .as_str()
            .with_context(|| format!("no token in Secret {name}"))?,
    )
}

/// The harness runs no kubelet for Deployments: run the applied agent
/// Deployment's command as one would, with the pod's files (`files`: path
/// in the pod, local stand-in) and service address swapped for local ones,
/// the member's kubeconfig standing in for the service account, and `env`.
fn run_like_a_kubelet(
    tower: &Tower,
    files: &[(&str, &std::path::Path)],
    env: &[(&str, &str)],
) -> Result<Proc> {
    let deploy: Value = serde_json::from_str(&tower.member().kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "deploy",
        "tower-agent",
        "-o",
        "json",
    ]))?;
    let command: Vec<String> = deploy["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_array()
        .context("the Deployment has no command")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    ensure!(
        command.first().map(String::as_str) == Some("/bin/agent"),
        "{command:?}"
    );
    let member_addr = tower.member().server_addr()?;
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| match files.iter().find(|(pod, _)| pod == a) {
            Some((_, local)) => local.display().to_string(),
            None if a == "kubernetes.default.svc:443" => member_addr.clone(),
            None => a.clone(),
        })
        .collect();
    let mut agent = Command::new(bin("agent"));
    agent
        .args(&args)
        .arg("--kubeconfig")
        .arg(tower.member().kubeconfig());
    clean_env(&mut agent);
    agent.envs(env.iter().copied());
    Proc::spawn("member-agent", agent)
}

/// Wait until Cluster `name` is AgentAvailable (the agent's last words when
/// it never is), then list the member's kube-system through its kubeconfig
/// (written to `dir`), as a user would.
async fn works(tower: &Tower, name: &str, agent: &Proc, dir: &Path) -> Result<()> {
    let kubeconfig = tower
        .host()
        .available_kubeconfig(name, DEADLINE)
        .await
        .with_context(|| format!("its agent said:\n{}", agent.tail(20)))?;
    let path = dir.join(format!("config_{name}"));
    std::fs::write(&path, kubeconfig)?;
    let through = tower.host().kubectl_ok(&[
        "--kubeconfig",
        &path.display().to_string(),
        "get",
        "ns",
        "kube-system",
        "-o",
        "name",
    ]);
    ensure!(through.contains("namespace/kube-system"), "{through}");
    Ok(())
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
    let applied = apply_on_member(&tower, &manifest).await?;
    for object in [
        "namespace/kubesphere-system",
        "serviceaccount/tower-agent",
        "secret/tower-agent-token",
        "deployment.apps/tower-agent",
    ] {
        ensure!(applied.contains(object), "{object} not applied:\n{applied}");
    }

    let dir = tempfile::tempdir()?;
    let token = member_secret(&tower, "tower-agent-token")?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token)?;
    let agent = run_like_a_kubelet(&tower, &[("/etc/tower/token", &token_file)], &[])?;

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

    let applied = apply_on_member(&tower, &manifest).await?;
    for object in [
        "secret/tower-agent-bootstrap",
        "deployment.apps/tower-agent",
    ] {
        ensure!(applied.contains(object), "{object} not applied:\n{applied}");
    }
    let bootstrap = String::from_utf8(member_secret(&tower, "tower-agent-bootstrap")?)?;
    let agent = run_like_a_kubelet(&tower, &[], &[("AGENT_BOOTSTRAP_TOKEN", &bootstrap)])?;

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
        let stored = String::from_utf8(member_secret(&tower, "tower-agent-token")?)?;
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
