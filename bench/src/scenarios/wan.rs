//! A long link: one HTTPS download through each tunnel whose agent reaches its
//! proxy through a [`Relay`](crate::relay::Relay) adding RTT/2 each way.
//! Loopback has no RTT, so this is where the SSH channel window shows: with a
//! fixed window one channel moves at most one window per round trip (2 MiB /
//! 50 ms = 40 MiB/s); tower-rs grows its windows with the bandwidth-delay
//! product (docs/protocol.md 9.3.1). Each tunnel gets its own pair of processes
//! (raw forward paths, TLS end to end); the baseline is the fixed window/RTT
//! bound, not a direct connection (the relay would not limit one).
//!
//! `wan-lossy`: the same at RTT 50 ms with 1 % packet loss each way, delay and
//! loss below TCP ([`TunLink`]). `wan-stalled`: at RTT 50 ms, the download's
//! throughput with one stalled reader on the same tunnel vs without.

use std::time::Duration;

use anyhow::Result;

use crate::http::Target;
use crate::measure::Measure;
use crate::relay::Link;
use crate::report::{Figure, Goal, Report};
use crate::scenarios::bulk::{Direction, transfer};
use crate::scenarios::concurrency::stall;
use crate::setup::{CHISEL, Chisel, ForwardPair, GO, GoPeers, Setup, Variant};
use e2e::lossy::TunLink;

/// The goals for one 64 MiB download (tower-rs forward).
fn throughput_goal(rtt_ms: u64, lossy: bool, mib_s: f64) -> Option<Goal> {
    match (rtt_ms, lossy) {
        (20, false) => Some(Goal::at_least(">= 250 MiB/s", mib_s, 250.0)),
        (50, false) => Some(Goal::at_least(">= 120 MiB/s", mib_s, 120.0)),
        _ => None,
    }
}

pub async fn run(setup: &Setup, report: &mut Report) {
    let quick = setup.env.quick;
    let rtts: &[u64] = if quick { &[50] } else { &[20, 50] };
    report.note(
        "long link: per tunnel a fresh proxy (--clusters-file, --forward) and agent whose websocket goes through a \
         relay that delays each direction by RTT/2 (loopback otherwise); TLS end to end; one download per run on a \
         new connection. Go peers and Chisel get the same relay.",
    );
    for &rtt in rtts {
        let link = Link::delay(Duration::from_millis(rtt / 2));
        if let Err(e) = one(setup, rtt, link, report).await {
            report.error(&format!("long link, RTT {rtt} ms"), &e);
        }
    }
}

/// `wan-lossy`: RTT 50 ms and 1 % loss each way, below TCP.
pub async fn run_lossy(setup: &Setup, report: &mut Report) {
    report.note(
        "lossy long link: as the long link, but the agent's connection crosses a TUN device whose packets the bench \
         delays by 25 ms and drops 1 % of, each way (MTU 9000), so TCP itself sees the round trip and the loss.",
    );
    let rtt = 50;
    let measured = async {
        let tun = TunLink::start(Duration::from_millis(rtt / 2), 1.0).await?;
        let link = Link {
            delay: Duration::from_millis(rtt / 2),
            lossy: Some(tun),
        };
        one(setup, rtt, link, report).await
    }
    .await;
    if let Err(e) = measured {
        report.error("lossy long link, RTT 50 ms, 1 % loss", &e);
    }
}

/// `wan-stalled`: RTT 50 ms; one download of 64 MiB through tower-rs with one
/// stalled reader on the same tunnel, against the same without (bracketed:
/// without, with, without again).
pub async fn run_stalled(setup: &Setup, report: &mut Report) {
    if let Err(e) = stalled(setup, report).await {
        report.error("long link with a stalled reader, RTT 50 ms", &e);
    }
}

async fn stalled(setup: &Setup, report: &mut Report) -> Result<()> {
    let env = &setup.env;
    let quick = env.quick;
    let rtt_ms = 50;
    let len: u64 = if quick { 16 << 20 } else { 64 << 20 };
    let runs = if quick { 1 } else { 3 };
    let link = Link::delay(Duration::from_millis(rtt_ms / 2));
    report.note(format!(
        "long link + stalled reader: RTT {rtt_ms} ms (relay), per tunnel one download of {} MiB while another \
         connection on the same tunnel read 1 MiB of a 1 GiB answer and stopped; slowdown = 1 - with / \
         mean(without before, without after), {runs} runs.",
        len >> 20
    ));
    let base = &setup.paths.direct;
    let mut variants = vec![Variant::current()];
    variants.extend(Variant::b_from_env());
    let scenario = format!(
        "long link + stalled reader: RTT {rtt_ms} ms, 1 download of {} MiB + 1 stalled",
        len >> 20
    );
    for (i, v) in variants.iter().enumerate() {
        let pair = ForwardPair::start(env, &format!("wans{i}"), v, Some(link.clone())).await?;
        let t = Target {
            name: v.label.clone(),
            addr: pair.forward,
            procs: pair.procs(),
            ..base.clone()
        };
        let mut slowdown = Measure::new();
        let mut with = Measure::new();
        for _ in 0..runs {
            let before = transfer(&t, &[], Direction::Download, len).await?.mib_s;
            let stalled = stall(&t).await?;
            let during = transfer(&t, &[], Direction::Download, len).await?.mib_s;
            drop(stalled);
            let after = transfer(&t, &[], Direction::Download, len).await?.mib_s;
            with.push(during);
            slowdown.push(100.0 * (1.0 - 2.0 * during / (before + after)));
        }
        if let Some(s) = with.stat() {
            report.add(Figure::new(
                &scenario,
                &t.name,
                "throughput with the stalled reader",
                "MiB/s",
                s,
            ));
        }
        if let Some(s) = slowdown.stat() {
            let goal = (i == 0).then(|| Goal::at_most("slows the others < 10 %", s.median, 10.0));
            report.add(
                Figure::new(
                    &scenario,
                    &t.name,
                    "slowdown vs without the stalled reader",
                    "%",
                    s,
                )
                .goal(goal),
            );
        }
        drop(pair);
    }
    Ok(())
}

async fn one(setup: &Setup, rtt_ms: u64, link: Link, report: &mut Report) -> Result<()> {
    let lossy = link.lossy.is_some();
    let env = &setup.env;
    let quick = env.quick;
    let len: u64 = if quick { 16 << 20 } else { 64 << 20 };
    let runs = if quick { 1 } else { 3 };
    let delay = Some(link);
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
    let ours = ForwardPair::start(env, &format!("wan{rtt_ms}"), &current, delay.clone()).await?;
    targets.push(target(&current.label, ours.forward, ours.procs()));
    keep_pairs.push(ours);
    if let Some(b) = Variant::b_from_env() {
        let pair = ForwardPair::start(env, &format!("wanb{rtt_ms}"), &b, delay.clone()).await?;
        targets.push(target(&b.label, pair.forward, pair.procs()));
        keep_pairs.push(pair);
    }
    let go = if env.wants_path("go") {
        match GoPeers::start(upstream, delay.clone()).await {
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
        match Chisel::start(env, upstream, delay.clone()).await {
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
    let peers = match &setup.peer_pki {
        Some(pki) => {
            let context = format!("long link, RTT {rtt_ms} ms");
            crate::peers::start_all(env, pki, upstream, delay.as_ref(), report, &context).await
        }
        None => Vec::new(),
    };
    targets.extend(peers.iter().map(|p| p.target(base, false)));

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
    let scenario = if lossy {
        format!(
            "lossy long link: RTT {rtt_ms} ms, 1 % loss agent<->proxy, 1 download of {} MiB",
            len >> 20
        )
    } else {
        format!(
            "long link: RTT {rtt_ms} ms agent<->proxy, 1 download of {} MiB",
            len >> 20
        )
    };
    for (i, t) in targets.iter().enumerate() {
        if let Some(v) = values[i].stat() {
            let goal = (i == 0)
                .then(|| throughput_goal(rtt_ms, lossy, v.median))
                .flatten();
            report.add(
                Figure::new(
                    &scenario,
                    &t.name,
                    &format!("throughput (2 MiB window / RTT = {bound:.0} MiB/s)"),
                    "MiB/s",
                    v,
                )
                .goal(goal),
            );
        }
    }
    if let Some(s) = vs_chisel.stat() {
        let goal = (!lossy).then(|| Goal::at_least(">= 3x Chisel", s.median, 3.0));
        report.add(
            Figure::new(
                &scenario,
                "tower-rs forward (b) / chisel reverse",
                "throughput ratio",
                "x",
                s,
            )
            .goal(goal),
        );
    }
    drop((go, chisel, peers, keep_pairs));
    Ok(())
}
