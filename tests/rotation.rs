//! Token rotation without a gap (issue #13, part 2) on real apiservers, with
//! the real kubectl and a Go Tower agent (docs/token-rotation.md).
//!
//! - `kubectl annotate cluster ... tower.kubesphere.io/rotate-token=...` with
//!   a grace period: kubectl through the Cluster's kubeconfig (requests in a
//!   loop, a `get -w` and an `exec -i`) never fails, our agent is handed the new token,
//!   stores it in its member Secret and reconnects with it; a Go Tower agent
//!   (which cannot be told) keeps working until the grace ends, is then
//!   closed, and the previous token is refused from then on.
//! - Writing `spec.connection.token` directly revokes at once, also while a
//!   rotation's grace period runs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::{
    CLUSTER, KubeCluster, Proc, Stream, Tower, TowerOptions, bin, clean_env, kubectl_binary,
    log_field, wait_for_ok, wait_until,
};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Command;

const DEADLINE: Duration = Duration::from_secs(120);
/// Where our agent keeps a handed token in the member (`--token-secret`).
const TOKEN_NS: &str = "kubesphere-system";
const TOKEN_SECRET: &str = "tower-agent-token";
/// The cluster a Go Tower agent serves (alpha is our agent's).
const BETA: &str = "beta";

const ROTATE: &str = "tower.kubesphere.io/rotate-token";
const GRACE: &str = "tower.kubesphere.io/token-grace";
const UNTIL: &str = "tower.kubesphere.io/previous-token-until";

fn cluster(host: &KubeCluster, name: &str) -> Result<Value> {
    let text = host.kubectl_ok(&["get", "cluster", name, "-o", "json"]);
    serde_json::from_str(&text).context("parsing the Cluster")
}

fn token_of(host: &KubeCluster, name: &str) -> Result<String> {
    let c = cluster(host, name)?;
    let token = c["spec"]["connection"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(!token.is_empty(), "Cluster {name} has no token yet");
    Ok(token)
}

/// Ask for a rotation of `name`'s token with `grace`; returns the new token
/// once the proxy wrote it.
async fn rotate(host: &KubeCluster, name: &str, value: &str, grace: &str) -> Result<String> {
    let old = token_of(host, name)?;
    host.kubectl_ok(&[
        "annotate",
        "--overwrite",
        "cluster",
        name,
        &format!("{ROTATE}={value}"),
        &format!("{GRACE}={grace}"),
    ]);
    let new = wait_for_ok(DEADLINE, || async {
        let token = token_of(host, name)?;
        ensure!(token != old, "Cluster {name}'s token is not rotated yet");
        Ok(token)
    })
    .await?;
    let c = cluster(host, name)?;
    let annotations = c["metadata"]["annotations"].to_string();
    ensure!(
        !annotations.contains(&old) && !annotations.contains(&new),
        "a token is written in the annotations: {annotations}"
    );
    ensure!(
        c["metadata"]["annotations"][UNTIL].is_string(),
        "no {UNTIL}: {annotations}"
    );
    Ok(new)
}

/// Wait until the grace period of `name`'s previous token is over.
async fn grace_over(host: &KubeCluster, name: &str) -> Result<()> {
    let c = cluster(host, name)?;
    let until: jiff::Timestamp = c["metadata"]["annotations"][UNTIL]
        .as_str()
        .with_context(|| format!("Cluster {name} has no {UNTIL}"))?
        .parse()?;
    wait_until(DEADLINE, || async { jiff::Timestamp::now() > until }).await
}

/// The token our agent stored in the member Secret, if any.
fn stored_token(member: &KubeCluster) -> Result<String> {
    let out = member.kubectl(&[
        "get",
        "secret",
        "-n",
        TOKEN_NS,
        TOKEN_SECRET,
        "-o",
        "jsonpath={.data.token}",
    ]);
    ensure!(
        out.status.success(),
        "no Secret {TOKEN_NS}/{TOKEN_SECRET} yet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = B64.decode(String::from_utf8_lossy(&out.stdout).trim())?;
    Ok(String::from_utf8(bytes)?)
}

/// The member's address, CA, client certificate and key (files), as a Go
/// agent sends them.
struct MemberAccess {
    server: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn member_access(member: &KubeCluster, dir: &Path) -> Result<MemberAccess> {
    let view: Value = serde_json::from_str(
        &member.kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"]),
    )?;
    let server = view["clusters"][0]["cluster"]["server"]
        .as_str()
        .and_then(|s| s.strip_prefix("https://"))
        .context("the member's server")?
        .to_string();
    let file = |name: &str, value: &Value| -> Result<PathBuf> {
        let text = value
            .as_str()
            .with_context(|| format!("no {name} in the member's kubeconfig"))?;
        let path = dir.join(name);
        std::fs::write(&path, B64.decode(text)?)?;
        Ok(path)
    };
    Ok(MemberAccess {
        server,
        ca: file(
            "member-ca.pem",
            &view["clusters"][0]["cluster"]["certificate-authority-data"],
        )?,
        cert: file(
            "member-cert.pem",
            &view["users"][0]["user"]["client-certificate-data"],
        )?,
        key: file(
            "member-key.pem",
            &view["users"][0]["user"]["client-key-data"],
        )?,
    })
}

/// A Go Tower agent for cluster `name` with `token`, reaching the member.
fn go_agent(tower: &Tower, access: &MemberAccess, name: &str, token: &str) -> Result<Proc> {
    let mut cmd = Command::new(bin("go-agent"));
    cmd.args([
        "--proxy-server",
        &format!("http://127.0.0.1:{}", tower.proxy_port()),
    ])
    .args(["--name", name, "--token", token])
    .args(["--kubernetes-service", &access.server])
    .args(["--kubesphere-service", "127.0.0.1:9"])
    .arg("--ca-data-file")
    .arg(&access.ca)
    .arg("--cert-data-file")
    .arg(&access.cert)
    .arg("--key-data-file")
    .arg(&access.key)
    .args(["--expect-host-key", tower.fingerprint()])
    .args(["--keepalive", "1s"]);
    clean_env(&mut cmd);
    Proc::spawn(&format!("go-agent-{name}"), cmd)
}

/// A Go agent with `token` for `name` is refused as unauthorized.
async fn refused(tower: &Tower, access: &MemberAccess, name: &str, token: &str) -> Result<()> {
    let mut agent = go_agent(tower, access, name, token)?;
    let status = agent.wait(DEADLINE).await?;
    ensure!(status.code() == Some(1), "go-agent exited with {status}");
    agent
        .wait_for_line(|l| l.starts_with("config rejected"), DEADLINE)
        .await?;
    let stderr = agent.stream_lines(Stream::Stderr);
    ensure!(
        stderr
            .iter()
            .any(|l| l == "config rejected: Unauthorized agent"),
        "go-agent's stderr: {stderr:#?}"
    );
    Ok(())
}

/// Cluster `name` on the host; its token once the proxy wrote it.
async fn create_cluster(host: &KubeCluster, name: &str, dir: &Path) -> Result<String> {
    let path = dir.join(format!("cluster-{name}.json"));
    let object = json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {"joinFederation": true, "connection": {"type": "proxy"}}
    });
    std::fs::write(&path, object.to_string())?;
    host.kubectl_ok(&["create", "-f", &path.display().to_string()]);
    wait_for_ok(DEADLINE, || async { token_of(host, name) }).await
}

/// Cluster `name`'s kubeconfig (written to `dir`) once the proxy published it.
async fn kubeconfig_of(host: &KubeCluster, name: &str, dir: &Path) -> Result<PathBuf> {
    let kubeconfig = wait_for_ok(DEADLINE, || async {
        let c = cluster(host, name)?;
        let kc = c["spec"]["connection"]["kubeconfig"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(!kc.is_empty(), "no kubeconfig for {name} yet");
        Ok(B64.decode(kc)?)
    })
    .await?;
    let path = dir.join(format!("config_{name}"));
    std::fs::write(&path, kubeconfig)?;
    Ok(path)
}

/// kubectl through `kubeconfig`, output whatever the status.
async fn kubectl_via(kubeconfig: &Path, args: &[&str]) -> Result<std::process::Output> {
    Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running kubectl")
}

/// kubectl requests through `kubeconfig`, one after the other, until `stop`:
/// (successes, failures with their stderr).
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(kubeconfig: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let task = tokio::spawn({
            let (stop, ok) = (stop.clone(), ok.clone());
            async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let args = ["get", "ns", "kube-system", "-o", "name"];
                    match kubectl_via(&kubeconfig, &args).await {
                        Ok(out) if out.status.success() => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(out) => failures.push(String::from_utf8_lossy(&out.stderr).into()),
                        Err(e) => failures.push(format!("{e:#}")),
                    }
                }
                failures
            }
        });
        Self { stop, ok, task }
    }

    fn successes(&self) -> u32 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Wait until `more` requests after now succeeded.
    async fn more(&self, more: u32) -> Result<()> {
        let target = self.successes() + more;
        wait_until(DEADLINE, || async { self.successes() >= target })
            .await
            .context("kubectl requests stopped succeeding")
    }

    async fn stop(self) -> Result<u32> {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.task.await?;
        ensure!(failures.is_empty(), "kubectl failed: {failures:#?}");
        Ok(self.ok.load(Ordering::SeqCst))
    }
}

/// `kubectl exec -i box -- cat` through alpha: lines go in and come back.
struct Exec {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: BufReader<tokio::process::ChildStdout>,
}

impl Exec {
    fn start(tower: &Tower) -> Result<Self> {
        let mut cmd = tower.kubectl_command();
        cmd.args(["exec", "-i", "box", "--", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning kubectl exec")?;
        let stdin = child.stdin.take().context("kubectl's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("kubectl's stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    async fn round_trip(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let mut back = String::new();
        let n = tokio::time::timeout(DEADLINE, self.stdout.read_line(&mut back))
            .await
            .context("no line back from kubectl exec")??;
        ensure!(n > 0, "kubectl exec's output ended");
        ensure!(back.trim_end() == line, "sent {line:?}, got {back:?}");
        Ok(())
    }

    /// EOF to cat; kubectl exec must end well.
    async fn finish(self) -> Result<()> {
        let Self {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .context("kubectl exec did not end after EOF")??;
        ensure!(status.success(), "kubectl exec ended with {status}");
        Ok(())
    }
}

/// Our agent stores handed tokens in the member: its namespace first.
async fn tower_with_token_secret(kubelet: bool) -> Result<Tower> {
    let mut tower = Tower::start_with(TowerOptions {
        kubelet,
        keepalive: Some("1s".into()),
        ..Default::default()
    })
    .await?;
    tower.member().kubectl_ok(&["create", "ns", TOKEN_NS]);
    let secret = format!("{TOKEN_NS}/{TOKEN_SECRET}");
    tower.restart_agent(&["--token-secret", &secret]).await?;
    Ok(tower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_with_a_grace_period_has_no_gap() -> Result<()> {
    let t0 = std::time::Instant::now();
    let tower = tower_with_token_secret(true).await?;
    let (host, member) = (tower.host(), tower.member());
    let access = member_access(member, tower.dir())?;
    member.run_pod("default", "box").await?;

    // beta: served by a Go Tower agent.
    let beta_old = create_cluster(host, BETA, tower.dir()).await?;
    let go_beta = go_agent(&tower, &access, BETA, &beta_old)?;
    go_beta
        .wait_for_line(|l| l == "connected", DEADLINE)
        .await?;
    let config_beta = kubeconfig_of(host, BETA, tower.dir()).await?;
    wait_for_ok(DEADLINE, || async {
        let out = kubectl_via(&config_beta, &["get", "ns", "default", "-o", "name"]).await?;
        ensure!(out.status.success(), "kubectl via beta: {out:?}");
        Ok(())
    })
    .await?;

    // kubectl through alpha the whole time: requests in a loop, and a watch.
    let traffic = Traffic::start(tower.config_alpha().to_path_buf());
    let mut watch_cmd = tower.kubectl_command();
    watch_cmd.args(["get", "ns", "-w", "-o", "name"]);
    let mut watch = Proc::spawn("kubectl-watch", watch_cmd)?;
    watch
        .wait_for_line(|l| l == "namespace/kube-system", DEADLINE)
        .await?;
    traffic.more(3).await?;
    let mut exec = Exec::start(&tower)?;
    exec.round_trip("before the rotation").await?;

    // Rotate both, with a short grace period.
    let alpha_old = token_of(host, CLUSTER)?;
    // alpha's grace is longer: it only has to outlast our agent storing the
    // token and reconnecting.
    let alpha_new = rotate(host, CLUSTER, "first", "20s").await?;
    let beta_new = rotate(host, BETA, "first", "5s").await?;

    // Our agent is told, stores the new token in the member and reconnects
    // with it, the old tunnel still serving.
    wait_for_ok(DEADLINE, || async {
        let stored = stored_token(member)?;
        ensure!(stored == alpha_new, "the member Secret holds another token");
        Ok(())
    })
    .await
    .context("the agent never stored the rotated token")?;
    tower
        .agent()
        .wait_for_line(|l| l.contains("connected with the new token"), DEADLINE)
        .await?;

    // The Go agent on beta cannot be told: the proxy closes it when the
    // grace period ends, not before.
    let closed = tower
        .proxy()
        .wait_for_line(
            |l| {
                l.contains("closing agent session")
                    && log_field(l, "cluster").as_deref() == Some(BETA)
            },
            DEADLINE,
        )
        .await?;
    ensure!(
        closed.contains("grace period is over"),
        "beta's Go agent was closed for another reason: {closed}"
    );
    go_beta
        .wait_for_line(|l| l.starts_with("go-agent: connection lost"), DEADLINE)
        .await?;
    // The previous tokens are refused from now on; beta's new one works.
    refused(&tower, &access, BETA, &beta_old).await?;
    grace_over(host, CLUSTER).await?;
    refused(&tower, &access, CLUSTER, &alpha_old).await?;
    let go_beta_new = go_agent(&tower, &access, BETA, &beta_new)?;
    go_beta_new
        .wait_for_line(|l| l == "connected", DEADLINE)
        .await?;
    wait_for_ok(DEADLINE, || async {
        let out = kubectl_via(&config_beta, &["get", "ns", "default", "-o", "name"]).await?;
        ensure!(out.status.success(), "kubectl via beta: {out:?}");
        Ok(())
    })
    .await?;

    // alpha: none of our agent's sessions was closed, kubectl kept working,
    // and the watch still delivers.
    ensure!(
        !tower.proxy().lines().iter().any(|l| {
            l.contains("closing agent session")
                && log_field(l, "cluster").as_deref() == Some(CLUSTER)
        }),
        "an alpha session was closed"
    );
    traffic.more(3).await?;
    member.kubectl_ok(&["create", "ns", "after-rotation"]);
    watch
        .wait_for_line(|l| l == "namespace/after-rotation", DEADLINE)
        .await
        .context("the watch started before the rotation stopped delivering")?;
    ensure!(watch.is_running(), "kubectl get -w ended");
    exec.round_trip("after the grace period").await?;
    exec.finish().await?;
    let requests = traffic.stop().await?;
    eprintln!(
        "rotation_with_a_grace_period_has_no_gap: {requests} kubectl requests, none failed, in {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writing_the_token_directly_revokes_at_once() -> Result<()> {
    let tower = tower_with_token_secret(false).await?;
    let (host, member) = (tower.host(), tower.member());
    let access = member_access(member, tower.dir())?;

    // A rotation whose grace period outlasts the test: a Go agent on the
    // previous token stays, our agent moves to the new one.
    let old = token_of(host, CLUSTER)?;
    let go = go_agent(&tower, &access, CLUSTER, &old)?;
    go.wait_for_line(|l| l == "connected", DEADLINE).await?;
    let new = rotate(host, CLUSTER, "before-revoke", "1h").await?;
    wait_for_ok(DEADLINE, || async {
        ensure!(stored_token(member)? == new, "not stored yet");
        Ok(())
    })
    .await?;
    tower
        .agent()
        .wait_for_line(|l| l.contains("connected with the new token"), DEADLINE)
        .await?;

    // A token written by hand: every session closes now, grace or not.
    let patch = json!({"spec": {"connection": {"token": "written-by-hand-0123456789"}}});
    host.kubectl_ok(&[
        "patch",
        "cluster",
        CLUSTER,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ]);
    go.wait_for_line(|l| l.starts_with("go-agent: connection lost"), DEADLINE)
        .await
        .context("the Go agent on the previous token was not closed")?;
    tower
        .proxy()
        .wait_for_line(
            |l| l.contains("closing agent session") && l.contains("the cluster's token changed"),
            DEADLINE,
        )
        .await?;
    // Our agent's sessions too: it is refused from now on, and kubectl
    // through alpha finds no agent.
    tower
        .agent()
        .wait_for_line(|l| l.contains("rejected by proxy"), DEADLINE)
        .await?;
    wait_until(DEADLINE, || async {
        tower
            .kubectl(&["get", "ns", "kube-system", "-o", "name"])
            .await
            .is_ok_and(|o| !o.status.success())
    })
    .await
    .context("kubectl through alpha still works after the token was revoked")?;
    // Neither the rotated token nor the one before it is accepted.
    refused(&tower, &access, CLUSTER, &old).await?;
    refused(&tower, &access, CLUSTER, &new).await?;
    Ok(())
}
