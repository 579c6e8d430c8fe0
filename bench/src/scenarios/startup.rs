//! Setup: from starting `bin/agent` (the proxy and its Cluster already there)
//! to the first successful `kubectl get --raw /version` through `config_alpha`;
//! also to the agent's `connected to proxy` line. kubectl itself takes a while
//! to start: its direct answer time is the baseline.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::measure::Measure;
use crate::report::{Compare, Figure, Report};
use crate::setup::{HTTPS, Setup, kubectl, log_field, log_message_is};

pub async fn run(setup: &mut Setup, report: &mut Report) {
    if let Err(e) = measure(setup, report).await {
        report.error("setup time", &e);
    }
}

async fn measure(setup: &mut Setup, report: &mut Report) -> Result<()> {
    let runs = if setup.env.quick { 1 } else { 3 };
    let (Some(member), Some(tower)) = (&setup.member, &mut setup.tower) else {
        anyhow::bail!("needs the member cluster and the tower-rs proxy");
    };
    eprintln!("setup time: {runs} agent restarts");
    let scenario = "setup: agent start -> first kubectl answer";
    let (mut direct, mut connected, mut first, mut added) = (
        Measure::new(),
        Measure::new(),
        Measure::new(),
        Measure::new(),
    );
    for _ in 0..runs {
        let t = Instant::now();
        kubectl(member.kubeconfig(), &["get", "--raw", "/version"]).await?;
        let kubectl_direct = t.elapsed().as_secs_f64() * 1000.0;
        direct.push(kubectl_direct);

        // Stop the agent; wait until the proxy has let the session go.
        let seen = tower.proxy.lines().len();
        if let Some(mut old) = tower.alpha_agent.take() {
            old.terminate(Duration::from_secs(5)).await?;
        }
        tower
            .proxy
            .wait_for_line(
                {
                    let mut i = 0;
                    move |l: &str| {
                        i += 1;
                        i > seen
                            && log_message_is(l, "agent disconnected")
                            && log_field(l, "cluster").as_deref() == Some("alpha")
                    }
                },
                Duration::from_secs(30),
            )
            .await
            .context("the proxy did not notice the agent leave")?;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let t = Instant::now();
        let agent = tower.spawn_alpha_agent(member)?;
        let kc = tower.alpha_kubeconfig.clone();
        let answered = async {
            loop {
                if kubectl(&kc, &["get", "--raw", "/version"]).await.is_ok() {
                    return t.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let answered = tokio::time::timeout(Duration::from_secs(60), answered)
            .await
            .context("no kubectl answer through the tunnel within 60 s")?;
        agent
            .wait_for_line(
                |l| log_message_is(l, "connected to proxy"),
                Duration::from_secs(1),
            )
            .await?;
        // The agent's own clock for "connected": the line's arrival is later
        // than the event; use the first kubectl answer as the upper bound.
        let connected_ms = agent_connected_ms(&agent, t).min(answered.as_secs_f64() * 1000.0);
        connected.push(connected_ms);
        let ms = answered.as_secs_f64() * 1000.0;
        first.push(ms);
        added.push(ms - kubectl_direct);
        tower.alpha_agent = Some(agent);
    }
    report.add(Figure::new(
        scenario,
        HTTPS,
        "agent start -> connected to proxy",
        "ms",
        connected.stat().expect("runs"),
    ));
    report.add(
        Figure::new(
            scenario,
            HTTPS,
            "agent start -> first kubectl answer",
            "ms",
            first.stat().expect("runs"),
        )
        .direct(direct.stat())
        .compare(Compare::Added(added.stat().expect("runs"))),
    );
    report.note(
        "setup: \"direct\" is one `kubectl get --raw /version` straight to the member (kubectl's own start-up); \
         the path figure polls the same command through config_alpha from the agent's spawn until it succeeds.",
    );
    Ok(())
}

/// Milliseconds from `start` to the agent's `connected to proxy` log line,
/// read from the line's own timestamp.
fn agent_connected_ms(agent: &e2e::Proc, start: Instant) -> f64 {
    let now_wall = std::time::SystemTime::now();
    let now = Instant::now();
    let started_wall = now_wall - now.duration_since(start);
    agent
        .lines()
        .iter()
        .find(|l| log_message_is(l, "connected to proxy"))
        .and_then(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let ts = v["timestamp"].as_str()?;
            let at = parse_rfc3339(ts)?;
            at.duration_since(started_wall).ok()
        })
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// `2026-11-21T15:08:49.553280Z` -> SystemTime (UTC, as tracing writes it).
fn parse_rfc3339(ts: &str) -> Option<std::time::SystemTime> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (h, mi, s) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u32 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h * 3600 + mi * 60 + s;
    Some(std::time::UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_rfc3339("2026-11-21T15:08:49.553280Z").unwrap();
        let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs, 1_795_273_729);
    }
}
