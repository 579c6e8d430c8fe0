//! Bulk: one big HTTPS GET (download) and one big POST (upload) per path, on a
//! connection opened before the clock starts; MiB/s.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::http::Target;
use crate::measure::{Measure, mib_per_s};
use crate::report::{Compare, Figure, Goal, Report};
use crate::setup::{CHISEL, FORWARD, HTTPS, Paths, Setup};
use crate::sys;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Download,
    Upload,
}

/// What one transfer measured.
pub struct Transfer {
    pub mib_s: f64,
    /// CPU seconds the path's own processes (both tunnel ends) spent per GiB.
    pub cpu_s_per_gib: Option<f64>,
    /// CPU seconds the endpoints (this process's client, the upstream) spent per GiB.
    pub endpoints_s_per_gib: Option<f64>,
}

fn cpu_of(procs: &[u32]) -> Option<Duration> {
    procs.iter().map(|p| sys::cpu_precise(*p).ok()).sum()
}

/// One transfer of `len` bytes.
pub async fn transfer(
    target: &Target,
    endpoints: &[u32],
    direction: Direction,
    len: u64,
) -> Result<Transfer> {
    let mut conn = target.connect().await?;
    // A tiny request first: the path's own connection setup (channel open,
    // the proxy's upstream TLS) is not part of the figure.
    conn.get(1).await?;
    let (cpu0, ends0) = (cpu_of(&target.procs), cpu_of(endpoints));
    let t = Instant::now();
    match direction {
        Direction::Download => conn.get(len).await?,
        Direction::Upload => conn.upload(len).await?,
    }
    let elapsed = t.elapsed();
    let gib = len as f64 / (1u64 << 30) as f64;
    let per_gib =
        |before: Option<Duration>, after: Option<Duration>, procs: &[u32]| match (before, after) {
            (Some(a), Some(b)) if !procs.is_empty() => Some((b - a).as_secs_f64() / gib),
            _ => None,
        };
    Ok(Transfer {
        mib_s: mib_per_s(len, elapsed),
        cpu_s_per_gib: per_gib(cpu0, cpu_of(&target.procs), &target.procs),
        endpoints_s_per_gib: per_gib(ends0, cpu_of(endpoints), endpoints),
    })
}

/// The environment variable `name` as a whole number of at least 1,
/// `default` when unset or empty.
fn knob(name: &str, default: u64) -> anyhow::Result<u64> {
    parse_knob(name, std::env::var(name).ok().as_deref(), default)
}

fn parse_knob(name: &str, value: Option<&str>, default: u64) -> anyhow::Result<u64> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => anyhow::bail!("{name}={v:?}: expected a whole number of at least 1"),
        },
    }
}

pub async fn run(setup: &Setup, report: &mut Report) {
    let quick = setup.env.quick;
    // Longer and more transfers than the default: less noise for a
    // `BENCH_B_BIN` comparison of CPU per byte.
    let len = knob("BENCH_BULK_MIB", if quick { 16 } else { 64 }).and_then(|mib| {
        mib.checked_mul(1 << 20)
            .ok_or_else(|| anyhow::anyhow!("BENCH_BULK_MIB={mib}: too large"))
    });
    let (len, runs) = match (len, knob("BENCH_BULK_RUNS", if quick { 2 } else { 5 })) {
        (Ok(len), Ok(runs)) => (len, runs),
        (Err(e), _) | (_, Err(e)) => {
            report.error("bulk", &e);
            return;
        }
    };
    let paths = &setup.paths;
    report.note(format!(
        "bulk: {runs} runs; each transfer on a new keep-alive connection after a 1-byte request (channel open and the \
         proxy's upstream TLS are not timed). CPU: /proc/PID/task/*/schedstat of the path's two tunnel processes. \
         CPU cost ratio = direct's CPU per GiB (client + upstream) / the path's (client + upstream + both tunnel ends): \
         when all processes compete for the cores, as here, it predicts the throughput ratio."
    ));
    let endpoints = [std::process::id(), setup.upstream.proc.pid()];
    for direction in [Direction::Download, Direction::Upload] {
        let scenario = format!(
            "bulk {} {} MiB",
            match direction {
                Direction::Download => "download (GET)",
                Direction::Upload => "upload (POST)",
            },
            len >> 20
        );
        eprintln!("bulk: {scenario}, {runs} runs");
        let through = paths.through();
        let mut direct = Measure::new();
        let mut values: Vec<Measure> = through.iter().map(|_| Measure::new()).collect();
        let mut ratios: Vec<Measure> = through.iter().map(|_| Measure::new()).collect();
        let mut cpu: Vec<Measure> = through.iter().map(|_| Measure::new()).collect();
        // direct's CPU per GiB ÷ the path's (endpoints + tunnel), per run.
        let mut cost: Vec<Measure> = through.iter().map(|_| Measure::new()).collect();
        let mut direct_cpu = Measure::new();
        let mut failed = vec![false; through.len()];
        let mut vs_chisel = Measure::new();
        let mut vs_b = VsB::pairs(paths);
        for _ in 0..runs {
            let (d, d_cpu) = match transfer(&paths.direct, &endpoints, direction, len).await {
                Ok(d) => (d.mib_s, d.endpoints_s_per_gib),
                Err(e) => {
                    report.error(&format!("{scenario}: direct"), &e);
                    return;
                }
            };
            direct.push(d);
            if let Some(c) = d_cpu {
                direct_cpu.push(c);
            }
            // This run's (throughput, CPU per GiB) per path.
            let mut got = std::collections::HashMap::new();
            for (i, t) in through.iter().enumerate() {
                if failed[i] {
                    continue;
                }
                match transfer(t, &endpoints, direction, len).await {
                    Ok(Transfer {
                        mib_s: v,
                        cpu_s_per_gib,
                        endpoints_s_per_gib,
                    }) => {
                        if let Some(c) = cpu_s_per_gib {
                            cpu[i].push(c);
                        }
                        if let (Some(dc), Some(c), Some(e)) =
                            (d_cpu, cpu_s_per_gib, endpoints_s_per_gib)
                        {
                            cost[i].push(dc / (c + e));
                        }
                        values[i].push(v);
                        ratios[i].push(v / d);
                        got.insert(t.name.as_str(), (v, cpu_s_per_gib));
                    }
                    Err(e) => {
                        report.error(&format!("{scenario}: {}", t.name), &e);
                        failed[i] = true;
                    }
                }
            }
            if let (Some((f, _)), Some((c, _))) = (got.get(FORWARD), got.get(CHISEL)) {
                vs_chisel.push(f / c);
            }
            for pair in &mut vs_b {
                pair.push(&got);
            }
        }
        let direct_stat = direct.stat();
        report.add(Figure::new(
            &scenario,
            "direct",
            "throughput",
            "MiB/s",
            direct_stat.expect("runs > 0"),
        ));
        for (i, t) in through.iter().enumerate() {
            let (Some(v), Some(r)) = (values[i].stat(), ratios[i].stat()) else {
                continue;
            };
            let goal = (t.name == HTTPS).then(|| Goal::at_least(">= 0.6x direct", r.median, 0.6));
            report.add(
                Figure::new(&scenario, &t.name, "throughput", "MiB/s", v)
                    .direct(direct_stat)
                    .compare(Compare::Ratio(r))
                    .goal(goal),
            );
        }
        if let Some(c) = direct_cpu.stat() {
            report.add(Figure::new(
                &scenario,
                "direct",
                "CPU of client + upstream per GiB",
                "CPU-s/GiB",
                c,
            ));
        }
        for (i, t) in through.iter().enumerate() {
            if let Some(c) = cpu[i].stat() {
                report.add(Figure::new(
                    &scenario,
                    &t.name,
                    "CPU of both tunnel ends per GiB",
                    "CPU-s/GiB",
                    c,
                ));
            }
            if let Some(c) = cost[i].stat() {
                report.add(Figure::new(
                    &scenario,
                    &t.name,
                    "CPU cost ratio: direct's CPU/GiB ÷ the path's (all processes)",
                    "x",
                    c,
                ));
            }
        }
        for pair in &vs_b {
            pair.report(&scenario, report);
        }
        if let Some(s) = vs_chisel.stat() {
            report.add(
                Figure::new(
                    &scenario,
                    "tower-rs forward (b) / chisel reverse",
                    "throughput ratio",
                    "x",
                    s,
                )
                .goal(Some(Goal::at_least(">= 5x Chisel", s.median, 5.0))),
            );
        }
    }
}

/// `BENCH_B_*`'s path against ours in the same run (forward with
/// forward, https with https): B / ours, per run.
struct VsB {
    ours: &'static str,
    b: String,
    throughput: Measure,
    cpu: Measure,
}

impl VsB {
    fn pairs(paths: &Paths) -> Vec<VsB> {
        [(FORWARD, &paths.b), (HTTPS, &paths.b_https)]
            .into_iter()
            .filter_map(|(ours, b)| {
                b.as_ref().map(|b| VsB {
                    ours,
                    b: b.name.clone(),
                    throughput: Measure::new(),
                    cpu: Measure::new(),
                })
            })
            .collect()
    }

    /// One run's figures, if both paths have them.
    fn push(&mut self, got: &std::collections::HashMap<&str, (f64, Option<f64>)>) {
        let (Some((o, oc)), Some((b, bc))) = (got.get(self.ours), got.get(self.b.as_str())) else {
            return;
        };
        self.throughput.push(b / o);
        if let (Some(oc), Some(bc)) = (oc, bc) {
            self.cpu.push(bc / oc);
        }
    }

    fn report(&self, scenario: &str, report: &mut Report) {
        let name = format!("B / {}", self.ours);
        for (metric, m) in [
            ("throughput ratio", &self.throughput),
            ("CPU per GiB ratio", &self.cpu),
        ] {
            if let Some(s) = m.stat() {
                report.add(Figure::new(scenario, &name, metric, "x", s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_knob;

    #[test]
    fn a_knob_is_a_positive_whole_number_or_its_default() {
        assert_eq!(parse_knob("K", None, 64).unwrap(), 64);
        assert_eq!(parse_knob("K", Some(" "), 64).unwrap(), 64);
        assert_eq!(parse_knob("K", Some("1024"), 64).unwrap(), 1024);
        for bad in ["0", "-1", "1.5", "lots"] {
            let e = parse_knob("BENCH_BULK_MIB", Some(bad), 64).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with(&format!("BENCH_BULK_MIB=\"{bad}\"")),
                "{e}"
            );
        }
    }
}
