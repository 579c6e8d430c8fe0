//! The monitoring kit in `config/monitoring/` (issue #16, part 4), checked
//! with the tools people run it with: the alerting rules pass `promtool check
//! rules` and fire as `rules_test.yaml` says (`promtool test rules`), the
//! Prometheus Operator's copy cannot drift from the plain file, the
//! dashboard's queries parse as PromQL, and every metric the rules and the
//! dashboard name is served by a real proxy's `/metrics` after a real
//! workflow (an agent connected, a request, a reconnect, a refused agent).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{Tower, TowerOptions, bin, scrape_metrics, wait_for_ok, workspace_root};

fn monitoring(file: &str) -> PathBuf {
    workspace_root().join("config/monitoring").join(file)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// `promtool ARGS` in `config/monitoring`; fails with its output unless it exits 0.
fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new(bin("promtool"))
        .args(args)
        .current_dir(workspace_root().join("config/monitoring"))
        .output()
        .context("running promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "promtool {args:?} failed:\n{text}");
    Ok(text)
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_exprs() -> Result<Vec<String>> {
    let dash: Value = serde_json::from_str(&read(&monitoring("dashboard.json"))?)
        .context("dashboard.json is not JSON")?;
    let panels = dash["panels"]
        .as_array()
        .context("dashboard has no panels")?;
    let mut exprs = Vec::new();
    for panel in panels {
        let targets = panel["targets"]
            .as_array()
            .context("a panel has no targets")?;
        for target in targets {
            let expr = target["expr"].as_str().context("a target has no expr")?;
            exprs.push(expr.to_string());
        }
    }
    ensure!(!exprs.is_empty(), "the dashboard has no queries");
    Ok(exprs)
}

/// The `expr:` values of a rules file (one line each, as ours are written).
fn rule_exprs(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect()
}

/// The `tower_*` metric names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let token = &expr[start..i];
            if token.starts_with("tower_") {
                names.insert(token.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The names of the samples in a `/metrics` body.
fn served_names(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn rules_pass_promtool_and_fire_as_tested() -> Result<()> {
    let checked = promtool(&["check", "rules", "rules.yaml"])?;
    ensure!(
        checked.contains("SUCCESS"),
        "promtool check rules: {checked}"
    );
    let tested = promtool(&["test", "rules", "rules_test.yaml"])?;
    ensure!(tested.contains("SUCCESS"), "promtool test rules: {tested}");
    Ok(())
}

#[test]
fn the_prometheus_rule_carries_exactly_the_rules_file() -> Result<()> {
    let rules = read(&monitoring("rules.yaml"))?;
    let groups = &rules[rules.find("groups:").context("rules.yaml has no groups")?..];
    let operator = read(&monitoring("prometheusrule.yaml"))?;
    ensure!(
        operator.contains("kind: PrometheusRule"),
        "prometheusrule.yaml is not a PrometheusRule"
    );
    let spec = &operator[operator.find("\nspec:\n").context("no spec")? + "\nspec:\n".len()..];
    let unindented: String = spec
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    ensure!(
        unindented.trim_end() == groups.trim_end(),
        "prometheusrule.yaml's spec differs from rules.yaml's groups: copy rules.yaml's \
         groups under spec:, indented by two spaces"
    );
    Ok(())
}

/// Grafana's variables replaced by what they stand for, each dashboard
/// query becomes a recording rule, and promtool parses them.
#[test]
fn dashboard_queries_are_promql() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs()?.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$cluster", ".*");
        let quoted = serde_json::to_string(&expr)?;
        file.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let path = dir.path().join("dashboard-rules.yaml");
    std::fs::write(&path, file)?;
    let path = path.display().to_string();
    let checked = promtool(&["check", "rules", &path])?;
    ensure!(
        checked.contains("SUCCESS"),
        "promtool check rules: {checked}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_named_is_served() -> Result<()> {
    let mut named = BTreeSet::new();
    for expr in rule_exprs(&read(&monitoring("rules.yaml"))?)
        .into_iter()
        .chain(dashboard_exprs()?)
    {
        named.extend(metric_names(&expr));
    }
    ensure!(
        named.len() >= 6,
        "too few metrics found in the rules and dashboard: {named:?}"
    );

    let mut tower = Tower::start_with(TowerOptions {
        kubelet: false,
        ..Default::default()
    })
    .await?;
    // A request through alpha's port, a reconnect, and a refused agent: every
    // per-cluster family then has a sample.
    let kubeconfig = tower.config_alpha().display().to_string();
    let out = tower
        .host()
        .kubectl(&["--kubeconfig", &kubeconfig, "get", "namespaces"]);
    ensure!(
        out.status.success(),
        "kubectl through the tunnel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tower.restart_agent(&[]).await?;
    let mut intruder = tokio::process::Command::new(bin("agent"));
    intruder.args([
        "--name",
        "alpha",
        "--token",
        "not-the-token",
        "--proxy-server",
        &format!("http://127.0.0.1:{}", tower.proxy_port()),
        "--max-retry",
        "1",
    ]);
    e2e::clean_env(&mut intruder);
    let refused = intruder
        .output()
        .await
        .context("running a wrong-token agent")?;
    ensure!(
        !refused.status.success(),
        "a wrong-token agent was admitted"
    );

    let port = tower.proxy_port();
    wait_for_ok(Duration::from_secs(30), || async {
        let served = served_names(&scrape_metrics("127.0.0.1", port).await?);
        let missing: Vec<&String> = named.difference(&served).collect();
        ensure!(
            missing.is_empty(),
            "named in config/monitoring but not served by the proxy: {missing:?}"
        );
        Ok(())
    })
    .await
}
