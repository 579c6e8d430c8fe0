//! SSH host key rotation (issue #13 part 3) as an operator does it, with
//! kubectl on the proxy's Secret: a next key is added (`ssh-host-key-next`),
//! the proxy announces it to the connected agents (`hostkeys-00@openssh.com`),
//! then the switch (the next key moved into `ssh-host-key`). Existing
//! sessions keep going; an agent pinned to {old, new} reconnects after the
//! switch, one pinned to the old key only is refused, with a message naming
//! the proxy's new fingerprint, and exits 1.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use e2e::k8s_openapi::serde_json::json;
use e2e::{Proc, Tower, bin};
use tokio::process::Command;

const SOON: Duration = Duration::from_secs(60);

/// `kubectl patch` the proxy's Secret with a merge patch of its `data`.
fn patch_secret(tower: &Tower, data: e2e::k8s_openapi::serde_json::Value) {
    let patch = json!({ "data": data }).to_string();
    tower.host().kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "patch",
        "secret",
        "tower-proxy",
        "--type",
        "merge",
        "-p",
        &patch,
    ]);
}

/// A second agent of alpha (same token), pinned to `pins` only.
fn agent_pinned(tower: &Tower, name: &str, pins: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(bin("agent"));
    cmd.args(["--name", e2e::CLUSTER])
        .arg("--token-file")
        .arg(tower.dir().join("alpha.token"))
        .arg("--proxy-server")
        .arg(format!("http://127.0.0.1:{}", tower.proxy_port()))
        .arg("--kubeconfig")
        .arg(tower.member().kubeconfig())
        .args(["--kubesphere-service", "127.0.0.1:9"]);
    for pin in pins {
        cmd.args(["--proxy-host-key-fingerprint", pin]);
    }
    Proc::spawn(name, cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_a_host_key_rotation_and_old_pins_are_refused() -> Result<()> {
    let mut tower = Tower::start().await?;
    let old = tower.fingerprint().to_string();
    let old_only = agent_pinned(&tower, "agent-old-only", &[&old])?;
    old_only
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;

    // 1. The next key, beside the current one: announced, not yet shown.
    let next = tunnel::ssh::generate_host_key()?;
    let new = tunnel::ssh::fingerprint(next.public_key());
    let next_pem = tunnel::ssh::encode_host_key(&next)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(next_pem);
    patch_secret(&tower, json!({ "ssh-host-key-next": b64 }));
    tower
        .proxy()
        .wait_for_line(|l| l.contains("next SSH host key added"), SOON)
        .await?;
    // The agent that will not follow hears of the key while connected, and warns.
    let warned = old_only
        .wait_for_line(|l| l.contains(&new) && l.contains("does not pin"), SOON)
        .await?;
    eprintln!("old-only agent: {warned}");

    // An agent pinned to both keys: told of both, both pinned.
    tower
        .restart_agent(&["--proxy-host-key-fingerprint", &new])
        .await?;
    tower
        .agent()
        .wait_for_line(
            |l| {
                l.contains(&new)
                    && l.contains("announced a host key")
                    && !l.contains("does not pin")
            },
            SOON,
        )
        .await?;

    // 2. The switch: new handshakes show the new key.
    patch_secret(
        &tower,
        json!({ "ssh-host-key": b64, "ssh-host-key-next": null }),
    );
    tower
        .proxy()
        .wait_for_line(|l| l.contains("SSH host key switched"), SOON)
        .await?;
    // Sessions made before it keep going.
    let out = tower
        .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
        .await?;
    ensure!(out.contains("kube-system"), "{out}");

    // A forced reconnect: pinned to {old, new}, the agent follows.
    tower
        .restart_agent(&["--proxy-host-key-fingerprint", &new])
        .await?;
    let out = tower
        .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
        .await?;
    ensure!(out.contains("kube-system"), "{out}");

    // Pinned to the old key only: refused, naming the proxy's fingerprint.
    drop(old_only);
    let mut refused = agent_pinned(&tower, "agent-old-only-again", &[&old])?;
    let status = refused.wait(SOON).await?;
    let line = refused
        .wait_for_line(|l| l.contains("--proxy-host-key-fingerprint pins"), SOON)
        .await
        .context("the refusal names the pins")?;
    ensure!(
        line.contains(&new) && line.contains(&old),
        "the refusal names the proxy's key {new} and the pinned {old}: {line}"
    );
    ensure!(status.code() == Some(1), "exit status {status}");
    Ok(())
}
