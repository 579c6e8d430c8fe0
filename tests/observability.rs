//! Observability (issue #6, part 3) on real apiservers: what an operator sees
//! of the tunnel. JSON logs of the proxy and the agents hold no secret across
//! the whole workflow (connect, traffic, a wrong-token agent, a bearer-token
//! agent, exposure, deletion) and every line is JSON; Kubernetes Events on the
//! Cluster tell that story; `/readyz` waits for the controller; the Cluster
//! status shows the member's version and node count, the agent's version,
//! its last heartbeat and when the published kubeconfig expires.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::metric_sample as sample;
use e2e::{
    CLUSTER, KubeCluster, Proc, Tower, TowerOptions, bin, free_port, wait_for_ok, wait_until,
};
use tokio::process::Command;

const DEADLINE: Duration = Duration::from_secs(120);

fn json_logs() -> TowerOptions {
    let json = vec!["--log-format".to_string(), "json".to_string()];
    TowerOptions {
        kubelet: false,
        proxy_args: json.clone(),
        agent_args: json,
        ..Default::default()
    }
}

fn cluster(host: &KubeCluster) -> Result<Value> {
    let text = host.kubectl_ok(&["get", "cluster", CLUSTER, "-o", "json"]);
    serde_json::from_str(&text).context("parsing the Cluster")
}

/// `base64 -d`, for the secrets the test looks for in their decoded form too.
fn b64_decode(text: &str) -> Result<String> {
    let mut child = std::process::Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running base64 -d")?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("base64 stdin")?,
        text.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "base64 -d failed on {} bytes",
        text.len()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The secret itself and, for PEM, each line of its body (a logged PEM would
/// show them, whatever the escaping).
fn secret_forms(what: &str, value: &str, out: &mut Vec<(String, String)>) {
    out.push((what.to_string(), value.trim().to_string()));
    for line in value
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
    {
        out.push((format!("{what} (PEM line)"), line.to_string()));
    }
}

/// `alpha`'s events on the host, as `kubectl get events` lists them:
/// (type, reason) pairs.
fn events(host: &KubeCluster) -> Result<Vec<(String, String)>> {
    let text = host.kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        &format!("involvedObject.kind=Cluster,involvedObject.name={CLUSTER}"),
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&text).context("parsing kubectl get events")?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

async fn wait_for_event(host: &KubeCluster, type_: &str, reason: &str) -> Result<()> {
    wait_for_ok(DEADLINE, || async {
        let seen = events(host)?;
        ensure!(
            seen.iter().any(|(t, r)| t == type_ && r == reason),
            "no {type_} event {reason} on Cluster {CLUSTER} yet; events: {seen:?}"
        );
        Ok(())
    })
    .await
}

async fn scrape(port: u16) -> Result<String> {
    e2e::scrape_metrics("127.0.0.1", port).await
}

/// An agent for alpha with `token`, reaching the member with `kubeconfig`.
fn spawn_agent(
    tower: &Tower,
    label: &str,
    token: &str,
    kubeconfig: &std::path::Path,
) -> Result<Proc> {
    let token_file = tower.dir().join(format!("{label}.token"));
    std::fs::write(&token_file, token)?;
    let mut cmd = Command::new(bin("agent"));
    cmd.args(["--name", CLUSTER, "--log-format", "json"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--proxy-server")
        .arg(format!("http://127.0.0.1:{}", tower.proxy_port()))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--kubesphere-service", "127.0.0.1:9"])
        .args(["--max-retry-interval", "5s"])
        .arg("--proxy-host-key-fingerprint")
        .arg(tower.fingerprint());
    Proc::spawn(label, cmd)
}

/// A kubeconfig for the member that authenticates with a service account's
/// bearer token (cluster-admin), so an agent sends `BearerToken`.
fn bearer_kubeconfig(tower: &Tower) -> Result<(std::path::PathBuf, String)> {
    let member = tower.member();
    member.kubectl_ok(&["create", "serviceaccount", "tower-agent", "-n", "default"]);
    member.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "tower-agent",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:tower-agent",
    ]);
    let token = member
        .kubectl_ok(&["create", "token", "tower-agent", "-n", "default"])
        .trim()
        .to_string();
    let view: Value = serde_json::from_str(
        &member.kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"]),
    )?;
    let server = view["clusters"][0]["cluster"]["server"].clone();
    let ca = view["clusters"][0]["cluster"]["certificate-authority-data"].clone();
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "member", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "member", "context": {"cluster": "member", "user": "sa"}}],
        "current-context": "member",
    });
    let path = tower.dir().join("member-bearer.json");
    std::fs::write(&path, kubeconfig.to_string())?;
    Ok((path, token))
}

fn random_token() -> String {
    use std::hash::BuildHasher;
    (0..4)
        .map(|i| {
            let n = std::collections::hash_map::RandomState::new()
                .hash_one((i, std::time::Instant::now()));
            format!("{n:016x}")
        })
        .collect()
}

/// The whole workflow with `--log-format json` on both sides: the Events on
/// the Cluster tell it (connect, refusal, exposure, disconnect), no log line
/// of the proxy or of any agent holds a secret, and each is one JSON object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_no_secrets_and_events_tell_the_story() -> Result<()> {
    let tower = Tower::start_with(json_logs()).await?;
    let host = tower.host();
    let c = cluster(host)?;
    let token = c["spec"]["connection"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kubeconfig_b64 = c["spec"]["connection"]["kubeconfig"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(token.len() == 64 && !kubeconfig_b64.is_empty(), "{c}");
    wait_for_event(host, "Normal", "AgentConnected").await?;

    let mut secrets = Vec::new();
    secret_forms("cluster token", &token, &mut secrets);
    secret_forms("published kubeconfig", &kubeconfig_b64, &mut secrets);
    let kubeconfig = b64_decode(&kubeconfig_b64)?;
    let client_key = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-key-data: "))
        .context("no client-key-data in the published kubeconfig")?
        .to_string();
    secret_forms("kubeconfig client key", &client_key, &mut secrets);
    secret_forms(
        "kubeconfig client key PEM",
        &b64_decode(&client_key)?,
        &mut secrets,
    );
    // The proxy's CA key, from its Secret.
    let ca_key = host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "secret",
        "tower-proxy",
        "-o",
        "jsonpath={.data.ca\\.key}",
    ]);
    ensure!(!ca_key.is_empty(), "no ca.key in Secret tower-proxy");
    secret_forms("CA key (Secret data)", &ca_key, &mut secrets);
    secret_forms("CA key PEM", &b64_decode(&ca_key)?, &mut secrets);
    // The member credentials the first agent sends: its client key.
    let member_view: Value = serde_json::from_str(
        &tower
            .member()
            .kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"]),
    )?;
    let member_key = member_view["users"][0]["user"]["client-key-data"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        !member_key.is_empty(),
        "the member kubeconfig has no client key"
    );
    secret_forms("member client key", &member_key, &mut secrets);
    secret_forms(
        "member client key PEM",
        &b64_decode(&member_key)?,
        &mut secrets,
    );

    // Traffic; a watch holds a stream open through the tunnel meanwhile.
    let port = tower.proxy_port();
    let before = scrape(port).await?;
    let mut watch = tower.kubectl_command();
    watch
        .args(["get", "ns", "--watch", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let watch = watch.spawn().context("kubectl get ns --watch")?;
    for _ in 0..3 {
        tower.kubectl_ok(&["get", "ns"]).await?;
    }
    let during = wait_for_ok(DEADLINE, || async {
        let m = scrape(port).await?;
        ensure!(
            sample(&m, r#"tower_streams_open{cluster="alpha"}"#) >= 1.0,
            "no stream open during a watch:\n{m}"
        );
        Ok(m)
    })
    .await?;
    drop(watch);
    for (what, name) in [
        (
            "bytes",
            r#"tower_tunnel_bytes_total{cluster="alpha",direction="from_agent"}"#,
        ),
        (
            "bytes",
            r#"tower_tunnel_bytes_total{cluster="alpha",direction="to_agent"}"#,
        ),
        (
            "latency",
            r#"tower_request_duration_seconds_count{cluster="alpha"}"#,
        ),
    ] {
        ensure!(
            sample(&during, name) > sample(&before, name),
            "{what}: {name} did not move:\n{during}"
        );
    }
    for kind in ["client", "serving"] {
        let name = format!(
            r#"tower_certificate_expiry_timestamp_seconds{{cluster="alpha",kind="{kind}"}}"#
        );
        ensure!(sample(&during, &name) > 1.7e9, "{name}:\n{during}");
    }
    // A wrong token: refused, counted, a Warning event.
    let failures = r#"tower_agent_auth_failures_total"#;
    let wrong = random_token();
    secret_forms("wrong token", &wrong, &mut secrets);
    let rejected = spawn_agent(&tower, "agent-wrong", &wrong, tower.member().kubeconfig())?;
    rejected
        .wait_for_line(|l| l.contains("Unauthorized agent"), DEADLINE)
        .await?;
    wait_for_event(host, "Warning", "AgentRejected").await?;
    let after = scrape(port).await?;
    ensure!(
        sample(&after, failures) > sample(&before, failures),
        "auth failures did not move:\n{after}"
    );
    // A second agent that reaches the member with a bearer token: two
    // sessions, one more connect.
    let (bearer_kc, bearer) = bearer_kubeconfig(&tower)?;
    secret_forms("agent bearer token", &bearer, &mut secrets);
    let second = spawn_agent(&tower, "agent-bearer", &token, &bearer_kc)?;
    second
        .wait_for_line(|l| l.contains("connected to proxy"), DEADLINE)
        .await?;
    let connects = r#"tower_agent_connects_total{cluster="alpha"}"#;
    let two = wait_for_ok(DEADLINE, || async {
        let m = scrape(port).await?;
        ensure!(
            sample(&m, r#"tower_agent_sessions{cluster="alpha"}"#) == 2.0,
            "not two sessions:\n{m}"
        );
        Ok(m)
    })
    .await?;
    ensure!(
        sample(&two, connects) >= sample(&before, connects) + 1.0,
        "{two}"
    );
    for _ in 0..6 {
        tower.kubectl_ok(&["get", "ns"]).await?;
    }
    // Exposure switched on: an event for the waiting load balancer.
    host.kubectl_ok(&[
        "patch",
        "cluster",
        CLUSTER,
        "--type=merge",
        "-p",
        r#"{"spec":{"externalKubeAPIEnabled":true}}"#,
    ]);
    wait_for_event(host, "Normal", "WaitingForLoadBalancer").await?;
    // A new token: both agents' sessions end, AgentAvailable turns False,
    // with an event; their reconnects are refused.
    let new_token = random_token();
    secret_forms("new token", &new_token, &mut secrets);
    let patch = json!({"spec": {"connection": {"token": new_token}}}).to_string();
    host.kubectl_ok(&["patch", "cluster", CLUSTER, "--type=merge", "-p", &patch]);
    wait_for_event(host, "Normal", "AgentDisconnected").await?;
    let m = scrape(port).await?;
    ensure!(
        sample(&m, r#"tower_agent_sessions{cluster="alpha"}"#) == 0.0,
        "sessions left after the token changed:\n{m}"
    );
    host.kubectl_ok(&["delete", "cluster", CLUSTER]);
    let mut rejected = rejected;
    let mut second = second;
    rejected.terminate(Duration::from_secs(10)).await?;
    second.terminate(Duration::from_secs(10)).await?;

    let mut lines: Vec<(String, String)> = Vec::new();
    for p in [tower.proxy(), tower.agent(), &rejected, &second] {
        lines.extend(p.lines().into_iter().map(|l| (p.name().to_string(), l)));
    }
    ensure!(lines.len() > 20, "too few log lines to mean anything");
    let mut bad = Vec::new();
    for (who, line) in &lines {
        if let Err(e) = serde_json::from_str::<Value>(line) {
            bad.push(format!("{who} wrote a line that is not JSON ({e}): {line}"));
        }
        for (what, secret) in &secrets {
            if !secret.is_empty() && line.contains(secret.as_str()) {
                bad.push(format!("{who} logged the {what}: {line}"));
            }
        }
        if line.contains("PRIVATE KEY") || line.contains("BEGIN CERT") {
            bad.push(format!("{who} logged PEM: {line}"));
        }
    }
    ensure!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}

/// HTTP status of `GET path` on the proxy's agents' port.
async fn http_status(port: u16, path: &str) -> Result<u16> {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .await
        .context("running curl")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("curl {path}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// `/readyz` answers 503 while the controller cannot sync (here: the Cluster
/// CRD is not installed yet) and 200 once it has; `/healthz` is 200 all along
/// (a liveness probe must not restart a proxy that waits for its API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_controller() -> Result<()> {
    let host = KubeCluster::start("host").await?;
    host.kubectl_ok(&["create", "ns", "kubesphere-system"]);
    let dir = tempfile::Builder::new().prefix("readyz-").tempdir()?;
    let port = free_port();
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--kubeconfig")
        .arg(host.kubeconfig())
        .args(["--advertise-address", "127.0.0.1"])
        .arg("--data-dir")
        .arg(dir.path());
    let proxy = Proc::spawn("proxy", cmd)?;
    proxy
        .wait_for_line(|l| l.contains("listening for agents"), DEADLINE)
        .await?;
    assert_eq!(http_status(port, "/readyz").await?, 503);
    assert_eq!(http_status(port, "/healthz").await?, 200);

    // The CRD, as in Tower's README.
    host.install_crd()?;
    wait_until(DEADLINE, || async {
        http_status(port, "/readyz").await.ok() == Some(200)
    })
    .await
    .context("/readyz never turned 200 after the CRD was installed")?;
    assert_eq!(http_status(port, "/healthz").await?, 200);
    Ok(())
}

/// The client certificate's notAfter in `kubeconfig`, as RFC 3339 (openssl).
fn client_cert_expiry(kubeconfig: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(kubeconfig)?;
    let cert = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("client-certificate-data: "))
        .context("no client-certificate-data in config_alpha")?;
    let pem = b64_decode(cert)?;
    let mut child = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running openssl")?;
    std::io::Write::write_all(
        &mut child.stdin.take().context("openssl stdin")?,
        pem.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    let line = String::from_utf8_lossy(&out.stdout);
    // notAfter=2026-08-01 12:00:00Z
    let date = line
        .trim()
        .strip_prefix("notAfter=")
        .with_context(|| format!("openssl said {line:?}"))?;
    Ok(date.replace(' ', "T"))
}

/// After connecting, the Cluster status shows what the member reported
/// through the tunnel (its gitVersion and node count, as kubectl sees them on
/// the member itself), the agent's version, a heartbeat and when the
/// published kubeconfig's certificate expires; a node added to the member
/// shows at the next refresh (with two nodes, `limit=1` leaves one in
/// `remainingItemCount`: the count is not just the page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_shows_the_member() -> Result<()> {
    let tower = Tower::start().await?;
    let (host, member) = (tower.host(), tower.member());
    let version: Value = serde_json::from_str(&member.kubectl_ok(&["version", "-o", "json"]))?;
    let git_version = version["serverVersion"]["gitVersion"]
        .as_str()
        .context("no serverVersion.gitVersion")?
        .to_string();
    let node_count = |m: &KubeCluster| {
        m.kubectl_ok(&["get", "nodes", "-o", "name"])
            .lines()
            .count()
    };
    let nodes = node_count(member);
    ensure!(nodes >= 1, "the kubelet stand-in registered no node");
    let expiry = client_cert_expiry(tower.config_alpha())?;
    let agent_version = format!("tower-agent/{}", env!("CARGO_PKG_VERSION"));

    let status = wait_for_ok(DEADLINE, || async {
        let status = cluster(host)?["status"].clone();
        ensure!(
            status["kubernetesVersion"] == git_version.as_str()
                && status["nodeCount"] == nodes
                && status["agentVersion"] == agent_version.as_str()
                && status["certificateExpirationTime"] == expiry.as_str()
                && status["lastHeartbeatTime"].is_string(),
            "status is not complete yet: {status}"
        );
        Ok(status)
    })
    .await?;
    eprintln!("status: {status}");
    let wide = host.kubectl_ok(&["get", "clusters", "-o", "wide"]);
    ensure!(
        wide.contains(&agent_version) && wide.contains(&git_version),
        "kubectl get clusters -o wide:\n{wide}"
    );

    // One more node in the member: the periodic refresh finds it.
    let node = tower.dir().join("node.json");
    std::fs::write(
        &node,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "second-node"}})
            .to_string(),
    )?;
    member.kubectl_ok(&["create", "-f", &node.display().to_string()]);
    let nodes = node_count(member);
    ensure!(nodes >= 2, "the member has {nodes} nodes");
    wait_until(DEADLINE, || async {
        cluster(host).is_ok_and(|c| c["status"]["nodeCount"] == nodes)
    })
    .await
    .with_context(|| format!("nodeCount never became {nodes}"))?;

    // A Go Tower agent joins too: its version shows as what it sends, next
    // to ours (sorted, so two sessions always read the same).
    let (bearer_kc, bearer) = bearer_kubeconfig(&tower)?;
    let kc: Value = serde_json::from_str(&std::fs::read_to_string(&bearer_kc)?)?;
    let server = kc["clusters"][0]["cluster"]["server"]
        .as_str()
        .and_then(|s| s.strip_prefix("https://"))
        .context("member server")?
        .to_string();
    let ca = tower.dir().join("member-ca.pem");
    std::fs::write(
        &ca,
        b64_decode(
            kc["clusters"][0]["cluster"]["certificate-authority-data"]
                .as_str()
                .unwrap_or_default(),
        )?,
    )?;
    let token = cluster(host)?["spec"]["connection"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut cmd = Command::new(bin("go-agent"));
    cmd.args([
        "--proxy-server",
        &format!("http://127.0.0.1:{}", tower.proxy_port()),
    ])
    .args(["--name", CLUSTER, "--token", &token])
    .args(["--kubernetes-service", &server])
    .args(["--kubesphere-service", "127.0.0.1:9"])
    .arg("--ca-data-file")
    .arg(&ca)
    .args(["--bearer-token", &bearer])
    .args(["--expect-host-key", tower.fingerprint()]);
    let _go_agent = Proc::spawn("go-agent", cmd)?;
    let versions = wait_for_ok(DEADLINE, || async {
        let v = cluster(host)?["status"]["agentVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let parts: Vec<&str> = v.split(", ").collect();
        ensure!(
            parts.len() == 2 && parts.contains(&agent_version.as_str()),
            "agentVersion {v:?} does not show both agents"
        );
        Ok(v)
    })
    .await?;
    eprintln!("agentVersion with a Go agent too: {versions}");
    Ok(())
}
