//! Waiting for conditions with a deadline: the sanctioned replacement for
//! fixed sleeps.
//!
//! ```no_run
//! # async fn demo(c: &e2e::KubeCluster) -> anyhow::Result<()> {
//! use std::time::Duration;
//! // a boolean condition
//! e2e::wait_until(Duration::from_secs(30), || async {
//!     c.kubectl(&["get", "ns", "demo"]).status.success()
//! })
//! .await?;
//! // an operation that must eventually succeed; its last error is reported
//! let out = e2e::wait_for_ok(Duration::from_secs(30), || async {
//!     let out = c.kubectl(&["get", "ns", "demo", "-o", "name"]);
//!     anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
//!     Ok(String::from_utf8_lossy(&out.stdout).into_owned())
//! })
//! .await?;
//! # let _ = out; Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Polls `cond` until it returns true (Ok) or `timeout` has passed (Err).
///
/// The pause between polls starts at 10 ms and doubles up to 200 ms, so
/// fast conditions are seen quickly and slow ones aren't hammered. The
/// condition is always checked at least once, and once more at the deadline.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_ok(timeout, || {
        let fut = cond();
        async move {
            if fut.await {
                Ok(())
            } else {
                Err(anyhow!("condition still false"))
            }
        }
    })
    .await
    .map_err(|_| anyhow!("condition not met within {timeout:?}"))
}

/// Polls `op` until it returns `Ok(value)` and returns that value; after
/// `timeout`, fails with the last error `op` returned.
pub async fn wait_for_ok<T, F, Fut>(timeout: Duration, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let err = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(err.context(format!("still failing after {timeout:?}")));
        }
        tokio::time::sleep_until((now + pause).min(deadline)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn polls_until_true_or_deadline() -> Result<()> {
        let n = AtomicU32::new(0);
        wait_until(Duration::from_secs(5), || async {
            n.fetch_add(1, Ordering::SeqCst) >= 3
        })
        .await?;
        assert_eq!(n.load(Ordering::SeqCst), 4);
        let t = std::time::Instant::now();
        assert!(
            wait_until(Duration::from_millis(100), || async { false })
                .await
                .is_err()
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        let err = wait_for_ok(Duration::from_millis(50), || async {
            Err::<(), _>(anyhow!("the last error"))
        })
        .await
        .expect_err("never ok");
        assert!(format!("{err:#}").contains("the last error"), "{err:#}");
        Ok(())
    }
}
