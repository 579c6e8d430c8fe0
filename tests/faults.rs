//! Network faults between the agent and the proxy (issue #14 part 2), made
//! with real fault tools on the agent's real path. The kernel, on the
//! member's veth: nftables drops 5 % of the packets at random, or all of
//! them (a black hole: no RST, no FIN, the half-open case), and `tc tbf`
//! holds each direction to 1 Mbit/s (this kernel has no `sch_netem`).
//! Toxiproxy (bin/toxiproxy-server, `make toxiproxy`), put between the
//! agent and the proxy by a NAT rule in the member's namespace: 300 ms
//! latency with 50 ms jitter, connection resets, payloads sliced into 1-16
//! byte pieces, a slow close.
//!
//! For each fault: what a running `kubectl get -w`, an `exec -i ... cat`
//! session and a new request see, within a deadline derived from
//! `--keepalive` (a dead tunnel is noticed after 3 missed pings; every
//! kubectl must deliver or end by then, never hang); how long until the
//! tunnel is back once the fault is cleared; and that the proxy's and the
//! agent's fds come back to their baseline and RSS stays bounded.
//!
//! `make test` runs short faults (`--keepalive 5s`, 5 s each, a 20 s black
//! hole); `make faults` (FAULTS_FULL=1) holds each fault 30 s and the black
//! hole 2 minutes with the default `--keepalive 30s`. Each fault prints a
//! `FAULTS |` line: the figures of the README's "Reliability" table.
//!
//! Two more on the slow link (`faults/fair_share.rs`): a download, or pull
//! mode's upload to a hub service, and a watch share the tunnel at 16
//! Mbit/s; the watch's events must not queue behind the transfer (`FAIR
//! SHARE |` lines).

#[path = "faults/fair_share.rs"]
mod fair_share;
#[path = "faults/kernel.rs"]
mod kernel;
#[path = "faults/observe.rs"]
mod observe;
#[path = "faults/toxiproxy.rs"]
mod toxiproxy;

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{MemberNet, Tower, TowerOptions, Usage, in_own_netns, wait_for_ok, wait_until};
use observe::{Seen, Session, short};
use tokio::process::Command;
use tokio::time::Instant;
use toxiproxy::Toxiproxy;

/// fds a process may keep above its baseline (a pooled connection that
/// outlives the fault, the SSH session's replacement before the old one is gone).
const FD_SLACK: usize = 3;
/// The agent's `--max-retry-interval` in the testkit's Tower.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// tunnel::client::HANDSHAKE_TIMEOUT plus the agent's dial timeouts.
const HANDSHAKE: Duration = Duration::from_secs(35);

/// Durations of one run: short in `make test`, the issue's in `make faults`.
struct Plan {
    keepalive: Duration,
    /// How long each fault but the black hole is held.
    hold: Duration,
    black_hole: Duration,
}

impl Plan {
    fn from_env() -> Plan {
        if std::env::var_os("FAULTS_FULL").is_some_and(|v| v == "1") {
            Plan {
                keepalive: Duration::from_secs(30),
                hold: Duration::from_secs(30),
                black_hole: Duration::from_secs(120),
            }
        } else {
            Plan {
                keepalive: Duration::from_secs(5),
                hold: Duration::from_secs(5),
                black_hole: Duration::from_secs(20),
            }
        }
    }

    fn keepalive_flag(&self) -> String {
        format!("{}s", self.keepalive.as_secs())
    }

    /// The documented bound: a dead tunnel is noticed after 3 missed pings
    /// (3 keepalive periods after the last word, so at most 4 after the
    /// fault starts); then every stream on it ends. Plus time for kubectl.
    fn noticed(&self) -> Duration {
        self.keepalive * 4 + Duration::from_secs(20)
    }

    /// How long after a fault starts every kubectl must have delivered or ended.
    fn deadline(&self, fault: &Fault) -> Duration {
        match fault {
            // Nothing gets through: the streams must end while it lasts.
            Fault::BlackHole => self.noticed(),
            _ => self.hold + self.noticed(),
        }
    }

    /// How long after a fault is cleared the tunnel must be back: the
    /// proxy notices the old session, the agent's backoff, a handshake.
    fn back_within(&self) -> Duration {
        self.noticed() + MAX_RETRY_INTERVAL + HANDSHAKE
    }
}

enum Fault {
    /// Toxiproxy's latency, both directions: 300 ms ± 50 ms each way.
    Latency,
    /// nftables drops 5 % of the packets, both directions.
    Loss,
    /// `tc tbf`: 1 Mbit/s each direction.
    Bandwidth,
    /// nftables drops every packet: nothing gets through, no RST, no FIN.
    BlackHole,
    /// Toxiproxy's reset_peer: the agent's next bytes reset the connection.
    Reset,
    /// Toxiproxy's slicer on both directions: 1-16 byte pieces.
    Slicer,
    /// Toxiproxy's slow_close (2 keepalive periods) on both directions,
    /// then the agent dies (SIGKILL): the proxy sees its connection close
    /// late; a new agent connects meanwhile.
    SlowClose,
}

impl Fault {
    fn name(&self) -> String {
        match self {
            Fault::Latency => "300 ms ± 50 ms latency (toxiproxy latency)".into(),
            Fault::Loss => "5 % packet loss (nft numgen drop)".into(),
            Fault::Bandwidth => "1 Mbit/s (tc tbf)".into(),
            Fault::BlackHole => "black hole (nft drop)".into(),
            Fault::Reset => "connection reset (toxiproxy reset_peer)".into(),
            Fault::Slicer => "sliced 1-16 bytes (toxiproxy slicer)".into(),
            Fault::SlowClose => "slow close (toxiproxy slow_close), agent killed".into(),
        }
    }
}

/// One row of the table.
struct Row {
    fault: String,
    watch: String,
    exec: String,
    request: String,
    back_after: Duration,
    proxy: (Usage, Usage),
    agent: (Usage, Usage),
}

impl Row {
    fn print(&self) {
        let u = |(a, b): (Usage, Usage)| {
            format!(
                "fds {}→{}, RSS {}→{} MiB",
                a.fds,
                b.fds,
                a.rss_kib / 1024,
                b.rss_kib / 1024
            )
        };
        println!(
            "FAULTS | {} | {} | {} | {} | {:.1}s | proxy {}; agent {} |",
            self.fault,
            self.watch,
            self.exec,
            self.request,
            self.back_after.as_secs_f64(),
            u(self.proxy),
            u(self.agent)
        );
    }
}

/// The world one test runs its faults in.
struct Bench {
    tower: Tower,
    plan: Plan,
    toxiproxy: Option<Toxiproxy>,
    /// The first baseline: after all faults the proxy is back to it.
    first: Option<Usage>,
    round: usize,
}

impl Bench {
    async fn start(plan: Plan) -> Result<Bench> {
        Self::start_with(plan, Vec::new(), Vec::new()).await
    }

    /// With more flags for the proxy and the agent.
    async fn start_with(
        plan: Plan,
        proxy_args: Vec<String>,
        agent_args: Vec<String>,
    ) -> Result<Bench> {
        let tower = Tower::start_with(TowerOptions {
            isolated_member: true,
            keepalive: Some(plan.keepalive_flag()),
            proxy_args,
            agent_args,
            ..Default::default()
        })
        .await?;
        tower.member().run_pod("default", "box").await?;
        wait_for_ok(Duration::from_secs(60), || {
            tower.kubectl_ok(&["exec", "box", "--", "echo", "ready"])
        })
        .await?;
        Ok(Bench {
            tower,
            plan,
            toxiproxy: None,
            first: None,
            round: 0,
        })
    }

    fn net(&self) -> Result<&MemberNet> {
        self.tower
            .member_net()
            .context("the Tower has no member namespace")
    }

    /// Toxiproxy on the agent's path: the NAT rule, then a new agent.
    async fn through_toxiproxy(&mut self) -> Result<()> {
        let tp = Toxiproxy::start(self.tower.proxy_port()).await?;
        let Some(net) = self.tower.member_net() else {
            bail!("the Tower has no member namespace")
        };
        toxiproxy::redirect(net, self.tower.proxy_port(), tp.listen_port).await?;
        self.toxiproxy = Some(tp);
        self.tower.restart_agent(&[]).await?;
        self.request_ok(Duration::from_secs(60)).await?;
        Ok(())
    }

    fn toxiproxy(&self) -> Result<&Toxiproxy> {
        self.toxiproxy.as_ref().context("toxiproxy is not started")
    }

    async fn request_ok(&self, within: Duration) -> Result<()> {
        wait_for_ok(within, || async {
            self.tower
                .kubectl_ok(&[
                    "get",
                    "ns",
                    "kube-system",
                    "-o",
                    "name",
                    "--request-timeout=10s",
                ])
                .await
        })
        .await
        .map(drop)
    }

    fn usage(&self) -> Result<(Usage, Usage)> {
        Ok((
            Usage::of(self.tower.proxy().pid())?,
            Usage::of(self.tower.agent().pid())?,
        ))
    }

    fn agent_losses(&self) -> usize {
        self.tower
            .agent()
            .lines()
            .iter()
            .filter(|l| l.contains("tunnel lost") || l.contains("cannot connect"))
            .count()
    }

    async fn apply(&self, fault: &Fault) -> Result<()> {
        let net = self.net()?;
        match fault {
            Fault::Latency => {
                let tp = self.toxiproxy()?;
                let delay = r#"{"latency":300,"jitter":50}"#;
                tp.add("latency-up", "latency", "upstream", delay).await?;
                tp.add("latency-down", "latency", "downstream", delay).await
            }
            Fault::Loss => kernel::drop_packets(net, Some(5)).await,
            Fault::Bandwidth => kernel::limit_rate(net.name(), "1mbit").await,
            Fault::BlackHole => kernel::drop_packets(net, None).await,
            Fault::Reset => {
                self.toxiproxy()?
                    .add("reset", "reset_peer", "upstream", r#"{"timeout":0}"#)
                    .await
            }
            Fault::Slicer => {
                let tp = self.toxiproxy()?;
                let slices = r#"{"average_size":8,"size_variation":7,"delay":0}"#;
                tp.add("slice-up", "slicer", "upstream", slices).await?;
                tp.add("slice-down", "slicer", "downstream", slices).await
            }
            Fault::SlowClose => {
                let tp = self.toxiproxy()?;
                let delay = format!(r#"{{"delay":{}}}"#, self.plan.keepalive.as_millis() * 2);
                tp.add("slow-up", "slow_close", "upstream", &delay).await?;
                tp.add("slow-down", "slow_close", "downstream", &delay)
                    .await?;
                // The agent goes: its end closes now, the proxy's end late.
                let pid = self.tower.agent().pid().to_string();
                let out = Command::new("kill").args(["-KILL", &pid]).output().await?;
                ensure!(out.status.success(), "kill -KILL {pid}");
                Ok(())
            }
        }
    }

    /// Keeps the fault on as long as it lasts.
    async fn hold(&self, fault: &Fault, losses: usize) -> Result<()> {
        match fault {
            Fault::BlackHole => tokio::time::sleep(self.plan.black_hole).await,
            // Until the reset happened (the agent's next ping triggers it).
            Fault::Reset => {
                wait_until(self.plan.noticed(), || async {
                    self.agent_losses() > losses
                })
                .await
                .context("the agent never saw its connection reset")?;
            }
            // Until the proxy noticed the dead agent (or the deadline).
            Fault::SlowClose => {}
            _ => tokio::time::sleep(self.plan.hold).await,
        }
        Ok(())
    }

    async fn clear(&mut self, fault: &Fault) -> Result<()> {
        match fault {
            Fault::Latency => {
                let tp = self.toxiproxy()?;
                tp.remove("latency-up").await?;
                tp.remove("latency-down").await
            }
            Fault::Loss | Fault::BlackHole => kernel::stop_dropping(self.net()?).await,
            Fault::Bandwidth => kernel::unlimit_rate(self.net()?.name()).await,
            Fault::Reset => self.toxiproxy()?.remove("reset").await,
            Fault::Slicer => {
                let tp = self.toxiproxy()?;
                tp.remove("slice-up").await?;
                tp.remove("slice-down").await
            }
            Fault::SlowClose => {
                // A new agent while the old connection is still closing.
                self.tower.restart_agent(&[]).await?;
                let tp = self.toxiproxy()?;
                tp.remove("slow-up").await?;
                tp.remove("slow-down").await
            }
        }
    }

    /// One fault, measured; the row is printed and returned.
    async fn measure(&mut self, fault: Fault) -> Result<Row> {
        self.round += 1;
        let round = self.round;
        let name = fault.name();
        eprintln!("faults: {name}");
        self.request_ok(self.plan.back_within()).await?;
        let before = self.usage()?;
        self.first.get_or_insert(before.0);

        // The sessions, working before the fault.
        let mut watch = Session::watch(&self.tower)?;
        let mut exec = Session::exec(&self.tower)?;
        let member = |args: Vec<String>| {
            let member = self.tower.member();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            member.kubectl_ok(&args);
        };
        let ready = Instant::now() + Duration::from_secs(60);
        member(vec![
            "create".into(),
            "configmap".into(),
            format!("before-{round}"),
            "-n".into(),
            "default".into(),
        ]);
        exec.send(&format!("before-{round}")).await;
        for (what, s) in [("get -w", &mut watch), ("exec", &mut exec)] {
            match s
                .expect(&format!("before-{round}"), Instant::now(), ready)
                .await
            {
                Some(Seen::Delivered(_)) => {}
                Some(other) => bail!("{what} before the fault: {}", other.describe()),
                None => bail!("{what} before the fault: nothing within 60s"),
            }
        }

        // The fault; then, under it, what each kubectl sees.
        let losses = self.agent_losses();
        let start = Instant::now();
        self.apply(&fault).await?;
        let deadline = start + self.plan.deadline(&fault);
        member(vec![
            "create".into(),
            "configmap".into(),
            format!("during-{round}"),
            "-n".into(),
            "default".into(),
        ]);
        let token = format!("during-{round}");
        let watched = watch.expect(&token, start, deadline);
        let execed = async {
            exec.send(&token).await;
            exec.expect(&token, start, deadline).await
        };
        let request = async {
            let r = tokio::time::timeout_at(
                deadline,
                self.tower
                    .kubectl(&["get", "ns", "kube-system", "-o", "name"]),
            )
            .await;
            (start.elapsed(), r)
        };
        let (held, watched, execed, (took, request)) =
            tokio::join!(self.hold(&fault, losses), watched, execed, request);
        held?;
        let bound = self.plan.deadline(&fault);
        let watched = watched.with_context(|| {
            format!("{name}: get -w neither delivered nor ended within {bound:?}")
        })?;
        let execed = execed
            .with_context(|| format!("{name}: exec neither echoed nor ended within {bound:?}"))?;
        let request = match request {
            Err(_) => bail!("{name}: a new request hung past {bound:?}"),
            Ok(out) => {
                let out = out?;
                if out.status.success() {
                    format!("ok {:.1}s", took.as_secs_f64())
                } else {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    format!(
                        "failed {:.1}s ({})",
                        took.as_secs_f64(),
                        short(stderr.lines().last().unwrap_or_default())
                    )
                }
            }
        };

        // Cleared: how long until the tunnel serves again.
        let cleared = Instant::now();
        self.clear(&fault).await?;
        self.request_ok(self.plan.back_within())
            .await
            .with_context(|| {
                format!(
                    "{name}: the tunnel was not back within {:?}",
                    self.plan.back_within()
                )
            })?;
        let back_after = cleared.elapsed();
        watch.stop().await;
        exec.stop().await;

        // Nothing leaks: fds back to the baseline, RSS bounded.
        let settled = wait_for_ok(self.plan.back_within(), || async {
            let now = self.usage()?;
            ensure!(
                now.0.fds <= before.0.fds + FD_SLACK && now.1.fds <= before.1.fds + FD_SLACK,
                "fds: proxy {} (baseline {}), agent {} (baseline {})",
                now.0.fds,
                before.0.fds,
                now.1.fds,
                before.1.fds
            );
            Ok(now)
        })
        .await
        .with_context(|| format!("{name}: fds not back to the baseline"))?;
        for (who, b, a) in [
            ("proxy", before.0, settled.0),
            ("agent", before.1, settled.1),
        ] {
            ensure!(
                a.rss_kib <= b.rss_kib * 2 + 32 * 1024,
                "{name}: {who} RSS grew from {} to {} KiB",
                b.rss_kib,
                a.rss_kib
            );
        }
        let row = Row {
            fault: name,
            watch: watched.describe(),
            exec: execed.describe(),
            request,
            back_after,
            proxy: (before.0, settled.0),
            agent: (before.1, settled.1),
        };
        row.print();
        Ok(row)
    }

    /// After all faults: the proxy's fds are back to the first baseline,
    /// and it stops cleanly on SIGTERM (no panic in its log: it once
    /// panicked in kube-runtime when its runtime cancelled a reconcile).
    async fn finish(mut self) -> Result<()> {
        if let Some(first) = self.first {
            wait_until(self.plan.back_within(), || async {
                Usage::of(self.tower.proxy().pid()).is_ok_and(|u| u.fds <= first.fds + FD_SLACK)
            })
            .await
            .with_context(|| {
                format!(
                    "the proxy's fds did not come back to {} after all faults",
                    first.fds
                )
            })?;
        }
        let proxy = self.tower.proxy_mut();
        let status = proxy.terminate(Duration::from_secs(30)).await?;
        let panics: Vec<String> = proxy
            .lines()
            .into_iter()
            .filter(|l| l.contains("panicked"))
            .collect();
        ensure!(panics.is_empty(), "the proxy panicked: {panics:?}");
        ensure!(
            status.success(),
            "the proxy exited with {status} on SIGTERM"
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_loss_bandwidth_and_a_black_hole() -> Result<()> {
    if !in_own_netns("kernel_loss_bandwidth_and_a_black_hole").await? {
        return Ok(());
    }
    let mut bench = Bench::start(Plan::from_env()).await?;
    for fault in [Fault::Loss, Fault::Bandwidth, Fault::BlackHole] {
        bench.measure(fault).await?;
    }
    bench.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toxiproxy_latency_resets_slices_and_a_slow_close() -> Result<()> {
    if !in_own_netns("toxiproxy_latency_resets_slices_and_a_slow_close").await? {
        return Ok(());
    }
    let mut bench = Bench::start(Plan::from_env()).await?;
    bench.through_toxiproxy().await?;
    for fault in [
        Fault::Latency,
        Fault::Reset,
        Fault::Slicer,
        Fault::SlowClose,
    ] {
        bench.measure(fault).await?;
    }
    bench.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_leaves_room_for_a_watch_on_a_slow_link() -> Result<()> {
    if !in_own_netns("a_download_leaves_room_for_a_watch_on_a_slow_link").await? {
        return Ok(());
    }
    let bench = Bench::start(Plan::from_env()).await?;
    fair_share::measure(&bench.tower, fair_share::Flow::Download).await?;
    bench.finish().await
}

/// The same with pull mode's upload in place of the download: a member
/// process writes into the agent's `--hub-listen` listener, to a TCP sink
/// the proxy publishes as a hub service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_upload_leaves_room_for_a_watch_on_a_slow_link() -> Result<()> {
    if !in_own_netns("a_hub_upload_leaves_room_for_a_watch_on_a_slow_link").await? {
        return Ok(());
    }
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    // Inside the member's own namespace: nothing else listens there.
    let listen = "127.0.0.1:7070".to_string();
    let bench = Bench::start_with(
        Plan::from_env(),
        vec![format!("--hub-service=sink={sink_addr}")],
        vec![format!("--hub-listen=sink={listen}")],
    )
    .await?;
    bench.tower.host().kubectl_ok(&[
        "annotate",
        "cluster",
        "alpha",
        "tower.kubesphere.io/hub-services=sink",
    ]);
    fair_share::measure(&bench.tower, fair_share::Flow::HubUpload { listen, sink }).await?;
    bench.finish().await
}
