//! Kubernetes-level: a big LIST with the real kubectl (`get --raw`) and small
//! GETs with a Kubernetes client (kube-rs), through `config_alpha` (the
//! per-cluster listener, the tunnel, the member's real kube-apiserver) and
//! directly to the member.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use e2e::kube::api::{ObjectMeta, PostParams};
use e2e::kube::{Api, Client};
use tokio::process::Command;
use tokio::task::JoinSet;

use crate::measure::{Measure, mib_per_s, micros, percentile};
use crate::report::{Compare, Figure, Report};
use crate::setup::{HTTPS, Setup};

const NAMESPACE: &str = "bench-list";
/// Bytes of data per ConfigMap.
const CONFIGMAP_BYTES: usize = 100 * 1024;

async fn client(kubeconfig: &Path) -> Result<Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = e2e::kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = e2e::kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(Client::try_from(config)?)
}

/// `count` ConfigMaps of 100 KiB in [`NAMESPACE`].
async fn populate(client: Client, count: usize) -> Result<()> {
    let ns: Api<Namespace> = Api::all(client.clone());
    let _ = ns
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await;
    let api: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    let value: String = (0..CONFIGMAP_BYTES)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let mut set = JoinSet::new();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..8 {
        let api = api.clone();
        let value = value.clone();
        let next = next.clone();
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(format!("bench-{i:05}")),
                        ..Default::default()
                    },
                    data: Some([("blob".to_string(), value.clone())].into()),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm)
                    .await
                    .with_context(|| format!("creating ConfigMap bench-{i:05}"))?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Wall time of `kubectl get --raw <path>` (stdout to /dev/null).
async fn kubectl_raw(kubeconfig: &Path, path: &str) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new(e2e::kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["get", "--raw", path])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await?;
    let elapsed = t.elapsed();
    ensure!(
        status.success(),
        "kubectl get --raw {path} failed: {status}"
    );
    Ok(elapsed)
}

/// `count` rounds of one GET of namespace `default` through each client,
/// alternating; latencies per client.
async fn small_gets(clients: [Client; 2], count: usize) -> Result<[Vec<Duration>; 2]> {
    let apis: [Api<Namespace>; 2] = clients.map(Api::all);
    for api in &apis {
        for _ in 0..10 {
            api.get("default").await?;
        }
    }
    let mut out: [Vec<Duration>; 2] = Default::default();
    for _ in 0..count {
        for (api, o) in apis.iter().zip(out.iter_mut()) {
            let t = Instant::now();
            api.get("default").await?;
            o.push(t.elapsed());
        }
    }
    Ok(out)
}

pub async fn run(setup: &Setup, report: &mut Report) {
    if let Err(e) = measure(setup, report).await {
        report.error("kubectl-level", &e);
    }
}

async fn measure(setup: &Setup, report: &mut Report) -> Result<()> {
    let quick = setup.env.quick;
    let (Some(member), Some(tower)) = (&setup.member, &setup.tower) else {
        anyhow::bail!("needs the member cluster and the tower-rs proxy");
    };
    report.note(
        "kubectl-level: path (a) with the real member kube-apiserver behind agent alpha; config_alpha is the \
         kubeconfig the proxy wrote into Cluster alpha. LIST: wall time of the real `kubectl get --raw` (stdout to \
         /dev/null), after one unmeasured LIST on each. Small GETs: kube-rs clients, direct and through, alternating.",
    );
    let direct_kc = member.kubeconfig();
    let alpha_kc = &tower.alpha_kubeconfig;
    let count = if quick { 100 } else { 500 };
    let t = Instant::now();
    populate(client(direct_kc).await?, count).await?;
    let list_path = format!("/api/v1/namespaces/{NAMESPACE}/configmaps");
    let size = Command::new(e2e::kubectl_binary())
        .arg("--kubeconfig")
        .arg(direct_kc)
        .args(["get", "--raw", &list_path])
        .output()
        .await?
        .stdout
        .len() as u64;
    eprintln!(
        "kubectl: {count} ConfigMaps ({:.1} MB LIST) created in {:.1} s",
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let runs = if quick { 2 } else { 5 };
    let scenario = format!(
        "kubectl get --raw: LIST of {:.0} MB ({count} ConfigMaps)",
        size as f64 / 1e6
    );
    let (mut d, mut v, mut r) = (Measure::new(), Measure::new(), Measure::new());
    // One unmeasured LIST each: the apiserver's watch cache and both paths warm.
    kubectl_raw(direct_kc, &list_path).await?;
    kubectl_raw(alpha_kc, &list_path).await?;
    for _ in 0..runs {
        let direct = mib_per_s(size, kubectl_raw(direct_kc, &list_path).await?);
        let through = mib_per_s(size, kubectl_raw(alpha_kc, &list_path).await?);
        d.push(direct);
        v.push(through);
        r.push(through / direct);
    }
    report.add(Figure::new(
        &scenario,
        "direct",
        "throughput (kubectl wall time)",
        "MiB/s",
        d.stat().expect("runs"),
    ));
    report.add(
        Figure::new(
            &scenario,
            HTTPS,
            "throughput (kubectl wall time)",
            "MiB/s",
            v.stat().expect("runs"),
        )
        .direct(d.stat())
        .compare(Compare::Ratio(r.stat().expect("runs"))),
    );

    let gets = 200;
    let runs = if quick { 1 } else { 3 };
    let scenario = format!("kube-rs client: {gets} sequential GET namespace (interleaved)");
    let direct_client = client(direct_kc).await?;
    let alpha_client = client(alpha_kc).await?;
    let mut dm: [Measure; 2] = Default::default();
    let mut vm: [Measure; 2] = Default::default();
    let mut am: [Measure; 2] = Default::default();
    for _ in 0..runs {
        let [mut dl, mut vl] =
            small_gets([direct_client.clone(), alpha_client.clone()], gets).await?;
        for (k, p) in [50.0, 99.0].into_iter().enumerate() {
            let dv = micros(percentile(&mut dl, p));
            let vv = micros(percentile(&mut vl, p));
            dm[k].push(dv);
            vm[k].push(vv);
            am[k].push(vv - dv);
        }
    }
    for (k, name) in ["p50", "p99"].into_iter().enumerate() {
        let ds = dm[k].stat();
        report.add(Figure::new(
            &scenario,
            "direct",
            &format!("{name} latency"),
            "µs",
            ds.expect("runs"),
        ));
        report.add(
            Figure::new(
                &scenario,
                HTTPS,
                &format!("{name} latency"),
                "µs",
                vm[k].stat().expect("runs"),
            )
            .direct(ds)
            .compare(Compare::Added(am[k].stat().expect("runs"))),
        );
    }
    Ok(())
}
