//! The aggregated API end to end (issue #12, parts 1 and 2): the proxy
//! serves `tower.kubesphere.io/v1alpha1` behind the HOST kube-apiserver, so
//! the host's admin kubeconfig plus a path reaches member alpha, the host's
//! RBAC on `clusters/proxy` decides who reaches which cluster, and the
//! member judges the caller (impersonated), not the agent.
//!
//! The kube-apiserver will not send an APIService's traffic to a loopback
//! address, so the whole test runs in a network namespace of its own
//! ([`e2e::in_own_netns`]): the proxy's aggregated port is reached at
//! [`e2e::NETNS_ADDR`] through the Service `kubesphere-system/tower-api`
//! and an EndpointSlice the test writes (no controllers run in the harness).
//!
//! One set-up (host, member with the kubelet stand-in, proxy, agent), then
//! every assertion.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::{
    CLUSTER, EchoServer, NETNS_ADDR, POD_CONTAINER, Proc, Tower, TowerOptions, free_port,
    in_own_netns, kubectl_binary, wait_for_ok,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const QUICK: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(120);
const NS: &str = "default";
const POD: &str = "box";

/// kubectl with the host's admin kubeconfig at `server`, as `user` (with
/// `--as`, groups `dev`) or as admin.
async fn kubectl(
    host_kc: &Path,
    server: &str,
    user: Option<&str>,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<Output> {
    let mut cmd = Command::new(kubectl_binary());
    cmd.arg("--kubeconfig")
        .arg(host_kc)
        .arg("--server")
        .arg(server);
    if let Some(user) = user {
        cmd.args(["--as", user, "--as-group", "dev"]);
    }
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("spawning kubectl")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    if let Some(input) = input {
        stdin.write_all(input).await?;
    }
    drop(stdin);
    tokio::time::timeout(SETTLE, child.wait_with_output())
        .await
        .with_context(|| format!("kubectl {args:?} did not finish"))?
        .context("kubectl")
}

fn ok(args: &[&str], out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn refused(args: &[&str], out: &Output) -> Result<String> {
    ensure!(
        !out.status.success(),
        "kubectl {args:?} should have been refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn aggregated_api_reaches_members_as_the_host_allows() -> Result<()> {
    if !in_own_netns("aggregated_api_reaches_members_as_the_host_allows").await? {
        return Ok(());
    }
    let port = free_port();
    let audit_dir = tempfile::tempdir()?;
    let audit_log = audit_dir.path().join("audit.log");
    let tower = Tower::start_with(TowerOptions {
        proxy_args: vec![
            // The aggregated port must be reachable at NETNS_ADDR.
            "--host".into(),
            "0.0.0.0".into(),
            "--aggregated-api-port".into(),
            port.to_string(),
            "--audit-log".into(),
            audit_log.to_string_lossy().into_owned(),
        ],
        ..Default::default()
    })
    .await?;
    let host = tower.host();
    let host_kc = host.kubeconfig().to_path_buf();
    let host_url = format!("https://{}", host.server_addr()?);
    let alpha = format!("{host_url}/apis/tower.kubesphere.io/v1alpha1/clusters/{CLUSTER}/proxy");
    let beta_path = "/apis/tower.kubesphere.io/v1alpha1/clusters/beta/proxy";

    // What the deployment ships (config/proxy): the Service; the harness has
    // no endpoint controller, so the EndpointSlice is written here too.
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "tower-api", "namespace": "kubesphere-system"},
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "tower-api", "namespace": "kubesphere-system",
                      "labels": {"kubernetes.io/service-name": "tower-api"}},
         "addressType": "IPv4",
         "endpoints": [{"addresses": [NETNS_ADDR], "conditions": {"ready": true}}],
         "ports": [{"name": "https", "port": port, "protocol": "TCP"}]},
        // jane: alpha for get/list/watch/create; joe: get only.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "tower-alpha"},
         "rules": [{"apiGroups": ["tower.kubesphere.io"], "resources": ["clusters/proxy"],
                    "resourceNames": [CLUSTER], "verbs": ["get", "list", "watch", "create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "tower-alpha-jane"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tower-alpha"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "jane"}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "tower-alpha-get"},
         "rules": [{"apiGroups": ["tower.kubesphere.io"], "resources": ["clusters/proxy"],
                    "resourceNames": [CLUSTER], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "tower-alpha-joe"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tower-alpha-get"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "joe"}]},
        // beta: a Cluster without an agent.
        {"apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
         "metadata": {"name": "beta"},
         "spec": {"joinFederation": true, "connection": {"type": "proxy"}}},
    ]})
    .to_string();
    host.kubectl_ok(&[
        "apply",
        "-f",
        &write(audit_dir.path(), "host.json", &objects)?,
    ]);
    // On the member, jane may read namespaces and configmaps, nothing more.
    let member_rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "reader"},
         "rules": [{"apiGroups": [""], "resources": ["namespaces", "configmaps"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "reader-jane"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reader"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "jane"}]},
    ]})
    .to_string();
    tower.member().kubectl_ok(&[
        "apply",
        "-f",
        &write(audit_dir.path(), "member.json", &member_rbac)?,
    ]);
    tower.member().run_pod(NS, POD).await?;

    // The proxy registered its APIService; the aggregator finds it available.
    wait_for_ok(SETTLE, || async {
        let out = host.kubectl_ok(&[
            "get",
            "apiservice",
            "v1alpha1.tower.kubesphere.io",
            "-o",
            "json",
        ]);
        let svc: Value = serde_json::from_str(&out)?;
        ensure!(
            !svc["spec"]["caBundle"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "no caBundle"
        );
        let available = svc["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Available");
        ensure!(
            available.is_some_and(|c| c["status"] == "True"),
            "APIService not available yet: {available:?}"
        );
        Ok(())
    })
    .await
    .context("the aggregator never found the proxy's APIService available")?;

    // Admin: get, apply, watch, exec, port-forward, cp on alpha.
    let args = ["get", "ns", "kube-system", "-o", "name"];
    let got = wait_for_ok(QUICK, || async {
        ok(&args, kubectl(&host_kc, &alpha, None, &args, None).await?)
    })
    .await?;
    ensure!(got.trim() == "namespace/kube-system", "{got}");

    let mut watch_cmd = Command::new(kubectl_binary());
    watch_cmd.arg("--kubeconfig").arg(&host_kc).args([
        "--server",
        &alpha,
        "get",
        "configmaps",
        "-n",
        NS,
        "-w",
        "-o",
        "name",
    ]);
    let watch = Proc::spawn("watch", watch_cmd)?;
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "applied", "namespace": NS}, "data": {"k": "v"}})
    .to_string();
    let args = ["apply", "-f", "-"];
    ok(
        &args,
        kubectl(&host_kc, &alpha, None, &args, Some(cm.as_bytes())).await?,
    )?;
    let on_member =
        tower
            .member()
            .kubectl_ok(&["get", "cm", "applied", "-n", NS, "-o", "jsonpath={.data.k}"]);
    ensure!(
        on_member == "v",
        "applied through the aggregated API: {on_member}"
    );
    watch
        .wait_for_line(|l| l.contains("configmap/applied"), QUICK)
        .await
        .context("the watch through the aggregated API")?;
    drop(watch);

    let args = ["exec", POD, "-n", NS, "--", "echo", "hello from alpha"];
    let out = ok(&args, kubectl(&host_kc, &alpha, None, &args, None).await?)?;
    ensure!(out.trim() == "hello from alpha", "exec: {out:?}");
    // The same over SPDY/3.1 (kubectl's fallback), also passed through.
    let spdy = Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(&host_kc)
        .args(["--server", &alpha])
        .args(args)
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .kill_on_drop(true)
        .output()
        .await?;
    let out = ok(&args, spdy)?;
    ensure!(out.trim() == "hello from alpha", "exec over SPDY: {out:?}");
    let args = ["logs", POD, "-n", NS];
    ok(&args, kubectl(&host_kc, &alpha, None, &args, None).await?)?;

    let echo = EchoServer::start().await?;
    let mut pf_cmd = Command::new(kubectl_binary());
    pf_cmd.arg("--kubeconfig").arg(&host_kc).args([
        "--server",
        &alpha,
        "port-forward",
        "-n",
        NS,
        &format!("pod/{POD}"),
        &format!(":{}", echo.addr().port()),
    ]);
    let pf = Proc::spawn("port-forward", pf_cmd)?;
    let suffix = format!(" -> {}", echo.addr().port());
    let line = pf
        .wait_for_line(
            |l| l.starts_with("Forwarding from 127.0.0.1:") && l.ends_with(&suffix),
            QUICK,
        )
        .await?;
    let local: std::net::SocketAddr =
        line["Forwarding from ".len()..line.len() - suffix.len()].parse()?;
    let mut conn = tokio::net::TcpStream::connect(local).await?;
    conn.write_all(b"through the aggregator\n").await?;
    let mut back = [0u8; 23];
    tokio::time::timeout(QUICK, conn.read_exact(&mut back)).await??;
    ensure!(
        &back == b"through the aggregator\n",
        "port-forward echoed {back:?}"
    );
    drop((conn, pf));

    let local_file = write(
        audit_dir.path(),
        "cp.txt",
        "copied through the aggregated API\n",
    )?;
    let target = format!("{NS}/{POD}:cp.txt");
    let args = ["cp", &local_file, &target, "-c", POD_CONTAINER];
    ok(&args, kubectl(&host_kc, &alpha, None, &args, None).await?)?;
    let landed = std::fs::read_to_string(
        tower
            .member()
            .container_dir(NS, POD, POD_CONTAINER)
            .join("cp.txt"),
    )?;
    ensure!(
        landed == "copied through the aggregated API\n",
        "cp: {landed:?}"
    );

    // jane: reads alpha as herself...
    let args = ["get", "ns", "kube-system", "-o", "name"];
    let got = ok(
        &args,
        kubectl(&host_kc, &alpha, Some("jane"), &args, None).await?,
    )
    .with_context(|| audit_tail(&audit_log))?;
    ensure!(got.trim() == "namespace/kube-system", "{got}");
    let args = [
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ];
    let me = ok(
        &args,
        kubectl(&host_kc, &alpha, Some("jane"), &args, None).await?,
    )?;
    ensure!(me == "jane", "the member should see jane, saw {me:?}");
    // ...is refused on beta by the host (raw: kubectl's discovery would
    // only say "Forbidden: unknown")...
    // (--raw ignores the server's path: the whole path is given.)
    let beta_raw = format!("{beta_path}/api/v1/namespaces");
    let args = ["get", "--raw", &beta_raw];
    let out = kubectl(&host_kc, &host_url, Some("jane"), &args, None).await?;
    let err = refused(&args, &out)?;
    ensure!(
        err.contains("forbidden") && err.contains("\"jane\"") && err.contains("\"beta\""),
        "{err}"
    );
    // ...and gets the member's 403 for what the member does not grant.
    let args = ["create", "ns", "janes"];
    let out = kubectl(&host_kc, &alpha, Some("jane"), &args, None).await?;
    let err = refused(&args, &out)?;
    ensure!(
        err.contains("namespaces is forbidden") && err.contains("User \"jane\""),
        "expected the member's refusal: {err}"
    );
    // joe may `get` on the host but not list: the proxy's review refuses.
    let args = ["get", "ns"];
    let out = kubectl(&host_kc, &alpha, Some("joe"), &args, None).await?;
    let err = refused(&args, &out)?;
    ensure!(
        err.contains("\"joe\"") && err.contains("cannot list") && err.contains("alpha"),
        "joe listing alpha: {err}"
    );

    // No front-proxy certificate: 401.
    let direct = format!("https://{NETNS_ADDR}:{port}");
    let out = Command::new(kubectl_binary())
        .args([
            "--kubeconfig",
            "/dev/null",
            "--server",
            &direct,
            "--insecure-skip-tls-verify",
            "--token",
            "not-a-front-proxy",
            "get",
            "--raw",
            "/apis",
        ])
        .output()
        .await?;
    let err = refused(&["get", "--raw"], &out)?;
    ensure!(
        err.contains("logged in") && err.contains("no front-proxy client certificate"),
        "without a front-proxy certificate: {err}"
    );

    // Impersonation off: the member sees the agent's identity again.
    host.kubectl_ok(&[
        "annotate",
        "cluster",
        CLUSTER,
        "tower.kubesphere.io/impersonate=false",
    ]);
    let args = [
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ];
    wait_for_ok(QUICK, || async {
        let me = ok(
            &args,
            kubectl(&host_kc, &alpha, Some("jane"), &args, None).await?,
        )?;
        ensure!(
            me == "admin",
            "the member should see the agent (admin), saw {me:?}"
        );
        Ok(())
    })
    .await?;

    // The audit log: door aggregated, jane, the member's answers.
    let lines = std::fs::read_to_string(&audit_log)?;
    let records: Vec<Value> = lines
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let jane = |status: u64, verb: &str| {
        records.iter().any(|r| {
            r["door"] == "aggregated"
                && r["cluster"] == CLUSTER
                && r["caller"]["user"] == "jane"
                && r["status"] == status
                && r["verb"] == verb
        })
    };
    ensure!(jane(200, "get"), "no audit line for jane's get:\n{lines}");
    // Where kubectl came from, as the host kube-apiserver vouched
    // (X-Forwarded-For), not the kube-apiserver's own address (NETNS_ADDR).
    ensure!(
        records
            .iter()
            .filter(|r| r["door"] == "aggregated" && r["caller"]["user"] == "jane")
            .all(|r| r["source"] == "127.0.0.1"),
        "jane's audit lines should name kubectl's address 127.0.0.1:\n{lines}"
    );
    ensure!(
        jane(403, "create"),
        "no audit line for jane's refused create:\n{lines}"
    );
    ensure!(
        records.iter().any(|r| r["door"] == "aggregated"
            && r["caller"]["user"] == "joe"
            && r["status"] == 403),
        "no audit line for joe's refusal:\n{lines}"
    );
    ensure!(
        records
            .iter()
            .any(|r| r["door"] == "aggregated" && r["verb"] == "exec" && r["status"] == 101),
        "no audit line for the exec:\n{lines}"
    );
    Ok(())
}

/// The audit log's last lines, to explain a failure.
fn audit_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "audit log tail:\n{}",
        lines[lines.len().saturating_sub(8)..].join("\n")
    )
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}
