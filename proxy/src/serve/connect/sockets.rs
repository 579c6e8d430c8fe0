//! `--connect-socket-dir DIR`: `DIR/<cluster>.sock` exists while the cluster
//! has a live agent session and is removed when it has none. Mode 0660: the
//! file's owner and group may connect, and that is the access control.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{Bound, Door};
use crate::agents::registry::Registry;
use crate::identity::names::is_cluster_name;
use crate::ops::accept::accept_loop;
use crate::ops::audit::Caller;

/// A cluster name usable as a file name: what Kubernetes allows for a
/// Cluster, nothing that walks out of the directory.
fn file_name(cluster: &str) -> Option<String> {
    is_cluster_name(cluster).then(|| format!("{cluster}.sock"))
}

/// Keep one socket per connected cluster in `dir` until `stop`, then remove them.
pub async fn run(dir: PathBuf, door: Arc<Door>, registry: Registry, stop: CancellationToken) {
    let mut open: HashMap<String, (PathBuf, CancellationToken)> = HashMap::new();
    let mut changes = registry.subscribe();
    loop {
        let live = registry.live_clusters();
        open.retain(|cluster, (path, cancel)| {
            if live.contains(cluster) {
                return true;
            }
            cancel.cancel();
            remove(path);
            tracing::info!(%cluster, path = %path.display(), "CONNECT socket removed: no agent");
            false
        });
        for cluster in live {
            if open.contains_key(&cluster) {
                continue;
            }
            let Some(name) = file_name(&cluster) else {
                tracing::warn!(%cluster, "no CONNECT socket: the cluster's name is not a safe file name");
                continue;
            };
            let path = dir.join(name);
            match listen(&path) {
                Ok(listener) => {
                    let cancel = stop.child_token();
                    tracing::info!(%cluster, path = %path.display(), "CONNECT socket listening");
                    tokio::spawn(serve(
                        listener,
                        door.clone(),
                        cluster.clone(),
                        cancel.clone(),
                    ));
                    open.insert(cluster, (path, cancel));
                }
                Err(e) => {
                    tracing::warn!(%cluster, path = %path.display(), error = %e,
                        "cannot create the CONNECT socket (is --connect-socket-dir writable?)");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    for (path, cancel) in open.into_values() {
        cancel.cancel();
        remove(&path);
    }
}

/// Listen on `path` (replacing a stale socket file) with mode 0660. The
/// socket is bound under a hidden name and renamed into place once it listens
/// with its final mode: a client that sees the file can connect at once, and
/// nobody ever sees it with a wider mode.
fn listen(path: &Path) -> std::io::Result<UnixListener> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other(
            "a socket path needs a directory and a file name",
        ));
    };
    let staging = dir.join(format!(".{}.new", name.to_string_lossy()));
    for stale in [&staging, &path.to_path_buf()] {
        if std::fs::symlink_metadata(stale).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(stale)?;
        }
    }
    let listener = UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        remove(&staging);
        return Err(e);
    }
    Ok(listener)
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a CONNECT socket");
    }
}

/// Streams outlive `stop` (the socket going away): they end with their tunnel.
async fn serve(listener: UnixListener, door: Arc<Door>, cluster: String, stop: CancellationToken) {
    accept_loop(listener, "connect-socket", stop, |stream, _| {
        let (door, cluster) = (door.clone(), cluster.clone());
        tokio::spawn(async move {
            let caller = Caller::named(format!("socket of {cluster}"));
            door.serve(stream, "unix", Bound::Socket(cluster), caller, None)
                .await
        });
        async {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_file_names() {
        assert_eq!(file_name("alpha").as_deref(), Some("alpha.sock"));
        assert_eq!(file_name("eu-1.prod").as_deref(), Some("eu-1.prod.sock"));
        for bad in ["", "../etc", "a/b", ".hidden", "UPPER", "a..b", "sp ace"] {
            assert_eq!(file_name(bad), None, "{bad}");
        }
    }

    /// The file appears only once it accepts connections, with its final
    /// mode, replacing a stale one and leaving no staging file behind.
    #[tokio::test]
    async fn the_socket_file_appears_listening() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("alpha.sock");
        std::fs::write(&path, b"stale")?;
        let listener = listen(&path)?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let _client = tokio::net::UnixStream::connect(&path).await?;
        listener.accept().await?;
        let names: Vec<_> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(names, ["alpha.sock"]);
        Ok(())
    }
}
