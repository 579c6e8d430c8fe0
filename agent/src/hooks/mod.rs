//! `--pre-start-hook` and `--post-start-hook` (excalibur/anp-tunnel's
//! `PreStartTunnelAgent` and `PostStartTunnelAgent`).
//!
//! A hook is a shell command line, run as `sh -c CMD` with stdin from
//! `/dev/null` and these variables added to the agent's environment:
//! `TOWER_CLUSTER` (`--name`), `TOWER_PROXY` (the proxy's URL), `TOWER_EVENT`
//! (`pre-start` or `post-start`) and `TOWER_ATTEMPT` (1 for the agent's first
//! connection attempt, then counting up).
//!
//! The hook runs in a process group of its own, which is killed (SIGKILL) at
//! `--hook-timeout`, when the hook ends (so a stray background process cannot
//! hold its pipes), and when the agent stops waiting for it. Its stdout is read
//! up to [`MAX_STDOUT`]: for the pre-start hook it may carry credentials
//! ([`output`]), so it is never logged, only its length and the fields it set.
//! Its stderr is logged line by line (at most [`MAX_STDERR_LINES`] lines of
//! [`MAX_LINE`] characters), with any value from stdout redacted.

mod output;

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::unix::pipe;
use tracing::{info, warn};

use crate::credentials::Material;

pub use output::Overrides;

/// Most stdout bytes read from a hook; more is an error.
pub const MAX_STDOUT: u64 = 1 << 20;
/// Most stderr bytes read from a hook; the rest is dropped.
const MAX_STDERR: u64 = 64 << 10;
/// Most stderr lines logged per run.
pub const MAX_STDERR_LINES: usize = 20;
/// Longest stderr line logged, in characters.
pub const MAX_LINE: usize = 200;

/// When a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    PreStart,
    PostStart,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreStart => "pre-start",
            Self::PostStart => "post-start",
        }
    }
}

/// What a hook learns about the connection, in its environment.
#[derive(Clone, Debug)]
pub struct Context {
    pub cluster: String,
    pub proxy: String,
    pub attempt: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start `sh -c`: {0}")]
    Spawn(std::io::Error),
    #[error("reading its output: {0}")]
    Io(std::io::Error),
    #[error("it exited with {0}")]
    Failed(ExitStatus),
    #[error("it did not finish within {0:?} and was killed")]
    TimedOut(Duration),
    #[error("it printed more than {MAX_STDOUT} bytes")]
    TooMuchOutput,
    #[error("its output is not valid: {0}")]
    Invalid(String),
}

/// One `--*-hook` command.
#[derive(Clone, Debug)]
pub struct Hook {
    pub cmd: String,
    pub timeout: Duration,
}

impl Hook {
    /// Run the hook to its end and return its stdout; a non-zero exit, a
    /// timeout or too much output is an error.
    pub async fn run(&self, event: Event, ctx: &Context) -> Result<Vec<u8>, HookError> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&self.cmd)
            .env("TOWER_CLUSTER", &ctx.cluster)
            .env("TOWER_PROXY", &ctx.proxy)
            .env("TOWER_EVENT", event.as_str())
            .env("TOWER_ATTEMPT", ctx.attempt.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // std's process, not tokio's: tokio's process support costs every
        // runtime park a check for children to reap, in both binaries
        // (about 1 % of a tunnel end's CPU), for a hook that runs once per
        // connection attempt.
        let mut child = cmd.spawn().map_err(HookError::Spawn)?;
        // Kills the whole group (the hook leads it) however this function
        // ends (timeout, drop): the blocking wait below then returns.
        let group = Group(child.id());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        // Waits from now on, so the hook is reaped however this function
        // ends (dropping the handle does not stop the wait).
        let exited = tokio::task::spawn_blocking(move || child.wait());
        let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
            return Err(HookError::Io(std::io::Error::other("no pipes")));
        };
        let stdout = pipe::Receiver::from_owned_fd(OwnedFd::from(stdout)).map_err(HookError::Io)?;
        let stderr = pipe::Receiver::from_owned_fd(OwnedFd::from(stderr)).map_err(HookError::Io)?;
        let outcome = tokio::time::timeout(self.timeout, async {
            let (out, err, status) = tokio::join!(
                read_limited(stdout, MAX_STDOUT + 1),
                read_limited(stderr, MAX_STDERR),
                async {
                    let status = exited
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    // Background children of the hook would hold its pipes open.
                    group.kill();
                    status
                }
            );
            (out, err, status)
        })
        .await;
        let Ok((out, err, status)) = outcome else {
            return Err(HookError::TimedOut(self.timeout));
        };
        let out = out.map_err(HookError::Io)?;
        let err = err.unwrap_or_default();
        log_stderr(event, &err, &out);
        let status = status.map_err(HookError::Io)?;
        if !status.success() {
            return Err(HookError::Failed(status));
        }
        if out.len() as u64 > MAX_STDOUT {
            return Err(HookError::TooMuchOutput);
        }
        Ok(out)
    }
}

/// A hook's process group, killed when dropped.
struct Group(u32);

impl Group {
    fn kill(&self) {
        if let Ok(pid) = i32::try_from(self.0) {
            // ESRCH (nothing left in the group) is the usual case.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Read at most `limit` bytes, then keep draining (and dropping) so that the
/// hook does not block on a full pipe.
async fn read_limited(mut pipe: impl AsyncRead + Unpin, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    (&mut pipe).take(limit).read_to_end(&mut kept).await?;
    tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await?;
    Ok(kept)
}

/// Log the hook's stderr, bounded, with stdout's values redacted.
fn log_stderr(event: Event, stderr: &[u8], stdout: &[u8]) {
    let secrets = output::secrets(stdout);
    let text = String::from_utf8_lossy(stderr);
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(MAX_STDERR_LINES)
    {
        let mut line = line.to_string();
        for secret in &secrets {
            line = line.replace(secret.as_str(), "<redacted>");
        }
        let line: String = line.chars().take(MAX_LINE).collect();
        info!(event = event.as_str(), line = %line, "hook stderr");
    }
}

/// The credentials for one attempt: the agent's own, or what `hook` printed.
pub async fn pre_start(
    hook: &Hook,
    ctx: &Context,
    material: &Material,
) -> Result<Material, HookError> {
    let out = hook.run(Event::PreStart, ctx).await?;
    let overrides = Overrides::parse(&out)?;
    if overrides.is_empty() {
        info!(
            bytes = out.len(),
            "pre-start hook printed nothing; using the agent's own credentials"
        );
    } else {
        info!(
            bytes = out.len(),
            fields = overrides.fields(),
            "pre-start hook set credentials"
        );
    }
    Ok(Material {
        token: material.token.clone(),
        credentials: overrides.apply(material.credentials.clone()),
    })
}

/// Run `hook` in the background; the tunnel never waits for it.
pub fn spawn_post_start(hook: Hook, ctx: Context) {
    tokio::spawn(async move {
        match hook.run(Event::PostStart, &ctx).await {
            Ok(out) => info!(bytes = out.len(), "post-start hook done"),
            Err(e) => warn!(error = %e, "post-start hook failed"),
        }
    });
}

#[cfg(test)]
mod tests;
