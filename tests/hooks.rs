//! Agent hooks (issue #11 part 5) with real processes: `bin/agent
//! --pre-start-hook --post-start-hook --hook-timeout`.
//!
//! - A pre-start hook's credentials are the ones the proxy uses: the hook mints
//!   a token of ServiceAccount `hooked`, which may only list namespaces, and
//!   kubectl through the proxy's per-cluster port lists namespaces but gets
//!   the member's 403 naming `system:serviceaccount:default:hooked` for pods.
//! - A failing pre-start hook is retried with the backoff; a hanging one is
//!   killed at `--hook-timeout` (with its children) and the agent retries.
//! - The post-start hook gets the connection in its environment, and its
//!   failure does not touch the tunnel.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Proc, Tower, TowerOptions, bin, clean_env, kubectl_binary, log_field, wait_until};
use tokio::process::Command;

const SOON: Duration = Duration::from_secs(60);
const TOKEN: &str = "e2e-hooks-7c1d9e3b5a7f9c1e3d5b7a9f1c3e5d7b";

/// An executable shell script.
fn script(path: &Path, body: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.display().to_string())
}

#[tokio::test]
async fn the_proxy_uses_the_pre_start_hooks_credentials() -> Result<()> {
    let mut tower = Tower::start_with(TowerOptions {
        kubelet: false,
        ..TowerOptions::default()
    })
    .await?;
    let member = tower.member();
    member.kubectl_ok(&["create", "serviceaccount", "hooked", "-n", "default"]);
    member.kubectl_ok(&[
        "create",
        "clusterrole",
        "namespace-lister",
        "--verb=list",
        "--resource=namespaces",
    ]);
    member.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "hooked-lists-namespaces",
        "--clusterrole=namespace-lister",
        "--serviceaccount=default:hooked",
    ]);
    // The README's example hook, with this member's kubeconfig.
    let hook = script(
        &tower.dir().join("pre-start.sh"),
        &format!(
            "set -eu\n\
             token=$('{kubectl}' --kubeconfig '{kc}' create token hooked -n default --duration 10m)\n\
             printf '{{\"bearerToken\": \"%s\"}}\\n' \"$token\"",
            kubectl = kubectl_binary().display(),
            kc = member.kubeconfig().display(),
        ),
    )?;
    tower
        .restart_agent(&["--pre-start-hook", &hook, "--hook-timeout=20s"])
        .await?;
    let line = tower
        .agent()
        .wait_for_line(|l| l.contains("pre-start hook set credentials"), SOON)
        .await?;
    assert_eq!(log_field(&line, "fields").as_deref(), Some("bearerToken"));

    // The proxy may still hold the old agent's session for a moment: wait
    // for the answer only the hooked token can get.
    let hooked = "system:serviceaccount:default:hooked";
    wait_until(SOON, || async {
        let out = tower.kubectl(&["get", "pods", "-A"]).await;
        out.is_ok_and(|o| {
            let err = String::from_utf8_lossy(&o.stderr);
            !o.status.success() && err.contains("(Forbidden)") && err.contains(hooked)
        })
    })
    .await
    .context("kubectl get pods through the proxy never got the member's 403 for `hooked`")?;
    let ns = tower.kubectl_ok(&["get", "ns", "-o", "name"]).await?;
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    let out = tower.kubectl(&["create", "ns", "not-allowed"]).await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(hooked), "{err}");
    // Tokens are JWTs ("eyJ..."); none in the agent's logs.
    assert!(!tower.agent().lines().iter().any(|l| l.contains("eyJ")));
    Ok(())
}

/// `bin/proxy` without Kubernetes (cluster alpha from a file); its agents' URL.
async fn static_proxy(dir: &Path) -> Result<(Proc, String)> {
    let clusters = dir.join("clusters.json");
    std::fs::write(&clusters, format!(r#"{{"alpha": "{TOKEN}"}}"#))?;
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--clusters-file"])
        .arg(&clusters)
        .arg("--data-dir")
        .arg(dir.join("data"));
    clean_env(&mut cmd);
    let proxy = Proc::spawn("proxy", cmd)?;
    let line = proxy
        .wait_for_line(|l| l.contains("listening for agents"), SOON)
        .await?;
    let addr = log_field(&line, "addr").context("no addr= in the listening line")?;
    Ok((proxy, format!("http://{addr}")))
}

/// An agent of alpha with `hook_args`, retrying every second at most.
fn agent(proxy: &str, hook_args: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(bin("agent"));
    cmd.args(["--name=alpha", &format!("--token={TOKEN}")])
        .arg(format!("--proxy-server={proxy}"))
        .args([
            "--kubernetes-service=127.0.0.1:9",
            "--kubesphere-service=127.0.0.1:9",
        ])
        .arg("--max-retry-interval=1s")
        .args(hook_args);
    clean_env(&mut cmd);
    Proc::spawn("agent", cmd)
}

fn count(agent: &Proc, text: &str) -> usize {
    agent.lines().iter().filter(|l| l.contains(text)).count()
}

#[tokio::test]
async fn a_failing_hook_is_retried_and_the_post_start_hook_sees_the_connection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_proxy, url) = static_proxy(dir.path()).await?;
    let runs = dir.path().join("runs");
    let pre = script(
        &dir.path().join("pre.sh"),
        &format!(
            "echo run >> '{}'\n\
             if [ \"$TOWER_ATTEMPT\" -le 2 ]; then echo \"not ready ($TOWER_ATTEMPT)\" >&2; exit 1; fi",
            runs.display()
        ),
    )?;
    let env_file = dir.path().join("post-start.env");
    // Fails after writing its environment: only logged.
    let post = script(
        &dir.path().join("post.sh"),
        &format!(
            "env | grep '^TOWER_' > '{f}.tmp' && mv '{f}.tmp' '{f}'; exit 7",
            f = env_file.display()
        ),
    )?;
    let agent = agent(
        &url,
        &["--pre-start-hook", &pre, "--post-start-hook", &post],
    )?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    assert_eq!(count(&agent, "pre-start hook failed"), 2);
    assert_eq!(
        count(&agent, "not ready ("),
        2,
        "the hook's stderr is logged"
    );
    assert_eq!(std::fs::read_to_string(&runs)?.lines().count(), 3);
    assert_eq!(count(&agent, "pre-start hook printed nothing"), 1);

    wait_until(SOON, || async { env_file.exists() }).await?;
    let env = std::fs::read_to_string(&env_file)?;
    for expected in [
        "TOWER_CLUSTER=alpha",
        "TOWER_EVENT=post-start",
        "TOWER_ATTEMPT=3",
        &format!("TOWER_PROXY=ws{}/", url.trim_start_matches("http")),
    ] {
        assert!(
            env.lines().any(|l| l == expected),
            "{expected} not in {env}"
        );
    }
    agent
        .wait_for_line(|l| l.contains("post-start hook failed"), SOON)
        .await?;
    assert_eq!(count(&agent, "tunnel lost"), 0);
    Ok(())
}

/// True while `pid` runs (a zombie does not count).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_hanging_hook_is_killed_at_its_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_proxy, url) = static_proxy(dir.path()).await?;
    let pid_file = dir.path().join("sleep.pid");
    // The first attempt hangs in a child of the hook; later ones print nothing.
    let pre = script(
        &dir.path().join("pre.sh"),
        &format!(
            "if [ \"$TOWER_ATTEMPT\" = 1 ]; then sleep 1000 & echo $! > '{f}.tmp'; mv '{f}.tmp' '{f}'; wait; fi",
            f = pid_file.display()
        ),
    )?;
    let agent = agent(&url, &["--pre-start-hook", &pre, "--hook-timeout=2s"])?;
    let line = agent
        .wait_for_line(|l| l.contains("pre-start hook failed"), SOON)
        .await?;
    assert!(
        line.contains("did not finish within 2s and was killed"),
        "{line}"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    wait_until(SOON, || async { !running(pid) })
        .await
        .with_context(|| format!("the hook's sleep ({pid}) survived its timeout"))?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    ensure!(count(&agent, "pre-start hook failed") == 1);
    Ok(())
}
