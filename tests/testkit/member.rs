//! A member joined the way a user joins one: a manifest applied with
//! `kubectl apply -f -`, and the agent Deployment it describes run as the
//! kubelet would run its container (the harness runs no kubelet for
//! Deployments). Used by tests/join.rs and tests/helm.rs.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::serde_json::{self, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::cluster::KubeCluster;
use crate::env::clean_env;
use crate::paths::{bin, kubectl_binary};
use crate::proc::Proc;
use crate::tower::b64_decode;

impl KubeCluster {
    /// `kubectl apply -f -` of `manifest`; fails with kubectl's stderr
    /// unless it exits 0. Returns kubectl's stdout (`<kind>/<name> created`).
    pub async fn apply_manifest(&self, manifest: &str) -> Result<String> {
        let mut child = Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running kubectl apply")?;
        let mut stdin = child.stdin.take().context("kubectl's stdin")?;
        stdin.write_all(manifest.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        ensure!(
            out.status.success(),
            "kubectl apply on cluster {:?} failed:\n{}",
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl <args>` with `input` on stdin, blocking like
    /// [`KubeCluster::kubectl`]; stdout, or an error with kubectl's stderr
    /// unless it exits 0.
    pub fn kubectl_input(&self, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(kubectl_binary())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning kubectl")?;
        let mut stdin = child.stdin.take().context("kubectl's stdin")?;
        // A kubectl that exits early closes its stdin: its stderr says why.
        let _ = stdin.write_all(input.as_bytes());
        drop(stdin);
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl {} on cluster {:?} failed ({}):\n{}",
            args.join(" "),
            self.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Key `token` of Secret `kubesphere-system/<name>`, decoded.
    pub fn secret_token(&self, name: &str) -> Result<Vec<u8>> {
        let secret: Value = serde_json::from_str(&self.kubectl_ok(&[
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

    /// The command of the first container of Deployment
    /// `kubesphere-system/<name>`, as applied.
    pub fn deployment_command(&self, name: &str) -> Result<Vec<String>> {
        let deploy: Value = serde_json::from_str(&self.kubectl_ok(&[
            "-n",
            "kubesphere-system",
            "get",
            "deploy",
            name,
            "-o",
            "json",
        ]))?;
        Ok(
            deploy["spec"]["template"]["spec"]["containers"][0]["command"]
                .as_array()
                .with_context(|| format!("Deployment {name} has no command"))?
                .iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect(),
        )
    }

    /// On a host: wait until Cluster `name` is AgentAvailable (the agent's
    /// last words when it never is), then list the member's kube-system
    /// through the published kubeconfig (written to `dir`), as a user would.
    pub async fn prove_joined(
        &self,
        name: &str,
        agent: &Proc,
        dir: &Path,
        timeout: Duration,
    ) -> Result<()> {
        let kubeconfig = self
            .available_kubeconfig(name, timeout)
            .await
            .with_context(|| format!("its agent said:\n{}", agent.tail(20)))?;
        let path = dir.join(format!("config_{name}"));
        std::fs::write(&path, kubeconfig)?;
        let through = self.kubectl_ok(&[
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
}

/// The harness runs no kubelet for Deployments: run the member's applied
/// Deployment `tower-agent` as one would, with the pod's files (`files`:
/// path in the pod, local stand-in) and service address swapped for local
/// ones, the member's kubeconfig standing in for the service account, and
/// `env`.
pub fn run_agent_like_a_kubelet(
    member: &KubeCluster,
    files: &[(&str, &Path)],
    env: &[(&str, &str)],
) -> Result<Proc> {
    let command = member.deployment_command("tower-agent")?;
    ensure!(
        command.first().map(String::as_str) == Some("/bin/agent"),
        "{command:?}"
    );
    let member_addr = member.server_addr()?;
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
        .arg(member.kubeconfig());
    clean_env(&mut agent);
    agent.envs(env.iter().copied());
    Proc::spawn("member-agent", agent)
}
