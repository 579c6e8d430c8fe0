//! `bench`: how fast the tunnel is, side by side with a direct connection, the
//! Go peers (Go Tower's SSH and websocket stack), Chisel, apiserver-network-proxy
//! (konnectivity), frp and rathole. `make bench` builds
//! everything in release and runs it; results go to `target/bench/results.md`
//! and `results.json`, and the table is printed.
//!
//! Environment: `BENCH_QUICK=1` for a fast pass (smaller sizes, fewer runs),
//! `BENCH_ONLY=bulk,small,...` to pick scenarios (see [`scenarios::ALL`]),
//! `BENCH_PATHS=https,forward,connect,go,chisel,konnectivity,frp,rathole` to
//! pick the paths besides direct (the stronger peers are in [`peers`]),
//! `BENCH_SCALE=1000,10000` for the numbers of idle agents,
//! `BENCH_BULK_MIB=64` and `BENCH_BULK_RUNS=5` for the bulk transfers' size
//! and count (larger and more: less noise in a CPU-per-byte comparison),
//! `BENCH_OUT` for the output directory (default `<repo>/target/bench`).
//! `BENCH_B_BIN=DIR` (a directory with another build's `proxy` and `agent`)
//! and/or `BENCH_B_ENV='K=V ...'` add a path "B" (a raw forward through that
//! build) next to ours in every scenario, to measure a change in the same run;
//! with the https path wanted, that build's https path too (its proxy in
//! Kubernetes mode on a host cluster of its own, "host-b").
//!
//! Layout: [`setup`] starts the processes every path needs, [`http`] is the
//! HTTPS client and the upstream server (`bench upstream`, its own process),
//! [`fleet`] runs many in-process agents, [`relay`] makes a long link
//! (with packet loss below TCP: `e2e::lossy`, a TUN device; root),
//! [`measure`] summarises runs, [`report`] writes the table, [`sys`] reads
//! /proc, [`tls`] makes certificates, [`scenarios`] has one module per scenario.

mod fleet;
mod http;
mod measure;
mod peers;
mod relay;
mod report;
mod scenarios;
mod setup;
mod sys;
mod tls;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Tower tunnel benchmarks (make bench)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark suite (the default).
    Run,
    /// Internal: the upstream HTTPS server the paths lead to.
    Upstream {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Upstream { cert, key, listen }) => upstream(cert, key, listen),
        Some(Cmd::Run) | None => {
            // The testkit echoes child output unless told not to; errors keep the tails.
            // SAFETY: no other thread runs yet.
            unsafe { std::env::set_var("TESTKIT_ECHO", "0") };
            sys::raise_nofile();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run())
        }
    }
}

fn upstream(cert: PathBuf, key: PathBuf, listen: String) -> Result<()> {
    let cert = std::fs::read_to_string(&cert).context("reading --cert")?;
    let key = std::fs::read_to_string(&key).context("reading --key")?;
    let config = tls::server_config(&cert, &key)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            println!("listening {}", listener.local_addr()?);
            http::serve_upstream(listener, config).await;
            Ok(())
        })
}

async fn run() -> Result<()> {
    let t0 = Instant::now();
    let root = e2e::workspace_root();
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target").join("bench"));
    let work = out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let only: Vec<String> = std::env::var("BENCH_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = only.iter().find(|s| !scenarios::ALL.contains(&s.as_str())) {
        anyhow::bail!(
            "BENCH_ONLY: unknown scenario {bad:?}; known: {}",
            scenarios::ALL.join(",")
        );
    }
    let wants = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let paths: Vec<String> = std::env::var("BENCH_PATHS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(bad) = paths
        .iter()
        .find(|p| !setup::PATH_KEYS.contains(&p.as_str()))
    {
        anyhow::bail!(
            "BENCH_PATHS: unknown path {bad:?}; known: {}",
            setup::PATH_KEYS.join(",")
        );
    }
    let env = setup::Env {
        root,
        work,
        quick,
        paths,
    };
    let mut report = report::Report {
        started: report::now_utc(),
        quick,
        machine: sys::machine(),
        ..Default::default()
    };

    let needs_setup = [
        "bulk",
        "small",
        "concurrency",
        "wan",
        "wan-lossy",
        "wan-stalled",
        "kubectl",
        "setup",
    ]
    .iter()
    .any(|s| wants(s));
    if needs_setup {
        match setup::Setup::start(&env, &mut report).await {
            Ok(mut s) => {
                report.versions = s.versions.clone();
                if wants("bulk") {
                    scenarios::bulk::run(&s, &mut report).await;
                }
                if wants("small") {
                    scenarios::small::run(&s, &mut report).await;
                }
                if wants("concurrency") {
                    scenarios::concurrency::run(&s, &mut report).await;
                }
                if wants("wan") {
                    scenarios::wan::run(&s, &mut report).await;
                }
                if wants("wan-lossy") {
                    scenarios::wan::run_lossy(&s, &mut report).await;
                }
                if wants("wan-stalled") {
                    scenarios::wan::run_stalled(&s, &mut report).await;
                }
                if wants("kubectl") {
                    scenarios::kubectl::run(&s, &mut report).await;
                }
                if wants("setup") {
                    scenarios::startup::run(&mut s, &mut report).await;
                }
                eprintln!("stopping the setup");
                drop(s);
            }
            Err(e) => report.error("setup", &e),
        }
    }
    if wants("scale") {
        scenarios::scale::run(&env, &mut report).await;
    }
    if wants("controlplane") {
        scenarios::controlplane::run(&env, &mut report).await;
    }
    report.note(
        "Paths: direct = the bench client's TLS straight to the upstream HTTPS server (loopback). \
         tower-rs https (a) = client TLS (client certificate from the Cluster's kubeconfig) -> the proxy's \
         per-cluster listener -> SSH over websocket -> agent -> upstream, TLS again from the proxy \
         (Kubernetes mode against a kube-harness host). tower-rs forward (b) = the proxy's raw --forward port, \
         the client's TLS carried end to end (the comparable path for the Go peers and Chisel). \
         go-tower forward = tests/go-peers go-proxy --forward + go-agent. chisel reverse = chisel server --reverse + client R:port. \
         tower-rs CONNECT door = mutual TLS to the proxy's --connect-port (the bench Cluster's kubeconfig certificate), \
         CONNECT bench:443, then the client's TLS to the upstream through it. konnectivity = apiserver-network-proxy \
         proxy-server --mode=http-connect (mutual TLS front door) + proxy-agent (gRPC over mutual TLS), the same CONNECT \
         client (to the upstream's address). frp = frps (TLS forced) + frpc (a tcp proxy, TLS to frps, yamux). \
         rathole = server + client over its websocket transport with TLS. 'X vs PEER' rows: ratio of the medians, \
         oriented so that > 1 means tower-rs is ahead (throughput: ours / theirs; latency and CPU: theirs / ours).",
    );
    report.versus(setup::FORWARD, &peers::versus_forward());
    report.versus(setup::CONNECT, &[peers::KONNECTIVITY]);
    report.duration_s = t0.elapsed().as_secs_f64();
    let md = report.write(&out)?;
    println!("{md}");
    println!(
        "(written to {} and {})",
        out.join("results.md").display(),
        out.join("results.json").display()
    );
    Ok(())
}
