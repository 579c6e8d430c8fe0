//! Concurrency: many connections (one stream each through a tunnel) download at
//! once; aggregate MiB/s. Then the same with one reader that stops reading
//! after 1 MiB of a 1 GiB answer and holds its connection: how much slower do
//! the others get?

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::BodyExt;
use tokio::task::JoinSet;

use crate::http::{Conn, Target};
use crate::measure::{Measure, mib_per_s};
use crate::report::{Compare, Figure, Goal, Report};
use crate::setup::{HTTPS, Setup};

/// `streams` connections, opened first, then all download `len` at once;
/// aggregate MiB/s from the first request to the last byte.
pub async fn aggregate(target: &Target, streams: usize, len: u64) -> Result<f64> {
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut c = target.connect().await?;
        c.get(1).await?;
        conns.push(c);
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(streams + 1));
    let mut set = JoinSet::new();
    for mut c in conns {
        let start = start.clone();
        set.spawn(async move {
            start.wait().await;
            c.get(len).await
        });
    }
    start.wait().await;
    let t = Instant::now();
    while let Some(r) = set.join_next().await {
        r.context("a stream panicked")??;
    }
    Ok(mib_per_s(len * streams as u64, t.elapsed()))
}

/// A connection whose reader took 1 MiB of a 1 GiB answer and stopped.
pub struct Stalled {
    _conn: Conn,
    _body: hyper::body::Incoming,
}

pub async fn stall(target: &Target) -> Result<Stalled> {
    let mut conn = target.connect().await?;
    let resp = conn.get_response(1 << 30).await?;
    let mut body = resp.into_body();
    let mut got = 0usize;
    while got < 1 << 20 {
        match body.frame().await {
            Some(f) => got += f?.data_ref().map_or(0, |d| d.len()),
            None => bail!("the stalled stream ended early"),
        }
    }
    // Let every buffer on the way fill up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Stalled {
        _conn: conn,
        _body: body,
    })
}

/// How the stalled-reader measurement of one run went.
enum Slowdown {
    Measured(f64),
    /// The others were not done within the limit: they wait behind it.
    WaitBehind,
    Failed(anyhow::Error),
}

struct PathResult {
    all: Measure,
    all_ratio: Measure,
    slowdown: Measure,
}

pub async fn run(setup: &Setup, report: &mut Report) {
    let quick = setup.env.quick;
    let streams = if quick { 20 } else { 100 };
    let len: u64 = if quick { 1 << 20 } else { 4 << 20 };
    let runs = if quick { 1 } else { 3 };
    let scenario = format!("concurrency: {streams} streams x {} MiB", len >> 20);
    let stall_scenario = format!(
        "stalled reader: {} streams x {} MiB + 1 stalled",
        streams - 1,
        len >> 20
    );
    eprintln!("concurrency: {scenario}, {runs} runs");
    report.note(format!(
        "concurrency: all connections opened first, then released together; aggregate = all bytes / time to the last \
         byte. Stalled reader: it reads 1 MiB of a 1 GiB answer and stops; slowdown = 1 - with / mean(without before, \
         without after), {runs} runs."
    ));
    let paths = &setup.paths;
    let all: Vec<&Target> = std::iter::once(&paths.direct)
        .chain(paths.through())
        .collect();
    let mut results: Vec<PathResult> = all
        .iter()
        .map(|_| PathResult {
            all: Measure::new(),
            all_ratio: Measure::new(),
            slowdown: Measure::new(),
        })
        .collect();
    let mut failed = vec![false; all.len()];
    // Paths whose streams waited behind the stalled reader: measured once
    // (each try waits out the whole limit), then counted the same.
    let mut waits_behind = vec![false; all.len()];
    for _ in 0..runs {
        let mut direct = None;
        for (i, t) in all.iter().enumerate() {
            if failed[i] {
                continue;
            }
            // A path whose streams wait behind the stalled reader (one
            // shared flow, as konnectivity's gRPC stream) would hang the run.
            let limit = Duration::from_secs(if quick { 60 } else { 180 });
            let measured: Result<(f64, Slowdown)> = async {
                let agg = tokio::time::timeout(limit, aggregate(t, streams, len))
                    .await
                    .map_err(|_| anyhow!("{streams} streams not done within {limit:?}"))??;
                if waits_behind[i] {
                    return Ok((agg, Slowdown::WaitBehind));
                }
                // Bracketed: without, with, without again (the machine drifts).
                let slowdown = tokio::time::timeout(limit, async {
                    let before = aggregate(t, streams - 1, len).await?;
                    let stalled = stall(t).await?;
                    let with = aggregate(t, streams - 1, len).await?;
                    drop(stalled);
                    let after = aggregate(t, streams - 1, len).await?;
                    anyhow::Ok(100.0 * (1.0 - 2.0 * with / (before + after)))
                })
                .await;
                Ok((
                    agg,
                    match slowdown {
                        Ok(Ok(s)) => Slowdown::Measured(s),
                        Ok(Err(e)) => Slowdown::Failed(e),
                        Err(_) => Slowdown::WaitBehind,
                    },
                ))
            }
            .await;
            match measured {
                Ok((agg, slowdown)) => {
                    let slowdown = match slowdown {
                        Slowdown::Measured(s) => s,
                        Slowdown::WaitBehind if waits_behind[i] => 100.0,
                        Slowdown::WaitBehind => {
                            report.error(
                                &format!("{stall_scenario}: {}", t.name),
                                &anyhow!(
                                    "with a stalled reader, {} streams not done within {limit:?}: they wait \
                                     behind it (its later runs skip this and count it the same, 100 %)",
                                    streams - 1
                                ),
                            );
                            waits_behind[i] = true;
                            // Counted as a full stop of the others.
                            100.0
                        }
                        Slowdown::Failed(e) => {
                            report.error(&format!("{stall_scenario}: {}", t.name), &e);
                            100.0
                        }
                    };
                    if i == 0 {
                        direct = Some(agg);
                    }
                    let r = &mut results[i];
                    r.all.push(agg);
                    if let Some(d) = direct {
                        r.all_ratio.push(agg / d);
                    }
                    r.slowdown.push(slowdown);
                }
                Err(e) => {
                    report.error(&format!("{scenario}: {}", t.name), &e);
                    failed[i] = true;
                    if i == 0 {
                        return;
                    }
                }
            }
        }
    }
    let direct_stat = results[0].all.stat();
    for (i, t) in all.iter().enumerate() {
        let Some(v) = results[i].all.stat() else {
            continue;
        };
        let mut f = Figure::new(&scenario, &t.name, "aggregate throughput", "MiB/s", v);
        if i > 0 {
            let r = results[i].all_ratio.stat().expect("runs");
            f = f
                .direct(direct_stat)
                .compare(Compare::Ratio(r))
                .goal((t.name == HTTPS).then(|| Goal::at_least(">= 0.5x direct", r.median, 0.5)));
        }
        report.add(f);
    }
    for (i, t) in all.iter().enumerate() {
        let Some(s) = results[i].slowdown.stat() else {
            continue;
        };
        let goal =
            (t.name == HTTPS).then(|| Goal::at_most("others slow down < 10 %", s.median, 10.0));
        report.add(
            Figure::new(
                &stall_scenario,
                &t.name,
                "others' slowdown vs without the stalled reader",
                "%",
                s,
            )
            .goal(goal),
        );
    }
}
