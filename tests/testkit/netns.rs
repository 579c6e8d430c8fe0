//! A network namespace of the test's own, for tests that need an address
//! that is not loopback: the kube-apiserver refuses loopback Endpoints, so a
//! proxy registered as an aggregated API server (or anything behind a
//! Service) must listen elsewhere, and never on an address of the machine.
//!
//! [`in_own_netns`] re-runs the calling test inside `unshare --net` (as
//! root); the inner run brings `lo` up and adds the interface `tower0`
//! with [`NETNS_ADDR`] (dummy, else a veth pair), then everything the test starts (harness clusters,
//! proxy, agent, kubectl) lives in that namespace and vanishes with it.
//!
//! ```no_run
//! #[tokio::test]
//! async fn my_test() -> anyhow::Result<()> {
//!     if !e2e::in_own_netns("my_test").await? {
//!         return Ok(()); // the inner run passed
//!     }
//!     // ... inside: listen on e2e::NETNS_ADDR ...
//!     Ok(())
//! }
//! # fn main() {}
//! ```

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::process::Command;

/// Marks the inner run.
const INNER: &str = "TESTKIT_NETNS_INNER";

/// The namespace's own non-loopback address (on `tower0`, a /24).
pub const NETNS_ADDR: &str = "10.213.0.2";

/// `Ok(true)`: this is the inner run, inside the namespace and set up: go on
/// with the test. `Ok(false)`: this was the outer run and the inner one
/// passed. An error when the namespace cannot be made (never a skip) or the
/// inner run failed (its output is on the test's stdout and stderr).
pub async fn in_own_netns(test: &str) -> Result<bool> {
    if is_inner_run() {
        set_up().await?;
        return Ok(true);
    }
    let exe = std::env::current_exe().context("finding the test binary")?;
    let status = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .stdin(Stdio::null())
        .status()
        .await
        .context(
            "cannot run `unshare --net` (util-linux): this test needs a network namespace of \
             its own, and root (or CAP_SYS_ADMIN) to make one",
        )?;
    if !status.success() {
        bail!(
            "{test} inside `unshare --net` failed ({status}); if unshare itself failed just \
             above, run the tests as root (it needs CAP_SYS_ADMIN for a network namespace)"
        );
    }
    Ok(false)
}

/// Whether this is the inner run of [`in_own_netns`] (inside the test's
/// own network namespace).
pub(crate) fn is_inner_run() -> bool {
    std::env::var_os(INNER).is_some()
}

/// Inside: `lo` up, `tower0` with [`NETNS_ADDR`]: a dummy interface, or a
/// veth pair (`tower0`/`tower1`) where the kernel has no dummy driver.
async fn set_up() -> Result<()> {
    ip(&["link", "set", "lo", "up"]).await?;
    if let Err(dummy) = ip(&["link", "add", "tower0", "type", "dummy"]).await {
        ip(&[
            "link", "add", "tower0", "type", "veth", "peer", "name", "tower1",
        ])
        .await
        .with_context(|| format!("no dummy interface ({dummy:#}), and no veth pair"))?;
        ip(&["link", "set", "tower1", "up"]).await?;
    }
    ip(&["addr", "add", &format!("{NETNS_ADDR}/24"), "dev", "tower0"]).await?;
    ip(&["link", "set", "tower0", "up"]).await
}

pub(crate) async fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .context("running `ip` (iproute2) inside the test's network namespace")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
