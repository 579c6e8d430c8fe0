//! The audit log (issue #12 part 6) with real processes: `bin/proxy
//! --audit-log`, the real kubectl with the kubeconfig the proxy published,
//! a CONNECT through the cluster's Unix socket. Every request and stream
//! gets one line with the right verb, status, cluster and caller, and no
//! line carries the kubeconfig's key, the agent's token or a bearer token.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{Proc, Tower, TowerOptions, audit_records, free_port, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SOON: Duration = Duration::from_secs(60);

/// Wait for a record of the cluster port matching `verb` and `path` and
/// return it.
async fn record_of(file: &Path, verb: &str, path: &str) -> Result<Value> {
    let find = || {
        audit_records(file)
            .into_iter()
            .find(|r| r["door"] == "port" && r["verb"] == verb && r["path"] == path)
    };
    wait_until(SOON, || async { find().is_some() })
        .await
        .with_context(|| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            format!("no {verb} {path} line in {}:\n{text}", file.display())
        })?;
    find().context("the line went away")
}

/// The caller of every request made with alpha's published kubeconfig.
fn check_kubeconfig_caller(r: &Value) -> Result<()> {
    ensure!(r["cluster"] == "alpha", "{r}");
    ensure!(r["caller"]["user"] == "kubeconfig of alpha", "{r}");
    ensure!(r["caller"]["cn"] == "tower:alpha", "{r}");
    ensure!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    ensure!(r["duration_ms"].is_u64(), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_request_and_stream_without_secrets() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("tower-audit-").tempdir()?;
    let file = dir.path().join("audit.log");
    let sockets = dir.path().join("sockets");
    let forward_port = free_port();
    let tower = Tower::start_with(TowerOptions {
        proxy_args: vec![
            format!("--audit-log={}", file.display()),
            format!("--connect-socket-dir={}", sockets.display()),
            format!("--forward=alpha=127.0.0.1:{forward_port}"),
        ],
        kubelet: true,
        ..Default::default()
    })
    .await?;
    tower.member().run_pod("default", "box").await?;

    tower.kubectl_ok(&["get", "ns"]).await?;
    let list = record_of(&file, "list", "/api/v1/namespaces").await?;
    check_kubeconfig_caller(&list)?;
    ensure!(list["status"] == 200 && list["method"] == "GET", "{list}");
    ensure!(list["bytes_out"].as_u64() > Some(0), "{list}");
    ensure!(list["source"] == "127.0.0.1", "kubectl's address: {list}");

    tower.kubectl_ok(&["create", "ns", "audited"]).await?;
    let create = record_of(&file, "create", "/api/v1/namespaces").await?;
    check_kubeconfig_caller(&create)?;
    ensure!(create["status"] == 201, "{create}");
    ensure!(create["bytes_in"].as_u64() > Some(0), "{create}");

    // A watch is written when it ends: here, when kubectl is stopped.
    let mut cmd = tower.kubectl_command();
    cmd.args(["get", "ns", "audited", "-w", "-o", "name"]);
    let mut watch = Proc::spawn("watch", cmd)?;
    watch.wait_for_line(|l| l.contains("audited"), SOON).await?;
    // The watch is open once it shows a change (it starts from the GET's
    // resourceVersion, so none is missed).
    tower
        .kubectl_ok(&["label", "ns", "audited", "seen=yes"])
        .await?;
    wait_until(SOON, || async {
        watch
            .lines()
            .iter()
            .filter(|l| l.contains("audited"))
            .count()
            >= 2
    })
    .await?;
    let patch = record_of(&file, "patch", "/api/v1/namespaces/audited").await?;
    check_kubeconfig_caller(&patch)?;
    ensure!(patch["status"] == 200, "{patch}");
    let watched = || {
        audit_records(&file)
            .into_iter()
            .any(|r| r["verb"] == "watch" && r["path"] == "/api/v1/namespaces")
    };
    ensure!(!watched(), "a watch still open has no line yet");
    watch.terminate(Duration::from_secs(5)).await?;
    let watch_line = record_of(&file, "watch", "/api/v1/namespaces").await?;
    check_kubeconfig_caller(&watch_line)?;
    ensure!(watch_line["status"] == 200, "{watch_line}");

    // exec: the 101 and the upgraded stream's bytes, written when it ends.
    let out = tower
        .kubectl_ok(&["exec", "box", "--", "echo", "hi"])
        .await?;
    ensure!(out.trim() == "hi", "{out}");
    // SPDY (POST) or websocket (GET), whichever this kubectl speaks.
    let exec = record_of(&file, "exec", "/api/v1/namespaces/default/pods/box/exec").await?;
    check_kubeconfig_caller(&exec)?;
    ensure!(exec["status"] == 101, "{exec}");
    ensure!(exec["bytes_out"].as_u64() > Some(0), "{exec}");

    // CONNECT through alpha's socket to its kube-apiserver.
    let socket = sockets.join("alpha.sock");
    wait_until(SOON, || async { socket.exists() }).await?;
    let mut io = UnixStream::connect(&socket).await?;
    io.write_all(b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(SOON, io.read(&mut byte)).await??;
        ensure!(n == 1, "closed: {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    // Some bytes each way: a ClientHello gets an answer (or an alert).
    io.write_all(b"\x16\x03\x01\x00\x05hello").await?;
    io.shutdown().await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(SOON, io.read_to_end(&mut rest)).await?;
    drop(io);
    let connect = || {
        audit_records(&file)
            .into_iter()
            .find(|r| r["door"] == "unix" && r["verb"] == "connect")
    };
    wait_until(SOON, || async { connect().is_some() }).await?;
    let connect = connect().context("the CONNECT line went away")?;
    ensure!(connect["cluster"] == "alpha", "{connect}");
    ensure!(connect["caller"]["user"] == "socket of alpha", "{connect}");
    ensure!(connect["target"] == "alpha:443", "{connect}");
    ensure!(connect["status"] == 200, "{connect}");
    ensure!(connect["bytes_in"] == 10, "{connect}");
    ensure!(connect.get("path").is_none(), "{connect}");
    ensure!(
        connect.get("source").is_none(),
        "a socket has no address: {connect}"
    );

    // The raw --forward port: one line per connection, its bytes counted.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", forward_port)).await?;
    raw.write_all(b"\x16\x03\x01\x00\x05hello").await?;
    raw.shutdown().await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(SOON, raw.read_to_end(&mut rest)).await?;
    drop(raw);
    let forwarded = || {
        audit_records(&file)
            .into_iter()
            .find(|r| r["door"] == "forward")
    };
    wait_until(SOON, || async { forwarded().is_some() }).await?;
    let forwarded = forwarded().context("the forward line went away")?;
    ensure!(forwarded["cluster"] == "alpha", "{forwarded}");
    ensure!(
        forwarded["caller"]["user"] == "client of the --forward port of alpha",
        "{forwarded}"
    );
    ensure!(forwarded["status"] == 200, "{forwarded}");
    ensure!(forwarded["bytes_in"] == 10, "{forwarded}");
    ensure!(forwarded["source"] == "127.0.0.1", "{forwarded}");

    // One line per request: every line is a whole record, and no secret.
    let text = std::fs::read_to_string(&file)?;
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(r["status"].as_u64() > Some(0), "{line}");
    }
    let creates = audit_records(&file)
        .into_iter()
        .filter(|r| r["verb"] == "create" && r["path"] == "/api/v1/namespaces")
        .count();
    ensure!(creates == 1, "one create, one line: {creates}\n{text}");
    let kubeconfig = std::fs::read_to_string(tower.config_alpha())?;
    let key = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-key-data:"))
        .map(str::trim)
        .context("the kubeconfig has no client-key-data")?;
    let token = std::fs::read_to_string(tower.dir().join("alpha.token"))?;
    ensure!(!key.is_empty() && !token.trim().is_empty());
    for secret in [key, token.trim(), "Bearer", "PRIVATE KEY", "client-key"] {
        ensure!(
            !text.contains(secret),
            "{secret:?} in the audit log:\n{text}"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)?.permissions().mode();
        ensure!(mode & 0o777 == 0o600, "audit log mode {mode:o}");
    }
    Ok(())
}
