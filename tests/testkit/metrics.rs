//! Reading a proxy's `/metrics` (OpenMetrics text) in tests.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use tokio::process::Command;

/// The body of `http://<host>:<port>/metrics`, fetched with curl.
pub async fn scrape_metrics(host: &str, port: u16) -> Result<String> {
    let url = format!("http://{host}:{port}/metrics");
    let out = Command::new("curl").args(["-sf", &url]).output().await?;
    ensure!(out.status.success(), "curl {url} failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sum of the samples whose line starts with `prefix` (0 when none).
pub fn metric_sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The writes a kube-apiserver has counted so far (`apiserver_request_total`,
/// every verb but GET, LIST, WATCH and CONNECT), per `VERB resource`, from
/// its `/metrics` text. Refused writes (a 409 conflict, say) count under
/// `VERB resource CODE`, so a test can bound what was written apart from
/// what was retried.
pub fn apiserver_writes(metrics: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            let key = format!("{name}=\"");
            line.split(&key)
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        let verb = label("verb");
        if matches!(verb.as_str(), "GET" | "LIST" | "WATCH" | "CONNECT") {
            continue;
        }
        let Some(count) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let code = label("code");
        let key = if code.starts_with('2') {
            format!("{verb} {}", label("resource"))
        } else {
            format!("{verb} {} {code}", label("resource"))
        };
        *out.entry(key).or_default() += count as u64;
    }
    out
}

/// What changed between two [`apiserver_writes`] readings (only what grew).
pub fn writes_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}
