//! Where things are: the workspace root, the built binaries in `bin/`, kubectl.

use std::path::{Path, PathBuf};

/// The workspace root (the directory holding the root `Cargo.toml` and `bin/`).
///
/// Resolved at run time, not from the path compiled in: cargo does not
/// rebuild this crate when another clone shares the target directory, so a
/// compiled-in path would run that clone's `bin/proxy`. The order is the
/// manifest directory cargo gives a test run, then the current directory
/// (`make bench`), then the path this crate was built from.
pub fn workspace_root() -> PathBuf {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let starts = runtime
        .into_iter()
        .chain(std::env::current_dir().ok())
        .chain(std::iter::once(PathBuf::from(env!("CARGO_MANIFEST_DIR"))));
    for start in starts {
        if let Some(root) = enclosing_workspace(&start) {
            return root.canonicalize().unwrap_or(root);
        }
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The nearest directory at or above `start` whose `Cargo.toml` declares a
/// `[workspace]`.
fn enclosing_workspace(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
        manifest
            .lines()
            .any(|line| line.trim() == "[workspace]")
            .then(|| dir.to_path_buf())
    })
}

/// Path of `<workspace root>/bin/<name>`, a binary built by the Makefile.
///
/// Panics with the `make` target to run when the binary is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = workspace_root().join("bin").join(name);
    if !path.is_file() {
        let target = match name {
            "kube-harness" | "connect-client" => "make harness",
            "promtool" => "make promtool",
            "helm" => "make helm",
            "toxiproxy-server" => "make toxiproxy",
            "go-agent" | "go-proxy" => "make go-peers",
            "proxy" | "agent" => "make build",
            "kubectl" => "bash .ci/run (builds bin/kubectl when kubectl is missing)",
            _ => "make build / make harness / make go-peers",
        };
        panic!(
            "{} does not exist: run `{target}` in {} first",
            path.display(),
            workspace_root().display()
        );
    }
    path
}

/// The kubectl binary the tests run: `$KUBECTL` if set, else `kubectl` found
/// on `PATH`, else `<workspace root>/bin/kubectl` (built by `.ci/run` on
/// machines without kubectl), else plain `kubectl` (spawning it then fails
/// with a clear "not found").
pub fn kubectl_binary() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        return PathBuf::from(k);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("kubectl");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let local = workspace_root().join("bin").join("kubectl");
    if local.is_file() {
        return local;
    }
    PathBuf::from("kubectl")
}
