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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use e2e::{KubeCluster, Proc, bin, kubectl_binary, wait_for_ok};
use rustls_pki_types::ServerName;
use tokio::process::Command;

use crate::http::{Target, Via};
use crate::peers::{Peer, PeerPki};
use crate::relay::{Link, Relay};
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

/// Spawn `program args` quietly (its lines are collected for errors).
pub fn spawn(name: &str, program: &Path, args: &[String]) -> Result<Proc> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    spawn_command(name, cmd)
}

/// [`spawn`] for a command made already.
fn spawn_command(name: &str, cmd: Command) -> Result<Proc> {
    let mut p = Proc::spawn_quiet(name, cmd)?;
    p.set_drop_grace(Duration::from_secs(3));
    Ok(p)
}

/// A field of a JSON log line (`fields.<name>`), as tracing's JSON format writes.
pub fn log_field(line: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    match &v["fields"][name] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// From a starting proxy's JSON log (`--log-format=json`, one `--forward`):
/// its agents' address, its forward port and its host key fingerprint.
async fn started_proxy(proxy: &Proc) -> Result<(SocketAddr, SocketAddr, String)> {
    let listening = proxy
        .wait_for_line(
            |l| log_message_is(l, "listening for agents"),
            Duration::from_secs(30),
        )
        .await?;
    let agents: SocketAddr = log_field(&listening, "addr").context("addr")?.parse()?;
    let fw = proxy
        .wait_for_line(
            |l| log_message_is(l, "forward listening"),
            Duration::from_secs(5),
        )
        .await?;
    let forward: SocketAddr = log_field(&fw, "addr").context("addr")?.parse()?;
    let fingerprint = proxy
        .lines()
        .iter()
        .find_map(|l| log_field(l, "fingerprint"))
        .context("no host key fingerprint in the proxy's log")?;
    Ok((agents, forward, fingerprint))
}

pub fn log_message_is(line: &str, message: &str) -> bool {
    log_field(line, "message").is_some_and(|m| m == message)
}

/// Run kubectl with `kubeconfig`; stdout on success.
pub async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The upstream HTTPS server, in a process of its own (`bench upstream`).
pub struct Upstream {
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Upstream {
    pub async fn start(env: &Env, pki: &Pki) -> Result<Upstream> {
        let cert = env.work.join("upstream.crt");
        let key = env.work.join("upstream.key");
        std::fs::write(&cert, &pki.server_cert_pem)?;
        std::fs::write(&key, &pki.server_key_pem)?;
        let me = std::env::current_exe().context("the bench binary's path")?;
        let proc = spawn(
            "upstream",
            &me,
            &[
                "upstream".into(),
                "--cert".into(),
                cert.display().to_string(),
                "--key".into(),
                key.display().to_string(),
            ],
        )?;
        let line = proc
            .wait_for_line(|l| l.starts_with("listening "), Duration::from_secs(10))
            .await?;
        let addr = line["listening ".len()..].trim().parse()?;
        Ok(Upstream { addr, proc })
    }
}

/// Our proxy in Kubernetes mode with its two agents.
pub struct TowerRs {
    // Drop order: agents before the proxy, the proxy before the clusters.
    pub alpha_agent: Option<Proc>,
    pub bench_agent: Proc,
    pub proxy: Proc,
    pub agents_addr: SocketAddr,
    pub forward: SocketAddr,
    /// `--connect-port`: the HTTP CONNECT door (mutual TLS).
    pub connect: SocketAddr,
    pub fingerprint: String,
    pub alpha_token: PathBuf,
    /// `config_alpha`: reaches the member kube-apiserver through the tunnel.
    pub alpha_kubeconfig: PathBuf,
    /// The Cluster `bench` kubeconfig: reaches the upstream through the tunnel.
    pub bench_kubeconfig: PathBuf,
}

/// The cluster resources the proxy manages.
const CLUSTERS: &str = "apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: bench
spec:
  joinFederation: true
  connection:
    type: proxy
---
apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: alpha
spec:
  joinFederation: true
  connection:
    type: proxy
";

impl TowerRs {
    /// `variant`: the build to run ([`Variant::current`], or `BENCH_B_*`'s
    /// on a host cluster of its own); its files in the work directory and
    /// its port range are its own.
    pub async fn start(
        env: &Env,
        host: &KubeCluster,
        member: &KubeCluster,
        upstream_kubeconfig: &Path,
        variant: &Variant,
    ) -> Result<TowerRs> {
        let hkc = host.kubeconfig();
        let tag = variant.tag();
        let crd = Command::new(kubectl_binary())
            .arg("kustomize")
            .arg(env.root.join("config/crd"))
            .output()
            .await?;
        ensure!(crd.status.success(), "kubectl kustomize config/crd failed");
        let crd_file = env.work.join("crd.yaml");
        std::fs::write(&crd_file, &crd.stdout)?;
        kubectl(hkc, &["apply", "-f", &crd_file.display().to_string()]).await?;
        kubectl(
            hkc,
            &[
                "wait",
                "--for",
                "condition=established",
                "crd/clusters.cluster.kubesphere.io",
                "--timeout=60s",
            ],
        )
        .await?;
        let _ = kubectl(hkc, &["create", "namespace", "kubesphere-system"]).await;

        let ports = match tag.is_empty() {
            true => std::env::var("BENCH_CLUSTER_PORTS").unwrap_or_else(|_| "24600-24649".into()),
            false => "24650-24699".into(),
        };
        let proxy = variant.spawn(
            &format!("proxy{tag}"),
            "proxy",
            vec![
                "--host=127.0.0.1".into(),
                "--port=0".into(),
                format!("--kubeconfig={}", hkc.display()),
                "--advertise-address=127.0.0.1".into(),
                format!(
                    "--data-dir={}",
                    env.work.join(format!("proxy-data{tag}")).display()
                ),
                format!("--cluster-ports={ports}"),
                "--forward=bench=127.0.0.1:0".into(),
                "--connect-port=0".into(),
                "--log-format=json".into(),
                // The bulk uploads measure the tunnel, like the peers'
                // (which pace nothing): one client's request bodies are not
                // paced here (by default 8 MiB/s after 32 MiB).
                "--request-body-rate-per-source=0".into(),
            ],
        )?;
        let (agents_addr, forward, fingerprint) = started_proxy(&proxy).await?;
        let door = proxy
            .wait_for_line(
                |l| log_message_is(l, "CONNECT port listening (mutual TLS)"),
                Duration::from_secs(10),
            )
            .await?;
        let connect: SocketAddr = log_field(&door, "addr").context("addr")?.parse()?;

        let clusters = env.work.join(format!("clusters{tag}.yaml"));
        std::fs::write(&clusters, CLUSTERS)?;
        kubectl(hkc, &["apply", "-f", &clusters.display().to_string()]).await?;
        let mut tokens = Vec::new();
        for name in ["bench", "alpha"] {
            let token = wait_for_ok(Duration::from_secs(30), || async {
                let t = kubectl(
                    hkc,
                    &[
                        "get",
                        "cluster",
                        name,
                        "-o",
                        "jsonpath={.spec.connection.token}",
                    ],
                )
                .await?;
                ensure!(!t.trim().is_empty(), "no token yet for {name}");
                Ok(t.trim().to_string())
            })
            .await?;
            let file = env.work.join(format!("{name}{tag}.token"));
            std::fs::write(&file, token)?;
            tokens.push(file);
        }
        let alpha_token = tokens.pop().expect("two");
        let bench_token = tokens.pop().expect("two");

        let bench_agent = variant.spawn(
            &format!("agent-bench{tag}"),
            "agent",
            agent_args(
                "bench",
                &bench_token,
                agents_addr,
                &fingerprint,
                upstream_kubeconfig,
            ),
        )?;
        let alpha_agent = variant.spawn(
            &format!("agent-alpha{tag}"),
            "agent",
            agent_args(
                "alpha",
                &alpha_token,
                agents_addr,
                &fingerprint,
                member.kubeconfig(),
            ),
        )?;
        for a in [&bench_agent, &alpha_agent] {
            a.wait_for_line(
                |l| log_message_is(l, "connected to proxy"),
                Duration::from_secs(30),
            )
            .await?;
        }
        let bench_kubeconfig = published_kubeconfig(env, hkc, "bench", &tag).await?;
        let alpha_kubeconfig = published_kubeconfig(env, hkc, "alpha", &tag).await?;
        Ok(TowerRs {
            alpha_agent: Some(alpha_agent),
            bench_agent,
            proxy,
            agents_addr,
            forward,
            connect,
            fingerprint,
            alpha_token,
            alpha_kubeconfig,
            bench_kubeconfig,
        })
    }

    /// The https path (a) through this proxy: the bench Cluster's
    /// kubeconfig, named `name`.
    pub fn https_target(&self, name: &str) -> Result<Target> {
        let k = tls::from_kubeconfig(&self.bench_kubeconfig)?;
        Ok(Target {
            name: name.into(),
            addr: k.addr,
            tls: k.tls,
            server_name: k.server_name,
            procs: vec![self.proxy.pid(), self.bench_agent.pid()],
            via: None,
        })
    }

    /// Spawn the alpha agent (the previous one must be gone).
    pub fn spawn_alpha_agent(&self, member: &KubeCluster) -> Result<Proc> {
        spawn(
            "agent-alpha",
            &bin("agent"),
            &agent_args(
                "alpha",
                &self.alpha_token,
                self.agents_addr,
                &self.fingerprint,
                member.kubeconfig(),
            ),
        )
    }
}

pub fn agent_args(
    name: &str,
    token: &Path,
    proxy: SocketAddr,
    fingerprint: &str,
    kubeconfig: &Path,
) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--token-file={}", token.display()),
        format!("--proxy-server=http://{proxy}"),
        format!("--proxy-host-key-fingerprint={fingerprint}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--kubesphere-service=127.0.0.1:9".into(),
        "--log-format=json".into(),
    ]
}

/// The kubeconfig the proxy wrote into Cluster `name`, saved as
/// `config_<name><tag>`.
async fn published_kubeconfig(
    env: &Env,
    host_kubeconfig: &Path,
    name: &str,
    tag: &str,
) -> Result<PathBuf> {
    let b64 = wait_for_ok(Duration::from_secs(60), || async {
        let k = kubectl(
            host_kubeconfig,
            &[
                "get",
                "cluster",
                name,
                "-o",
                "jsonpath={.spec.connection.kubeconfig}",
            ],
        )
        .await?;
        ensure!(!k.trim().is_empty(), "no kubeconfig yet in Cluster {name}");
        Ok(k)
    })
    .await?;
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("the Cluster's kubeconfig is not base64")?;
    let file = env.work.join(format!("config_{name}{tag}"));
    std::fs::write(&file, yaml)?;
    Ok(file)
}

/// go-proxy + go-agent (x/crypto/ssh + gorilla websocket, Tower's stack).
pub struct GoPeers {
    pub agent: Proc,
    /// Kept alive for the connection's sake.
    pub _relay: Option<Relay>,
    pub proxy: Proc,
    pub forward: SocketAddr,
}

impl GoPeers {
    /// `link`: put a [`Relay`] over this link between them.
    pub async fn start(upstream: SocketAddr, link: Option<Link>) -> Result<GoPeers> {
        let token = "bench-go-token";
        let proxy = spawn(
            "go-proxy",
            &bin("go-proxy"),
            &[
                "--listen=127.0.0.1:0".into(),
                "--name=bench".into(),
                format!("--token={token}"),
                "--forward=127.0.0.1:0".into(),
            ],
        )?;
        let listen = proxy
            .wait_for_line(|l| l.starts_with("listening "), Duration::from_secs(10))
            .await?;
        let forward = proxy
            .wait_for_line(|l| l.starts_with("forward "), Duration::from_secs(10))
            .await?;
        let listen: SocketAddr = listen["listening ".len()..].trim().parse()?;
        let forward = forward["forward ".len()..].trim().parse()?;
        let relay = match &link {
            Some(l) => Some(Relay::start(listen, l).await?),
            None => None,
        };
        let listen = relay.as_ref().map_or(listen, |r| r.addr);
        let agent = spawn(
            "go-agent",
            &bin("go-agent"),
            &[
                format!("--proxy-server=http://{listen}"),
                "--name=bench".into(),
                format!("--token={token}"),
                format!("--kubernetes-service={upstream}"),
                format!("--kubesphere-service={upstream}"),
            ],
        )?;
        agent
            .wait_for_line(|l| l == "connected", Duration::from_secs(20))
            .await?;
        Ok(GoPeers {
            agent,
            _relay: relay,
            proxy,
            forward,
        })
    }
}

/// Chisel in reverse mode: the server listens for the client's reverse port.
pub struct Chisel {
    pub client: Proc,
    /// Kept alive for the connection's sake.
    pub _relay: Option<Relay>,
    pub server: Proc,
    pub forward: SocketAddr,
    pub version: String,
}

impl Chisel {
    /// `link`: put a [`Relay`] over this link between them.
    pub async fn start(env: &Env, upstream: SocketAddr, link: Option<Link>) -> Result<Chisel> {
        let chisel = env.chisel();
        if !chisel.is_file() {
            bail!(
                "{} is missing: `make bench` installs it (target chisel)",
                chisel.display()
            );
        }
        let version = std::process::Command::new(&chisel)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let port = e2e::free_port();
        let rport = e2e::free_port();
        let server = spawn(
            "chisel-server",
            &chisel,
            &[
                "server".into(),
                "--host=127.0.0.1".into(),
                format!("--port={port}"),
                "--reverse".into(),
            ],
        )?;
        server
            .wait_for_line(|l| l.contains("Listening on"), Duration::from_secs(10))
            .await?;
        let relay = match &link {
            Some(l) => Some(Relay::start(SocketAddr::from(([127, 0, 0, 1], port)), l).await?),
            None => None,
        };
        let server_addr = relay
            .as_ref()
            .map_or(SocketAddr::from(([127, 0, 0, 1], port)), |r| r.addr);
        let client = spawn(
            "chisel-client",
            &chisel,
            &[
                "client".into(),
                format!("http://{server_addr}"),
                format!("R:127.0.0.1:{rport}:{upstream}"),
            ],
        )?;
        server
            .wait_for_line(
                |l| l.contains(&format!(":{rport}")) && l.contains("Listening"),
                Duration::from_secs(20),
            )
            .await?;
        Ok(Chisel {
            client,
            _relay: relay,
            server,
            forward: SocketAddr::from(([127, 0, 0, 1], rport)),
            version,
        })
    }
}

/// Our proxy in `--clusters-file` mode with a `--forward` port and one agent
/// whose websocket goes to the proxy, or through a [`Relay`] that delays it.
/// Used for `BENCH_B_*` (another build) and for the long-link scenario.
pub struct ForwardPair {
    pub agent: Proc,
    /// Kept alive for the connection's sake.
    pub _relay: Option<Relay>,
    pub proxy: Proc,
    pub forward: SocketAddr,
}

/// Another build of our proxy and agent to measure side by side with this one:
/// `BENCH_B_BIN` (a directory with `proxy` and `agent`) and/or `BENCH_B_ENV`
/// (`K=V ...` for both processes).
#[derive(Clone, Debug)]
pub struct Variant {
    pub dir: Option<PathBuf>,
    pub vars: Vec<(String, String)>,
    pub label: String,
}

impl Variant {
    /// This build (`bin/`), no extra environment.
    pub fn current() -> Variant {
        Variant {
            dir: None,
            vars: Vec::new(),
            label: FORWARD.into(),
        }
    }

    /// `BENCH_B_BIN` / `BENCH_B_ENV`, if either is set.
    pub fn b_from_env() -> Option<Variant> {
        let dir = std::env::var_os("BENCH_B_BIN").map(PathBuf::from);
        let vars: Vec<(String, String)> = std::env::var("BENCH_B_ENV")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        if dir.is_none() && vars.is_empty() {
            return None;
        }
        let mut label = format!(
            "B: {}",
            dir.as_ref()
                .map_or_else(|| "bin/".to_string(), |d| format!("{}/", d.display()))
        );
        for (k, v) in &vars {
            label.push_str(&format!(" {k}={v}"));
        }
        Some(Variant { dir, vars, label })
    }

    /// The label of its https path: the forward path's, and " https".
    pub fn https_label(&self) -> String {
        format!("{} https", self.label)
    }

    /// "" for this build, "-b" for the other: in process and file names.
    fn tag(&self) -> String {
        match self.dir.is_some() || !self.vars.is_empty() {
            true => "-b".into(),
            false => String::new(),
        }
    }

    /// `program` (`proxy`, `agent`) of this variant, as [`spawn`] does.
    fn spawn(&self, name: &str, program: &str, args: Vec<String>) -> Result<Proc> {
        spawn_command(name, self.command(program, args))
    }

    fn command(&self, name: &str, args: Vec<String>) -> Command {
        let program = self
            .dir
            .as_ref()
            .map_or_else(|| bin(name), |d| d.join(name));
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }
}

impl ForwardPair {
    /// `name`: the cluster's name (and the processes' log prefix).
    pub async fn start(
        env: &Env,
        name: &str,
        variant: &Variant,
        link: Option<Link>,
    ) -> Result<ForwardPair> {
        let token = format!("bench-{name}-token-0123456789abcdef");
        let clusters = env.work.join(format!("clusters-{name}.json"));
        std::fs::write(&clusters, format!("{{\"{name}\": \"{token}\"}}"))?;
        let token_file = env.work.join(format!("{name}.token"));
        std::fs::write(&token_file, &token)?;
        let proxy = variant.spawn(
            &format!("proxy-{name}"),
            "proxy",
            vec![
                "--host=127.0.0.1".into(),
                "--port=0".into(),
                format!(
                    "--data-dir={}",
                    env.work.join(format!("proxy-{name}")).display()
                ),
                format!("--clusters-file={}", clusters.display()),
                format!("--forward={name}=127.0.0.1:0"),
                "--log-format=json".into(),
            ],
        )?;
        let (agents, forward, fingerprint) = started_proxy(&proxy).await?;
        let relay = match &link {
            Some(l) => Some(Relay::start(agents, l).await?),
            None => None,
        };
        let dial = relay.as_ref().map_or(agents, |r| r.addr);
        let kubeconfig = env.work.join("upstream.kubeconfig");
        let agent = variant.spawn(
            &format!("agent-{name}"),
            "agent",
            agent_args(name, &token_file, dial, &fingerprint, &kubeconfig),
        )?;
        agent
            .wait_for_line(
                |l| log_message_is(l, "connected to proxy"),
                Duration::from_secs(30),
            )
            .await?;
        Ok(ForwardPair {
            agent,
            _relay: relay,
            proxy,
            forward,
        })
    }

    pub fn procs(&self) -> Vec<u32> {
        vec![self.proxy.pid(), self.agent.pid()]
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
