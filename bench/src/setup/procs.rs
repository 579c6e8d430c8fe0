//! Starting the bench's processes and reading what they log.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Proc, kubectl_binary};
use tokio::process::Command;

use super::Env;
use crate::tls::Pki;

/// Spawn `program args` quietly (its lines are collected for errors).
pub fn spawn(name: &str, program: &Path, args: &[String]) -> Result<Proc> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    spawn_command(name, cmd)
}

/// [`spawn`] for a command made already.
pub(super) fn spawn_command(name: &str, cmd: Command) -> Result<Proc> {
    let mut p = Proc::spawn_quiet(name, cmd)?;
    p.set_drop_grace(Duration::from_secs(3));
    Ok(p)
}

/// A field of a JSON log line (`fields.<name>`), as tracing's JSON format writes.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    match &v["fields"][name] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// From a starting proxy's JSON log (`--log-format=json`, one `--forward`):
/// its agents' address, its forward port and its host key fingerprint.
pub(super) async fn started_proxy(proxy: &Proc) -> Result<(SocketAddr, SocketAddr, String)> {
    let listening = proxy
        .wait_for_line(
            |l| log_message_is(l, "listening for agents"),
            Duration::from_secs(30),
        )
        .await?;
    let agents: SocketAddr = log_field(&listening, "addr").context("addr")?.parse()?;
    let fw = proxy
        .wait_for_line(
            |l| log_message_is(l, "forward listening"),
            Duration::from_secs(5),
        )
        .await?;
    let forward: SocketAddr = log_field(&fw, "addr").context("addr")?.parse()?;
    let fingerprint = proxy
        .lines()
        .iter()
        .find_map(|l| log_field(l, "fingerprint"))
        .context("no host key fingerprint in the proxy's log")?;
    Ok((agents, forward, fingerprint))
}

pub fn log_message_is(line: &str, message: &str) -> bool {
    log_field(line, "message").is_some_and(|m| m == message)
}

/// Run kubectl with `kubeconfig`; stdout on success.
pub async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The upstream HTTPS server, in a process of its own (`bench upstream`).
pub struct Upstream {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Upstream {
    pub async fn start(env: &Env, pki: &Pki) -> Result<Upstream> {
        let cert = env.work.join("upstream.crt");
        let key = env.work.join("upstream.key");
        std::fs::write(&cert, &pki.server_cert_pem)?;
        std::fs::write(&key, &pki.server_key_pem)?;
        let me = std::env::current_exe().context("the bench binary's path")?;
        let proc = spawn(
            "upstream",
            &me,
            &[
                "upstream".into(),
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ],
        )?;
        let line = proc
            .wait_for_line(|l| l.starts_with("listening "), Duration::from_secs(10))
            .await?;
        let addr = line["listening ".len()..].trim().parse()?;
        Ok(Upstream { addr, proc })
    }
}
