//! Reading a proxy's `/metrics` (OpenMetrics text) in tests.

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
