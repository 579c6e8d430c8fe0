//! Self-registration (docs/registration.md), end to end: the harness's host
//! and member clusters, our proxy and agents as processes, the real kubectl.
//!
//! Two member identities: the harness member, and the host cluster itself
//! seen as a member (its own `kube-system` UID, so its own cluster ID).
//! Agents run without `--name` (their name is derived from the cluster ID)
//! and keep handed tokens in `--token-secret`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use e2e::{KubeCluster, Proc, Tower, bin, wait_for_ok, wait_until};
use tokio::process::Command;

const SETTLE: Duration = Duration::from_secs(60);
const ID_LABEL: &str = "tower.kubesphere.io/cluster-id";

/// A bootstrap token's Secret in the host's kube-system, made with kubectl.
fn bootstrap_token(host: &KubeCluster, id: &str, auto: bool, expiration: Option<&str>) -> String {
    let secret = format!("{id}0123456789");
    let mut args = vec![
        "-n".to_string(),
        "kube-system".into(),
        "create".into(),
        "secret".into(),
        "generic".into(),
        format!("bootstrap-token-{id}"),
        "--type".into(),
        "bootstrap.kubernetes.io/token".into(),
        format!("--from-literal=token-id={id}"),
        format!("--from-literal=token-secret={secret}"),
        "--from-literal=usage-bootstrap-tower=true".into(),
    ];
    if let Some(at) = expiration {
        args.push(format!("--from-literal=expiration={at}"));
    }
    host.kubectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    if auto {
        host.kubectl_ok(&[
            "-n",
            "kube-system",
            "annotate",
            "secret",
            &format!("bootstrap-token-{id}"),
            "tower.kubesphere.io/auto-approve=true",
        ]);
    }
    format!("{id}.{secret}")
}

/// The cluster ID of `member`: its kube-system namespace's UID.
fn cluster_id(member: &KubeCluster) -> String {
    member.kubectl_ok(&["get", "ns", "kube-system", "-o", "jsonpath={.metadata.uid}"])
}

/// `bin/agent` in `member`, registering with `token` (if any), keeping its
/// token in `default/<secret>` there.
fn agent(
    tower: &Tower,
    member: &KubeCluster,
    token: Option<&str>,
    secret: &str,
    name: Option<&str>,
) -> Result<Proc> {
    let mut cmd = Command::new(bin("agent"));
    cmd.arg("--proxy-server")
        .arg(format!("http://127.0.0.1:{}", tower.proxy_port()))
        .arg("--proxy-host-key-fingerprint")
        .arg(tower.fingerprint())
        .arg("--kubeconfig")
        .arg(member.kubeconfig())
        .args(["--kubesphere-service", "127.0.0.1:9"])
        .args(["--max-retry-interval", "2s"])
        .args(["--token-secret", &format!("default/{secret}")]);
    if let Some(token) = token {
        cmd.args(["--bootstrap-token", token]);
    }
    if let Some(name) = name {
        cmd.args(["--name", name]);
    }
    Proc::spawn("agent", cmd)
}

/// The Clusters carrying `id` in their cluster-ID label.
fn clusters_of(host: &KubeCluster, id: &str) -> Vec<String> {
    host.kubectl_ok(&[
        "get",
        "clusters",
        "-l",
        &format!("{ID_LABEL}={id}"),
        "-o",
        "name",
    ])
    .lines()
    .map(str::to_string)
    .collect()
}

/// `kubectl get clsrr` (the printer columns), one line per request.
fn clsrr(host: &KubeCluster) -> String {
    host.kubectl_ok(&["get", "clsrr", "--no-headers"])
}

/// Wait until Cluster `name` has an agent and a kubeconfig, then list the
/// member's namespaces through that kubeconfig, as a user would.
async fn works_through_its_kubeconfig(host: &KubeCluster, name: &str, dir: &Path) -> Result<()> {
    let kubeconfig = host.available_kubeconfig(name, SETTLE).await?;
    let file = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&file, kubeconfig)?;
    wait_for_ok(SETTLE, || async {
        let out = Command::new(e2e::kubectl_binary())
            .arg("--kubeconfig")
            .arg(&file)
            .args(["get", "ns", "kube-system", "-o", "name"])
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
    .await
    .with_context(|| format!("kubectl get ns through Cluster {name}'s kubeconfig"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_with_bootstrap_tokens() -> Result<()> {
    let tower = Tower::start().await?;
    let t0 = std::time::Instant::now();
    let (host, member) = (tower.host(), tower.member());
    let auto = bootstrap_token(host, "auto01", true, None);
    let manual = bootstrap_token(host, "manual", false, Some("2099-01-01T00:00:00Z"));
    let expired = bootstrap_token(host, "old000", true, Some("2020-01-01T00:00:00Z"));
    let (a_id, b_id) = (cluster_id(member), cluster_id(host));
    let a_name = format!("cluster-{}", &a_id[..8]);
    let b_name = format!("cluster-{}", &b_id[..8]);

    // (3) Expired and unknown tokens: refused, both sides say why, nothing is made.
    for (token, why) in [
        (expired.as_str(), "expired at"),
        (
            "nosuch.0123456789abcdef",
            "bootstrap token nosuch is unknown or wrong",
        ),
    ] {
        let refused = agent(&tower, host, Some(token), "reg-b", None)?;
        refused
            .wait_for_line(
                |l| l.contains("rejected by proxy") && l.contains(why),
                SETTLE,
            )
            .await?;
        tower
            .proxy()
            .wait_for_line(
                |l| l.contains("registration not admitted") && l.contains(why),
                SETTLE,
            )
            .await?;
        drop(refused);
    }
    ensure!(
        clsrr(host).trim().is_empty(),
        "a request was made: {}",
        clsrr(host)
    );
    ensure!(clusters_of(host, &b_id).is_empty());

    // (1) Auto-approve: a member with only a bootstrap token becomes a Cluster.
    let mut a1 = agent(&tower, member, Some(&auto), "reg-a1", None)?;
    a1.wait_for_line(
        |l| l.contains("stored the token the proxy handed over"),
        SETTLE,
    )
    .await?;
    works_through_its_kubeconfig(host, &a_name, tower.dir()).await?;
    // The member keeps the Cluster's own token in its Secret.
    let stored = member.kubectl_ok(&[
        "-n",
        "default",
        "get",
        "secret",
        "reg-a1",
        "-o",
        "jsonpath={.data.token}",
    ]);
    let stored = base64::engine::general_purpose::STANDARD.decode(stored.trim())?;
    let issued = host.kubectl_ok(&[
        "get",
        "cluster",
        &a_name,
        "-o",
        "jsonpath={.spec.connection.token}",
    ]);
    ensure!(
        !issued.is_empty() && stored == issued.as_bytes(),
        "the member's Secret does not hold Cluster {a_name}'s token"
    );
    ensure!(clusters_of(host, &a_id) == [format!("cluster.cluster.kubesphere.io/{a_name}")]);
    ensure!(
        clsrr(host)
            .lines()
            .any(|l| l.contains(&a_id) && l.contains("Approved")),
        "{}",
        clsrr(host)
    );
    // The Cluster is served through the proxy and marked with the cluster ID.
    let spec = host.kubectl_ok(&[
        "get",
        "cluster",
        &a_name,
        "-o",
        "jsonpath={.spec.joinFederation} {.spec.connection.type}",
    ]);
    ensure!(spec == "true proxy", "{spec}");

    // (4) Restarted, the stored token lets it in: no bootstrap token needed
    // (the one it is given has expired and would be refused).
    a1.terminate(Duration::from_secs(10)).await?;
    let a1 = agent(&tower, member, Some(&expired), "reg-a1", None)?;
    a1.wait_for_line(
        |l| l.contains("using the token stored in the member cluster"),
        SETTLE,
    )
    .await?;
    a1.wait_for_line(|l| l.contains("the bootstrap token is not used"), SETTLE)
        .await?;
    a1.wait_for_line(|l| l.contains("connected to proxy"), SETTLE)
        .await?;

    // An approval is for the token it was given to: another valid token
    // that does not approve by itself is refused for this cluster ID.
    let other = agent(&tower, member, Some(&manual), "reg-a3", None)?;
    other
        .wait_for_line(
            |l| {
                l.contains("rejected by proxy") && l.contains("approved for bootstrap token auto01")
            },
            SETTLE,
        )
        .await?;
    drop(other);

    // (5) The same cluster registering again (a new request: the first one
    // deleted) re-uses its Cluster, found by the cluster-ID label.
    host.kubectl_ok(&["delete", "clsrr", &format!("tower-{a_id}")]);
    let a2 = agent(&tower, member, Some(&auto), "reg-a2", None)?;
    a2.wait_for_line(
        |l| l.contains("stored the token the proxy handed over"),
        SETTLE,
    )
    .await?;
    a2.wait_for_line(|l| l.contains("connected to proxy"), SETTLE)
        .await?;
    ensure!(
        clusters_of(host, &a_id).len() == 1,
        "a twin: {:?}",
        clusters_of(host, &a_id)
    );
    let reused = host.kubectl_ok(&[
        "get",
        "clsrr",
        &format!("tower-{a_id}"),
        "-o",
        "jsonpath={.status.phase} {.status.cluster}",
    ]);
    ensure!(reused == format!("Approved {a_name}"), "{reused}");

    // (2) Without auto-approve: pending until a person decides with kubectl.
    let b = agent(&tower, host, Some(&manual), "reg-b", None)?;
    b.wait_for_line(|l| l.contains("waits for approval"), SETTLE)
        .await?;
    let request = format!("tower-{b_id}");
    wait_until(SETTLE, || async {
        clsrr(host)
            .lines()
            .any(|l| l.contains(&b_id) && l.contains("Pending"))
    })
    .await
    .with_context(|| clsrr(host))?;
    // The printer columns: name, cluster ID, the Cluster asked for, state.
    let table = host.kubectl_ok(&["get", "clsrr", &request]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "CLUSTER-ID", "CLUSTER", "STATUS", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    ensure!(
        row[..4] == [request.as_str(), b_id.as_str(), b_name.as_str(), "Pending"],
        "{table}"
    );
    let decide = |decision: &str| {
        host.kubectl_ok(&[
            "patch",
            "clsrr",
            &request,
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"decision":"{decision}"}}}}"#),
        ]);
    };
    // Denied: it stays out and nothing is made.
    decide("Denied");
    b.wait_for_line(|l| l.contains("was denied"), SETTLE)
        .await?;
    tower
        .proxy()
        .wait_for_line(
            |l| l.contains("registration not admitted") && l.contains("was denied"),
            SETTLE,
        )
        .await?;
    wait_until(SETTLE, || async {
        clsrr(host)
            .lines()
            .any(|l| l.contains(&b_id) && l.contains("Denied"))
    })
    .await
    .with_context(|| clsrr(host))?;
    ensure!(clusters_of(host, &b_id).is_empty());
    ensure!(
        host.kubectl(&["get", "cluster", &b_name]).status.code() != Some(0),
        "a Cluster {b_name} was made for a denied request"
    );
    // The request deleted, the cluster asks again; approved, it joins.
    host.kubectl_ok(&["delete", "clsrr", &request]);
    wait_until(SETTLE, || async {
        clsrr(host)
            .lines()
            .any(|l| l.contains(&b_id) && l.contains("Pending"))
    })
    .await
    .with_context(|| clsrr(host))?;
    decide("Approved");
    b.wait_for_line(
        |l| l.contains("stored the token the proxy handed over"),
        SETTLE,
    )
    .await?;
    works_through_its_kubeconfig(host, &b_name, tower.dir()).await?;
    ensure!(clusters_of(host, &b_id).len() == 1);
    eprintln!("registration scenarios done in {:?}", t0.elapsed());
    Ok(())
}
