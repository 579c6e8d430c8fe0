//! What the soak counts: outcomes by reason.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// How one request or session ended.
pub enum Outcome {
    Ok,
    /// Failed, and said why (an HTTP `Status`, kubectl's error text).
    Failed(String),
    /// Failed without saying why (no `Status`, a transport error, a hang):
    /// a defect.
    Unexplained(String),
}

/// Outcomes of one kind of operation, failures counted by reason.
#[derive(Default)]
pub struct Tally {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    ok: usize,
    failed: BTreeMap<String, usize>,
    unexplained: Vec<String>,
}

impl Tally {
    pub fn add(&self, outcome: Outcome) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Outcome::Ok => c.ok += 1,
            Outcome::Failed(why) => *c.failed.entry(why).or_default() += 1,
            Outcome::Unexplained(what) => c.unexplained.push(what),
        }
    }

    pub fn ok(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).ok
    }

    /// Failures with a reason and without.
    pub fn failed(&self) -> usize {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.failed.values().sum::<usize>() + c.unexplained.len()
    }

    pub fn total(&self) -> usize {
        self.ok() + self.failed()
    }

    pub fn unexplained(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unexplained
            .clone()
    }

    /// `reason: count; ...`, most frequent first.
    pub fn reasons(&self) -> String {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(&String, &usize)> = c.failed.iter().collect();
        all.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let mut parts: Vec<String> = all.iter().map(|(r, n)| format!("{n}× {r}")).collect();
        if !c.unexplained.is_empty() {
            parts.push(format!("{}× WITHOUT A REASON", c.unexplained.len()));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("; ")
        }
    }
}

/// A reason with what differs between occurrences (cluster names, ports,
/// times, pids) made alike, so that failures group: digits become `#`,
/// kubectl's klog prefix goes, at most 140 characters.
pub fn reason(text: &str) -> String {
    let line = text.trim();
    // klog: `E1204 01:02:03.456789   12345 file.go:12] message`
    let line = match line.split_once("] ") {
        Some((head, rest)) if head.starts_with(['E', 'W', 'I', 'F']) && head.contains(".go:") => {
            rest
        }
        _ => line,
    };
    let mut out: String = line
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .take(140)
        .collect();
    if line.chars().count() > 140 {
        out.push('…');
    }
    out
}
