//! The one-line join (issue #16, part 2): `proxy join-command --cluster beta
//! --create` against the host prints a manifest; `kubectl apply -f -` of it
//! on the member passes the real apiserver; the agent it describes, run as
//! the kubelet would run its container, joins, and `kubectl get clusters`
//! on the host shows beta available with a kubeconfig that works.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_manifest_joins_a_member() -> Result<()> {
    let tower = Tower::start_with(TowerOptions {
        kubelet: false,
        ..Default::default()
    })
    .await?;
    let address = format!("127.0.0.1:{}", tower.proxy_port());

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

    // The harness runs no kubelet for Deployments: run the container's command
    // as one would, with the pod's files and service address swapped for local
    // ones (the token Secret's value in a file, the member's address, its
    // kubeconfig standing in for the service account).
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
    let secret: Value = serde_json::from_str(&tower.member().kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "secret",
        "tower-agent-token",
        "-o",
        "json",
    ]))?;
    let token = b64_decode(
        secret["data"]["token"]
            .as_str()
            .context("no token in the Secret")?,
    )?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token)?;
    let member_addr = tower.member().server_addr()?;
    let args: Vec<String> = command[1..]
        .iter()
        .map(|a| match a.as_str() {
            "/etc/tower/token" => token_file.display().to_string(),
            "kubernetes.default.svc:443" => member_addr.clone(),
            other => other.to_string(),
        })
        .collect();
    let mut agent = Command::new(bin("agent"));
    agent
        .args(&args)
        .arg("--kubeconfig")
        .arg(tower.member().kubeconfig());
    clean_env(&mut agent);
    let agent = Proc::spawn("beta-agent", agent)?;

    // Back on the host: beta is available and its kubeconfig works.
    let host = tower.host();
    let kubeconfig = wait_for_ok(DEADLINE, || async {
        let c: Value =
            serde_json::from_str(&host.kubectl_ok(&["get", "cluster", "beta", "-o", "json"]))?;
        let available = c["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True");
        let kubeconfig = c["spec"]["connection"]["kubeconfig"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            available && !kubeconfig.is_empty(),
            "beta is not available yet"
        );
        Ok(kubeconfig.to_string())
    })
    .await
    .with_context(|| {
        format!(
            "beta never became available; its agent said:\n{}",
            agent.tail(20)
        )
    })?;
    let config_beta = dir.path().join("config_beta");
    std::fs::write(&config_beta, b64_decode(&kubeconfig)?)?;
    let config_beta = config_beta.display().to_string();
    let through = host.kubectl_ok(&[
        "--kubeconfig",
        &config_beta,
        "get",
        "ns",
        "kube-system",
        "-o",
        "name",
    ]);
    ensure!(through.contains("namespace/kube-system"), "{through}");
    let listed = host.kubectl_ok(&["get", "clusters"]);
    ensure!(listed.contains("beta"), "{listed}");
    Ok(())
}
