//! Small requests: 1 KiB GETs one after the other on one keep-alive connection
//! per path (paths interleaved request by request); the latency percentiles of
//! each run, and what the path adds to direct's.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::http::Target;
use crate::measure::{Measure, micros, percentile};
use crate::report::{Compare, Figure, Goal, Report};
use crate::setup::{HTTPS, Setup};
use crate::sys;

const PERCENTILES: [(f64, &str); 3] = [(50.0, "p50"), (99.0, "p99"), (99.9, "p99.9")];

/// `count` rounds of one 1 KiB GET on each target's keep-alive connection,
/// round-robin, so that every path sees the same moments of the (shared,
/// noisy) machine; after a warm-up. Latencies per target.
pub async fn latencies(targets: &[&Target], count: usize, size: u64) -> Result<Vec<Vec<Duration>>> {
    let mut conns = Vec::with_capacity(targets.len());
    for t in targets {
        let mut c = t.connect().await?;
        for _ in 0..200.min(count) {
            c.get(size).await?;
        }
        conns.push(c);
    }
    let mut out: Vec<Vec<Duration>> = targets.iter().map(|_| Vec::with_capacity(count)).collect();
    for _ in 0..count {
        for (c, o) in conns.iter_mut().zip(out.iter_mut()) {
            let t = Instant::now();
            c.get(size).await?;
            o.push(t.elapsed());
        }
    }
    Ok(out)
}

/// Percentiles in µs, in [`PERCENTILES`] order.
fn summary(mut samples: Vec<Duration>) -> [f64; 3] {
    PERCENTILES.map(|(p, _)| micros(percentile(&mut samples, p)))
}

pub async fn run(setup: &Setup, report: &mut Report) {
    let quick = setup.env.quick;
    let count = if quick { 2_000 } else { 10_000 };
    let runs = if quick { 2 } else { 3 };
    let scenario = format!("small: {count} sequential 1 KiB GETs");
    eprintln!("small: {scenario}, {runs} runs");
    let paths = &setup.paths;
    let through = paths.through();
    let mut direct: [Measure; 3] = Default::default();
    let mut values: Vec<[Measure; 3]> = through.iter().map(|_| Default::default()).collect();
    let mut added: Vec<[Measure; 3]> = through.iter().map(|_| Default::default()).collect();
    report.note(format!(
        "small: {runs} runs of {count} rounds; each round sends one GET on every path's keep-alive connection in turn \
         (interleaved, so all paths see the same moments of the shared machine); added = path - direct, per run. \
         CPU per request: one path at a time, {} requests.",
        count / 2
    ));
    let all: Vec<&Target> = std::iter::once(&paths.direct)
        .chain(through.iter().copied())
        .collect();
    for _ in 0..runs {
        let mut lat = match latencies(&all, count, 1024).await {
            Ok(l) => l.into_iter(),
            Err(e) => {
                report.error(&scenario, &e);
                return;
            }
        };
        let d = summary(lat.next().expect("direct"));
        for k in 0..3 {
            direct[k].push(d[k]);
        }
        for (i, l) in lat.enumerate() {
            let v = summary(l);
            for k in 0..3 {
                values[i][k].push(v[k]);
                added[i][k].push(v[k] - d[k]);
            }
        }
    }
    // CPU per request of each path's own processes, one path at a time (the
    // latency rounds interleave paths that share processes).
    let mut cpu: Vec<Measure> = through.iter().map(|_| Measure::new()).collect();
    for _ in 0..runs {
        for (i, t) in through.iter().enumerate() {
            if t.procs.is_empty() {
                continue;
            }
            match cpu_per_request(t, count / 2, 1024).await {
                Ok(us) => cpu[i].push(us),
                Err(e) => report.error(&format!("{scenario}: CPU on {}", t.name), &e),
            }
        }
    }
    for (k, (_, name)) in PERCENTILES.iter().enumerate() {
        let ds = direct[k].stat();
        report.add(Figure::new(
            &scenario,
            "direct",
            &format!("{name} latency"),
            "µs",
            ds.expect("runs"),
        ));
        for (i, t) in through.iter().enumerate() {
            let (Some(v), Some(a)) = (values[i][k].stat(), added[i][k].stat()) else {
                continue;
            };
            let goal = match (t.name == HTTPS, *name) {
                (true, "p50") => Some(Goal::at_most("p50 added <= 100 µs", a.median, 100.0)),
                (true, "p99") => Some(Goal::at_most("p99 added <= 1 ms", a.median, 1000.0)),
                _ => None,
            };
            report.add(
                Figure::new(&scenario, &t.name, &format!("{name} latency"), "µs", v)
                    .direct(ds)
                    .compare(Compare::Added(a))
                    .goal(goal),
            );
        }
    }
    for (i, t) in through.iter().enumerate() {
        if let Some(c) = cpu[i].stat() {
            report.add(Figure::new(
                &scenario,
                &t.name,
                "CPU of both tunnel ends per request",
                "µs",
                c,
            ));
        }
    }
}

/// CPU time (µs) the path's processes spend per request, over `count` requests.
async fn cpu_per_request(target: &Target, count: usize, size: u64) -> Result<f64> {
    let mut conn = target.connect().await?;
    for _ in 0..100 {
        conn.get(size).await?;
    }
    let cpu = |procs: &[u32]| -> Duration {
        procs.iter().filter_map(|p| sys::cpu_precise(*p).ok()).sum()
    };
    let before = cpu(&target.procs);
    for _ in 0..count {
        conn.get(size).await?;
    }
    let spent = cpu(&target.procs) - before;
    Ok(micros(spent) / count as f64)
}
