//! Faults the kernel makes on the member's veth, in the member's network
//! namespace: nftables rules (random loss with `numgen`, a black hole that
//! drops everything) and a token bucket (`tc tbf`) for the bandwidth. This
//! kernel has no `sch_netem`, so latency with jitter comes from Toxiproxy.

use anyhow::{Context, Result, ensure};
use e2e::MemberNet;
use tokio::process::Command;

/// The table the loss and black-hole rules live in.
pub const TABLE: &str = "tower_faults_drop";

/// Drops packets crossing the member's veth, both ways: every one (a black
/// hole: no RST, no FIN, the half-open case), or `percent` of them at random.
pub async fn drop_packets(net: &MemberNet, percent: Option<u8>) -> Result<()> {
    let verdict = match percent {
        Some(p) => format!("numgen random mod 100 < {p} drop"),
        None => "drop".into(),
    };
    net.nft(&format!(
        "table inet {TABLE} {{
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname \"tm-member\" {verdict}
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    oifname \"tm-member\" {verdict}
  }}
}}
"
    ))
    .await
}

/// Removes [`drop_packets`]' rules.
pub async fn stop_dropping(net: &MemberNet) -> Result<()> {
    net.nft(&format!("delete table inet {TABLE}\n")).await
}

/// `rate` (tc's syntax, `1mbit`) each way on the veth: a token bucket on
/// the member's end (agent to proxy) and on the host's end (proxy to agent).
pub async fn limit_rate(ns: &str, rate: &str) -> Result<()> {
    limit_rate_queued(ns, rate, "16kbit", "500ms").await
}

/// [`limit_rate`] with tc's `burst` (tokens that may pass at once) and
/// `latency` (how long a packet may queue before the bucket drops it: the
/// link's own buffer).
pub async fn limit_rate_queued(ns: &str, rate: &str, burst: &str, latency: &str) -> Result<()> {
    let tbf = [
        "root", "tbf", "rate", rate, "burst", burst, "latency", latency,
    ];
    let mut member = vec!["-n", ns, "qdisc", "add", "dev", "tm-member"];
    member.extend(tbf);
    tc(&member).await?;
    let mut host = vec!["qdisc", "add", "dev", "tm-host"];
    host.extend(tbf);
    tc(&host).await
}

/// Removes [`limit_rate`]'s token buckets.
pub async fn unlimit_rate(ns: &str) -> Result<()> {
    tc(&["-n", ns, "qdisc", "del", "dev", "tm-member", "root"]).await?;
    tc(&["qdisc", "del", "dev", "tm-host", "root"]).await
}

async fn tc(args: &[&str]) -> Result<()> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .await
        .context("running tc (iproute2)")?;
    ensure!(
        out.status.success(),
        "tc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
