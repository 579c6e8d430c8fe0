//! The system under test at a higher CPU priority than the rest of the
//! machine, the way benchmarks isolate what they measure: the latency test
//! judges what the proxy does with an attack, not what other engineers'
//! compilers on the same 2 cores do.
//!
//! Two settings, both needing root (CAP_SYS_NICE), both inherited by every
//! process and thread the test starts afterwards (host and member
//! kube-apiservers, proxy, agent, kubectl):
//! - nice `NICE` and a time slice of `SLICE_NS` on every thread of this
//!   process (`sched_setattr`, SCHED_OTHER): the nice against the other
//!   tasks of the same scheduling group; the short slice (Linux >= 6.12,
//!   EEVDF's custom slice, which the scheduler also gives the thread's
//!   group) lets a thread that wakes preempt a compiler at once instead of
//!   waiting out the compiler's slice (1.4 ms here), once per hop of a
//!   request (client, proxy, agent, apiserver, and back);
//! - nice `NICE` on this session's autogroup (`/proc/self/autogroup`): with
//!   `kernel.sched_autogroup_enabled`, the kernel first shares the CPU
//!   between sessions, and a task's own nice only counts inside its
//!   session's group, so without this the other sessions' compilers keep
//!   their share whatever the threads' nice. Restored when the last test
//!   of the process that raised it ends.
//!
//! The attackers stay at `SCHED_IDLE` ([`super::attacker`]). Off with
//! `ADVERSARIAL_ISOLATE=0` (to compare); without root the test goes on
//! unisolated and says so.

use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// The nice value of everything the test measures (the rest of the machine: 0).
const NICE: i32 = -10;

/// The time slice of everything the test measures: the kernel's smallest
/// (its default here is 1.4 ms).
const SLICE_NS: u64 = 100_000;

/// `struct sched_attr`, its first version (48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// How many tests hold the autogroup's nice, and what it was before the first.
static AUTOGROUP: Mutex<(usize, Option<i32>)> = Mutex::new((0, None));

/// Held for a test's length: what was done, undone at drop.
pub struct Isolation {
    /// What was done or why not, for the `ADVERSARIAL | isolation` line.
    pub said: String,
    raised_autogroup: bool,
}

/// Isolates this process and what it starts from now on (see the module doc).
pub fn isolate() -> Isolation {
    if std::env::var_os("ADVERSARIAL_ISOLATE").is_some_and(|v| v == "0") {
        return Isolation {
            said: "off (ADVERSARIAL_ISOLATE=0): the proxy, agent, apiservers and client at the machine's nice 0".into(),
            raised_autogroup: false,
        };
    }
    let threads = match renice_threads() {
        Ok(n) => format!(
            "{n} threads of the test at nice {NICE} with a {} us slice",
            SLICE_NS / 1000
        ),
        Err(e) => format!(
            "threads NOT reniced ({e:#}): not root? the figures include the co-tenants' load"
        ),
    };
    let (group, raised_autogroup) = match raise_autogroup() {
        Ok(said) => (said, true),
        Err(e) => (format!("autogroup NOT raised ({e:#})"), false),
    };
    Isolation {
        said: format!("{threads}; {group}; attackers at SCHED_IDLE"),
        raised_autogroup,
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        if !self.raised_autogroup {
            return;
        }
        let mut held = AUTOGROUP.lock().unwrap_or_else(|e| e.into_inner());
        held.0 -= 1;
        if held.0 == 0
            && let Some(before) = held.1.take()
        {
            let _ = std::fs::write("/proc/self/autogroup", before.to_string());
        }
    }
}

/// nice `NICE` and a `SLICE_NS` slice for every thread of this process; how many.
fn renice_threads() -> Result<usize> {
    let mut n = 0;
    for task in std::fs::read_dir("/proc/self/task").context("/proc/self/task")? {
        let tid: libc::pid_t = task?.file_name().to_string_lossy().parse()?;
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            sched_flags: 0,
            sched_nice: NICE,
            sched_priority: 0,
            sched_runtime: SLICE_NS,
            sched_deadline: 0,
            sched_period: 0,
        };
        // SAFETY: `attr` is a valid sched_attr of the size it says, alive for the call.
        let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr, 0u32) };
        // A kernel that refuses the slice still takes the nice alone.
        // SAFETY: plain syscall on a thread id of this process.
        if rc != 0 && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE) } != 0
        {
            return Err(std::io::Error::last_os_error()).context("sched_setattr and setpriority");
        }
        n += 1;
    }
    Ok(n)
}

/// The nice of this session's autogroup ("/autogroup-25 nice 0").
fn autogroup_nice() -> Result<i32> {
    let text = std::fs::read_to_string("/proc/self/autogroup").context("/proc/self/autogroup")?;
    Ok(text
        .rsplit_once("nice ")
        .context("no nice in /proc/self/autogroup")?
        .1
        .trim()
        .parse()?)
}

fn raise_autogroup() -> Result<String> {
    let enabled = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    if !enabled {
        bail!("autogroups off: the threads' nice is enough");
    }
    let mut held = AUTOGROUP.lock().unwrap_or_else(|e| e.into_inner());
    if held.0 == 0 {
        let before = autogroup_nice()?;
        std::fs::write("/proc/self/autogroup", NICE.to_string())
            .context("writing /proc/self/autogroup")?;
        held.1 = Some(before);
    }
    held.0 += 1;
    Ok(format!(
        "this session's autogroup at nice {} (was {})",
        autogroup_nice()?,
        held.1.unwrap_or_default()
    ))
}

/// The nice and time slice of process `pid` ("-10, 100 us", from
/// /proc/PID/stat field 19 and /proc/PID/sched), to show what a child inherited.
pub fn nice_of(pid: u32) -> Result<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("no ) in /proc/PID/stat")?.1;
    // Field 19 is at 16 counted from field 3 (the state).
    let nice = rest
        .split_whitespace()
        .nth(16)
        .context("short /proc/PID/stat")?;
    let sched = std::fs::read_to_string(format!("/proc/{pid}/sched")).unwrap_or_default();
    let slice = sched
        .lines()
        .find(|l| l.starts_with("se.slice"))
        .and_then(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .map_or_else(|| "?".to_string(), |ns| format!("{} us", ns / 1000));
    Ok(format!("{nice}, slice {slice}"))
}

/// Time the threads of process `pid` (or this process, `None`) spent
/// waiting for a CPU while runnable (the run queue), in ns: the second field
/// of each /proc/PID/task/TID/schedstat. Threads named `skip` are left out;
/// threads gone since are not counted; a gone process counts 0.
pub fn run_queue_wait_ns(pid: Option<u32>, skip: &str) -> u64 {
    let dir = pid.map_or_else(
        || "/proc/self/task".to_string(),
        |p| format!("/proc/{p}/task"),
    );
    let Ok(tasks) = std::fs::read_dir(dir) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() != skip))
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}
