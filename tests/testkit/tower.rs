//! [`Tower`]: the whole seed flow in one call, for tests that need kubectl
//! reaching a member cluster through the tunnel.
//!
//! It does what `hack/demo.sh` and a user do: a host and a member cluster
//! (real kube-apiservers; the member with the kubelet stand-in), the Cluster
//! CRD and `kubesphere-system` on the host, `bin/proxy` watching Clusters
//! through the host's kubeconfig, Cluster `alpha`, `bin/agent` with alpha's
//! token and the member's kubeconfig, and finally `config_alpha`: the
//! kubeconfig the proxy published in `spec.connection.kubeconfig`, which
//! points at alpha's per-cluster HTTPS listener.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let tower = e2e::Tower::start().await?;
//! tower.member().run_pod("default", "box").await?;
//! // the real kubectl, through the tunnel
//! let out = tower.kubectl_ok(&["exec", "box", "--", "echo", "hi"]).await?;
//! assert_eq!(out, "hi\n");
//! # Ok(()) }
//! ```
//!
//! Dropping it stops the agent, then the proxy, then the clusters.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::serde_json::{self, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::cluster::KubeCluster;
use crate::member_net::{MEMBER_GATEWAY, MemberNet};
use crate::net::free_port;
use crate::paths::{bin, kubectl_binary, workspace_root};
use crate::ports::{PortBlock, pick_ports};
use crate::proc::Proc;
use crate::wait::wait_for_ok;

/// The Cluster [`Tower::start`] creates.
pub const CLUSTER: &str = "alpha";
const CRD: &str = "crd/clusters.cluster.kubesphere.io";
/// The other CRD of config/crd (self-registration).
pub const CRR_CRD: &str = "crd/clusterregistrationrequests.cluster.kubesphere.io";
const NS: &str = "kubesphere-system";
/// In [`TowerOptions::proxy_args`]: the host kube-apiserver's `host:port`.
pub const HOST_SERVER: &str = "{host-server}";
const SETTLE: Duration = Duration::from_secs(120);

/// What [`Tower::start_with`] sets up.
#[derive(Clone, Debug)]
pub struct TowerOptions {
    /// Run the member with `--kubelet` (default true).
    pub kubelet: bool,
    /// `--keepalive` of the proxy and the agent (default: theirs, 30s).
    pub keepalive: Option<String>,
    /// More flags for the proxy and the agent (e.g. `--log-format json`).
    /// [`HOST_SERVER`] in a proxy flag becomes the host kube-apiserver's `host:port`.
    pub proxy_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// Put the member's kube-apiserver, kubelet stand-in and agent in a
    /// [`MemberNet`]: no inbound network, the agent dials the proxy on
    /// [`crate::MEMBER_GATEWAY`]. Only inside [`crate::in_own_netns`].
    pub isolated_member: bool,
    /// More `kube-harness` flags for the host (e.g. `--etcd-sync-delay-file`).
    pub host_args: Vec<String>,
    /// Collect the proxy's and the agent's lines without echoing them to the
    /// test's output: a test whose attacks make hundreds of warn lines would
    /// otherwise bury its own failure message (errors from
    /// [`Proc::wait_for_line`] still carry the last lines).
    pub quiet: bool,
}

impl Default for TowerOptions {
    fn default() -> Self {
        Self {
            kubelet: true,
            keepalive: None,
            proxy_args: Vec::new(),
            agent_args: Vec::new(),
            isolated_member: false,
            host_args: Vec::new(),
            quiet: false,
        }
    }
}

/// Host + member + proxy + agent + Cluster alpha, and alpha's kubeconfig.
pub struct Tower {
    // Fields drop in declaration order: the agent and the proxy stop before
    // the clusters they talk to, the directory goes last.
    agent: Proc,
    proxy: Proc,
    member: KubeCluster,
    host: KubeCluster,
    /// After the member: the namespace goes once its processes stopped.
    member_net: Option<MemberNet>,
    config_alpha: PathBuf,
    /// The agent's arguments, for [`Tower::restart_agent`].
    agent_args: Vec<std::ffi::OsString>,
    kube_port: u16,
    proxy_port: u16,
    fingerprint: String,
    /// The proxy's `--cluster-ports`, reserved while it runs.
    _ports: PortBlock,
    dir: tempfile::TempDir,
    quiet: bool,
}

impl Tower {
    /// Everything with the defaults (member with the kubelet stand-in).
    pub async fn start() -> Result<Tower> {
        Self::start_with(TowerOptions::default()).await
    }

    /// Everything, as `opts` says.
    pub async fn start_with(opts: TowerOptions) -> Result<Tower> {
        let t0 = Instant::now();
        let member_args: &[&str] = if opts.kubelet { &["--kubelet"] } else { &[] };
        let member_net = if opts.isolated_member {
            Some(MemberNet::create().await?)
        } else {
            None
        };
        let member = async {
            match &member_net {
                Some(net) => KubeCluster::start_isolated("member", net, member_args).await,
                None => KubeCluster::start_with_args("member", member_args).await,
            }
        };
        let host_args: Vec<&str> = opts.host_args.iter().map(String::as_str).collect();
        let (host, member) = tokio::join!(KubeCluster::start_with_args("host", &host_args), member);
        let (host, member) = (host?, member?);
        let dir = tempfile::Builder::new().prefix("tower-").tempdir()?;

        // The CRDs as in Tower's README: kubectl kustomize config/crd | kubectl create -f -
        let crd = checked(
            &["kustomize", "config/crd"],
            run_kubectl(
                None,
                &[
                    "kustomize",
                    &workspace_root().join("config/crd").to_string_lossy(),
                ],
                None,
                &[],
            )
            .await?,
        )?;
        let host_kc = host.kubeconfig().to_path_buf();
        let k = |args: &'static [&'static str]| {
            let host_kc = host_kc.clone();
            async move { checked(args, run_kubectl(Some(&host_kc), args, None, &[]).await?) }
        };
        checked(
            &["create", "-f", "-"],
            run_kubectl(
                Some(&host_kc),
                &["create", "-f", "-"],
                Some(crd.as_bytes()),
                &[],
            )
            .await?,
        )?;
        k(&[
            "wait",
            "--for",
            "condition=established",
            CRD,
            CRR_CRD,
            "--timeout=120s",
        ])
        .await?;
        k(&["create", "ns", NS]).await?;

        // The proxy, with one port range of its own (below the ephemeral
        // range; it skips ports it cannot bind).
        let proxy_port = free_port();
        let ports = pick_ports(20)?;
        let mut cmd = Command::new(bin("proxy"));
        // An isolated member reaches the proxy on the veth's host side.
        let listen = if member_net.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        cmd.args(["--host", listen, "--port"])
            .arg(proxy_port.to_string())
            .arg("--kubeconfig")
            .arg(&host_kc)
            .args(["--advertise-address", "127.0.0.1"])
            .arg("--cluster-ports")
            .arg(ports.range())
            .arg("--data-dir")
            .arg(dir.path().join("proxy-data"));
        if let Some(k) = &opts.keepalive {
            cmd.args(["--keepalive", k]);
        }
        let host_server = host.server_addr()?;
        cmd.args(
            opts.proxy_args
                .iter()
                .map(|a| a.replace(HOST_SERVER, &host_server)),
        );
        let proxy = spawn(opts.quiet, "proxy", cmd)?;
        let line = proxy
            .wait_for_line(|l| l.contains("SSH host key"), SETTLE)
            .await?;
        let fingerprint = fingerprint_in(&line)?;
        proxy
            .wait_for_line(|l| l.contains("listening for agents"), SETTLE)
            .await?;

        // Cluster alpha; the proxy gives it a token and ports.
        let cluster = serde_json::json!({
            "apiVersion": "cluster.kubesphere.io/v1alpha1",
            "kind": "Cluster",
            "metadata": {"name": CLUSTER},
            "spec": {"joinFederation": true, "connection": {"type": "proxy"}}
        })
        .to_string();
        checked(
            &["create", "-f", "-"],
            run_kubectl(
                Some(&host_kc),
                &["create", "-f", "-"],
                Some(cluster.as_bytes()),
                &[],
            )
            .await?,
        )?;
        let get_cluster = || async {
            let out = checked(
                &["get", "cluster"],
                run_kubectl(
                    Some(&host_kc),
                    &["get", "cluster", CLUSTER, "-o", "json"],
                    None,
                    &[],
                )
                .await?,
            )?;
            serde_json::from_str::<Value>(&out).context("parsing the Cluster")
        };
        let token = wait_for_ok(SETTLE, || async {
            let c = get_cluster().await?;
            let token = c["spec"]["connection"]["token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ensure!(!token.is_empty(), "Cluster {CLUSTER} has no token yet");
            Ok(token)
        })
        .await?;

        // The agent, in the "member", with the member's admin kubeconfig.
        let token_file = dir.path().join("alpha.token");
        std::fs::write(&token_file, &token)?;
        let mut agent_args = agent_args(
            CLUSTER,
            &token_file,
            proxy_port,
            &fingerprint,
            &member,
            member_net.as_ref(),
        );
        if let Some(k) = &opts.keepalive {
            agent_args.extend(["--keepalive".into(), k.into()]);
        }
        agent_args.extend(opts.agent_args.iter().map(Into::into));
        let mut cmd = agent_program(member_net.as_ref());
        cmd.args(&agent_args);
        let agent = spawn(opts.quiet, "agent", cmd)?;
        agent
            .wait_for_line(|l| l.contains("connected to proxy"), SETTLE)
            .await?;

        // The published kubeconfig: config_alpha.
        let (b64, kube_port) = wait_for_ok(SETTLE, || async {
            let c = get_cluster().await?;
            let available = c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True");
            ensure!(available, "AgentAvailable is not True yet");
            let kc = c["spec"]["connection"]["kubeconfig"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ensure!(!kc.is_empty(), "no kubeconfig published yet");
            // None with `--cluster-ports none` (the path form).
            let port = c["spec"]["connection"]["kubernetesAPIServerPort"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0);
            Ok((kc, port))
        })
        .await
        .context("Cluster alpha never got AgentAvailable=True and a kubeconfig")?;
        let config_alpha = dir.path().join("config_alpha");
        std::fs::write(&config_alpha, b64_decode(&b64)?)?;
        let tower = Tower {
            agent,
            proxy,
            member,
            host,
            member_net,
            config_alpha,
            agent_args,
            kube_port,
            proxy_port,
            fingerprint,
            _ports: ports,
            dir,
            quiet: opts.quiet,
        };
        // Through the tunnel: the member's namespaces.
        wait_for_ok(SETTLE, || async {
            tower
                .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
                .await
        })
        .await
        .context("kubectl through config_alpha")?;
        eprintln!(
            "tower: host, member, proxy, agent and config_alpha ready in {:?}",
            t0.elapsed()
        );
        Ok(tower)
    }

    /// The kubeconfig the proxy published for alpha (through the tunnel).
    pub fn config_alpha(&self) -> &Path {
        &self.config_alpha
    }

    /// The host cluster (Cluster resources, the proxy's Secret).
    pub fn host(&self) -> &KubeCluster {
        &self.host
    }

    /// The host, to stop or restart its kube-apiserver.
    pub fn host_mut(&mut self) -> &mut KubeCluster {
        &mut self.host
    }

    /// The member cluster (direct access, not through the tunnel).
    pub fn member(&self) -> &KubeCluster {
        &self.member
    }

    /// The member's network namespace, with [`TowerOptions::isolated_member`].
    pub fn member_net(&self) -> Option<&MemberNet> {
        self.member_net.as_ref()
    }

    /// The member, to stop or restart its kube-apiserver.
    pub fn member_mut(&mut self) -> &mut KubeCluster {
        &mut self.member
    }

    /// The agent, to stop it.
    pub fn agent_mut(&mut self) -> &mut Proc {
        &mut self.agent
    }

    /// The proxy, to stop it or ask whether it is still running.
    pub fn proxy_mut(&mut self) -> &mut Proc {
        &mut self.proxy
    }

    pub fn proxy(&self) -> &Proc {
        &self.proxy
    }

    pub fn agent(&self) -> &Proc {
        &self.agent
    }

    /// Stop the agent and start it again with its arguments plus `extra`
    /// (e.g. flags that need the member set up first); wait until it is
    /// connected.
    pub async fn restart_agent(&mut self, extra: &[&str]) -> Result<()> {
        self.agent.terminate(Duration::from_secs(10)).await?;
        let mut cmd = agent_program(self.member_net.as_ref());
        cmd.args(&self.agent_args).args(extra);
        self.agent = spawn(self.quiet, "agent", cmd)?;
        self.agent
            .wait_for_line(|l| l.contains("connected to proxy"), SETTLE)
            .await?;
        Ok(())
    }

    /// Alpha's kube-apiserver port on the proxy (config_alpha's server
    /// port); 0 with `--cluster-ports none`.
    pub fn kube_port(&self) -> u16 {
        self.kube_port
    }

    /// The proxy's port for agents (`/health`, `/metrics`).
    pub fn proxy_port(&self) -> u16 {
        self.proxy_port
    }

    /// The proxy's SSH host key fingerprint (`SHA256:...`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A scratch directory removed with the `Tower`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The real kubectl with config_alpha; output whatever the exit status.
    /// Async: the runtime keeps running while kubectl does.
    pub async fn kubectl(&self, args: &[&str]) -> Result<Output> {
        run_kubectl(Some(&self.config_alpha), args, None, &[]).await
    }

    /// [`Tower::kubectl`] with stdin `input` and extra environment variables.
    pub async fn kubectl_with(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        env: &[(&str, &str)],
    ) -> Result<Output> {
        run_kubectl(Some(&self.config_alpha), args, input, env).await
    }

    /// [`Tower::kubectl`] that must succeed; returns stdout.
    pub async fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        checked(args, self.kubectl(args).await?)
    }

    /// A `tokio::process::Command` for kubectl with config_alpha, for tests
    /// that drive kubectl's stdin/stdout themselves.
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(kubectl_binary());
        cmd.arg("--kubeconfig").arg(&self.config_alpha);
        cmd.kill_on_drop(true);
        cmd
    }
}

impl std::fmt::Debug for Tower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tower")
            .field("config_alpha", &self.config_alpha)
            .field("kube_port", &self.kube_port)
            .field("proxy_port", &self.proxy_port)
            .finish_non_exhaustive()
    }
}

/// `bin/agent`, inside `net` if given.
pub(crate) fn agent_program(net: Option<&MemberNet>) -> Command {
    match net {
        Some(net) => net.command(bin("agent")),
        None => Command::new(bin("agent")),
    }
}

/// The arguments of `bin/agent` for cluster `name` with the member's admin
/// kubeconfig, dialling the proxy on `proxy_port` (from inside `net`, if
/// given) and pinning its host key.
pub(crate) fn agent_args(
    name: &str,
    token_file: &Path,
    proxy_port: u16,
    fingerprint: &str,
    member: &KubeCluster,
    net: Option<&MemberNet>,
) -> Vec<OsString> {
    let proxy_host = if net.is_some() {
        MEMBER_GATEWAY
    } else {
        "127.0.0.1"
    };
    let mut args: Vec<OsString> = vec!["--name".into(), name.into(), "--token-file".into()];
    args.push(token_file.into());
    args.extend([
        "--proxy-server".into(),
        format!("http://{proxy_host}:{proxy_port}").into(),
    ]);
    args.push("--kubeconfig".into());
    args.push(member.kubeconfig().into());
    for a in [
        "--kubesphere-service",
        "127.0.0.1:9",
        "--max-retry-interval",
        "5s",
        "--proxy-host-key-fingerprint",
        fingerprint,
    ] {
        args.push(a.into());
    }
    args
}

pub(crate) async fn run_kubectl(
    kubeconfig: Option<&Path>,
    args: &[&str],
    input: Option<&[u8]>,
    env: &[(&str, &str)],
) -> Result<Output> {
    let mut cmd = Command::new(kubectl_binary());
    if let Some(kc) = kubeconfig {
        cmd.arg("--kubeconfig").arg(kc);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning kubectl (set KUBECTL?)")?;
    let writer = match (input, child.stdin.take()) {
        (Some(input), Some(mut stdin)) => {
            let input = input.to_vec();
            Some(tokio::spawn(async move {
                let _ = stdin.write_all(&input).await;
            }))
        }
        _ => None,
    };
    let out = child
        .wait_with_output()
        .await
        .context("waiting for kubectl")?;
    if let Some(w) = writer {
        let _ = w.await;
    }
    Ok(out)
}

pub(crate) fn checked(args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `name`'s process, its lines echoed to the test's output unless `quiet`.
fn spawn(quiet: bool, name: &str, cmd: Command) -> Result<Proc> {
    if quiet {
        Proc::spawn_quiet(name, cmd)
    } else {
        Proc::spawn(name, cmd)
    }
}

/// The proxy's host key fingerprint from its log line, text
/// (`fingerprint=SHA256:...`) or JSON (`"fields":{"fingerprint":...}`).
pub fn fingerprint_in(line: &str) -> Result<String> {
    let found = match serde_json::from_str::<Value>(line) {
        Ok(json) => json["fields"]["fingerprint"].as_str().map(str::to_string),
        Err(_) => line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("fingerprint="))
            .map(str::to_string),
    };
    found.with_context(|| format!("no fingerprint in {line:?}"))
}

/// Standard base64 (the kubeconfig in the Cluster), padding optional.
pub(crate) fn b64_decode(text: &str) -> Result<Vec<u8>> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = B64
            .iter()
            .position(|&x| x == c)
            .with_context(|| format!("{:?} is not base64", c as char))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}
