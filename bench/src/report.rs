//! The results: one [`Figure`] per (scenario, path, metric), written as a
//! Markdown table and as JSON under `target/bench/`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::measure::Stat;

/// How a figure relates to its direct baseline.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "kind", content = "stat", rename_all = "snake_case")]
pub enum Compare {
    /// value / direct, per run (throughput: higher is better).
    Ratio(Stat),
    /// value - direct, per run (latency added by the path).
    Added(Stat),
    /// No baseline.
    None,
}

/// Whether a goal of the issue holds (judged on the median).
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub text: String,
    pub met: bool,
}

impl Goal {
    /// Met when the judged number is at least `min`.
    pub fn at_least(text: &str, judged: f64, min: f64) -> Goal {
        Goal {
            text: text.to_string(),
            met: judged >= min,
        }
    }

    /// Met when the judged number is at most `max`.
    pub fn at_most(text: &str, judged: f64, max: f64) -> Goal {
        Goal {
            text: text.to_string(),
            met: judged <= max,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub scenario: String,
    pub path: String,
    pub metric: String,
    pub unit: String,
    /// The same measurement over the direct connection, same runs.
    pub direct: Option<Stat>,
    pub value: Stat,
    pub compare: Compare,
    pub goal: Option<Goal>,
}

impl Figure {
    pub fn new(scenario: &str, path: &str, metric: &str, unit: &str, value: Stat) -> Self {
        Figure {
            scenario: scenario.to_string(),
            path: path.to_string(),
            metric: metric.to_string(),
            unit: unit.to_string(),
            direct: None,
            value,
            compare: Compare::None,
            goal: None,
        }
    }

    pub fn direct(mut self, direct: Option<Stat>) -> Self {
        self.direct = direct;
        self
    }

    pub fn compare(mut self, compare: Compare) -> Self {
        self.compare = compare;
        self
    }

    pub fn goal(mut self, goal: Option<Goal>) -> Self {
        self.goal = goal;
        self
    }
}

/// Everything one `make bench` run found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub started: String,
    pub quick: bool,
    pub machine: Vec<String>,
    pub versions: Vec<String>,
    pub figures: Vec<Figure>,
    /// Scenario notes: which mode, what was measured how.
    pub notes: Vec<String>,
    /// Scenarios or paths that could not be measured, and why.
    pub errors: Vec<String>,
    /// Peers that were not built or did not start, and why (the bench goes on).
    pub skipped: Vec<String>,
    pub duration_s: f64,
}

impl Report {
    pub fn add(&mut self, figure: Figure) {
        eprintln!("  = {}", one_line(&figure));
        self.figures.push(figure);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn error(&mut self, what: &str, err: &anyhow::Error) {
        let text = format!("{what}: {err:#}");
        eprintln!("  ! {text}");
        self.errors.push(text);
    }

    /// Issue #15's "tower-rs ahead of every peer in every scenario they share":
    /// for each throughput, latency (p50, p99) and CPU figure of path `ours`, and
    /// the same scenario and metric of each of `peers`, the ratio of the
    /// medians, oriented so that > 1 means `ours` is ahead (throughput: ours /
    /// theirs; latency and CPU: theirs / ours). min/max: the worst and best
    /// pairing of the runs.
    pub fn versus(&mut self, ours: &str, peers: &[&str]) {
        let mut rows = Vec::new();
        for o in self.figures.iter().filter(|f| f.path == ours) {
            let higher_is_better = match o.unit.as_str() {
                "MiB/s" => true,
                "µs" | "CPU-s/GiB" if !o.metric.starts_with("p99.9") => false,
                _ => continue,
            };
            for p in &self.figures {
                if !peers.contains(&p.path.as_str())
                    || p.scenario != o.scenario
                    || p.metric != o.metric
                {
                    continue;
                }
                let (a, b) = if higher_is_better {
                    (o.value, p.value)
                } else {
                    (p.value, o.value)
                };
                if b.median <= 0.0 || b.min <= 0.0 {
                    continue;
                }
                let ratio = Stat {
                    median: a.median / b.median,
                    min: a.min / b.max,
                    max: a.max / b.min,
                    runs: a.runs.min(b.runs),
                };
                let metric = format!(
                    "{}: {}",
                    o.metric,
                    if higher_is_better {
                        "ours / theirs"
                    } else {
                        "theirs / ours"
                    }
                );
                rows.push(
                    Figure::new(
                        &o.scenario,
                        &format!("{ours} vs {}", p.path),
                        &metric,
                        "x",
                        ratio,
                    )
                    .goal(Some(Goal {
                        text: "tower-rs ahead (> 1x)".into(),
                        met: ratio.median > 1.0,
                    })),
                );
            }
        }
        for r in rows {
            self.add(r);
        }
    }

    pub fn skip(&mut self, what: &str, err: &anyhow::Error) {
        let text = format!("{what}: skipped: {err:#}");
        eprintln!("  ~ {text}");
        self.skipped.push(text);
    }

    pub fn write(&self, dir: &Path) -> Result<String> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = self.markdown();
        std::fs::write(dir.join("results.md"), &md).context("writing results.md")?;
        let json = serde_json::to_string_pretty(self).context("serialising the report")?;
        std::fs::write(dir.join("results.json"), json).context("writing results.json")?;
        Ok(md)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Run {} ({}, {:.0} s). Cells: median (min–max) of the runs; \"vs direct\" is computed per run against the direct connection measured in the same run.\n",
            self.started,
            if self.quick { "BENCH_QUICK=1" } else { "full" },
            self.duration_s
        );
        let _ = writeln!(
            out,
            "| scenario | path | metric | direct | through the path | vs direct | goal |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for f in &self.figures {
            let direct = f
                .direct
                .map_or_else(|| "–".to_string(), |s| cell(&s, &f.unit));
            let compare = match f.compare {
                Compare::Ratio(s) => format!("{}x", cell(&s, "")),
                Compare::Added(s) => format!("+{}", cell(&s, &f.unit)),
                Compare::None => "–".to_string(),
            };
            let goal = f.goal.as_ref().map_or_else(String::new, |g| {
                format!("{} {}", if g.met { "✅" } else { "❌" }, g.text)
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.scenario,
                f.path,
                f.metric,
                direct,
                cell(&f.value, &f.unit),
                compare,
                goal
            );
        }
        if !self.notes.is_empty() {
            out.push_str("\nNotes:\n");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        if !self.errors.is_empty() {
            out.push_str("\nNot measured:\n");
            for e in &self.errors {
                let _ = writeln!(out, "- {e}");
            }
        }
        if !self.skipped.is_empty() {
            out.push_str("\nSkipped peers:\n");
            for e in &self.skipped {
                let _ = writeln!(out, "- {e}");
            }
        }
        out.push_str("\nMachine: ");
        out.push_str(&self.machine.join("; "));
        out.push('\n');
        if !self.versions.is_empty() {
            out.push_str("Peers: ");
            out.push_str(&self.versions.join("; "));
            out.push('\n');
        }
        out
    }
}

fn one_line(f: &Figure) -> String {
    let compare = match f.compare {
        Compare::Ratio(s) => format!(" = {}x direct", num(s.median)),
        Compare::Added(s) => format!(" = +{} {} over direct", num(s.median), f.unit),
        Compare::None => String::new(),
    };
    format!(
        "{} | {} | {}: {} {}{}{}",
        f.scenario,
        f.path,
        f.metric,
        num(f.value.median),
        f.unit,
        compare,
        f.goal.as_ref().map_or_else(String::new, |g| format!(
            " [{} {}]",
            if g.met { "met" } else { "MISSED" },
            g.text
        ))
    )
}

/// `median (min–max) unit`.
fn cell(s: &Stat, unit: &str) -> String {
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    if s.runs == 1 || (s.min == s.max) {
        format!("{}{unit}", num(s.median))
    } else {
        format!("{} ({}–{}){unit}", num(s.median), num(s.min), num(s.max))
    }
}

/// Three significant digits, no exponent.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `YYYY-MM-DD HH:MM UTC` now.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(path: &str, metric: &str, unit: &str, median: f64) -> Figure {
        Figure::new("s", path, metric, unit, Stat::of(&[median]))
    }

    #[test]
    fn versus_is_above_one_when_ours_is_ahead() {
        let mut r = Report {
            figures: vec![
                fig("ours", "throughput", "MiB/s", 300.0),
                fig("peer", "throughput", "MiB/s", 100.0),
                fig("ours", "p50 latency", "µs", 200.0),
                fig("peer", "p50 latency", "µs", 100.0),
                fig("peer", "CPU cost ratio", "x", 1.0),
            ],
            ..Default::default()
        };
        r.versus("ours", &["peer"]);
        let rows: Vec<_> = r
            .figures
            .iter()
            .filter(|f| f.path == "ours vs peer")
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].value.median, 3.0);
        assert!(rows[0].goal.as_ref().is_some_and(|g| g.met));
        // Latency: theirs / ours, so a slower tower-rs is below 1 and not met.
        assert_eq!(rows[1].value.median, 0.5);
        assert!(rows[1].goal.as_ref().is_some_and(|g| !g.met));
    }
}
