//! Scale: N idle agents (in this process, see [`crate::fleet`]) on one proxy
//! (`--clusters-file` mode, one cluster per agent): the proxy's RSS per agent,
//! its CPU while the keepalives run (default 30 s period on both sides), and
//! how long all agents take to be back after a proxy restart (SIGTERM, a new
//! process on the same port with the same host key).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::{Proc, bin};

use crate::fleet::{Fleet, FleetOptions};
use crate::measure::{Measure, Stat};
use crate::report::{Figure, Goal, Report};
use crate::setup::{Env, log_field, log_message_is, spawn};
use crate::sys;

const KEEPALIVE: Duration = Duration::from_secs(30);

async fn start_proxy(env: &Env, port: u16, clusters: &Path) -> Result<(Proc, String)> {
    let proxy = spawn(
        "scale-proxy",
        &bin("proxy"),
        &[
            "--host=127.0.0.1".into(),
            format!("--port={port}"),
            format!("--data-dir={}", env.work.join("scale-proxy").display()),
            format!("--clusters-file={}", clusters.display()),
            "--log-format=json".into(),
        ],
    )?;
    proxy
        .wait_for_line(
            |l| log_message_is(l, "listening for agents"),
            Duration::from_secs(30),
        )
        .await?;
    let fingerprint = proxy
        .lines()
        .iter()
        .find_map(|l| log_field(l, "fingerprint"))
        .context("no fingerprint")?;
    Ok((proxy, fingerprint))
}

pub async fn run(env: &Env, report: &mut Report) {
    let sizes: Vec<usize> = match std::env::var("BENCH_SCALE") {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .filter_map(|n| n.trim().replace('_', "").parse().ok())
            .collect(),
        _ if env.quick => vec![100, 1000],
        _ => vec![1000, 10_000],
    };
    report.note(
        "scale: the proxy in --clusters-file mode (no Kubernetes), one cluster per agent; agents in the bench process \
         (tunnel::client::run, the agent's websocket dial and backoff). RSS per agent = (proxy RSS with N agents - \
         before) / N. CPU over one keepalive period. Restart: SIGTERM, then a new proxy on the same port with the \
         same host key; 'back' = every agent connected again after the SIGTERM.",
    );
    let limit = sys::raise_nofile();
    for n in sizes {
        // Each agent takes a socket here and one in the proxy.
        if (n as u64) + 200 > limit {
            report.error(
                &format!("scale {n} agents"),
                &anyhow::anyhow!("RLIMIT_NOFILE is {limit}: too low for {n} agents"),
            );
            continue;
        }
        if let Err(e) = one(env, n, report).await {
            report.error(&format!("scale {n} agents"), &e);
        }
    }
}

async fn one(env: &Env, n: usize, report: &mut Report) -> Result<()> {
    eprintln!("scale: {n} idle agents");
    let identities: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("c{i:05}"),
                format!("token-{i:05}-{:016x}", rand::random::<u64>()),
            )
        })
        .collect();
    let clusters = env.work.join(format!("clusters-{n}.json"));
    let map: serde_json::Map<String, serde_json::Value> = identities
        .iter()
        .map(|(n, t)| (n.clone(), serde_json::Value::String(t.clone())))
        .collect();
    std::fs::write(&clusters, serde_json::to_string(&map)?)?;
    let port = e2e::free_port();
    let (mut proxy, fingerprint) = start_proxy(env, port, &clusters).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = sys::rss_bytes(proxy.pid())?;
    let self_pid = std::process::id();
    let self_rss0 = sys::rss_bytes(self_pid)?;

    let t = Instant::now();
    let fleet = Fleet::start(FleetOptions {
        proxy: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        fingerprint,
        identities,
        keepalive: KEEPALIVE,
        ramp: 64,
    });
    fleet
        .wait_back(fleet.epoch, &[1.0], Duration::from_secs(600))
        .await
        .context("first connect")?;
    let connect_all = t.elapsed();
    eprintln!(
        "scale: {n} agents connected in {:.1} s",
        connect_all.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = sys::rss_bytes(proxy.pid())?;
    let self_rss = sys::rss_bytes(self_pid)?;
    let per_agent_kib = (rss.saturating_sub(rss0)) as f64 / n as f64 / 1024.0;
    let agent_side_kib = (self_rss.saturating_sub(self_rss0)) as f64 / n as f64 / 1024.0;

    let window = if env.quick {
        Duration::from_secs(10)
    } else {
        KEEPALIVE
    };
    let (p0, s0) = (sys::cpu_precise(proxy.pid())?, sys::cpu_precise(self_pid)?);
    tokio::time::sleep(window).await;
    let (p1, s1) = (sys::cpu_precise(proxy.pid())?, sys::cpu_precise(self_pid)?);
    let proxy_cpu = 100.0 * (p1 - p0).as_secs_f64() / window.as_secs_f64();
    let agents_cpu = 100.0 * (s1 - s0).as_secs_f64() / window.as_secs_f64();
    let connected_now = fleet.connected();

    let scenario = format!("scale: {n} idle agents");
    let one_value = |v: f64| Stat::of(&[v]);
    report.add(
        Figure::new(
            &scenario,
            "tower-rs proxy",
            "RSS per agent",
            "KiB",
            one_value(per_agent_kib),
        )
        .goal((n >= 10_000).then(|| Goal::at_most("<= 16 KiB per agent", per_agent_kib, 16.0))),
    );
    report.add(
        Figure::new(
            &scenario,
            "in-process agents (tunnel::client)",
            "RSS per agent (agent side)",
            "KiB",
            one_value(agent_side_kib),
        )
        .goal((n >= 10_000).then(|| Goal::at_most("<= 32 KiB per agent", agent_side_kib, 32.0))),
    );
    report.add(Figure::new(
        &scenario,
        "tower-rs proxy",
        &format!(
            "CPU, keepalives every {}s ({connected_now} connected)",
            KEEPALIVE.as_secs()
        ),
        "% of a core",
        one_value(proxy_cpu),
    ));
    report.add(Figure::new(
        &scenario,
        "in-process agents (tunnel::client)",
        "CPU, keepalives (agent side)",
        "% of a core",
        one_value(agents_cpu),
    ));
    report.add(Figure::new(
        &scenario,
        "tower-rs proxy",
        "first connect of all agents (64 in flight)",
        "s",
        one_value(connect_all.as_secs_f64()),
    ));

    // Restarts: SIGTERM, a new proxy on the same port, same host key.
    let restarts = if env.quick || n > 1000 { 1 } else { 2 };
    let (mut all, mut half, mut from_up) = (Measure::new(), Measure::new(), Measure::new());
    for _ in 0..restarts {
        let killed = Instant::now();
        proxy.terminate(Duration::from_secs(10)).await?;
        let up_at;
        (proxy, _) = {
            let started = start_proxy(env, port, &clusters).await?;
            up_at = Instant::now();
            started
        };
        let marks = fleet
            .wait_back(killed, &[0.5, 1.0], Duration::from_secs(300))
            .await
            .context("agents back after the restart")?;
        half.push(marks[0].as_secs_f64());
        all.push(marks[1].as_secs_f64());
        from_up.push((marks[1].saturating_sub(up_at - killed)).as_secs_f64());
        eprintln!(
            "scale: restart: half back after {:.1} s, all after {:.1} s (proxy up after {:.2} s)",
            marks[0].as_secs_f64(),
            marks[1].as_secs_f64(),
            (up_at - killed).as_secs_f64()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let all_s = all.stat().expect("restarts");
    report.add(Figure::new(
        &scenario,
        "tower-rs proxy + agents",
        "restart: half of the agents back",
        "s",
        half.stat().expect("restarts"),
    ));
    report.add(
        Figure::new(
            &scenario,
            "tower-rs proxy + agents",
            "restart: all agents back (from SIGTERM)",
            "s",
            all_s,
        )
        .goal((n == 1000).then(|| Goal::at_most("all 1,000 back <= 10 s", all_s.median, 10.0))),
    );
    report.add(Figure::new(
        &scenario,
        "tower-rs proxy + agents",
        "restart: all agents back (from the new proxy's start)",
        "s",
        from_up.stat().expect("restarts"),
    ));
    drop(fleet);
    drop(proxy);
    // Let the sockets go before the next size.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}
