//! [`KubeCluster`]: a real kube-apiserver (with embedded etcd) from
//! `bin/kube-harness`, listening on 127.0.0.1, with an admin kubeconfig.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use e2e::KubeCluster;
//! use e2e::k8s_openapi::api::core::v1::Namespace;
//! use e2e::kube::{Api, api::ListParams};
//!
//! let c = KubeCluster::start("member").await?;
//! let namespaces: Api<Namespace> = Api::all(c.client().await?);
//! let list = namespaces.list(&ListParams::default()).await?;
//! assert!(list.items.iter().any(|n| n.metadata.name.as_deref() == Some("default")));
//! let out = c.kubectl_ok(&["get", "ns", "default", "-o", "name"]);
//! assert_eq!(out.trim(), "namespace/default");
//! # Ok(()) }
//! ```
//!
//! The harness prints `ready <dir>/kubeconfig` on stdout once the API
//! server serves; its logs go to stderr (collected, see [`KubeCluster::proc`]).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;
use tokio::process::Command;
use tokio::task::JoinSet;

use crate::member_net::MemberNet;
use crate::paths::{bin, kubectl_binary};
use crate::proc::Proc;

/// How long a cluster may take to print `ready` (a cold start on a busy
/// 2-core machine takes tens of seconds; this leaves ample margin).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// How long dropping or stopping a cluster waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

enum DataDir {
    /// Created by the testkit, removed on drop (after the process stopped).
    Temp(TempDir),
    /// Given by the caller ([`KubeCluster::start_in`]), kept.
    Kept(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Kept(p) => p,
        }
    }
}

/// A running `bin/kube-harness`: one kube-apiserver + etcd, data in a
/// directory, admin (system:masters) kubeconfig in that directory.
///
/// Dropping it stops the process (SIGTERM, SIGKILL after [`STOP_GRACE`]) and
/// then removes its temporary directory (not a directory given to
/// [`KubeCluster::start_in`]).
pub struct KubeCluster {
    name: String,
    kubeconfig: PathBuf,
    /// The network namespace it runs in ([`KubeCluster::start_isolated`]);
    /// kubectl runs there too.
    netns: Option<String>,
    /// The harness flags besides `--dir`, for [`KubeCluster::restart`].
    args: Vec<String>,
    // Field order matters: fields drop in declaration order, so the process
    // is stopped (Proc's drop: SIGTERM, wait, SIGKILL) before the directory
    // is removed.
    proc: Proc,
    dir: DataDir,
}

impl KubeCluster {
    /// Starts a cluster in a new temporary directory and waits until it is
    /// ready. `name` prefixes its log lines and names its temp dir.
    pub async fn start(name: &str) -> Result<KubeCluster> {
        Self::start_temp(name, &[]).await
    }

    /// Like [`KubeCluster::start`], with extra `kube-harness` flags, e.g.
    /// `&["--kubelet"]` for the kubelet stand-in (Node [`crate::HARNESS_NODE`]
    /// whose pods can be exec'd into, attached to, port-forwarded and
    /// logged; see [`KubeCluster::run_pod`]).
    pub async fn start_with_args(name: &str, args: &[&str]) -> Result<KubeCluster> {
        Self::start_temp(name, args).await
    }

    /// Starts on a new temporary directory. The harness picks a free port
    /// and its kube-apiserver binds it a moment later: another process (an
    /// outgoing connection's ephemeral port) may take it in between, and the
    /// start fails with "address already in use". Such a start is tried
    /// again on a fresh directory, a few times.
    async fn start_temp(name: &str, args: &[&str]) -> Result<KubeCluster> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            let dir = tempfile::Builder::new()
                .prefix(&format!("kube-{name}-"))
                .tempdir()
                .context("creating the cluster's temp dir")?;
            match Self::start_dir(name, DataDir::Temp(dir), args).await {
                Err(e)
                    if attempt < ATTEMPTS
                        && format!("{e:#}").contains("address already in use") =>
                {
                    eprintln!(
                        "[{name}] its port was taken before the kube-apiserver bound it; \
                         starting again ({attempt} of {ATTEMPTS})"
                    );
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    /// Starts a cluster on `dir` (created if missing, kept on drop): a second
    /// start on the same directory reuses the data of the first.
    pub async fn start_in(name: &str, dir: &Path) -> Result<KubeCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Self::start_dir(name, DataDir::Kept(dir.to_path_buf()), &[]).await
    }

    /// Like [`KubeCluster::start_with_args`], inside the member namespace
    /// `net` (no inbound network): reachable only from inside it, so
    /// [`KubeCluster::kubectl`] runs kubectl there and
    /// [`KubeCluster::client`] is refused.
    pub async fn start_isolated(name: &str, net: &MemberNet, args: &[&str]) -> Result<KubeCluster> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kube-{name}-"))
            .tempdir()
            .context("creating the cluster's temp dir")?;
        let mut cmd = net.command(bin("kube-harness"));
        cmd.arg("--dir").arg(dir.path()).args(args);
        let mut cluster = Self::spawn(name, DataDir::Temp(dir), cmd).await?;
        cluster.netns = Some(net.name().to_string());
        Ok(cluster)
    }

    /// Starts several clusters in parallel; returns them in the order of
    /// `names`. If one fails, the others are stopped and the error returned.
    pub async fn start_many(names: &[&str]) -> Result<Vec<KubeCluster>> {
        let mut set = JoinSet::new();
        for (i, name) in names.iter().enumerate() {
            let name = name.to_string();
            set.spawn(async move { (i, KubeCluster::start(&name).await) });
        }
        let mut slots: Vec<Option<KubeCluster>> = names.iter().map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            let (i, res) = joined.context("a cluster start task panicked")?;
            // On error, returning drops `set` (aborting the other starts,
            // whose Procs are then killed) and `slots` (stopping the
            // clusters already up).
            slots[i] = Some(res.with_context(|| format!("starting cluster {:?}", names[i]))?);
        }
        Ok(slots.into_iter().flatten().collect())
    }

    async fn start_dir(name: &str, dir: DataDir, args: &[&str]) -> Result<KubeCluster> {
        let mut cmd = Command::new(bin("kube-harness"));
        cmd.arg("--dir").arg(dir.path()).args(args);
        let mut cluster = Self::spawn(name, dir, cmd).await?;
        cluster.args = args.iter().map(|a| a.to_string()).collect();
        Ok(cluster)
    }

    /// Starts the harness again on the same directory and flags after
    /// [`KubeCluster::terminate`]: the same data (etcd), certificates and
    /// port (the harness reuses the last port when it is free; an error if
    /// it could not, since clients would not find it).
    pub async fn restart(&mut self) -> Result<()> {
        ensure!(
            self.netns.is_none(),
            "restarting an isolated cluster is not supported"
        );
        ensure!(
            !self.proc.is_running(),
            "cluster {:?} is still running: terminate it first",
            self.name
        );
        let before = self.server_addr()?;
        let mut cmd = Command::new(bin("kube-harness"));
        cmd.arg("--dir").arg(self.dir.path()).args(&self.args);
        let mut proc = Proc::spawn(&self.name, cmd)?;
        proc.set_drop_grace(STOP_GRACE);
        proc.wait_for_line(|l| l.starts_with("ready "), READY_TIMEOUT)
            .await
            .with_context(|| {
                format!(
                    "cluster {:?} did not get ready again; its log files end with:\n{}",
                    self.name,
                    log_tails(self.dir.path(), 30)
                )
            })?;
        self.proc = proc;
        let after = self.server_addr()?;
        ensure!(
            before == after,
            "cluster {:?} came back on {after}, not {before} (the port was taken)",
            self.name
        );
        Ok(())
    }

    async fn spawn(name: &str, dir: DataDir, cmd: Command) -> Result<KubeCluster> {
        let mut proc = Proc::spawn(name, cmd)?;
        proc.set_drop_grace(STOP_GRACE);
        let line = match proc
            .wait_for_line(|l| l.starts_with("ready "), READY_TIMEOUT)
            .await
        {
            Ok(line) => line,
            // The harness logs to files in its dir: show them before the
            // dir is removed.
            Err(e) => {
                return Err(e.context(format!(
                    "cluster {name:?} did not get ready; its log files end with:\n{}",
                    log_tails(dir.path(), 30)
                )));
            }
        };
        let kubeconfig = PathBuf::from(line["ready ".len()..].trim());
        if !kubeconfig.is_file() {
            bail!(
                "cluster {name:?} said {line:?} but {} is not a file",
                kubeconfig.display()
            );
        }
        Ok(KubeCluster {
            name: name.to_string(),
            kubeconfig,
            netns: None,
            args: Vec::new(),
            proc,
            dir,
        })
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin kubeconfig (server `https://127.0.0.1:<port>`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `127.0.0.1:<port>` of the kube-apiserver, from the admin kubeconfig.
    pub fn server_addr(&self) -> Result<String> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let server = kc
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref()?.server.clone())
            .context("no server in the kubeconfig")?;
        Ok(server.trim_start_matches("https://").to_string())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The harness process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The last `n` lines of each `*.log` file in the cluster's directory
    /// (the harness writes the API server's and etcd's logs there), for
    /// failure messages.
    pub fn log_tails(&self, n: usize) -> String {
        log_tails(self.dir(), n)
    }

    /// The harness process (its collected log lines, signals, ...).
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Mutable access to the harness process.
    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// A kube-rs client built from the kubeconfig (rustls with ring).
    pub async fn client(&self) -> Result<kube::Client> {
        if let Some(netns) = &self.netns {
            bail!(
                "cluster {:?} is reachable only inside network namespace {netns}: use kubectl",
                self.name
            );
        }
        // Make ring the process' rustls provider even if feature unification
        // in a workspace build also enables another one (rustls then has no
        // default). An error only means a provider is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .context("kube config from the kubeconfig")?;
        kube::Client::try_from(config).context("building the kube client")
    }

    /// Runs the real `kubectl --kubeconfig <kubeconfig> <args>` (see
    /// [`crate::kubectl_binary`]) and returns its output, whatever its exit
    /// status. Blocks the calling thread until kubectl exits.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let kubectl = kubectl_binary();
        let mut cmd = match &self.netns {
            Some(netns) => {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(&kubectl);
                cmd
            }
            None => std::process::Command::new(&kubectl),
        };
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e} (set KUBECTL?)", kubectl.display()))
    }

    /// A `tokio::process::Command` for kubectl with the admin kubeconfig
    /// (inside the cluster's network namespace, if any).
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(kubectl_binary());
                cmd
            }
            None => Command::new(kubectl_binary()),
        };
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs kubectl like [`KubeCluster::kubectl`], panics (with stderr) if
    /// it fails, and returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} on cluster {:?} failed ({}):\n{}{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Installs the CRDs (Cluster, ClusterRegistrationRequest) the way Tower's README does (`kubectl
    /// kustomize config/crd`, then `kubectl create -f`) and waits until it
    /// is established.
    pub fn install_crd(&self) -> Result<()> {
        self.install_crd_from("config/crd")
    }

    /// [`Self::install_crd`] from another kustomization, e.g.
    /// `config/crd/kubesphere-compat` (no status subresource).
    pub fn install_crd_from(&self, dir: &str) -> Result<()> {
        let crd = std::process::Command::new(kubectl_binary())
            .arg("kustomize")
            .arg(crate::workspace_root().join(dir))
            .output()?;
        ensure!(crd.status.success(), "kubectl kustomize {dir} failed");
        let file = self.dir().join("crd.yaml");
        std::fs::write(&file, &crd.stdout)?;
        self.kubectl_ok(&["create", "-f", &file.to_string_lossy()]);
        self.kubectl_ok(&[
            "wait",
            "--for",
            "condition=established",
            "crd/clusters.cluster.kubesphere.io",
            crate::tower::CRR_CRD,
            "--timeout=120s",
        ]);
        Ok(())
    }

    /// Stops the harness (SIGTERM, SIGKILL after `grace`) and waits for it.
    /// The directory stays until the `KubeCluster` is dropped.
    pub async fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        self.proc.terminate(grace).await
    }

    /// Stops the harness (see [`STOP_GRACE`]) and removes its temporary
    /// directory; unlike a plain drop, returns errors.
    pub async fn stop(mut self) -> Result<()> {
        let status = self.terminate(STOP_GRACE).await?;
        if !status.success() {
            bail!(
                "cluster {:?} exited with {status} on SIGTERM; last lines:\n{}",
                self.name,
                self.proc.tail(20)
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("name", &self.name)
            .field("kubeconfig", &self.kubeconfig)
            .field("proc", &self.proc)
            .finish()
    }
}

/// `== file ==` headers and the last `n` lines of each `*.log` in `dir`.
fn log_tails(dir: &Path, n: usize) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read(&log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!("== {} ==\n", log.display()));
        for l in &lines[lines.len().saturating_sub(n)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    if out.is_empty() {
        out.push_str("(no *.log files)\n");
    }
    out
}
