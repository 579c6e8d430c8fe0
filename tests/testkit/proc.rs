//! [`Proc`]: a child process whose output lines are collected, with deadlines
//! for waiting on them and a reliable stop (also when the test panics).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let mut cmd = tokio::process::Command::new("sh");
//! cmd.args(["-c", "echo starting; echo listening on 127.0.0.1:8080; sleep 60"]);
//! let mut p = e2e::Proc::spawn("demo", cmd)?;
//! let line = p.wait_for_line(|l| l.starts_with("listening"), Duration::from_secs(5)).await?;
//! assert!(line.ends_with(":8080"));
//! p.terminate(Duration::from_secs(5)).await?; // SIGTERM, SIGKILL after 5 s
//! # Ok(()) }
//! ```

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// Which output stream a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Clone, Debug)]
struct Line {
    stream: Stream,
    text: String,
}

#[derive(Default)]
struct Buffer {
    lines: Vec<Line>,
    /// Output streams that reached end of file (0, 1 or 2).
    closed: usize,
}

/// The buffer the reader threads fill, and a version counter that wakes
/// waiters on each new line or closed stream.
struct Shared {
    buf: Mutex<Buffer>,
    version: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panicking reader thread cannot leave the buffer inconsistent.
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }
}

/// How long [`Drop`] waits after SIGTERM before it sends SIGKILL.
const DEFAULT_DROP_GRACE: Duration = Duration::from_secs(5);

/// A spawned child process with collected output.
///
/// * stdout and stderr are read line by line (lossy UTF-8) by two background
///   threads into a shared buffer, and echoed to the test's stderr as
///   `[name] line` (captured by the test harness and shown when the test
///   fails; `TESTKIT_ECHO=0` turns the echo off).
/// * stdin is `/dev/null`.
/// * On Linux the child gets SIGTERM if the thread that spawned it dies, so
///   a test binary killed from outside leaves no orphans.
/// * Dropping a `Proc` whose process still runs sends SIGTERM, waits up to
///   the drop grace (5 s unless [`Proc::set_drop_grace`]), then SIGKILLs and
///   reaps it. This blocks the dropping thread for at most grace + 2 s.
pub struct Proc {
    name: String,
    pid: u32,
    child: Child,
    shared: Arc<Shared>,
    status: Option<ExitStatus>,
    drop_grace: Duration,
}

impl Proc {
    /// Spawns `cmd` (stdout/stderr piped, stdin null, kill_on_drop) and starts
    /// collecting its output under `name`. Call inside a tokio runtime.
    pub fn spawn(name: &str, cmd: Command) -> Result<Proc> {
        let echo = std::env::var("TESTKIT_ECHO").map_or(true, |v| v != "0");
        Self::spawn_with(name, cmd, echo)
    }

    /// Like [`Proc::spawn`] but never echoes output to stderr (it is still
    /// collected: see [`Proc::lines`], [`Proc::tail`]).
    pub fn spawn_quiet(name: &str, cmd: Command) -> Result<Proc> {
        Self::spawn_with(name, cmd, false)
    }

    fn spawn_with(name: &str, mut cmd: Command, echo: bool) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let program = format!("{:?}", cmd.as_std().get_program());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} ({program})"))?;
        let pid = child
            .id()
            .with_context(|| format!("{name}: no pid right after spawn"))?;
        let (version, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            buf: Mutex::new(Buffer::default()),
            version,
        });
        let stdout: OwnedFd = child
            .stdout
            .take()
            .context("stdout not piped")?
            .into_owned_fd()
            .context("stdout fd")?;
        let stderr: OwnedFd = child
            .stderr
            .take()
            .context("stderr not piped")?
            .into_owned_fd()
            .context("stderr fd")?;
        for (stream, fd) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
            let shared = shared.clone();
            let label = name.to_string();
            std::thread::Builder::new()
                .name(format!("{name}-{stream:?}").to_lowercase())
                .spawn(move || read_lines(fd, stream, &label, echo, &shared))
                .context("spawning an output reader thread")?;
        }
        Ok(Proc {
            name: name.to_string(),
            pid,
            child,
            shared,
            status: None,
            drop_grace: DEFAULT_DROP_GRACE,
        })
    }

    /// The name given at spawn (prefix of the echoed lines).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long [`Drop`] waits after SIGTERM before SIGKILL.
    pub fn set_drop_grace(&mut self, grace: Duration) {
        self.drop_grace = grace;
    }

    /// A snapshot of all lines so far (stdout and stderr, in arrival order).
    pub fn lines(&self) -> Vec<String> {
        self.shared
            .lock()
            .lines
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }

    /// A snapshot of the lines of one stream.
    pub fn stream_lines(&self, stream: Stream) -> Vec<String> {
        self.shared
            .lock()
            .lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.clone())
            .collect()
    }

    /// The last `n` lines, one per line, prefixed with the stream: for error
    /// messages.
    pub fn tail(&self, n: usize) -> String {
        let buf = self.shared.lock();
        let start = buf.lines.len().saturating_sub(n);
        let mut out = String::new();
        for l in &buf.lines[start..] {
            let tag = match l.stream {
                Stream::Stdout => "out",
                Stream::Stderr => "err",
            };
            let _ = writeln!(out, "  {tag}| {}", l.text);
        }
        out
    }

    /// Waits until a line (already seen or new, from stdout or stderr)
    /// satisfies `pred`, and returns it. Fails when `timeout` passes or when
    /// the process closed both output streams (exited) without such a line;
    /// the error carries the output's tail.
    pub async fn wait_for_line(
        &self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.shared.version.subscribe();
        let mut seen = 0;
        loop {
            // Mark the version seen before reading, so a line pushed after
            // the read wakes `changed()` below.
            rx.borrow_and_update();
            {
                let buf = self.shared.lock();
                for l in &buf.lines[seen..] {
                    if pred(&l.text) {
                        return Ok(l.text.clone());
                    }
                }
                seen = buf.lines.len();
                if buf.closed == 2 {
                    drop(buf);
                    bail!(
                        "{} closed its output (exited?) without the expected line; last lines:\n{}",
                        self.name,
                        self.tail(40)
                    );
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(_) => {}
                Err(_) => bail!(
                    "{}: no expected line within {timeout:?}; last lines:\n{}",
                    self.name,
                    self.tail(40)
                ),
            }
        }
    }

    /// The exit status if the process has exited (reaps it), else `None`.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("try_wait")?;
        }
        Ok(self.status)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Waits for the process to exit by itself, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let st = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} still running after {timeout:?}; last lines:\n{}",
                    self.name,
                    self.tail(20)
                )
            })?
            .context("wait")?;
        self.status = Some(st);
        Ok(st)
    }

    /// Sends `signal` to the process (no-op once it has been reaped).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid as i32), signal)
            .with_context(|| format!("kill -{signal} {}", self.pid))
    }

    /// Stops the process: SIGTERM, then SIGKILL if it is still running after
    /// `grace`; waits for it and returns its exit status.
    pub async fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_status()? {
            return Ok(st);
        }
        self.signal(Signal::SIGTERM)?;
        let st = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(st) => st.context("wait")?,
            Err(_) => {
                eprintln!(
                    "[{}] still running {grace:?} after SIGTERM: SIGKILL",
                    self.name
                );
                self.child.start_kill().context("SIGKILL")?;
                self.child.wait().await.context("wait")?
            }
        };
        self.status = Some(st);
        Ok(st)
    }

    /// The blocking stop used by `Drop`: SIGTERM, poll up to `grace`, SIGKILL,
    /// poll up to 2 s more.
    fn stop_blocking(&mut self, grace: Duration) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        if poll_exit(&mut self.child, grace) {
            return;
        }
        eprintln!(
            "[{}] still running {grace:?} after SIGTERM: SIGKILL",
            self.name
        );
        let _ = self.child.start_kill();
        poll_exit(&mut self.child, Duration::from_secs(2));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.stop_blocking(self.drop_grace);
        }
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}

/// Polls `try_wait` until the child has exited (true) or `limit` passed.
fn poll_exit(child: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if start.elapsed() >= limit => return false,
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// Reader thread body: one stream into the shared buffer until end of file.
fn read_lines(fd: OwnedFd, stream: Stream, name: &str, echo: bool, shared: &Shared) {
    let mut reader = BufReader::new(std::fs::File::from(fd));
    let mut raw = Vec::with_capacity(256);
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    raw.pop();
                }
                let text = String::from_utf8_lossy(&raw).into_owned();
                if echo {
                    eprintln!("[{name}] {text}");
                }
                shared.lock().lines.push(Line { stream, text });
                shared.bump();
            }
        }
    }
    shared.lock().closed += 1;
    shared.bump();
}

/// The value of `key=value` in a log line of our binaries (text format),
/// quotes removed: `log_field(line, "addr")` of `... listening for agents addr=127.0.0.1:8080`.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[tokio::test]
    async fn waits_for_lines_seen_and_new() -> Result<()> {
        let p = Proc::spawn(
            "sh",
            sh("echo one; echo two >&2; read x < /dev/null; sleep 0.2; echo three; sleep 30"),
        )?;
        let l = p
            .wait_for_line(|l| l == "three", Duration::from_secs(10))
            .await?;
        assert_eq!(l, "three");
        // already-seen lines match at once
        let l = p
            .wait_for_line(|l| l == "one", Duration::from_millis(1))
            .await?;
        assert_eq!(l, "one");
        assert_eq!(p.stream_lines(Stream::Stderr), vec!["two".to_string()]);
        assert_eq!(p.lines().len(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn wait_fails_on_timeout_and_on_exit() -> Result<()> {
        let p = Proc::spawn("sleeper", sh("echo hi; sleep 30"))?;
        let t = Instant::now();
        let err = p
            .wait_for_line(|l| l == "never", Duration::from_millis(200))
            .await
            .expect_err("no such line");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(format!("{err}").contains("hi"), "{err}");

        let mut p = Proc::spawn("exits", sh("echo bye; exit 3"))?;
        let err = p
            .wait_for_line(|l| l == "never", Duration::from_secs(30))
            .await
            .expect_err("exited");
        assert!(format!("{err}").contains("closed its output"), "{err}");
        assert_eq!(p.wait(Duration::from_secs(5)).await?.code(), Some(3));
        Ok(())
    }

    #[tokio::test]
    async fn terminate_escalates_to_sigkill() -> Result<()> {
        // Ignores SIGTERM: terminate must SIGKILL after the grace.
        let mut p = Proc::spawn(
            "stubborn",
            sh("trap '' TERM; echo up; while :; do sleep 1; done"),
        )?;
        p.wait_for_line(|l| l == "up", Duration::from_secs(10))
            .await?;
        let t = Instant::now();
        let st = p.terminate(Duration::from_millis(300)).await?;
        assert!(!st.success());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!p.is_running());
        Ok(())
    }

    #[tokio::test]
    async fn drop_stops_the_process() -> Result<()> {
        let p = Proc::spawn("dropped", sh("echo up; exec sleep 30"))?;
        p.wait_for_line(|l| l == "up", Duration::from_secs(10))
            .await?;
        let pid = p.pid();
        drop(p);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }
}
