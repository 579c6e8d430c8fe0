//! The control plane at scale, on a real apiserver (issue #15 part 5): N
//! Clusters on a fresh `kube-harness` host, `bin/proxy` in Kubernetes mode
//! against it, one in-process agent per Cluster ([`crate::fleet`]). Sizes:
//! 1,000 with per-cluster ports and Services, and 10,000 in the path form
//! (`--cluster-ports none`); `BENCH_CONTROLPLANE=1000:ports,10000:paths`
//! picks others (`paths-compat`: the path form on the CRD without the status
//! subresource, `config/crd/kubesphere-compat`, as KubeSphere's own).
//!
//! Measured: the time from the proxy's start to every Cluster
//! `AgentAvailable=True` (a watch of the Clusters), the proxy's RSS then, and
//! the writes the host kube-apiserver counts itself (`apiserver_request_total`,
//! every verb but GET, LIST, WATCH and CONNECT) over a window of steady state
//! that starts [`SETTLE`] after all are available (the first status writes of
//! each cluster done).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use e2e::kube::runtime::watcher;
use e2e::{KubeCluster, apiserver_writes, free_port, writes_between};
use futures_util::StreamExt as _;

use crate::fleet::{Fleet, FleetOptions};
use crate::measure::Stat;
use crate::report::{Figure, Goal, Report};
use crate::setup::{Env, log_message_is, spawn};
use crate::sys;

const NS: &str = "kubesphere-system";
/// After all are available, before the window: each cluster's first status
/// write (after its first probe) is done.
const SETTLE: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(60);
/// Creates in flight while making the Clusters.
const CREATES: usize = 32;
/// How often the wait for availability says how far it got.
const PROGRESS: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ports,
    Paths,
    /// The path form on KubeSphere's CRD form (no status subresource).
    PathsCompat,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ports => "per-cluster ports and Services",
            Mode::Paths => "path form, --cluster-ports none",
            Mode::PathsCompat => "path form, CRD without the status subresource",
        }
    }
}

fn sizes(env: &Env) -> Vec<(usize, Mode)> {
    match std::env::var("BENCH_CONTROLPLANE") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .filter_map(|one| {
                let (n, mode) = one.trim().split_once(':').unwrap_or((one.trim(), "paths"));
                let n = n.replace('_', "").parse().ok()?;
                let mode = match mode {
                    "ports" => Mode::Ports,
                    "paths-compat" => Mode::PathsCompat,
                    _ => Mode::Paths,
                };
                Some((n, mode))
            })
            .collect(),
        _ if env.quick => vec![(100, Mode::Ports), (1000, Mode::Paths)],
        _ => vec![(1000, Mode::Ports), (10_000, Mode::Paths)],
    }
}

pub async fn run(env: &Env, report: &mut Report) {
    report.note(
        "controlplane: bin/proxy in Kubernetes mode against its own kube-harness host (real kube-apiserver \
         and etcd), N Clusters made beforehand with their tokens, one in-process agent each (tunnel::client; \
         their member addresses refuse, so each status says healthz/readyz/livez false, once). Available = \
         every Cluster AgentAvailable=True, timed from the proxy's spawn (a watch of the Clusters). Writes = \
         the host kube-apiserver's apiserver_request_total, verbs other than GET/LIST/WATCH/CONNECT, over 60 s \
         starting 30 s after all were available (the kube-apiserver's own identity Lease included).",
    );
    let limit = sys::raise_nofile();
    for (n, mode) in sizes(env) {
        // The agents' sockets are in this process, the proxy's in its own.
        if (n as u64) + 500 > limit {
            report.error(
                &format!("controlplane {n} clusters"),
                &anyhow::anyhow!("RLIMIT_NOFILE is {limit}: too low for {n} agents"),
            );
            continue;
        }
        if let Err(e) = one(env, n, mode, report).await {
            report.error(&format!("controlplane {n} clusters ({})", mode.name()), &e);
        }
    }
}

fn cluster_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cluster.kubesphere.io", "v1alpha1", "Cluster"),
        "clusters",
    )
}

/// Every write the host kube-apiserver counted so far, per `VERB resource`.
fn writes(host: &KubeCluster) -> BTreeMap<String, u64> {
    apiserver_writes(&host.kubectl_ok(&["get", "--raw", "/metrics"]))
}

fn available(c: &DynamicObject) -> bool {
    c.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True")
}

async fn make_clusters(api: &Api<DynamicObject>, identities: &[(String, String)]) -> Result<()> {
    let gate = Arc::new(tokio::sync::Semaphore::new(CREATES));
    let mut creates = tokio::task::JoinSet::new();
    for (name, token) in identities {
        let mut obj = DynamicObject::new(name, &cluster_resource());
        obj.data = serde_json::json!({
            "spec": {"joinFederation": true, "connection": {"type": "proxy", "token": token}}
        });
        let (api, gate) = (api.clone(), gate.clone());
        creates.spawn(async move {
            let _turn = gate.acquire_owned().await?;
            api.create(&PostParams::default(), &obj)
                .await
                .context("creating a Cluster")?;
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = creates.join_next().await {
        done??;
    }
    Ok(())
}

/// Waits until every one of `n` Clusters is AgentAvailable=True; says how
/// far it got every [`PROGRESS`] (and the proxy's RSS and open fds).
async fn all_available(
    api: Api<DynamicObject>,
    n: usize,
    timeout: Duration,
    proxy_pid: u32,
) -> Result<()> {
    let mut events = watcher(api, watcher::Config::default()).boxed();
    let mut up: HashSet<String> = HashSet::new();
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut next_progress = start + PROGRESS;
    loop {
        if tokio::time::Instant::now() >= next_progress {
            next_progress += PROGRESS;
            let usage = e2e::Usage::of(proxy_pid).ok();
            eprintln!(
                "controlplane: {:.0} s: {} of {n} available; proxy {:?}",
                start.elapsed().as_secs_f64(),
                up.len(),
                usage
            );
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("only {} of {n} Clusters available in {timeout:?}", up.len());
        }
        let Ok(event) = tokio::time::timeout_at(next_progress.min(deadline), events.next()).await
        else {
            continue;
        };
        match event {
            Some(Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c))) => {
                let name = c.metadata.name.clone().unwrap_or_default();
                if available(&c) {
                    up.insert(name);
                } else {
                    up.remove(&name);
                }
            }
            Some(Ok(watcher::Event::Delete(c))) => {
                up.remove(&c.metadata.name.clone().unwrap_or_default());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => eprintln!("controlplane: watching Clusters: {e}"),
            None => bail!("the Cluster watch ended"),
        }
        if up.len() >= n {
            return Ok(());
        }
    }
}

async fn one(env: &Env, n: usize, mode: Mode, report: &mut Report) -> Result<()> {
    eprintln!("controlplane: {n} clusters, {}", mode.name());
    let host = KubeCluster::start(&format!("cp-host-{n}")).await?;
    match mode {
        Mode::PathsCompat => host.install_crd_from("config/crd/kubesphere-compat")?,
        _ => host.install_crd()?,
    }
    host.kubectl_ok(&["create", "ns", NS]);
    let client = host.client().await?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &cluster_resource());
    let identities: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("c{i:05}"),
                format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                ),
            )
        })
        .collect();
    let t = Instant::now();
    make_clusters(&api, &identities).await?;
    eprintln!(
        "controlplane: {n} Clusters made in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let port = free_port();
    let mut args = vec![
        "--host=127.0.0.1".to_string(),
        format!("--port={port}"),
        format!("--kubeconfig={}", host.kubeconfig().display()),
        "--advertise-address=127.0.0.1".into(),
        format!(
            "--data-dir={}",
            env.work.join(format!("cp-proxy-{n}")).display()
        ),
        "--log-format=json".into(),
    ];
    match mode {
        // 20000..: below Linux's ephemeral range, with their +10000 too.
        Mode::Ports => args.push(format!("--cluster-ports=20000-{}", 20000 + n + n / 10)),
        Mode::Paths | Mode::PathsCompat => {
            args.push("--cluster-ports=none".into());
            args.push(format!("--access-port={}", free_port()));
        }
    }
    let before_start = writes(&host);
    let started = Instant::now();
    let proxy = spawn("cp-proxy", &e2e::bin("proxy"), &args)?;
    let line = proxy
        .wait_for_line(
            |l| log_message_is(l, "listening for agents"),
            Duration::from_secs(120),
        )
        .await?;
    let fingerprint = proxy
        .lines()
        .iter()
        .find_map(|l| crate::setup::log_field(l, "fingerprint"))
        .with_context(|| format!("no fingerprint before {line}"))?;
    let fleet = Fleet::start(FleetOptions {
        proxy: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        fingerprint,
        identities,
        keepalive: Duration::from_secs(30),
        ramp: 64,
    });
    if let Err(e) = all_available(api.clone(), n, Duration::from_secs(900), proxy.pid()).await {
        // Still say how far it got, and at what memory.
        let rss_mib = sys::rss_bytes(proxy.pid())? as f64 / f64::from(1 << 20);
        let scenario = format!("control plane: {n} clusters, {}", mode.name());
        let path = "tower-rs proxy + kube-apiserver";
        report.add(
            Figure::new(
                &scenario,
                path,
                "proxy RSS when given up",
                "MiB",
                Stat::of(&[rss_mib]),
            )
            .goal((n >= 10_000).then(|| Goal::at_most("proxy RSS <= 1 GiB", rss_mib, 1024.0))),
        );
        keep_log(env, n, &proxy)?;
        return Err(e);
    }
    let up = started.elapsed();
    let rss_up = sys::rss_bytes(proxy.pid())?;
    eprintln!(
        "controlplane: all {n} available {:.1} s after the proxy's start; proxy RSS {} MiB; {} agents connected",
        up.as_secs_f64(),
        rss_up / (1 << 20),
        fleet.connected()
    );
    tokio::time::sleep(SETTLE).await;
    let before = writes(&host);
    let startup = writes_between(&before_start, &before);
    tokio::time::sleep(WINDOW).await;
    let seen = writes_between(&before, &writes(&host));
    let rss = sys::rss_bytes(proxy.pid())?.max(rss_up);
    let total: u64 = seen.values().sum();
    let per_s = total as f64 / WINDOW.as_secs_f64();
    eprintln!("controlplane: startup writes {startup:?}; steady window {seen:?}");
    report.note(format!(
        "controlplane {n} ({}): writes from the proxy's start to the window: {}; in the 60 s window: {}",
        mode.name(),
        fmt_counts(&startup),
        fmt_counts(&seen)
    ));

    let scenario = format!("control plane: {n} clusters, {}", mode.name());
    let path = "tower-rs proxy + kube-apiserver";
    let one_value = |v: f64| Stat::of(&[v]);
    let big = n >= 10_000;
    report.add(
        Figure::new(
            &scenario,
            path,
            "proxy start -> every Cluster AgentAvailable=True",
            "s",
            one_value(up.as_secs_f64()),
        )
        .goal(big.then(|| Goal::at_most("all available <= 60 s", up.as_secs_f64(), 60.0))),
    );
    report.add(
        Figure::new(
            &scenario,
            path,
            "steady-state writes to the host apiserver (all clients)",
            "writes/s",
            one_value(per_s),
        )
        .goal(big.then(|| Goal::at_most("<= 2 writes/s in total", per_s, 2.0))),
    );
    let rss_mib = rss as f64 / f64::from(1 << 20);
    report.add(
        Figure::new(&scenario, path, "proxy RSS", "MiB", one_value(rss_mib))
            .goal(big.then(|| Goal::at_most("proxy RSS <= 1 GiB", rss_mib, 1024.0))),
    );
    let startup_total: u64 = startup.values().sum();
    report.add(Figure::new(
        &scenario,
        path,
        "writes from the proxy's start to steady state, per cluster",
        "writes",
        one_value(startup_total as f64 / n as f64),
    ));
    keep_log(env, n, &proxy)?;
    drop(fleet);
    drop(proxy);
    drop(host);
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

fn fmt_counts(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The proxy's log in the work directory, its messages counted on stderr.
fn keep_log(env: &Env, n: usize, proxy: &e2e::Proc) -> Result<()> {
    let log = env.work.join(format!("cp-proxy-{n}.log"));
    let lines = proxy.lines();
    std::fs::write(&log, lines.join("\n"))?;
    let mut messages: BTreeMap<String, u64> = BTreeMap::new();
    for line in &lines {
        let message = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["fields"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| "(not JSON)".into());
        *messages.entry(message).or_default() += 1;
    }
    eprintln!("controlplane: proxy log ({}): {messages:?}", log.display());
    Ok(())
}
