//! Everything the scenarios measure through, started once per run. Every
//! process is an [`e2e::Proc`] (SIGTERM then SIGKILL when dropped), every
//! cluster an [`e2e::KubeCluster`], so nothing outlives the bench.
//!
//! ```text
//!                         bench client (this process)
//!   direct ─────────────────────────────────────────────────────────┐
//!   tower-rs https:   TLS ─> proxy per-cluster listener ─┐          │
//!   tower-rs forward: TLS ─> proxy --forward ────────────┴> SSH/ws ─> agent ─> upstream HTTPS
//!   go-tower forward: TLS ─> go-proxy --forward ──> SSH/ws ─> go-agent ───────> (bench upstream,
//!   chisel reverse:   TLS ─> chisel server R:port ─> SSH/ws ─> chisel client ─>  own process)
//!   tower-rs CONNECT: mTLS + CONNECT bench:443 ─> proxy --connect-port ─> SSH/ws ─> agent ─> upstream
//! ```
//!
//! and the stronger peers of [`crate::peers`] (konnectivity, frp, rathole).
//!
//! The proxy runs in Kubernetes mode against a host `kube-harness` (Cluster
//! resources `bench` and `alpha`, tokens and kubeconfigs read back from them as
//! `hack/demo.sh` does); `bench`'s agent fronts the upstream, `alpha`'s a real
//! member kube-apiserver. [`ForwardPair`] is our proxy in `--clusters-file`
//! mode with one agent (for `BENCH_B_*` builds and the long-link scenario).
//!
//! One module per thing started: [`procs`] (spawning, log lines, kubectl, the
//! upstream), [`tower`] (our proxy and agents in Kubernetes mode), [`variant`]
//! (`BENCH_B_*` and [`ForwardPair`]), [`go_tower`] and [`chisel`] (the first
//! peers; the stronger ones are in [`crate::peers`]). This module puts them
//! together into [`Paths`].

mod chisel;
mod go_tower;
mod procs;
mod tower;
mod variant;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::{KubeCluster, wait_for_ok};
use rustls_pki_types::ServerName;

pub use chisel::Chisel;
pub use go_tower::GoPeers;
pub use procs::{Upstream, kubectl, log_field, log_message_is, spawn};
pub use tower::TowerRs;
pub use variant::{ForwardPair, Variant};

use crate::http::{Target, Via};
use crate::peers::{Peer, PeerPki};
use crate::tls::{self, Pki};

/// Where the bench keeps its files and finds its tools.
#[derive(Clone, Debug)]
pub struct Env {
    pub root: PathBuf,
    pub work: PathBuf,
    pub quick: bool,
    /// `BENCH_PATHS`: the paths to measure besides direct (empty: all).
    pub paths: Vec<String>,
}

impl Env {
    /// Whether path `key` (see [`PATH_KEYS`]) is wanted.
    pub fn wants_path(&self, key: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| p == key)
    }

    /// Where `make bench` installs the peers (`gobin/`, `cargo/bin/`): the
    /// repository's `target/bench`, whatever `BENCH_OUT` says.
    pub fn tools(&self) -> PathBuf {
        self.root.join("target").join("bench")
    }

    pub fn chisel(&self) -> PathBuf {
        self.tools().join("gobin").join("chisel")
    }
}

/// All paths to the upstream, direct first.
pub struct Paths {
    pub direct: Target,
    /// (a) the full path through the per-cluster HTTPS listener.
    pub https: Option<Target>,
    /// (b) our raw `--forward` port: TLS end to end.
    pub forward: Option<Target>,
    pub go: Option<Target>,
    pub chisel: Option<Target>,
    /// Our CONNECT door (`--connect-port`, mutual TLS), `CONNECT bench:443`.
    pub connect: Option<Target>,
    /// konnectivity, frp, rathole: those that started.
    pub peers: Vec<Target>,
    /// `BENCH_B_BIN` / `BENCH_B_ENV`: another build's forward path.
    pub b: Option<Target>,
    /// The same build's https path (its own host cluster and proxy).
    pub b_https: Option<Target>,
}

pub const DIRECT: &str = "direct";
pub const HTTPS: &str = "tower-rs https (a)";
pub const FORWARD: &str = "tower-rs forward (b)";
pub const GO: &str = "go-tower forward";
pub const CHISEL: &str = "chisel reverse";
pub const CONNECT: &str = "tower-rs CONNECT door (mTLS)";

/// `BENCH_PATHS` keys: the paths besides direct.
pub const PATH_KEYS: [&str; 8] = [
    "https",
    "forward",
    "connect",
    "go",
    "chisel",
    "konnectivity",
    "frp",
    "rathole",
];

impl Paths {
    /// The paths through something, in table order.
    pub fn through(&self) -> Vec<&Target> {
        [
            &self.https,
            &self.forward,
            &self.connect,
            &self.b_https,
            &self.b,
            &self.go,
            &self.chisel,
        ]
        .into_iter()
        .flatten()
        .chain(&self.peers)
        .collect()
    }
}

/// Everything started for one run.
/// The `Option<...>` process holders are only kept to be dropped (stopped) in
/// this order: tunnels first, clusters last.
#[allow(dead_code)]
pub struct Setup {
    pub b: Option<ForwardPair>,
    pub b_tower: Option<TowerRs>,
    pub peers: Vec<Peer>,
    pub chisel: Option<Chisel>,
    pub go: Option<GoPeers>,
    pub tower: Option<TowerRs>,
    pub upstream: Upstream,
    /// The bench PKI as files, for peers started by the scenarios.
    pub peer_pki: Option<PeerPki>,
    pub member: Option<KubeCluster>,
    pub host: Option<KubeCluster>,
    /// `BENCH_B_*`'s host cluster, for its https path.
    pub b_host: Option<KubeCluster>,
    pub paths: Paths,
    pub env: Env,
    pub versions: Vec<String>,
}

impl Setup {
    pub async fn start(env: &Env, report: &mut crate::report::Report) -> Result<Setup> {
        let t0 = Instant::now();
        let pki = Pki::generate()?;
        let upstream = Upstream::start(env, &pki).await?;
        let upstream_kc = env.work.join("upstream.kubeconfig");
        std::fs::write(&upstream_kc, pki.upstream_kubeconfig(upstream.addr))?;
        let bench_tls = tls::client_config(&pki.ca_pem)?;
        let target = |name: &str, addr: SocketAddr, procs: Vec<u32>| Target {
            name: name.to_string(),
            addr,
            tls: bench_tls.clone(),
            server_name: ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            procs,
            via: None,
        };
        let mut paths = Paths {
            direct: target(DIRECT, upstream.addr, Vec::new()),
            https: None,
            forward: None,
            go: None,
            chisel: None,
            connect: None,
            peers: Vec::new(),
            b: None,
            b_https: None,
        };
        let mut versions = Vec::new();

        // `BENCH_B_*` with the https path: a host cluster of its own for
        // the other build's proxy (two proxies would fight over Clusters).
        let b_variant = Variant::b_from_env();
        let b_https = b_variant.is_some() && env.wants_path("https");
        let clusters: &[&str] = match b_https {
            true => &["host", "member", "host-b"],
            false => &["host", "member"],
        };
        eprintln!("setup: starting the kube-apiservers: {clusters:?}");
        let (host, member, b_host) = match KubeCluster::start_many(clusters).await {
            Ok(v) => {
                let mut v = v.into_iter();
                (v.next(), v.next(), v.next())
            }
            Err(e) => {
                report.error("kube-harness (tower-rs https path, kubectl, setup)", &e);
                (None, None, None)
            }
        };
        let tower = match (&host, &member) {
            (Some(h), Some(m)) => {
                eprintln!("setup: proxy (Kubernetes mode) and agents");
                match TowerRs::start(env, h, m, &upstream_kc, &Variant::current()).await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        report.error("tower-rs proxy and agents", &e);
                        None
                    }
                }
            }
            _ => None,
        };
        if let Some(t) = &tower {
            let procs = vec![t.proxy.pid(), t.bench_agent.pid()];
            if env.wants_path("https") {
                match t.https_target(HTTPS) {
                    Ok(target) => paths.https = Some(target),
                    Err(e) => report.error("reading the bench Cluster's kubeconfig", &e),
                }
            }
            if env.wants_path("forward") {
                paths.forward = Some(target(FORWARD, t.forward, procs.clone()));
            }
            if env.wants_path("connect") {
                match tls::from_kubeconfig(&t.bench_kubeconfig) {
                    Ok(k) => {
                        paths.connect = Some(Target {
                            via: Some(Via {
                                tls: Some((
                                    k.tls,
                                    ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
                                )),
                                authority: "bench:443".into(),
                            }),
                            ..target(CONNECT, t.connect, procs)
                        })
                    }
                    Err(e) => report.error("reading the bench Cluster's kubeconfig", &e),
                }
            }
        }
        let mut go = None;
        if env.wants_path("go") {
            eprintln!("setup: go-proxy and go-agent");
            match GoPeers::start(upstream.addr, None).await {
                Ok(g) => {
                    paths.go = Some(target(GO, g.forward, vec![g.proxy.pid(), g.agent.pid()]));
                    go = Some(g);
                }
                Err(e) => report.error("Go peers (make go-peers)", &e),
            }
            versions.push("Go peers: golang.org/x/crypto/ssh + gorilla/websocket (tests/go-peers, Tower's 1 KiB websocket buffers)".into());
        }
        let mut chisel = None;
        if env.wants_path("chisel") {
            eprintln!("setup: chisel server and client");
            match Chisel::start(env, upstream.addr, None).await {
                Ok(c) => {
                    paths.chisel = Some(target(
                        CHISEL,
                        c.forward,
                        vec![c.server.pid(), c.client.pid()],
                    ));
                    versions.push(format!("chisel {}", c.version));
                    chisel = Some(c);
                }
                Err(e) => report.error("Chisel", &e),
            }
        }
        let peer_pki = match PeerPki::write(&env.work, &pki) {
            Ok(p) => Some(p),
            Err(e) => {
                report.error("the peers' certificates", &e);
                None
            }
        };
        let mut peers = Vec::new();
        if let Some(pp) = &peer_pki {
            peers = crate::peers::start_all(env, pp, upstream.addr, None, report, "setup").await;
            for p in &peers {
                paths.peers.push(p.target(&paths.direct, true));
                versions.push(p.version.clone());
            }
        }
        let mut b_tower = None;
        if let (Some(variant), Some(h), Some(m)) = (&b_variant, &b_host, &member) {
            eprintln!("setup: {} https (Kubernetes mode, host-b)", variant.label);
            let started = async {
                let t = TowerRs::start(env, h, m, &upstream_kc, variant).await?;
                let target = t.https_target(&variant.https_label())?;
                anyhow::Ok((t, target))
            };
            match started.await {
                Ok((t, target)) => {
                    paths.b_https = Some(target);
                    b_tower = Some(t);
                }
                Err(e) => report.error("BENCH_B_BIN/BENCH_B_ENV https path", &e),
            }
        }
        let mut b = None;
        if let Some(variant) = b_variant {
            eprintln!("setup: {}", variant.label);
            match ForwardPair::start(env, "b", &variant, None).await {
                Ok(pair) => {
                    paths.b = Some(target(&variant.label, pair.forward, pair.procs()));
                    b = Some(pair);
                }
                Err(e) => report.error("BENCH_B_BIN/BENCH_B_ENV path", &e),
            }
        }

        // Every path answers before anything is measured.
        for t in std::iter::once(&paths.direct).chain(paths.through()) {
            wait_for_ok(Duration::from_secs(20), || probe_once(t))
                .await
                .with_context(|| format!("path {} does not answer", t.name))?;
        }
        eprintln!("setup: ready in {:.1} s", t0.elapsed().as_secs_f64());
        Ok(Setup {
            b,
            b_tower,
            peers,
            chisel,
            go,
            tower,
            upstream,
            peer_pki,
            member,
            host,
            b_host,
            paths,
            env: env.clone(),
            versions,
        })
    }
}

async fn probe_once(t: &Target) -> Result<()> {
    let mut c = t.connect().await?;
    c.get(1).await
}
