//! The path form (issue #12 part 3) with real processes: `bin/proxy
//! --cluster-ports none --access-port P`, 50 Clusters each with its own
//! `bin/agent` (all serving the one member kube-apiserver), and the real
//! kubectl with the kubeconfig each Cluster got. No per-cluster port or
//! Service exists; every kubeconfig's server is
//! `https://127.0.0.1:P/clusters/<name>` and works; a kubeconfig opens its
//! own cluster's path only (403, audited); exec runs through the path form
//! (websocket and SPDY);
//! a deleted Cluster's path is a 404 that says so.
//!
//! Run: `make build harness && cargo test -p e2e --release --test paths`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{Tower, TowerOptions, audit_records, free_port, kubectl_binary, wait_until};
use nix::sys::signal::Signal;
use tokio::process::Command;

/// Clusters in all: alpha (from [`Tower`]) and 49 more.
const CLUSTERS: usize = 50;
/// kubectl processes at once on a small machine.
const PARALLEL: usize = 6;
const SOON: Duration = Duration::from_secs(60);

/// The real kubectl with `kubeconfig`; (success, stdout, stderr).
async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("spawning kubectl")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The `server` of a kubeconfig file.
fn server_of(kubeconfig: &Path) -> Result<String> {
    let text = std::fs::read_to_string(kubeconfig)?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .map(str::to_string)
        .with_context(|| format!("no server in {}", kubeconfig.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clusters_through_one_port_each_kubeconfig_its_own() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("tower-paths-").tempdir()?;
    let audit = dir.path().join("audit.log");
    let access = free_port();
    let tower = Tower::start_with(TowerOptions {
        proxy_args: vec![
            "--cluster-ports=none".into(),
            format!("--access-port={access}"),
            format!("--audit-log={}", audit.display()),
        ],
        kubelet: true,
        ..Default::default()
    })
    .await?;
    let base = format!("https://127.0.0.1:{access}/clusters");
    ensure!(tower.kube_port() == 0, "alpha got a port of its own");
    ensure!(server_of(tower.config_alpha())? == format!("{base}/alpha"));

    let names: Vec<String> = (1..CLUSTERS).map(|i| format!("c{i:02}")).collect();
    let mut joined = tower.join(&names).await?;
    let mut kubeconfigs: Vec<(String, PathBuf)> =
        vec![("alpha".into(), tower.config_alpha().into())];
    kubeconfigs.extend(
        joined
            .iter()
            .map(|j| (j.name.clone(), j.kubeconfig.clone())),
    );
    ensure!(kubeconfigs.len() == CLUSTERS);

    // No Service and no port of any cluster.
    let services = tower.host().kubectl_ok(&[
        "get",
        "services",
        "-A",
        "-l",
        "app.kubernetes.io/managed-by=tower-proxy",
        "-o",
        "name",
    ]);
    ensure!(services.trim().is_empty(), "Services were made: {services}");
    let ports: Vec<String> = tower
        .proxy()
        .lines()
        .into_iter()
        .filter(|l| l.contains("cluster proxy listening"))
        .collect();
    ensure!(ports.is_empty(), "per-cluster ports were opened: {ports:?}");

    // Each kubeconfig: the path form of its cluster, working with kubectl.
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut runs = tokio::task::JoinSet::new();
    for (name, kubeconfig) in kubeconfigs.clone() {
        let server = server_of(&kubeconfig)?;
        ensure!(server == format!("{base}/{name}"), "{name}: {server}");
        let limit = limit.clone();
        runs.spawn(async move {
            let _turn = limit.acquire_owned().await?;
            let (ok, out, err) =
                kubectl(&kubeconfig, &["get", "ns", "kube-system", "-o", "name"]).await?;
            ensure!(
                ok && out.trim() == "namespace/kube-system",
                "{name}: {out}{err}"
            );
            Ok::<_, anyhow::Error>(name)
        });
    }
    let mut reached = Vec::new();
    while let Some(run) = runs.join_next().await {
        reached.push(run??);
    }
    ensure!(reached.len() == CLUSTERS);

    // alpha's kubeconfig at c01's path: refused, saying why, and audited.
    let (ok, _, err) = kubectl(
        tower.config_alpha(),
        &["--server", &format!("{base}/c01"), "get", "ns"],
    )
    .await?;
    ensure!(!ok, "alpha's kubeconfig opened c01");
    ensure!(
        err.contains("issued for cluster \"alpha\"") && err.contains("not \"c01\""),
        "{err}"
    );
    let refused = || {
        audit_records(&audit)
            .into_iter()
            .find(|r| r["door"] == "path" && r["cluster"] == "c01" && r["status"] == 403)
    };
    wait_until(SOON, || async { refused().is_some() }).await?;
    let refused = refused().context("the refusal's line went away")?;
    ensure!(refused["caller"]["user"] == "tower:alpha", "{refused}");
    ensure!(
        refused["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/clusters/c01/")),
        "{refused}"
    );
    ensure!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("alpha")),
        "{refused}"
    );
    // Allowed requests are audited at the path door with the member's path.
    let listed = audit_records(&audit).into_iter().any(|r| {
        r["door"] == "path"
            && r["cluster"] == "c07"
            && r["status"] == 200
            && r["path"] == "/api/v1/namespaces/kube-system"
            && r["caller"]["user"] == "kubeconfig of c07"
    });
    ensure!(
        listed,
        "no audit line of c07's get:\n{}",
        std::fs::read_to_string(&audit)?
    );

    // An upgrade through the path form: exec on the kubelet stand-in.
    tower.member().run_pod("default", "box").await?;
    let out = tower
        .kubectl_ok(&["exec", "box", "--", "echo", "hi"])
        .await?;
    ensure!(out.trim() == "hi", "{out}");
    // And over SPDY, kubectl's fallback.
    let spdy = [("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")];
    let out = tower
        .kubectl_with(&["exec", "box", "--", "echo", "spdy"], None, &spdy)
        .await?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "spdy",
        "{out:?}"
    );
    let exec = audit_records(&audit).into_iter().any(|r| {
        r["door"] == "path" && r["verb"] == "exec" && r["status"] == 101 && r["cluster"] == "alpha"
    });
    ensure!(exec, "no audit line of the exec");

    // A deleted Cluster's kubeconfig: its path is a 404 that says so.
    let gone = joined.last().context("no joined cluster")?;
    tower
        .host()
        .kubectl_ok(&["delete", "cluster", &gone.name, "--wait=false"]);
    // `--raw` takes the path whole, without the server's.
    let path = format!("/clusters/{}/api/v1/namespaces/kube-system", gone.name);
    let raw = ["get", "--raw", path.as_str()];
    let last = std::sync::Mutex::new(String::new());
    wait_until(SOON, || async {
        let (ok, out, err) =
            kubectl(&gone.kubeconfig, &raw)
                .await
                .unwrap_or((true, String::new(), String::new()));
        *last.lock().unwrap() = format!("{out}{err}");
        !ok && err.contains("is not served by this proxy")
    })
    .await
    .with_context(|| {
        format!(
            "{}'s path still answers: {}",
            gone.name,
            last.lock().unwrap()
        )
    })?;

    // Agents stop together rather than one drop after another.
    for j in &mut joined {
        let _ = j.agent.signal(Signal::SIGTERM);
    }
    Ok(())
}
