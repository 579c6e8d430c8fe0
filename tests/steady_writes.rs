//! Steady state costs the host apiserver the same whatever the number of
//! connected clusters (issue #15 part 5; docs/health.md): one `bin/proxy`
//! (path form, so no Service per cluster) and a real `bin/agent` per Cluster,
//! all serving the one member kube-apiserver, the status refreshed every 5 s.
//! Once every Cluster's status is complete, the writes the host
//! kube-apiserver counts itself (`apiserver_request_total`, every verb but
//! GET, LIST and WATCH) over one window with N clusters, and then over an
//! equal window with 2N: the second count is no higher than the first but for
//! the ticks of the periodic Lease renewals that fall at a window's edges, and
//! no Cluster is written in either. Before the heartbeat moved to the
//! replica's Lease every connected cluster wrote its `lastHeartbeatTime` once
//! a minute: N more writes in the second window. Joining the second N also
//! patches each Cluster at most five times (the certificate expiry rides
//! with the conditions, not in a second member-status write), and the proxy
//! holds one watch of the Clusters, not two.
//!
//! Run: `make build harness && cargo test -p e2e --release --test steady_writes`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{Joined, Tower, TowerOptions, apiserver_writes, free_port, wait_until, writes_between};

/// Clusters added at each step (alpha is there from the start).
const STEP: usize = 16;
/// Longer than the heartbeat period the status had (one minute), so a
/// per-cluster periodic write would show in it.
const WINDOW: Duration = Duration::from_secs(75);
/// Periodic writes of constant number (the proxy's Lease every 5 s, the
/// kube-apiserver's own identity Lease every 10 s) can fall either side of a
/// window's edges: one tick each, and one of slack.
const EDGES: u64 = 3;
/// Cluster patches per joining cluster: spec and status before its agent
/// connects, spec, status and member status after.
const PATCHES_PER_JOIN: u64 = 5;
const SOON: Duration = Duration::from_secs(120);

/// Every write the host kube-apiserver counted so far, per `VERB resource`.
fn writes(tower: &Tower) -> BTreeMap<String, u64> {
    apiserver_writes(&tower.host().kubectl_ok(&["get", "--raw", "/metrics"]))
}

/// Watches of Clusters the kube-apiserver is serving now
/// (`apiserver_longrunning_requests`).
fn cluster_watches(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_longrunning_requests{"))
        .filter(|l| l.contains("resource=\"clusters\"") && l.contains("verb=\"WATCH\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// True once every Cluster is available and its status complete (the first
/// probe's write done): what follows is steady state.
fn all_settled(tower: &Tower, clusters: usize) -> Result<bool> {
    let list: Value =
        serde_json::from_str(&tower.host().kubectl_ok(&["get", "clusters", "-o", "json"]))?;
    let items = list["items"].as_array().context("no items")?;
    let settled = items
        .iter()
        .filter(|c| {
            let status = &c["status"];
            let available = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True");
            available
                && status["readyz"] == true
                && status["kubernetesVersion"].is_string()
                && status["certificateExpirationTime"].is_string()
                && status["lastHeartbeatTime"].is_string()
        })
        .count();
    Ok(settled == clusters)
}

/// The writes of one window of steady state with `clusters` clusters, and
/// the counts when it began.
async fn window(
    tower: &Tower,
    clusters: usize,
) -> Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
    wait_until(SOON, || async {
        all_settled(tower, clusters).unwrap_or(false)
    })
    .await
    .with_context(|| format!("{clusters} clusters never all became available with a status"))?;
    let before = writes(tower);
    // A measurement window, not a wait for a condition: what is counted is
    // whatever the apiserver saw during it.
    tokio::time::sleep(WINDOW).await;
    let seen = writes_between(&before, &writes(tower));
    eprintln!("steady_writes: {clusters} clusters, writes in {WINDOW:?}: {seen:?}");
    Ok((seen, before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_writes_do_not_grow_with_the_clusters() -> Result<()> {
    let access = free_port();
    let tower = Tower::start_with(TowerOptions {
        proxy_args: vec![
            "--cluster-ports=none".into(),
            format!("--access-port={access}"),
            "--cluster-status-update-frequency=5s".into(),
        ],
        kubelet: false,
        ..Default::default()
    })
    .await?;
    let names =
        |from: usize| -> Vec<String> { (from..from + STEP).map(|i| format!("s{i:02}")).collect() };

    let mut agents: Vec<Joined> = tower.join(&names(0)).await?;
    let n = STEP + 1;
    let (small, _) = window(&tower, n).await?;

    let joining = writes(&tower);
    agents.extend(tower.join(&names(STEP)).await?);
    let (big, settled) = window(&tower, n + STEP).await?;
    // What joining wrote (refused conflicts count apart, under their code),
    // up to every new status complete: per cluster its
    // token and endpoint (spec) and conditions (status) before its agent
    // came, then its kubeconfig (spec), conditions and certificate expiry
    // (status) and its member status, once. The expiry was a member-status
    // write of its own: 6 patches per cluster, 10,000 more at a fleet's start.
    let joined = writes_between(&joining, &settled);
    let patches = joined.get("PATCH clusters").copied().unwrap_or(0);
    eprintln!("steady_writes: joining {STEP} clusters wrote {joined:?}");
    ensure!(
        patches <= PATCHES_PER_JOIN * STEP as u64,
        "joining {STEP} clusters patched them {patches} times, more than {PATCHES_PER_JOIN} each: \
         {joined:?}"
    );

    let total = |w: &BTreeMap<String, u64>| w.values().sum::<u64>();
    let clusters = |w: &BTreeMap<String, u64>| {
        w.iter()
            .filter(|(k, _)| k.split(' ').nth(1) == Some("clusters"))
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    ensure!(
        clusters(&small) == 0 && clusters(&big) == 0,
        "Clusters were written at steady state: {small:?} with {n} clusters, {big:?} with {}",
        n + STEP
    );
    ensure!(
        total(&big) <= total(&small) + EDGES,
        "steady-state writes grew with the clusters: {} with {n} clusters ({small:?}), {} with {} ({big:?})",
        total(&small),
        total(&big),
        n + STEP
    );
    // One watch of the Clusters per proxy: its controller's (the deletions
    // had a second, so every Cluster write was sent and decoded twice).
    let watches = cluster_watches(&tower.host().kubectl_ok(&["get", "--raw", "/metrics"]));
    ensure!(
        watches == 1,
        "the host kube-apiserver serves {watches} watches of Clusters, one proxy should hold one"
    );
    // The proxy's own Lease is what stands for all of them: it is renewed.
    ensure!(
        big.keys().any(|k| k.split(' ').nth(1) == Some("leases")),
        "no Lease renewal in the window: {big:?}"
    );
    let lease = tower.host().kubectl_ok(&[
        "get",
        "leases",
        "-n",
        "kubesphere-system",
        "-l",
        "tower.kubesphere.io/lease=replica",
        "-o",
        "name",
    ]);
    ensure!(
        lease
            .trim()
            .starts_with("lease.coordination.k8s.io/tower-replica-"),
        "no replica Lease: {lease:?}"
    );
    drop(agents);
    Ok(())
}
