//! What an attack is measured with: the proxy's fds and RSS ([`e2e::Usage`]), the
//! latency of legitimate requests (a kube-rs client with config_alpha,
//! through the tunnel), the refusals in `/metrics`, and what legitimate
//! kubectl, watch and exec sessions see.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use e2e::kube::Api;
use e2e::{Tower, Usage, metric_sample, scrape_metrics};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::time::Instant;

use super::connect::ConnectClient;
use super::isolate;

/// CPU time (user + system) a process has used, in ms.
pub fn cpu_ms(pid: u32) -> Result<u64> {
    Ok(Stat::read(&format!("/proc/{pid}/stat"))?.cpu_ms)
}

/// What a thread's (or process's) `/proc/.../stat` says about its CPU.
pub struct Stat {
    /// User + system time, in ms.
    pub cpu_ms: u64,
    pub nice: i32,
}

impl Stat {
    fn read(path: &str) -> Result<Stat> {
        let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        // Fields after the command's closing parenthesis, counted from field
        // 3 (the state): utime (14) and stime (15) at 11 and 12, nice (19) at 16.
        let rest = stat.rsplit_once(')').context("no ) in /proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i).context("short /proc/PID/stat");
        let hz = 100; // USER_HZ on Linux
        Ok(Stat {
            cpu_ms: (field(11)?.parse::<u64>()? + field(12)?.parse::<u64>()?) * 1000 / hz,
            nice: field(16)?.parse()?,
        })
    }

    /// The process's threads named `name` (their `comm`).
    pub fn threads(pid: u32, name: &str) -> Result<Vec<Stat>> {
        let mut found = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let dir = task?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                found.push(Stat::read(&dir.join("stat").to_string_lossy())?);
            }
        }
        Ok(found)
    }

    /// The process's main thread.
    pub fn process(pid: u32) -> Result<Stat> {
        Stat::read(&format!("/proc/{pid}/stat"))
    }
}

/// The proxy's usage, sampled every 100 ms while `work` runs; its peak.
pub async fn peak_while<T>(pid: u32, work: impl Future<Output = T>) -> Result<(T, Usage)> {
    let mut peak = Usage::of(pid)?;
    tokio::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            out = &mut work => return Ok((out, peak.max(Usage::of(pid)?))),
            _ = tick.tick() => peak = peak.max(Usage::of(pid)?),
        }
    }
}

/// One block of timed requests and what was around it.
pub struct Block {
    pub times: Vec<Duration>,
    /// Time the system under test (proxy, agent, member kube-apiserver, the
    /// measuring client's threads) spent runnable but waiting for a CPU
    /// during the block: the co-tenants' share of its latency.
    pub run_queue: Duration,
    /// The attack was still running when the block started.
    pub attacking: bool,
}

/// p50 and p99 of request times taken in blocks: each the median over
/// the blocks of that block's percentile, so one burst of load on this
/// shared machine moves one block's p99, not the figure.
#[derive(Clone, Debug)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    /// Each block's p99, in the order taken.
    pub p99s: Vec<Duration>,
    /// Each block as printed: "p99|run-queue wait" in ms, `*` when the
    /// attack was still running at its start.
    pub shown: Vec<String>,
    /// Per block: its p50, and whether the attack ran at its start.
    p50s: Vec<Duration>,
    attacking: Vec<bool>,
    /// The proxy's CPU time over the blocks' wall time (1.0: one core).
    pub proxy_cpu: f64,
}

impl Latency {
    fn percentile(times: &mut [Duration], q: f64) -> Duration {
        times.sort();
        times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1]
    }

    fn median(mut of: Vec<Duration>) -> Duration {
        of.sort();
        match of.len() {
            0 => Duration::ZERO,
            n if n % 2 == 1 => of[n / 2],
            n => (of[n / 2 - 1] + of[n / 2]) / 2,
        }
    }

    fn of(blocks: Vec<Block>) -> Latency {
        let mut p50s = Vec::with_capacity(blocks.len());
        let mut p99s = Vec::with_capacity(blocks.len());
        let mut shown = Vec::with_capacity(blocks.len());
        let attacking = blocks.iter().map(|b| b.attacking).collect();
        for mut block in blocks {
            p50s.push(Self::percentile(&mut block.times, 0.50));
            let p99 = Self::percentile(&mut block.times, 0.99);
            p99s.push(p99);
            shown.push(format!(
                "{:.1}|{:.1}{}",
                p99.as_secs_f64() * 1000.0,
                block.run_queue.as_secs_f64() * 1000.0,
                if block.attacking { "*" } else { "" }
            ));
        }
        Latency {
            p50: Self::median(p50s.clone()),
            p99: Self::median(p99s.clone()),
            p99s,
            shown,
            proxy_cpu: 0.0,
            p50s,
            attacking,
        }
    }

    /// The figures over the blocks that started while the attack ran, and
    /// at least the first `AT_LEAST` (the attack's start and what the proxy
    /// does right after it): a short attack (a channel flood is over within
    /// one block) is judged by the blocks around it, not by the quiet long
    /// after it, and never by one block's p99 alone (one block of 100 over
    /// 2x the quiet median happens quiet too). All blocks stay in
    /// [`Latency::blocks`].
    pub fn while_attacking(&self) -> Latency {
        const AT_LEAST: usize = 3;
        let keep = |i: &usize| *i < AT_LEAST || self.attacking.get(*i).copied().unwrap_or(false);
        let pick = |of: &[Duration]| -> Vec<Duration> {
            (0..of.len()).filter(keep).map(|i| of[i]).collect()
        };
        Latency {
            p50: Self::median(pick(&self.p50s)),
            p99: Self::median(pick(&self.p99s)),
            ..self.clone()
        }
    }

    /// How many blocks started while the attack ran, of how many.
    pub fn attacked(&self) -> (usize, usize) {
        (
            self.attacking.iter().filter(|a| **a).count(),
            self.attacking.len(),
        )
    }

    /// Two measurements as one: the median over both's blocks.
    pub fn joined(&self, other: &Latency) -> Latency {
        let p99s: Vec<Duration> = self.p99s.iter().chain(&other.p99s).copied().collect();
        Latency {
            p50: Self::median(vec![self.p50, other.p50]),
            p99: Self::median(p99s.clone()),
            p99s,
            shown: self.shown.iter().chain(&other.shown).cloned().collect(),
            proxy_cpu: (self.proxy_cpu + other.proxy_cpu) / 2.0,
            p50s: self.p50s.iter().chain(&other.p50s).copied().collect(),
            attacking: self
                .attacking
                .iter()
                .chain(&other.attacking)
                .copied()
                .collect(),
        }
    }

    pub fn ms(d: Duration) -> String {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }

    /// The blocks, "p99|run-queue ms" each, `*` when the attack ran at its start.
    pub fn blocks(&self) -> String {
        format!("{} ms", self.shown.join(" "))
    }
}

/// What a measurement watches besides the requests: the processes of the
/// system under test whose run-queue wait is summed per block, and whether
/// the attack is still running.
pub struct Watch<'a> {
    pub pids: Vec<u32>,
    pub attack: Option<&'a AtomicBool>,
}

impl Watch<'_> {
    /// The proxy, the agent and the member's kube-apiserver of `tower`.
    pub fn of(tower: &Tower) -> Watch<'static> {
        Watch {
            pids: vec![
                tower.proxy().pid(),
                tower.agent().pid(),
                tower.member().pid(),
            ],
            attack: None,
        }
    }

    fn run_queue(&self) -> Duration {
        let others: u64 = self
            .pids
            .iter()
            .map(|&p| isolate::run_queue_wait_ns(Some(p), ""))
            .sum();
        // This process's threads but the attackers': the measuring client.
        Duration::from_nanos(others + isolate::run_queue_wait_ns(None, "attacker"))
    }
}

/// A kube-rs client through config_alpha: legitimate requests, timed;
/// and a CONNECT client when the proxy has a CONNECT port.
pub struct Legit {
    client: e2e::kube::Client,
    pub connect: Option<ConnectClient>,
}

impl Legit {
    pub async fn new(tower: &Tower) -> Result<Legit> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = e2e::kube::config::Kubeconfig::read_from(tower.config_alpha())?;
        let config = e2e::kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(Legit {
            client: e2e::kube::Client::try_from(config)?,
            connect: None,
        })
    }

    /// `blocks` x `n` GETs of namespace `default`, one after another: each
    /// must succeed; per block, what `watch` saw.
    pub async fn latency(&self, watch: &Watch<'_>, blocks: usize, n: usize) -> Result<Latency> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let mut all = Vec::with_capacity(blocks);
        let proxy = watch.pids.first().copied().unwrap_or_default();
        let (cpu0, t0) = (cpu_ms(proxy).unwrap_or_default(), Instant::now());
        for b in 0..blocks {
            let waited = watch.run_queue();
            let attacking = watch.attack.is_some_and(|a| a.load(Ordering::Relaxed));
            let mut times = Vec::with_capacity(n);
            for i in 0..n {
                let t = Instant::now();
                api.get("default")
                    .await
                    .with_context(|| format!("legitimate GET {i} of {n} (block {b})"))?;
                times.push(t.elapsed());
            }
            all.push(Block {
                times,
                run_queue: watch.run_queue().saturating_sub(waited),
                attacking,
            });
        }
        let cpu = cpu_ms(proxy).unwrap_or_default().saturating_sub(cpu0);
        Ok(Latency {
            proxy_cpu: cpu as f64 / (t0.elapsed().as_secs_f64() * 1000.0).max(1.0),
            ..Latency::of(all)
        })
    }

    /// A ConfigMap `name` in `default` (what the watch waits for).
    pub async fn create_configmap(&self, name: &str) -> Result<()> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), "default");
        let cm: ConfigMap = serde_json_value(name)?;
        api.create(&Default::default(), &cm)
            .await
            .with_context(|| format!("creating ConfigMap {name}"))?;
        Ok(())
    }
}

fn serde_json_value(name: &str) -> Result<ConfigMap> {
    let json =
        format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}}}}"#);
    Ok(e2e::k8s_openapi::serde_json::from_str(&json)?)
}

/// What legitimate users did while an attack ran: `kubectl get`, a
/// `kubectl get -w` that saw a new ConfigMap, an `exec -i ... cat`
/// round trip, and a CONNECT stream to the member when the proxy has the
/// door (one try: a refusal is a failure). Errors say which.
pub async fn legit_users_served(tower: &Tower, legit: &Legit, tag: &str) -> Result<()> {
    if let Some(connect) = &legit.connect {
        connect
            .reaches_member()
            .await
            .context("a legitimate CONNECT client during the attack")?;
    }
    e2e::wait_for_ok(Duration::from_secs(60), || async {
        tower
            .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
            .await
    })
    .await
    .context("kubectl get during the attack")?;
    let mut watch = tower
        .kubectl_command()
        .args(["get", "configmaps", "-n", "default", "-w", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(watch.stdout.take().context("watch stdout")?).lines();
    let name = format!("seen-{tag}");
    legit.create_configmap(&name).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("kubectl get -w did not show the new ConfigMap during the attack")??
            .context("kubectl get -w ended during the attack")?;
        if line.contains(&name) {
            break;
        }
    }
    let _ = watch.kill().await;
    let mut exec = tower
        .kubectl_command()
        .args(["exec", "-i", "box", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut stdin = exec.stdin.take().context("exec stdin")?;
    stdin.write_all(format!("echo-{tag}\n").as_bytes()).await?;
    stdin.flush().await?;
    let mut out = BufReader::new(exec.stdout.take().context("exec stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
        .await
        .context("kubectl exec did not echo during the attack")??;
    ensure!(
        line.as_deref() == Some(format!("echo-{tag}").as_str()),
        "kubectl exec echoed {line:?}"
    );
    drop(stdin);
    let _ = exec.kill().await;
    Ok(())
}

/// `tower_refused_connections_total{door,reason}` now.
pub async fn refused(tower: &Tower, door: &str, reason: &str) -> Result<f64> {
    let metrics = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    Ok(metric_sample(
        &metrics,
        &format!("tower_refused_connections_total{{door=\"{door}\",reason=\"{reason}\"}}"),
    ))
}
