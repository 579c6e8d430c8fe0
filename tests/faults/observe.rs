//! What the faults are measured with: a running `kubectl get -w` and an
//! `kubectl exec -i ... cat` session (a process's fds and RSS: [`e2e::Usage`]).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use e2e::Tower;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a long-running kubectl did while a fault was on.
pub enum Seen {
    /// It delivered what was asked for, after this long.
    Delivered(Duration),
    /// It ended (stdout closed) after this long, with its last stderr line.
    Ended(Duration, String),
}

impl Seen {
    pub fn describe(&self) -> String {
        match self {
            Seen::Delivered(d) => format!("delivered {:.1}s", d.as_secs_f64()),
            Seen::Ended(d, why) => format!("ended {:.1}s ({why})", d.as_secs_f64()),
        }
    }
}

/// The gist of an error line for the table.
pub fn short(line: &str) -> String {
    let line = line.trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let mut s: String = line.chars().take(70).collect();
    if line.chars().count() > 70 {
        s.push('…');
    }
    if s.is_empty() { "no message".into() } else { s }
}

/// A kubectl whose stdout lines arrive on a channel.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Session {
    /// `kubectl get configmaps -w -o name` in `default`.
    pub fn watch(tower: &Tower) -> Result<Session> {
        Self::spawn(
            tower,
            &["get", "configmaps", "-n", "default", "-w", "-o", "name"],
            false,
        )
    }

    /// `kubectl exec -i box -- cat`: each line written comes back.
    pub fn exec(tower: &Tower) -> Result<Session> {
        Self::spawn(tower, &["exec", "-i", "box", "--", "cat"], true)
    }

    fn spawn(tower: &Tower, args: &[&str], stdin: bool) -> Result<Session> {
        let mut cmd = tower.kubectl_command();
        cmd.args(args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning kubectl")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let mut out = BufReader::new(child.stdout.take().context("kubectl stdout")?).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut err = BufReader::new(child.stderr.take().context("kubectl stderr")?).lines();
        let keep = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = err.next_line().await {
                if let Ok(mut v) = keep.lock() {
                    v.push(line);
                }
            }
        });
        Ok(Session {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        })
    }

    /// Writes `line` to kubectl's stdin (exec); a closed stdin is not an
    /// error here: [`Session::expect`] then sees the end.
    pub async fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(format!("{line}\n").as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }

    /// Waits for a line containing `token` or the end of stdout, up to
    /// `deadline`; `None` when neither came (a hang).
    pub async fn expect(&mut self, token: &str, since: Instant, deadline: Instant) -> Option<Seen> {
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => return None,
                Ok(Some(line)) if line.contains(token) => {
                    return Some(Seen::Delivered(since.elapsed()));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let at = since.elapsed();
                    // stderr is read by its own task: give it the time kubectl takes to exit.
                    let code = match tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                        .await
                    {
                        Ok(Ok(status)) => status
                            .code()
                            .map_or_else(|| "killed".to_string(), |c| format!("exit {c}")),
                        _ => "still running".to_string(),
                    };
                    let why = self
                        .stderr
                        .lock()
                        .ok()
                        .and_then(|v| v.last().cloned())
                        .unwrap_or_default();
                    return Some(Seen::Ended(at, format!("{code}: {}", short(&why))));
                }
            }
        }
    }

    /// Stops kubectl.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
