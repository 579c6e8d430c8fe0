//! What a process holds, from /proc: open fds and resident memory. The
//! reliability tests (faults, adversarial peers, churn) compare it with a
//! baseline to prove nothing leaks.

use anyhow::{Context, Result};

/// Open fds and resident memory of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Result<Usage> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("reading /proc/{pid}/fd"))?
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS in /proc/PID/status")?;
        Ok(Usage { fds, rss_kib })
    }

    /// The larger of each figure.
    pub fn max(self, other: Usage) -> Usage {
        Usage {
            fds: self.fds.max(other.fds),
            rss_kib: self.rss_kib.max(other.rss_kib),
        }
    }

    /// Both within `percent` % above `base`.
    pub fn within(&self, base: &Usage, percent: u64) -> bool {
        let limit = |b: u64| b + b * percent / 100;
        self.fds as u64 <= limit(base.fds as u64) && self.rss_kib <= limit(base.rss_kib)
    }
}
