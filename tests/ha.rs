//! Proxy HA (issue #6, parts 2 and 5) with two real proxy replicas against one
//! real host kube-apiserver: replica `a` on 127.0.0.1 and replica `b` on
//! 127.0.0.2, both with `--leader-elect`. The agent reaches them through a
//! small TCP balancer that plays the agents' Service (first replica that
//! accepts), and kubectl reaches replica `b` directly with config_alpha's
//! credentials (`--server https://127.0.0.2:<port>`).
//!
//! - the agent on `a`, kubectl through `b` works (relayed over the peer port);
//!   `a` killed: the agent moves to `b` by itself and kubectl works again,
//!   and `b` takes over the leader Lease and the cluster's Lease. Before
//!   that, silent connections at `a`'s peer port from one source are capped
//!   like those at any client's door while `b`'s relays go on.
//!   The same once more with the member and its agent in a network
//!   namespace with no inbound network (e2e::MemberNet).
//! - with `--max-handshakes-per-source-per-second`, the connections `b`
//!   relays to `a` take their turn at `b` by the client's address (three
//!   clients' bursts all served, though at `a` they all come from `b`), and
//!   a flood past its turn is closed and counted at `b`; `a`'s audit log
//!   names each client's own address, which `b` sends along.
//! - `a` drains on SIGTERM: a watch relayed through `b` to `a` keeps
//!   delivering during the drain, requests through `b` never fail, the agent
//!   connects to `b` before its tunnel to `a` closes, and the Cluster never
//!   shows AgentAvailable=False.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{
    KubeCluster, MEMBER_GATEWAY, MemberNet, PortBlock, Proc, bin, free_port, in_own_netns,
    kubectl_binary, pick_ports, wait_for_ok, wait_until,
};
use nix::sys::signal::Signal;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

const NS: &str = "kubesphere-system";
const DEADLINE: Duration = Duration::from_secs(90);
const GRACE: &str = "8s";

/// Plays the agents' Service: each connection goes to the first backend
/// that accepts it, in order.
struct Balancer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(ip: Ipv4Addr, backends: Vec<SocketAddr>) -> Result<Balancer> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                tokio::spawn(async move {
                    for backend in backends {
                        if let Ok(mut upstream) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(Balancer { addr, task })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Replica {
    proc: Proc,
    host: &'static str,
}

struct Ha {
    agent: Proc,
    replicas: Vec<Option<Replica>>,
    _balancer: Balancer,
    member: KubeCluster,
    host: KubeCluster,
    /// After the member: the namespace goes once its processes stopped.
    _member_net: Option<MemberNet>,
    config_alpha: PathBuf,
    kube_port: u16,
    agents_port: u16,
    peer_port: u16,
    /// Both replicas' `--cluster-ports`, reserved while they run.
    _cluster_ports: PortBlock,
    _dir: tempfile::TempDir,
}

fn host_kubectl(host: &KubeCluster, args: &[&str]) -> String {
    let out = host.kubectl(args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn jsonpath(host: &KubeCluster, what: &[&str], path: &str) -> String {
    let expr = format!("jsonpath={path}");
    let mut args = vec!["get"];
    args.extend(what);
    args.extend(["-o", &expr]);
    host_kubectl(host, &args)
}

fn lease_holder(host: &KubeCluster, lease: &str) -> String {
    jsonpath(host, &["lease", "-n", NS, lease], "{.spec.holderIdentity}")
}

async fn spawn_replica(
    id: &str,
    host_ip: &'static str,
    ports: (u16, u16, &PortBlock),
    kubeconfig: &Path,
    dir: &Path,
    extra: &[&str],
) -> Result<Replica> {
    let (agents_port, peer_port, cluster_ports) = ports;
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(["--host", host_ip, "--port", &agents_port.to_string()])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--advertise-address", "127.0.0.1"])
        .args(["--cluster-ports", &cluster_ports.range()])
        .arg("--data-dir")
        .arg(dir.join(format!("data-{id}")))
        .args(["--leader-elect", "--leader-elect-lease-duration", "4s"])
        .args(["--replica-id", id, "--peer-port", &peer_port.to_string()])
        .args(["--shutdown-grace", GRACE])
        .args(extra);
    let proc = Proc::spawn(&format!("proxy-{id}"), cmd)?;
    proc.wait_for_line(|l| l.contains("listening for agents"), DEADLINE)
        .await?;
    Ok(Replica {
        proc,
        host: host_ip,
    })
}

impl Ha {
    async fn start() -> Result<Ha> {
        Self::start_with(None, &[]).await
    }

    /// With `net`: the member and its agent in that namespace with no
    /// inbound network; the agent reaches the replicas through the balancer
    /// on the veth's host side.
    /// `proxy_args`: more flags for both replicas.
    async fn start_with(net: Option<MemberNet>, proxy_args: &[&str]) -> Result<Ha> {
        let member = async {
            match &net {
                Some(net) => KubeCluster::start_isolated("member", net, &["--kubelet"]).await,
                None => KubeCluster::start_with_args("member", &["--kubelet"]).await,
            }
        };
        let (host, member) = tokio::join!(KubeCluster::start("host"), member);
        let (host, member) = (host?, member?);
        let dir = tempfile::Builder::new().prefix("tower-ha-").tempdir()?;
        host.install_crd()?;
        host.kubectl_ok(&["create", "ns", NS]);

        // Same ports on two addresses, as two pods would have.
        let (agents_port, peer_port) = (free_port(), free_port());
        let cluster_ports = pick_ports(10)?;
        let ports = (agents_port, peer_port, &cluster_ports);
        let (kubeconfig, data) = (host.kubeconfig(), dir.path());
        let a = spawn_replica("a", "127.0.0.1", ports, kubeconfig, data, proxy_args).await?;
        // `a` leads before `b` starts.
        wait_until(DEADLINE, || async { lease_holder(&host, "tower") == "a" })
            .await
            .context("replica a never took the leader Lease")?;
        let b = spawn_replica("b", "127.0.0.2", ports, kubeconfig, data, proxy_args).await?;
        let balancer_ip = if net.is_some() {
            MEMBER_GATEWAY.parse()?
        } else {
            Ipv4Addr::LOCALHOST
        };
        let balancer = Balancer::start(
            balancer_ip,
            vec![
                SocketAddr::from(([127, 0, 0, 1], agents_port)),
                SocketAddr::from(([127, 0, 0, 2], agents_port)),
            ],
        )
        .await?;

        let cluster_file = dir.path().join("alpha.yaml");
        std::fs::write(
            &cluster_file,
            r#"{"apiVersion":"cluster.kubesphere.io/v1alpha1","kind":"Cluster","metadata":{"name":"alpha"},"spec":{"joinFederation":true,"connection":{"type":"proxy"}}}"#,
        )?;
        host.kubectl_ok(&["create", "-f", &cluster_file.to_string_lossy()]);
        let token = wait_for_ok(DEADLINE, || async {
            let t = jsonpath(&host, &["cluster", "alpha"], "{.spec.connection.token}");
            ensure!(!t.is_empty(), "no token yet");
            Ok(t)
        })
        .await?;
        let token_file = dir.path().join("alpha.token");
        std::fs::write(&token_file, &token)?;
        let mut cmd = match &net {
            Some(net) => net.command(bin("agent")),
            None => Command::new(bin("agent")),
        };
        cmd.args(["--name", "alpha", "--token-file"])
            .arg(&token_file)
            .arg("--proxy-server")
            .arg(format!("http://{}", balancer.addr))
            .arg("--kubeconfig")
            .arg(member.kubeconfig())
            .args(["--kubesphere-service", "127.0.0.1:9"])
            .args(["--max-retry-interval", "2s"]);
        let agent = Proc::spawn("agent", cmd)?;
        agent
            .wait_for_line(|l| l.contains("connected to proxy"), DEADLINE)
            .await?;
        let (b64, kube_port) = wait_for_ok(DEADLINE, || async {
            let kc = jsonpath(
                &host,
                &["cluster", "alpha"],
                "{.spec.connection.kubeconfig}",
            );
            let available = jsonpath(
                &host,
                &["cluster", "alpha"],
                r#"{.status.conditions[?(@.type=="AgentAvailable")].status}"#,
            );
            ensure!(!kc.is_empty() && available == "True", "not available yet");
            let port: u16 = jsonpath(
                &host,
                &["cluster", "alpha"],
                "{.spec.connection.kubernetesAPIServerPort}",
            )
            .parse()?;
            Ok((kc, port))
        })
        .await?;
        let config_alpha = dir.path().join("config_alpha");
        let decoded = std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(b64.as_bytes())?;
                }
                child.wait_with_output()
            })?;
        std::fs::write(&config_alpha, decoded.stdout)?;
        Ok(Ha {
            agent,
            replicas: vec![Some(a), Some(b)],
            _balancer: balancer,
            member,
            host,
            _member_net: net,
            config_alpha,
            kube_port,
            agents_port,
            peer_port,
            _cluster_ports: cluster_ports,
            _dir: dir,
        })
    }

    /// kubectl with config_alpha's credentials, to replica `index`'s port.
    fn kubectl_via(&self, index: usize, args: &[&str]) -> Command {
        let host = self.replicas[index]
            .as_ref()
            .map_or("127.0.0.1", |r| r.host);
        let mut cmd = Command::new(kubectl_binary());
        cmd.arg("--kubeconfig")
            .arg(&self.config_alpha)
            .arg(format!("--server=https://{host}:{}", self.kube_port))
            // The listener's certificate names the advertised address.
            .arg("--tls-server-name=127.0.0.1")
            .args(args)
            .kill_on_drop(true);
        cmd
    }

    async fn kubectl_ok(&self, index: usize, args: &[&str]) -> Result<String> {
        let out = self.kubectl_via(index, args).output().await?;
        ensure!(
            out.status.success(),
            "kubectl via replica {index} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A sample of replica `index`'s /metrics (0 when absent).
    async fn metrics_text(&self, index: usize) -> Result<String> {
        let host = self.replicas[index]
            .as_ref()
            .context("replica stopped")?
            .host;
        e2e::scrape_metrics(host, self.agents_port).await
    }

    /// A sample of replica `index`'s /metrics (0 when absent).
    async fn metric(&self, index: usize, prefix: &str) -> Result<f64> {
        Ok(e2e::metric_sample(&self.metrics_text(index).await?, prefix))
    }

    fn replica(&mut self, index: usize) -> Result<&mut Replica> {
        self.replicas[index]
            .as_mut()
            .context("replica already stopped")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_on_one_replica_serves_clients_of_the_other_and_moves_when_it_dies() -> Result<()> {
    failover(Ha::start().await?).await
}

/// The same with a member that has no inbound network (tests/isolated_member.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failover_works_for_a_member_with_no_inbound_network() -> Result<()> {
    if !in_own_netns("the_failover_works_for_a_member_with_no_inbound_network").await? {
        return Ok(());
    }
    failover(Ha::start_with(Some(MemberNet::create().await?), &[]).await?).await
}

async fn failover(mut ha: Ha) -> Result<()> {
    ensure!(
        lease_holder(&ha.host, "tower-cluster-alpha") == "a",
        "the agent should be on a"
    );
    // Through a (the agent's replica) and through b (relayed to a).
    ha.kubectl_ok(0, &["get", "ns", "kube-system", "-o", "name"])
        .await?;
    let ns = wait_for_ok(DEADLINE, || {
        ha.kubectl_ok(1, &["get", "ns", "kube-system", "-o", "name"])
    })
    .await
    .context("kubectl through replica b (relayed to a)")?;
    ensure!(ns.trim() == "namespace/kube-system", "{ns}");
    // An upgraded stream across the relay too.
    ha.member.run_pod("default", "box").await?;
    let hi = wait_for_ok(DEADLINE, || {
        ha.kubectl_ok(1, &["exec", "box", "--", "echo", "hi"])
    })
    .await?;
    ensure!(hi == "hi\n", "{hi:?}");
    ensure!(
        lease_holder(&ha.host, "tower-cluster-alpha") == "a",
        "b must relay, not take the agent"
    );
    let relayed = ha
        .metric(1, r#"tower_relayed_connections_total{cluster="alpha"}"#)
        .await?;
    ensure!(
        relayed >= 2.0,
        "b's /metrics counts {relayed} relayed connections:\n{}",
        ha.metrics_text(1).await?
    );
    silent_connections_at_the_peer_port(&ha).await?;

    // a dies without a word: the agent moves to b by itself.
    ha.replica(0)?.proc.signal(Signal::SIGKILL)?;
    ha.replicas[0] = None;
    wait_for_ok(DEADLINE, || {
        ha.kubectl_ok(1, &["get", "ns", "kube-system", "-o", "name"])
    })
    .await
    .context("kubectl through b after a died")?;
    wait_until(DEADLINE, || async {
        lease_holder(&ha.host, "tower-cluster-alpha") == "b"
    })
    .await
    .context("b never recorded itself as alpha's replica")?;
    wait_until(DEADLINE, || async {
        lease_holder(&ha.host, "tower") == "b"
    })
    .await
    .context("b never took over the leader Lease")?;
    let available = jsonpath(
        &ha.host,
        &["cluster", "alpha"],
        r#"{.status.conditions[?(@.type=="AgentAvailable")].status}"#,
    );
    ensure!(available == "True", "AgentAvailable={available}");
    Ok(())
}

/// Connections from one source to a's peer port that never start TLS: the
/// excess over the per-source cap of pending handshakes is closed at once
/// and counted, a holds an fd only for those within the cap, and b's relays
/// to a go on meanwhile.
async fn silent_connections_at_the_peer_port(ha: &Ha) -> Result<()> {
    const PER_SOURCE: usize = 128; // --max-pending-handshakes-per-source
    const SILENT: usize = 3 * PER_SOURCE;
    let pid = ha.replicas[0]
        .as_ref()
        .context("replica a stopped")?
        .proc
        .pid();
    let base = e2e::Usage::of(pid)?.fds;
    let to = SocketAddr::from(([127, 0, 0, 1], ha.peer_port));
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 3], 0)))?;
        silent.push(socket.connect(to).await?);
    }
    let refused = r#"tower_refused_connections_total{door="peer",reason="pending_per_source"}"#;
    wait_until(DEADLINE, || async {
        ha.metric(0, refused).await.unwrap_or(0.0) >= (SILENT - PER_SOURCE) as f64
    })
    .await
    .context("a's peer port did not refuse the connections over the per-source cap")?;
    let fds = e2e::Usage::of(pid)?.fds;
    ensure!(
        fds <= base + PER_SOURCE + 32,
        "a holds {fds} fds with {SILENT} silent connections at its peer port ({base} before)"
    );
    ha.kubectl_ok(1, &["get", "ns", "kube-system", "-o", "name"])
        .await
        .context("kubectl through b (relayed to a) while a's peer port is flooded")?;
    drop(silent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_replica_hands_over_without_a_gap() -> Result<()> {
    let mut ha = Ha::start().await?;
    ensure!(
        lease_holder(&ha.host, "tower-cluster-alpha") == "a",
        "the agent should be on a"
    );
    // Every AgentAvailable status the host shows from now on.
    let mut cmd = Command::new(kubectl_binary());
    cmd.arg("--kubeconfig")
        .arg(ha.host.kubeconfig())
        .args(["get", "cluster", "alpha", "-w", "-o"])
        .arg(r#"jsonpath={.status.conditions[?(@.type=="AgentAvailable")].status}{"\n"}"#);
    let conditions = Proc::spawn_quiet("cluster-watch", cmd)?;
    conditions
        .wait_for_line(|l| l.trim() == "True", DEADLINE)
        .await?;
    // A watch relayed through b to a.
    ha.member
        .kubectl_ok(&["create", "configmap", "before-drain", "-n", "default"]);
    let watch = Proc::spawn_quiet(
        "cm-watch",
        ha.kubectl_via(
            1,
            &["get", "configmaps", "-n", "default", "-w", "-o", "name"],
        ),
    )?;
    watch
        .wait_for_line(|l| l.contains("before-drain"), DEADLINE)
        .await?;

    // Requests through b, all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let poller = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (config_alpha, server) = (
            ha.config_alpha.clone(),
            format!("--server=https://127.0.0.2:{}", ha.kube_port),
        );
        let cmd = move || {
            let mut c = Command::new(kubectl_binary());
            c.arg("--kubeconfig")
                .arg(&config_alpha)
                .arg(&server)
                .arg("--tls-server-name=127.0.0.1")
                .args(["get", "ns", "default", "-o", "name"])
                .kill_on_drop(true);
            c
        };
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match cmd().output().await {
                    Ok(out) if out.status.success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(out) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(String::from_utf8_lossy(&out.stderr).into_owned());
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        })
    };

    // a drains.
    ha.replica(0)?.proc.signal(Signal::SIGTERM)?;
    ha.agent
        .wait_for_line(
            |l| l.contains("the proxy is draining, reconnecting"),
            DEADLINE,
        )
        .await?;
    let moved = ha
        .agent
        .wait_for_line(
            |l| l.contains("draining tunnel serves its last streams"),
            DEADLINE,
        )
        .await;
    moved.context("the agent did not connect elsewhere while its tunnel to a drained")?;
    // The relayed watch still delivers during the drain.
    ha.member
        .kubectl_ok(&["create", "configmap", "during-drain", "-n", "default"]);
    watch
        .wait_for_line(|l| l.contains("during-drain"), DEADLINE)
        .await
        .context("the watch through b stopped delivering while a drained")?;
    ensure!(
        ha.replica(0)?.proc.is_running(),
        "a should still be draining (a watch is in flight)"
    );
    // a exits once its grace period is over.
    let status = ha.replica(0)?.proc.wait(Duration::from_secs(60)).await?;
    ensure!(status.success(), "a exited with {status}");
    ha.replicas[0] = None;
    ha.agent
        .wait_for_line(|l| l.contains("draining tunnel closed"), DEADLINE)
        .await?;
    // A few more requests through b, then stop polling.
    let before = ok.load(Ordering::Relaxed);
    wait_until(DEADLINE, || async {
        ok.load(Ordering::Relaxed) >= before + 3
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    let errors = poller.await?;
    ensure!(
        failed.load(Ordering::Relaxed) == 0 && errors.is_empty(),
        "{} of {} requests through b failed during the drain: {errors:?}",
        failed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed) + ok.load(Ordering::Relaxed)
    );
    wait_until(DEADLINE, || async {
        lease_holder(&ha.host, "tower-cluster-alpha") == "b"
    })
    .await?;
    let seen = conditions.stream_lines(e2e::Stream::Stdout);
    if seen.iter().any(|l| l.trim() == "False") {
        bail!("the Cluster showed AgentAvailable=False during the handover: {seen:?}");
    }
    eprintln!(
        "drain: {} requests through b, none failed; AgentAvailable seen: {seen:?}",
        ok.load(Ordering::Relaxed)
    );
    Ok(())
}

/// curl with config_alpha's credentials, from a source address of its own,
/// to replica b's port of alpha (the certificate names 127.0.0.1).
struct Curl {
    args: Vec<String>,
    port: u16,
    _files: tempfile::TempDir,
}

impl Curl {
    fn of(ha: &Ha) -> Result<Curl> {
        use base64::Engine as _;
        use e2e::kube::config::Kubeconfig;
        let kc = Kubeconfig::read_from(&ha.config_alpha)?;
        let b64 = |s: Option<&str>| -> Result<Vec<u8>> {
            Ok(base64::engine::general_purpose::STANDARD.decode(s.context("missing")?.trim())?)
        };
        let cluster = kc.clusters.first().and_then(|c| c.cluster.clone());
        let user = kc.auth_infos.first().and_then(|a| a.auth_info.clone());
        let (cluster, user) = (cluster.context("no cluster")?, user.context("no user")?);
        let key = {
            use secrecy::ExposeSecret as _;
            let key = user.client_key_data.as_ref().context("no client key")?;
            b64(Some(key.expose_secret()))?
        };
        let files = tempfile::tempdir()?;
        let path = |name: &str| files.path().join(name).to_string_lossy().into_owned();
        std::fs::write(
            path("ca.crt"),
            b64(cluster.certificate_authority_data.as_deref())?,
        )?;
        std::fs::write(
            path("tls.crt"),
            b64(user.client_certificate_data.as_deref())?,
        )?;
        std::fs::write(path("tls.key"), key)?;
        let port = ha.kube_port;
        let args = vec![
            "-sS".into(),
            "--fail".into(),
            "--cacert".into(),
            path("ca.crt"),
            "--cert".into(),
            path("tls.crt"),
            "--key".into(),
            path("tls.key"),
            "--connect-to".into(),
            format!("127.0.0.1:{port}:127.0.0.2:{port}"),
        ];
        Ok(Curl {
            args,
            port,
            _files: files,
        })
    }

    /// GET namespace kube-system through b, from 127.0.0.`source`.
    fn get(&self, source: u8) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let mut cmd = Command::new("curl");
        cmd.args(&self.args)
            .args(["--interface", &format!("127.0.0.{source}")])
            .arg(format!(
                "https://127.0.0.1:{}/api/v1/namespaces/kube-system",
                self.port
            ))
            .kill_on_drop(true);
        async move {
            let out = cmd.output().await?;
            let body = String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success() && body.contains(r#""kube-system""#),
                "curl from 127.0.0.{source} through b: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        }
    }
}

/// With `--max-handshakes-per-source-per-second=2` on both replicas: a
/// cluster port's connections that `b` relays to `a` take their turn at `b`,
/// by the client's address. Three clients at `b`, 12 connections each at
/// once (2 at once, then one each 0.5 s: 12 fit in the 5 s a turn may
/// wait), are all served: `a`, where all 36 come from `b`'s address, does
/// not rate them again (at 2 a second it would have closed the last ones).
/// A fourth client's flood past its turn is closed at `b` and counted there.
/// `a` audits the 36 requests by their clients' own addresses (sent along in
/// the relay's preface), not by `b`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_connections_take_their_turn_by_the_clients_address_at_the_relaying_replica()
-> Result<()> {
    let audit_dir = tempfile::tempdir()?;
    let audit_log = audit_dir.path().join("audit.log");
    let audit_arg = format!("--audit-log={}", audit_log.display());
    let ha = Ha::start_with(
        None,
        &["--max-handshakes-per-source-per-second=2", &audit_arg],
    )
    .await?;
    ensure!(
        lease_holder(&ha.host, "tower-cluster-alpha") == "a",
        "the agent should be on a"
    );
    let curl = Curl::of(&ha)?;
    let mut gets = tokio::task::JoinSet::new();
    for source in [9u8, 11, 12] {
        for _ in 0..12 {
            gets.spawn(curl.get(source));
        }
    }
    let mut served = 0;
    while let Some(got) = gets.join_next().await {
        got?.context("a connection within its client's turns was not served")?;
        served += 1;
    }
    ensure!(served == 36, "{served} of 36 served");
    let clients = ["127.0.0.9", "127.0.0.11", "127.0.0.12"];
    let from_clients = || {
        e2e::audit_records(&audit_log)
            .iter()
            .filter(|r| r["cluster"] == "alpha")
            .filter(|r| clients.iter().any(|c| r["source"] == *c))
            .count()
    };
    wait_until(DEADLINE, || async { from_clients() >= 36 })
        .await
        .with_context(|| {
            format!(
                "a audited {} of the 36 relayed requests by their client's address; sources: {:?}",
                from_clients(),
                e2e::audit_records(&audit_log)
                    .iter()
                    .map(|r| r["source"].clone())
                    .collect::<Vec<_>>()
            )
        })?;
    let rate_refusals =
        r#"tower_refused_connections_total{door="cluster",reason="handshake_rate"}"#;
    ensure!(
        ha.metric(0, rate_refusals).await? == 0.0,
        "a rated connections b relayed:\n{}",
        ha.metrics_text(0).await?
    );

    // Past its turns, a client is closed at b (nothing relayed for it).
    let to = SocketAddr::from(([127, 0, 0, 2], ha.kube_port));
    let mut flood = Vec::new();
    for _ in 0..30 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 10], 0)))?;
        flood.push(socket.connect(to).await?);
    }
    wait_until(DEADLINE, || async {
        ha.metric(1, rate_refusals).await.unwrap_or(0.0) >= 12.0
    })
    .await
    .context("b did not close the flood past its turns")?;
    ensure!(
        ha.metric(0, rate_refusals).await? == 0.0,
        "the flood was rated at a too"
    );
    drop(flood);
    Ok(())
}
