//! Where things are: the workspace root, the built binaries in `bin/`, kubectl.

use std::path::{Path, PathBuf};

/// The workspace root (the directory holding the root `Cargo.toml` and `bin/`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
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
