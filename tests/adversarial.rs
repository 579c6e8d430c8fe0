//! Adversarial peers (issue #14 part 5), against the real bin/proxy and
//! bin/agent with the real kubectl: while each attack runs, a legitimate
//! agent connects, `kubectl get`, a `get -w` and an `exec` session work;
//! the attack is refused or cut with its documented reason (a warn line
//! naming the source and the limit, `tower_refused_connections_total`);
//! the proxy's fds and RSS (from /proc) stay within a bound relative to
//! the quiet baseline; afterwards its fds are back to that baseline.
//!
//! Attackers come from source addresses of their own (127.0.0.2 and up):
//! legitimate agents and kubectl use 127.0.0.1, as they would use their own
//! hosts, so the per-source caps are what is proved.
//!
//! - agents' port: 1,000 (5,000) silent TCP connections and 1,000 (5,000)
//!   silent websockets (slowloris); garbage at the HTTP upgrade, in the
//!   websocket frames, as SSH identification and as kex packets (oversized
//!   packet lengths, unknown messages; 50 (1,000) inputs per stage);
//! - a valid agent (Cluster beta's token) that opens 10,000 (100,000)
//!   channels, and one that accepts the proxy's channels and never reads
//!   them while clients push large bodies at its cluster, and one that
//!   asks for key exchanges back to back (200 (2,000); its CPU cost measured);
//! - alpha's HTTPS port: 1,000 (5,000) connections that never start TLS,
//!   300 (2,000) handshaken connections that stay idle, huge headers,
//!   endless chunked bodies; the CONNECT door (`--connect-port`): 1,000
//!   (5,000) connections that never start TLS. There, a legitimate CONNECT
//!   client must open a stream to the member during every attack.
//!
//! Latency: p50/p99 of legitimate GETs (a kube-rs client through the
//! tunnel) quiet and under each attack. `make test` prints them;
//! `make adversarial` (ADVERSARIAL_FULL=1: the figures, in
//! brackets above) also fails when a p99 under attack exceeds 2x the quiet
//! p99, the acceptance. One `ADVERSARIAL |` line per attack.
//! The system under test runs at a higher CPU priority than the machine's
//! other load ([`isolate`], as root; `ADVERSARIAL_ISOLATE=0` turns it off),
//! the attackers at the lowest ([`attacker`]).

#[path = "adversarial/attacker.rs"]
mod attacker;
#[path = "adversarial/clients.rs"]
mod clients;
#[path = "adversarial/connect.rs"]
mod connect;
#[path = "adversarial/isolate.rs"]
mod isolate;
#[path = "adversarial/measure.rs"]
mod measure;
#[path = "adversarial/peers.rs"]
mod peers;
#[path = "adversarial/rogue.rs"]
mod rogue;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{Tower, TowerOptions, Usage, wait_for_ok};
use measure::{Latency, Legit, Watch, legit_users_served, peak_while, refused};

/// The proxy's per-source cap on pending handshakes (its default).
const PER_SOURCE: usize = 128;
/// fds the proxy may keep above its baseline afterwards (pooled connections
/// of the legitimate users, a replaced agent session not gone yet).
const FD_SLACK: usize = 8;
/// fds above the baseline during an attack besides what it holds: the
/// legitimate users' connections (watch, exec, a new agent, kubectl).
const FD_BUSY: usize = 48;
/// RSS above the baseline during an attack besides its own budget.
const RSS_SLACK_KIB: u64 = 96 * 1024;
/// Until the proxy's fds are back after an attack.
const BACK_WITHIN: Duration = Duration::from_secs(90);

/// Sizes of one run: scaled down in `make test`, the in `make adversarial`.
#[derive(Clone, Copy)]
struct Plan {
    full: bool,
    slowloris: usize,
    garbage_per_stage: usize,
    channels: usize,
    idle_tls: usize,
    huge_headers: usize,
    endless_bodies: usize,
    never_read_uploads: usize,
    rekeys: usize,
    /// Latency: blocks of `samples` GETs each (see [`Latency`]).
    blocks: usize,
    samples: usize,
}

impl Plan {
    fn from_env() -> Plan {
        if std::env::var_os("ADVERSARIAL_FULL").is_some_and(|v| v == "1") {
            Plan {
                full: true,
                slowloris: 5000,
                garbage_per_stage: 1000,
                channels: 100_000,
                idle_tls: 2000,
                huge_headers: 200,
                endless_bodies: 50,
                never_read_uploads: 100,
                rekeys: 2000,
                blocks: 12,
                samples: 100,
            }
        } else {
            Plan {
                full: false,
                slowloris: 1000,
                garbage_per_stage: 50,
                channels: 10_000,
                idle_tls: 300,
                huge_headers: 50,
                endless_bodies: 10,
                never_read_uploads: 20,
                rekeys: 200,
                blocks: 5,
                samples: 60,
            }
        }
    }
}

/// 127.0.0.`n`: an attacker's own source address.
fn source(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Enough fds for thousands of sockets in this process (root may raise the hard limit).
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.max(65536);
        if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// What an attack may cost the proxy on top of its baseline.
struct Budget {
    fds: usize,
    rss_kib: u64,
}

/// The quiet state an attack is measured against.
struct Quiet {
    usage: Usage,
    /// The latest quiet latency: before the first attack, then after each
    /// (an attack's baseline is the quiet on both sides of it).
    latency: std::sync::Mutex<Latency>,
    /// `make adversarial`: the attacks whose p99 exceeded 2x the quiet one
    /// (every attack runs; the test fails at its end, [`Quiet::accept`]).
    slow: std::sync::Mutex<Vec<String>>,
}

impl Quiet {
    /// Fails when an attack's p99 exceeded 2x the quiet one (`make adversarial`).
    fn accept(&self) -> Result<()> {
        let slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        if !slow.is_empty() {
            bail!("{}", slow.join("; "));
        }
        Ok(())
    }
}

async fn quiet(tower: &Tower, legit: &Legit, plan: &Plan) -> Result<Quiet> {
    let watch = Watch::of(tower);
    let pid = |p: u32| isolate::nice_of(p).unwrap_or_else(|e| format!("? ({e})"));
    println!(
        "ADVERSARIAL | isolation | nice: proxy {}, agent {}, member kube-apiserver {}, host kube-apiserver {}, the measuring client {}",
        pid(tower.proxy().pid()),
        pid(tower.agent().pid()),
        pid(tower.member().pid()),
        pid(tower.host().pid()),
        pid(std::process::id()),
    );
    // Warm the pooled connection first: its setup is not a request's latency.
    legit.latency(&watch, 1, 5).await?;
    let latency = legit.latency(&watch, plan.blocks, plan.samples).await?;
    Ok(Quiet {
        usage: Usage::of(tower.proxy().pid())?,
        latency: std::sync::Mutex::new(latency),
        slow: std::sync::Mutex::default(),
    })
}

/// Runs `attack` (on the attackers' runtime, [`attacker::spawn`]) while legitimate users work and their latency
/// is sampled; checks the proxy's peak against `budget`, waits for its fds
/// to come back, prints the `ADVERSARIAL |` line. `outcome` of the attack
/// (what the attacker saw) goes into the line.
async fn under_attack(
    tower: &mut Tower,
    legit: &Legit,
    quiet: &Quiet,
    plan: &Plan,
    name: &str,
    budget: Budget,
    attack: attacker::Attack,
) -> Result<()> {
    let pid = tower.proxy().pid();
    let tag: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
        .collect::<String>()
        .to_lowercase()
        .replace(' ', "-");
    let load_before = load_average();
    let watch = Watch {
        attack: Some(&attack.running),
        ..Watch::of(tower)
    };
    let (served, peak) = peak_while(pid, async {
        // First, while the attack is at its strongest.
        let latency = legit.latency(&watch, plan.blocks, plan.samples).await?;
        legit_users_served(tower, legit, &tag).await?;
        // Last, so the requests above did not lose their tunnel to it.
        tower
            .restart_agent(&[])
            .await
            .context("a legitimate agent could not connect during the attack")?;
        anyhow::Ok(latency)
    })
    .await?;
    attack.stop.store(true, Ordering::Relaxed);
    let all_blocks = served.with_context(|| format!("legitimate users during {name}"))?;
    let latency = all_blocks.while_attacking();
    let (attacked, blocks) = all_blocks.attacked();
    let (outcome, peak) = peak_while(pid, attack.outcome)
        .await
        .map(|(o, p)| (o, p.max(peak)))?;
    let outcome = outcome
        .context("the attacker's thread ended without an outcome")?
        .with_context(|| format!("the attack {name}"))?;
    let base = quiet.usage;
    wait_for_ok(BACK_WITHIN, || async {
        let now = Usage::of(pid)?;
        ensure!(
            now.fds <= base.fds + FD_SLACK,
            "proxy fds {} after {name}, baseline {}",
            now.fds,
            base.fds
        );
        Ok(now)
    })
    .await?;
    // Freed memory goes back to the system within the proxy's 30 s trim
    // period (`make adversarial` waits for it; `make test` briefly); the
    // figure is what it is then (the budget below is the check).
    let trim = Duration::from_secs(if plan.full { 40 } else { 5 });
    let back = wait_for_ok(trim, || async {
        let now = Usage::of(pid)?;
        ensure!(now.rss_kib <= base.rss_kib + 16 * 1024, "RSS not back yet");
        Ok(now)
    })
    .await
    .or_else(|_| Usage::of(pid))?;
    // The quiet after it, once the proxy is back: with the quiet before, the baseline.
    let after = legit
        .latency(&Watch::of(tower), plan.blocks, plan.samples)
        .await?;
    let baseline = {
        let mut latest = quiet.latency.lock().unwrap_or_else(|e| e.into_inner());
        let baseline = latest.joined(&after);
        *latest = after;
        baseline
    };
    let ratio = latency.p99.as_secs_f64() / baseline.p99.as_secs_f64().max(1e-6);
    println!(
        "ADVERSARIAL | {name} | {outcome} | proxy fds {} -> peak {} -> {} | RSS {} -> peak {} -> {} MiB | p50 quiet {} under attack {} | p99 quiet {} under attack {} (blocks: quiet {}, under attack {}) | ratio {ratio:.2} over {} blocks (the first 3 and those started during the attack: {attacked} of {blocks}) | proxy CPU quiet {:.0} % under attack {:.0} % | load {load_before} -> {}",
        base.fds,
        peak.fds,
        back.fds,
        base.rss_kib / 1024,
        peak.rss_kib / 1024,
        back.rss_kib / 1024,
        Latency::ms(baseline.p50),
        Latency::ms(latency.p50),
        Latency::ms(baseline.p99),
        Latency::ms(latency.p99),
        baseline.blocks(),
        latency.blocks(),
        attacked.max(3.min(blocks)),
        baseline.proxy_cpu * 100.0,
        latency.proxy_cpu * 100.0,
        load_average(),
    );
    ensure!(
        peak.fds <= base.fds + budget.fds + FD_BUSY,
        "{name}: the proxy held {} fds, baseline {} + budget {} + {FD_BUSY}",
        peak.fds,
        base.fds,
        budget.fds
    );
    ensure!(
        peak.rss_kib <= base.rss_kib + budget.rss_kib + RSS_SLACK_KIB,
        "{name}: the proxy's RSS reached {} KiB, baseline {} + budget {} + {RSS_SLACK_KIB}",
        peak.rss_kib,
        base.rss_kib,
        budget.rss_kib
    );
    if plan.full && ratio > 2.0 {
        quiet
            .slow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!(
                "{name}: p99 of legitimate requests {} under attack, {} quiet: more than 2x (blocks' p99|run-queue wait, * while the attack ran: quiet {}, under attack {})",
                Latency::ms(latency.p99),
                Latency::ms(baseline.p99),
                baseline.blocks(),
                latency.blocks(),
            ));
    }
    Ok(())
}

/// The machine's 1-minute load average (/proc/loadavg), for the figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

async fn tower_with_box(proxy_args: Vec<String>) -> Result<Tower> {
    let tower = Tower::start_with(TowerOptions {
        proxy_args,
        // Each attack makes hundreds of warn lines; echoed, they would push
        // the failure's message out of what a CI log shows.
        quiet: true,
        ..Default::default()
    })
    .await?;
    tower.member().run_pod("default", "box").await?;
    Ok(tower)
}

/// Where a slowloris aims: the door (its label in
/// `tower_refused_connections_total`), the attacker's source, the attack's name.
struct Slow {
    door: &'static str,
    from: IpAddr,
    name: &'static str,
}

/// A slowloris from one source at `at`: `attack` starts it, given where to
/// store how many of its connections the proxy closed. It may cost the proxy
/// one source's cap of handshakes, a warn line names the source, and every
/// connection the proxy closed was refused at the cap or cut at its deadline:
/// counted, whatever the timing (on a loaded machine more of the burst stays
/// in the kernel's queue, never accepted: the attack's line counts them apart).
/// Returns how many it cut at their deadline.
async fn slowloris(
    tower: &mut Tower,
    legit: &Legit,
    quiet: &Quiet,
    plan: &Plan,
    at: Slow,
    attack: impl FnOnce(Arc<AtomicUsize>) -> attacker::Attack,
) -> Result<f64> {
    let Slow { door, from, name } = at;
    let before = at_caps(tower, door).await?;
    let timeouts = refused(tower, door, "handshake_timeout").await?;
    let seen_closed = Arc::new(AtomicUsize::new(0));
    let budget = Budget {
        fds: PER_SOURCE,
        rss_kib: PER_SOURCE as u64 * 256,
    };
    let attack = attack(seen_closed.clone());
    under_attack(tower, legit, quiet, plan, name, budget, attack).await?;
    warned(tower, from, "too many pending handshakes").await?;
    let refused_now = at_caps(tower, door).await? - before;
    let timed_out = refused(tower, door, "handshake_timeout").await? - timeouts;
    let closed = seen_closed.load(Ordering::Relaxed);
    ensure!(
        refused_now > 0.0 && timed_out > 0.0,
        "{name}: {refused_now} refused at the caps (pending_per_source, handshake_rate), {timed_out} for handshake_timeout"
    );
    ensure!(
        refused_now + timed_out >= closed as f64 * 0.9,
        "{name}: the proxy closed {closed} connections, only {refused_now} refused at the caps and {timed_out} for handshake_timeout"
    );
    Ok(timed_out)
}

/// Connections refused at `door`'s caps so far: pending per source and, at
/// a clients' door, a source past its handshake rate (closed at once too).
async fn at_caps(tower: &Tower, door: &str) -> Result<f64> {
    Ok(refused(tower, door, "pending_per_source").await?
        + refused(tower, door, "handshake_rate").await?)
}

/// The warn line the proxy logs for `source` at a cap or deadline.
async fn warned(tower: &Tower, source: IpAddr, what: &str) -> Result<()> {
    let src = source.to_string();
    tower
        .proxy()
        .wait_for_line(
            |l| l.contains("WARN") && l.contains(what) && l.contains(&src),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("no warning {what:?} naming {src}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_and_garbage_at_the_agents_port() -> Result<()> {
    raise_nofile();
    let isolation = isolate::isolate();
    println!("ADVERSARIAL | isolation | {}", isolation.said);
    let plan = Plan::from_env();
    let mut tower = tower_with_box(Vec::new()).await?;
    let legit = Legit::new(&tower).await?;
    let quiet = quiet(&tower, &legit, &plan).await?;
    let agents = SocketAddr::from(([127, 0, 0, 1], tower.proxy_port()));

    for (n, ws, name) in [
        (2u8, false, "slowloris TCP"),
        (3u8, true, "slowloris websocket"),
    ] {
        let count = plan.slowloris;
        let at = Slow {
            door: "agents",
            from: source(n),
            name,
        };
        let upgraded_all = Arc::new(AtomicUsize::new(0));
        let upgraded_seen = upgraded_all.clone();
        let on_source = |seen: Arc<AtomicUsize>| {
            attacker::spawn(async move {
                let s = peers::Slowloris::start(source(n), agents, count, ws).await;
                let (closed, upgraded, failed) = (
                    s.closed.clone(),
                    s.upgraded.clone(),
                    s.failed_to_connect.clone(),
                );
                s.finish().await?;
                let closed = closed.load(Ordering::Relaxed);
                seen.store(closed, Ordering::Relaxed);
                let failed = failed.load(Ordering::Relaxed);
                upgraded_seen.store(upgraded.load(Ordering::Relaxed), Ordering::Relaxed);
                Ok(format!(
                    "{count} connections from one source: {closed} closed by the proxy, {} never accepted (left in the kernel's queue), {} upgraded",
                    count - closed - failed,
                    upgraded.load(Ordering::Relaxed),
                ))
            })
        };
        let freed = slowloris(&mut tower, &legit, &quiet, &plan, at, on_source).await?;
        // The cap is on handshakes pending at once: a slot is free again
        // only once its connection was cut. A burst the machine's load
        // stretches past the handshake deadline has later connections
        // upgraded in the slots the first ones freed.
        let upgraded = upgraded_all.load(Ordering::Relaxed);
        ensure!(
            upgraded as f64 <= PER_SOURCE as f64 + freed,
            "{name}: {upgraded} websockets upgraded from one source: more than the cap ({PER_SOURCE}) and one for each of the {freed} connections cut at their deadline"
        );
    }

    let per_stage = plan.garbage_per_stage;
    let attack = attacker::spawn(async move {
        let sent = peers::garbage_storm(source(4), agents, per_stage, 32).await?;
        Ok(format!(
            "{sent} inputs ({per_stage} per stage: HTTP, websocket, SSH identification, kex), each connection closed"
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "garbage at each stage",
        Budget {
            fds: 32,
            rss_kib: 32 * 2048,
        },
        attack,
    )
    .await?;
    ensure!(refused(&tower, "agents", "bad_handshake").await? > 0.0);
    quiet.accept()
}

/// Cluster beta on the host and its token, for the hostile agent.
async fn beta(tower: &Tower) -> Result<(String, Value)> {
    tower.create_cluster("beta")?;
    wait_for_ok(Duration::from_secs(120), || async {
        let out = tower
            .host()
            .kubectl_ok(&["get", "cluster", "beta", "-o", "json"]);
        let c: Value = serde_json::from_str(&out)?;
        let token = c["spec"]["connection"]["token"]
            .as_str()
            .unwrap_or_default();
        ensure!(!token.is_empty(), "no token for beta yet");
        Ok((token.to_string(), c))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_valid_agent_that_floods_channels_or_never_reads() -> Result<()> {
    raise_nofile();
    let isolation = isolate::isolate();
    println!("ADVERSARIAL | isolation | {}", isolation.said);
    let plan = Plan::from_env();
    let mut tower = tower_with_box(Vec::new()).await?;
    let legit = Legit::new(&tower).await?;
    let quiet = quiet(&tower, &legit, &plan).await?;
    let agents = SocketAddr::from(([127, 0, 0, 1], tower.proxy_port()));
    let (token, _) = beta(&tower).await?;

    // A channel flood: the proxy refuses each and closes the session at
    // 100. The attacker logs in again and goes on, for as long as the
    // legitimate users are measured (or until `channels` opens were
    // answered).
    let channels = plan.channels;
    let beta_token = token.clone();
    let attack = attacker::spawn_until(|stop| async move {
        let (mut sessions, mut refused) = (0, 0);
        while refused < channels && (sessions == 0 || !stop.load(Ordering::Relaxed)) {
            let rogue =
                rogue::Rogue::login(source(5), agents, "beta", &beta_token, "127.0.0.1:9").await?;
            let answered = rogue.channel_flood(channels - refused).await;
            ensure!(!rogue.ping().await, "the flooding session is still open");
            // 64 opens are in flight when the proxy's disconnect goes out.
            ensure!(
                answered <= tunnel::server::MAX_REFUSED_CHANNELS + 64,
                "{answered} channel opens answered before session {sessions} was closed"
            );
            sessions += 1;
            refused += answered.max(1);
        }
        Ok(format!(
            "{refused} channel opens refused in {sessions} sessions, each closed after its first {} or so",
            tunnel::server::MAX_REFUSED_CHANNELS
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "channel flood by a valid agent",
        Budget {
            fds: 8,
            rss_kib: 16 * 1024,
        },
        attack,
    )
    .await?;
    tower
        .proxy()
        .wait_for_line(
            |l| l.contains("WARN") && l.contains("too many channels") && l.contains("127.0.0.5"),
            Duration::from_secs(60),
        )
        .await?;

    // Unknown messages after the key exchange and login: each answered with
    // SSH_MSG_UNIMPLEMENTED naming its packet (RFC 4253 11.4), the session kept.
    let rogue = rogue::Rogue::login(source(13), agents, "beta", &token, "127.0.0.1:9").await?;
    let numbers: Vec<u8> = (192..=255).collect();
    let answered = rogue.unknown_messages(&numbers).await?;
    ensure!(
        answered.len() == numbers.len()
            && answered.windows(2).all(|w| w[1] == w[0].wrapping_add(1)),
        "SSH_MSG_UNIMPLEMENTED for packets {answered:?}: want {} consecutive",
        numbers.len()
    );
    ensure!(
        rogue.ping().await,
        "the session was closed after unknown messages"
    );
    println!(
        "ADVERSARIAL | unknown messages | {} unknown message numbers (192-255) after login: each answered SSH_MSG_UNIMPLEMENTED (packets {}-{}), the session kept",
        numbers.len(),
        answered.first().copied().unwrap_or_default(),
        answered.last().copied().unwrap_or_default()
    );
    drop(rogue);

    // A rekey storm: key exchanges back to back from one session; the
    // proxy closes it after its limit per minute.
    let (rekeys, pid) = (plan.rekeys, tower.proxy().pid());
    let limit = tunnel::ssh::MAX_AGENT_REKEYS_PER_MINUTE as usize;
    let beta_token = token.clone();
    let attack = attacker::spawn(async move {
        let rogue =
            rogue::Rogue::login(source(12), agents, "beta", &beta_token, "127.0.0.1:9").await?;
        let (cpu0, t0) = (measure::cpu_ms(pid)?, std::time::Instant::now());
        let mut done = 0;
        for _ in 0..rekeys {
            if rogue.handle.rekey_soon().await.is_err() || !rogue.ping().await {
                break;
            }
            done += 1;
        }
        let cpu = measure::cpu_ms(pid)? - cpu0;
        ensure!(
            done <= limit + 1,
            "{done} key exchanges back to back, the limit is {limit} a minute"
        );
        ensure!(!rogue.ping().await, "the rekeying session is still open");
        Ok(format!(
            "{rekeys} key exchanges back to back tried by one session: {done} done in {:.1} s, then the session was closed (limit {limit} a minute); the proxy spent {cpu} ms of CPU",
            t0.elapsed().as_secs_f64(),
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "rekey storm by a valid agent",
        Budget {
            fds: 8,
            rss_kib: 16 * 1024,
        },
        attack,
    )
    .await?;
    warned(&tower, source(12), "key exchanges in a minute").await?;

    // Never reads: it accepts the proxy's channels (to its ks-apiserver,
    // plain HTTP) and never reads them, while clients POST 16 MiB each.
    let ks_port = wait_for_ok(Duration::from_secs(120), || async {
        let out = tower
            .host()
            .kubectl_ok(&["get", "cluster", "beta", "-o", "json"]);
        let c: Value = serde_json::from_str(&out)?;
        let port = c["spec"]["connection"]["kubesphereAPIServerPort"]
            .as_u64()
            .context("beta has no ks-apiserver port yet")?;
        Ok(u16::try_from(port)?)
    })
    .await?;
    let uploads = plan.never_read_uploads;
    let attack = attacker::spawn(async move {
        let rogue = rogue::Rogue::login(source(6), agents, "beta", &token, "127.0.0.1:9").await?;
        let target = SocketAddr::from(([127, 0, 0, 1], ks_port));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..uploads {
            tasks.spawn(upload_unread(source(7), target));
        }
        let mut seen = Vec::new();
        while let Some(done) = tasks.join_next().await {
            seen.push(done??);
        }
        let held = rogue.held();
        drop(rogue);
        Ok(format!(
            "{uploads} 16 MiB uploads into {held} channels never read: {}",
            clients::tally(&seen)
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "window abuse (channels never read)",
        // The session's write queue (WRITE_QUEUE_LIMIT) and each upload's
        // HTTP buffers, not the channels' windows (2 MiB each).
        Budget {
            fds: 2 * uploads,
            rss_kib: uploads as u64 * 1024 + 2 * tunnel::server::WRITE_QUEUE_LIMIT as u64 / 1024,
        },
        attack,
    )
    .await?;
    quiet.accept()
}

/// POSTs 16 MiB to `target` (a cluster's ks-apiserver port), writing as
/// long as the proxy takes it; the answer's status line or "closed".
async fn upload_unread(from: IpAddr, target: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = peers::connect_from(from, target).await?;
    let (mut rd, mut wr) = tcp.into_split();
    let size = 16 << 20;
    let head = format!("POST /kapis/x HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
    wr.write_all(head.as_bytes()).await?;
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        wr
    });
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(180), async {
        while !head.windows(2).any(|w| w == b"\r\n") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    ensure!(
        answered.is_ok(),
        "an upload into a channel never read hung for 180 s"
    );
    let text = String::from_utf8_lossy(&head);
    Ok(text
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .map_or_else(|| "closed".to_string(), str::to_string))
}

/// The proxy's TLS handshake threads (`tls-handshake`), checked to run 10
/// nice levels below its main thread: their CPU time in ms.
fn handshake_threads(tower: &Tower) -> Result<u64> {
    let pid = tower.proxy().pid();
    let main = measure::Stat::process(pid)?.nice;
    let threads = measure::Stat::threads(pid, THREAD)?;
    ensure!(!threads.is_empty(), "the proxy has no {THREAD} thread");
    for t in &threads {
        ensure!(
            t.nice == (main + 10).min(19),
            "a {THREAD} thread runs at nice {}, the proxy at {main}: not below it",
            t.nice
        );
    }
    Ok(threads.iter().map(|t| t.cpu_ms).sum())
}

/// The proxy's TLS handshake threads' name.
const THREAD: &str = "tls-handshake";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_of_a_cluster_port() -> Result<()> {
    raise_nofile();
    let isolation = isolate::isolate();
    println!("ADVERSARIAL | isolation | {}", isolation.said);
    let plan = Plan::from_env();
    let connect_door = SocketAddr::from(([127, 0, 0, 1], e2e::free_port()));
    let mut tower = tower_with_box(vec![format!("--connect-port={}", connect_door.port())]).await?;
    let mut legit = Legit::new(&tower).await?;
    let port = SocketAddr::from(([127, 0, 0, 1], tower.kube_port()));
    let certified = clients::Certified::from_kubeconfig(tower.config_alpha())?;
    // Every attack below also checks a legitimate CONNECT stream.
    legit.connect = Some(connect::ConnectClient {
        certified: certified.clone(),
        door: connect_door,
    });
    let quiet = quiet(&tower, &legit, &plan).await?;

    // Connections that never start TLS, at the cluster's port and at the
    // CONNECT door: capped per source (the excess closed at once, so the
    // proxy's fds stay within the cap), the rest cut at 10 s.
    for (n, to, door, name) in [
        (8u8, port, "cluster", "TLS never started"),
        (
            14u8,
            connect_door,
            "connect",
            "TLS never started at the CONNECT door",
        ),
    ] {
        let count = plan.slowloris;
        let at = Slow {
            door,
            from: source(n),
            name,
        };
        let on_source = |seen: Arc<AtomicUsize>| {
            attacker::spawn(async move {
                let idle = clients::IdleTls::start(source(n), to, count, None);
                let closed = idle.closed.clone();
                idle.finish().await?;
                let closed = closed.load(Ordering::Relaxed);
                seen.store(closed, Ordering::Relaxed);
                Ok(format!(
                    "{count} TCP connections that never start TLS: {closed} closed by the proxy, {} never accepted (left in the kernel's queue)",
                    count - closed
                ))
            })
        };
        slowloris(&mut tower, &legit, &quiet, &plan, at, on_source).await?;
    }

    // Handshaken with a valid certificate, then idle: cut at 30 s. The
    // handshakes run on the proxy's handshake threads, below forwarding.
    let handshakes_before = handshake_threads(&tower)?;
    let n = plan.idle_tls;
    let c = certified.clone();
    let attack = attacker::spawn(async move {
        let idle = clients::IdleTls::start(source(9), port, n, Some(c));
        let (established, closed) = (idle.established.clone(), idle.closed.clone());
        let refused = idle.refused.clone();
        idle.finish().await?;
        Ok(format!(
            "{n} idle TLS connections with a valid certificate: {} cut during the handshake (the per-source cap), {} established, {} closed by the proxy",
            refused.load(Ordering::Relaxed),
            established.load(Ordering::Relaxed),
            closed.load(Ordering::Relaxed)
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "idle TLS connections",
        Budget {
            fds: n,
            rss_kib: n as u64 * 128,
        },
        attack,
    )
    .await?;
    let spent = handshake_threads(&tower)?.saturating_sub(handshakes_before);
    ensure!(
        spent > 0,
        "the proxy's {THREAD} threads spent no CPU on {n} TLS handshakes: they ran elsewhere"
    );
    println!(
        "ADVERSARIAL | handshake threads | {spent} ms of CPU on the idle TLS attack's handshakes"
    );

    // Repeated for the whole measurement, like the endless bodies: one
    // round is over within the first blocks.
    let (n, c) = (plan.huge_headers, certified.clone());
    let attack = attacker::spawn_until(move |stop| async move {
        let (mut rounds, mut seen) = (0, Vec::new());
        while rounds == 0 || !stop.load(Ordering::Relaxed) {
            seen.extend(clients::huge_headers(&c, source(10), port, n, 1 << 20).await?);
            rounds += 1;
        }
        ensure!(
            seen.iter().all(|s| !s.contains(" 200 ")),
            "a 1 MiB header was served: {seen:?}"
        );
        Ok(format!(
            "{rounds} rounds of {n} requests with a 1 MiB header: {}",
            clients::tally(&seen)
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "huge headers",
        Budget {
            fds: 16,
            rss_kib: 16 * 2048,
        },
        attack,
    )
    .await?;

    // Repeated for the whole measurement: one round is over within the
    // first block of samples, and a client uploading without pause is the
    // attack (the member answers 413 at its 3 MB limit, and it starts
    // again). At least three rounds: more than the proxy's default burst
    // per client (32 MiB), so its pacing must show.
    let (n, c) = (plan.endless_bodies, certified.clone());
    let attack = attacker::spawn_until(move |stop| async move {
        let (mut rounds, mut seen) = (0, Vec::new());
        while rounds < 3 || !stop.load(Ordering::Relaxed) {
            seen.extend(clients::endless_bodies(&c, source(11), port, n).await?);
            rounds += 1;
        }
        Ok(format!(
            "{rounds} rounds of {n} endless chunked bodies: {}",
            clients::tally(&seen)
        ))
    });
    under_attack(
        &mut tower,
        &legit,
        &quiet,
        &plan,
        "endless chunked bodies",
        Budget {
            fds: 2 * n,
            rss_kib: n as u64 * 8 * 1024,
        },
        attack,
    )
    .await?;
    // The member's kube-apiserver would take every byte as fast as it
    // came (the legitimate p99 went from 1.7 ms to 109 ms); the proxy paced
    // the attacker's bodies (`--request-body-rate-per-source`).
    let metrics = e2e::scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    let paced = e2e::metric_sample(
        &metrics,
        "tower_request_body_paced_seconds_total{cluster=\"alpha\"}",
    );
    ensure!(
        paced > 0.0,
        "the endless bodies never waited for their client's turn"
    );
    println!("ADVERSARIAL | request body pacing | the endless bodies waited {paced:.1} s in all");
    quiet.accept()
}
