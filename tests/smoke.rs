//! Smoke tests of the test support itself: the kube-apiserver harness starts
//! real, isolated clusters that kube-rs and the real kubectl can use, keeps
//! its data across restarts on the same directory, and leaves no process
//! behind.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::api::core::v1::Namespace;
use e2e::kube::api::{ObjectMeta, PostParams};
use e2e::kube::{Api, Client};
use e2e::{KubeCluster, wait_until};

const ONLY_IN_MEMBER: &str = "smoke-only-in-member";

async fn create_namespace(client: Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// The names in the first column of `kubectl get ns` output.
fn namespace_names(kubectl_get_ns: &str) -> Vec<String> {
    kubectl_get_ns
        .lines()
        .skip(1) // NAME STATUS AGE
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn proc_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn assert_pid_gone(pid: u32) -> Result<()> {
    wait_until(Duration::from_secs(10), || async { !proc_exists(pid) })
        .await
        .with_context(|| format!("harness pid {pid} still in /proc"))
}

#[tokio::test]
async fn two_clusters_are_isolated() -> Result<()> {
    let t0 = Instant::now();
    let [host, member]: [KubeCluster; 2] = KubeCluster::start_many(&["host", "member"])
        .await?
        .try_into()
        .map_err(|_| anyhow::anyhow!("start_many returned the wrong number of clusters"))?;
    eprintln!("two clusters ready in {:?}", t0.elapsed());
    ensure!(host.kubeconfig() != member.kubeconfig());

    // Created through kube-rs on the member only.
    create_namespace(member.client().await?, ONLY_IN_MEMBER).await?;

    // The real kubectl sees it on the member...
    let member_ns = namespace_names(&member.kubectl_ok(&["get", "ns"]));
    ensure!(
        member_ns.iter().any(|n| n == ONLY_IN_MEMBER),
        "member namespaces: {member_ns:?}"
    );
    ensure!(member_ns.iter().any(|n| n == "kube-system"));
    // ...and not on the host.
    let host_ns = namespace_names(&host.kubectl_ok(&["get", "ns"]));
    ensure!(
        !host_ns.iter().any(|n| n == ONLY_IN_MEMBER),
        "host namespaces: {host_ns:?}"
    );
    ensure!(host_ns.iter().any(|n| n == "default"));

    // kube-rs agrees.
    let host_namespaces: Api<Namespace> = Api::all(host.client().await?);
    ensure!(host_namespaces.get_opt(ONLY_IN_MEMBER).await?.is_none());
    let member_namespaces: Api<Namespace> = Api::all(member.client().await?);
    ensure!(member_namespaces.get_opt(ONLY_IN_MEMBER).await?.is_some());

    // Healthy, and the kubeconfig is an admin's.
    for c in [&host, &member] {
        assert_eq!(c.kubectl_ok(&["get", "--raw", "/readyz"]).trim(), "ok");
        assert_eq!(c.kubectl_ok(&["auth", "can-i", "*", "*"]).trim(), "yes");
    }
    eprintln!("two_clusters_are_isolated took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn restart_on_same_dir_keeps_data() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;

    let mut first = KubeCluster::start_in("first", dir.path()).await?;
    eprintln!("first start ready in {:?}", t0.elapsed());
    create_namespace(first.client().await?, "smoke-persisted").await?;
    let pid = first.pid();
    let status = first.terminate(Duration::from_secs(10)).await?;
    ensure!(status.success(), "harness exited with {status} on SIGTERM");
    assert_pid_gone(pid).await?;
    drop(first);
    ensure!(dir.path().is_dir(), "start_in must keep the caller's dir");

    let t1 = Instant::now();
    let second = KubeCluster::start_in("second", dir.path()).await?;
    eprintln!("restart ready in {:?}", t1.elapsed());
    let out = second.kubectl_ok(&["get", "ns", "smoke-persisted", "-o", "name"]);
    assert_eq!(out.trim(), "namespace/smoke-persisted");
    second.stop().await?;
    eprintln!("restart_on_same_dir_keeps_data took {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test]
async fn drop_stops_the_harness_and_removes_its_dir() -> Result<()> {
    let t0 = Instant::now();
    let cluster = KubeCluster::start("dropped").await?;
    let pid = cluster.pid();
    let dir = cluster.dir().to_path_buf();
    ensure!(
        proc_exists(pid),
        "harness pid {pid} not in /proc while running"
    );
    ensure!(dir.is_dir());

    let t1 = Instant::now();
    drop(cluster);
    eprintln!("drop took {:?}", t1.elapsed());
    assert_pid_gone(pid).await?;
    ensure!(!dir.exists(), "{} still exists after drop", dir.display());
    eprintln!(
        "drop_stops_the_harness_and_removes_its_dir took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// A test that panics with a cluster running leaves no harness process and
/// no directory behind: the cluster is dropped while the panic unwinds.
#[test]
fn a_panicking_test_leaves_no_harness_behind() -> Result<()> {
    let started: Arc<Mutex<Option<(u32, PathBuf)>>> = Arc::default();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
    };
    let rt = runtime()?;
    let seen = started.clone();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(async {
            let cluster = KubeCluster::start("panicking").await.expect("start");
            *seen.lock().expect("lock") = Some((cluster.pid(), cluster.dir().to_path_buf()));
            panic!("deliberate panic while a cluster runs");
        })
    }));
    ensure!(outcome.is_err(), "the block should have panicked");
    drop(rt);

    let (pid, dir) = started
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone()
        .context("the cluster never started")?;
    runtime()?.block_on(assert_pid_gone(pid))?;
    ensure!(!dir.exists(), "{} still exists", dir.display());
    Ok(())
}
