//! The soak's streaming sessions, with the real kubectl through a cluster's
//! published kubeconfig: `kubectl exec -i box -- cat` (a line in, the same
//! line out) and `kubectl port-forward pod/box :PORT` to an echo server on
//! the member's side (a connection through the forward, bytes echoed).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use e2e::kubectl_binary;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::tally::{Outcome, reason};

/// A session still going after this long is a hang: a failure without a
/// reason (the tunnel's own bounds are seconds; this only catches hangs).
pub const SESSION_DEADLINE: Duration = Duration::from_secs(120);

fn kubectl(kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(kubectl_binary());
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// kubectl's last non-empty stderr line, or what else there is to say.
fn last_error(stderr: &[u8], status: Option<std::process::ExitStatus>) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(reason)
        .or_else(|| status.map(|s| format!("kubectl {s} without a message")))
}

/// `kubectl exec -i box -- cat`: `token` in, `token` out.
pub async fn exec(kubeconfig: &Path, token: &str) -> Outcome {
    let run = async {
        let mut cmd = kubectl(kubeconfig);
        cmd.args(["exec", "-i", "box", "--", "cat"])
            .stdin(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            let line = format!("{token}\n");
            // A write error means kubectl is gone already: its stderr says why.
            let _ = stdin.write_all(line.as_bytes()).await;
        }
        Ok::<_, anyhow::Error>(child.wait_with_output().await?)
    };
    match tokio::time::timeout(SESSION_DEADLINE, run).await {
        Err(_) => Outcome::Unexplained(format!("exec still running after {SESSION_DEADLINE:?}")),
        Ok(Err(e)) => Outcome::Unexplained(format!("exec: {e:#}")),
        Ok(Ok(out)) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            if out.status.success() && stdout == format!("{token}\n") {
                return Outcome::Ok;
            }
            match last_error(&out.stderr, Some(out.status)) {
                Some(why) if !out.status.success() => Outcome::Failed(format!("exec: {why}")),
                _ => Outcome::Unexplained(format!(
                    "exec ({}): {stdout:?} instead of {token:?}",
                    out.status
                )),
            }
        }
    }
}

/// `kubectl port-forward pod/box :port`, one connection through it: `token`
/// written, `token` read back.
pub async fn port_forward(kubeconfig: &Path, port: u16, token: &str) -> Outcome {
    let mut cmd = kubectl(kubeconfig);
    cmd.args(["port-forward", "pod/box", &format!(":{port}")]);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Unexplained(format!("spawning kubectl port-forward: {e}")),
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Outcome::Unexplained("kubectl's output is not piped".into());
    };
    // kubectl's stderr, line by line: why a session failed.
    let (said, mut heard) = tokio::sync::watch::channel(Vec::<String>::new());
    let errors = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            said.send_modify(|all| all.push(l));
        }
    });
    let session = async {
        // `Forwarding from 127.0.0.1:NNNN -> PORT`
        let mut lines = BufReader::new(stdout).lines();
        let local = loop {
            match lines.next_line().await? {
                None => return Ok::<_, anyhow::Error>(false),
                Some(l) => {
                    if let Some(p) = l
                        .strip_prefix("Forwarding from 127.0.0.1:")
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        break p;
                    }
                }
            }
        };
        let mut conn = TcpStream::connect(("127.0.0.1", local)).await?;
        conn.write_all(token.as_bytes()).await?;
        let mut back = vec![0u8; token.len()];
        match conn.read_exact(&mut back).await {
            Ok(_) => Ok(back == token.as_bytes()),
            Err(_) => Ok(false),
        }
    };
    let result = tokio::time::timeout(SESSION_DEADLINE, session).await;
    if !matches!(result, Ok(Ok(true))) {
        // Failed: until kubectl says why (or exits), within the deadline.
        let said = async {
            let _ = heard
                .wait_for(|l| l.iter().any(|l| !l.trim().is_empty()))
                .await;
        };
        let _ = tokio::time::timeout(SESSION_DEADLINE, async {
            tokio::select! {
                _ = said => {}
                _ = child.wait() => {}
            }
        })
        .await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = errors.await;
    let stderr = heard.borrow().join("\n");
    match result {
        Err(_) => Outcome::Unexplained(format!(
            "port-forward still running after {SESSION_DEADLINE:?}"
        )),
        Ok(Ok(true)) => Outcome::Ok,
        Ok(Ok(false)) | Ok(Err(_)) => match last_error(stderr.as_bytes(), None) {
            Some(why) => Outcome::Failed(format!("port-forward: {why}")),
            None => {
                Outcome::Unexplained(format!("port-forward: no echo and no message ({result:?})"))
            }
        },
    }
}

/// What a session's failure can be checked against: [`Outcome`] as text.
pub fn describe(outcome: &Outcome) -> Result<(), String> {
    match outcome {
        Outcome::Ok => Ok(()),
        Outcome::Failed(why) | Outcome::Unexplained(why) => Err(why.clone()),
    }
}
