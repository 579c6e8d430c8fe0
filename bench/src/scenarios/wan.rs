//! A long link: one HTTPS download through each tunnel whose agent reaches its
//! proxy through a [`Relay`] adding RTT/2 each way. Loopback has no RTT, so
//! this is where the SSH channel window shows: one channel moves at most one
//! window per round trip (2 MiB / 50 ms = 40 MiB/s). Each tunnel gets its own
//! pair of processes (raw forward paths, TLS end to end); the baseline is that
//! window/RTT bound, not a direct connection (the relay would not limit one).

use std::time::Duration;

use anyhow::Result;

use crate::http::Target;
use crate::measure::Measure;
use crate::report::{Figure, Report};
use crate::scenarios::bulk::{Direction, transfer};
use crate::setup::{CHISEL, Chisel, ForwardPair, GO, GoPeers, Setup, Variant};

pub async fn run(setup: &Setup, report: &mut Report) {
    let quick = setup.env.quick;
    let rtts: &[u64] = if quick { &[50] } else { &[20, 50] };
    report.note(
        "long link: per tunnel a fresh proxy (--clusters-file, --forward) and agent whose websocket goes through a \
         relay that delays each direction by RTT/2 (loopback otherwise); TLS end to end; one download per run on a \
         new connection. Go peers and Chisel get the same relay.",
    );
    for &rtt in rtts {
        if let Err(e) = one(setup, rtt, report).await {
            report.error(&format!("long link, RTT {rtt} ms"), &e);
        }
    }
}

async fn one(setup: &Setup, rtt_ms: u64, report: &mut Report) -> Result<()> {
    let env = &setup.env;
    let quick = env.quick;
    let len: u64 = if quick { 16 << 20 } else { 64 << 20 };
    let runs = if quick { 1 } else { 3 };
    let delay = Some(Duration::from_millis(rtt_ms / 2));
    let upstream = setup.upstream.addr;
    let base = &setup.paths.direct;
    let target = |name: &str, addr, procs: Vec<u32>| Target {
        name: name.to_string(),
        addr,
        procs,
        ..base.clone()
    };
    eprintln!(
        "long link: RTT {rtt_ms} ms, {runs} runs of {} MiB",
        len >> 20
    );
    // Keep the processes alive while measuring; dropped at the end.
    let mut keep_pairs = Vec::new();
    let mut targets = Vec::new();
    let current = Variant::current();
    let ours = ForwardPair::start(env, &format!("wan{rtt_ms}"), &current, delay).await?;
    targets.push(target(&current.label, ours.forward, ours.procs()));
    keep_pairs.push(ours);
    if let Some(b) = Variant::b_from_env() {
        let pair = ForwardPair::start(env, &format!("wanb{rtt_ms}"), &b, delay).await?;
        targets.push(target(&b.label, pair.forward, pair.procs()));
        keep_pairs.push(pair);
    }
    let go = if env.wants_path("go") {
        match GoPeers::start(upstream, delay).await {
            Ok(g) => {
                targets.push(target(GO, g.forward, vec![]));
                Some(g)
            }
            Err(e) => {
                report.error(&format!("long link, RTT {rtt_ms} ms: Go peers"), &e);
                None
            }
        }
    } else {
        None
    };
    let chisel = if env.wants_path("chisel") {
        match Chisel::start(env, upstream, delay).await {
            Ok(c) => {
                targets.push(target(CHISEL, c.forward, vec![]));
                Some(c)
            }
            Err(e) => {
                report.error(&format!("long link, RTT {rtt_ms} ms: Chisel"), &e);
                None
            }
        }
    } else {
        None
    };

    let mut values: Vec<Measure> = targets.iter().map(|_| Measure::new()).collect();
    let mut vs_chisel = Measure::new();
    for _ in 0..runs {
        let mut ours = None;
        let mut theirs = None;
        for (i, t) in targets.iter().enumerate() {
            let v = transfer(t, &[], Direction::Download, len).await?.mib_s;
            values[i].push(v);
            if i == 0 {
                ours = Some(v);
            }
            if t.name == CHISEL {
                theirs = Some(v);
            }
        }
        if let (Some(o), Some(c)) = (ours, theirs) {
            vs_chisel.push(o / c);
        }
    }
    let bound = 2.0 * 1000.0 / rtt_ms as f64;
    let scenario = format!(
        "long link: RTT {rtt_ms} ms agent<->proxy, 1 download of {} MiB",
        len >> 20
    );
    for (i, t) in targets.iter().enumerate() {
        if let Some(v) = values[i].stat() {
            report.add(Figure::new(
                &scenario,
                &t.name,
                &format!("throughput (2 MiB window / RTT = {bound:.0} MiB/s)"),
                "MiB/s",
                v,
            ));
        }
    }
    if let Some(s) = vs_chisel.stat() {
        report.add(Figure::new(
            &scenario,
            "tower-rs forward (b) / chisel reverse",
            "throughput ratio",
            "x",
            s,
        ));
    }
    drop((go, chisel, keep_pairs));
    Ok(())
}
