//! The environment of the processes under test.

use tokio::process::Command;

/// Nothing from the test's environment that changes what our binaries (or
/// curl) do: no proxy variables (the agent honours them, for 127.0.0.1
/// too), no AGENT_TOKEN, no service account, no RUST_LOG (which would
/// override `--v`). Set a log level after, if the test wants one.
pub fn clean_env(cmd: &mut Command) {
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "AGENT_TOKEN",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env(
        "AGENT_SERVICEACCOUNT_DIR",
        "/nonexistent/e2e-no-service-account",
    );
}
