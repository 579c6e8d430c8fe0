//! The Helm chart `charts/tower` (issue #16, part 1) with the real `helm`
//! (`make helm`, built from the Helm Go module in tests/helm-tool) against
//! real kube-apiservers:
//!
//! - `helm lint --strict` for both modes; bad values refused by
//!   `values.schema.json` (or the templates) with a message naming the value;
//! - no drift from `config/` (helm/drift.rs);
//! - `helm template` passes `kubectl apply --dry-run=server`; `helm install`,
//!   `helm upgrade` (a changed value reaches the object), `helm uninstall`
//!   (nothing left but the CRDs, which Helm keeps on purpose);
//! - the README's "Run it in clusters": the chart installed on the host, the
//!   line `proxy join-command` prints applied on the member, `kubectl get
//!   clusters` shows the member available; and an agent installed with the
//!   chart's `mode=agent` joins as well. The harness runs no pods, so the
//!   chart's Deployments are run as the kubelet would run them, with the
//!   harness's addresses swapped in (as tests/join.rs does for the agent).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{
    KubeCluster, PortBlock, Proc, bin, clean_env, fingerprint_in, free_port, kubectl_binary,
    pick_ports, run_agent_like_a_kubelet, workspace_root,
};

#[path = "helm/drift.rs"]
mod drift;

const NS: &str = "kubesphere-system";
const DEADLINE: Duration = Duration::from_secs(120);
fn chart() -> String {
    workspace_root().join("charts/tower").display().to_string()
}

/// The real helm, with its cache/config/data in `home` (never the user's)
/// and no `KUBECONFIG` from the environment.
fn helm(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("helm"))
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running helm: {e}"))
}

fn helm_ok(home: &Path, args: &[&str]) -> Result<String> {
    let out = helm(home, args);
    ensure!(
        out.status.success(),
        "helm {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template tower charts/tower -n kubesphere-system <args>`.
fn template(home: &Path, args: &[&str]) -> Result<String> {
    let mut all = vec!["template", "tower", &*CHART, "--namespace", NS];
    all.extend_from_slice(args);
    helm_ok(home, &all)
}

static CHART: std::sync::LazyLock<String> = std::sync::LazyLock::new(chart);

fn kustomize(sub: &str) -> Result<String> {
    let out = Command::new(kubectl_binary())
        .arg("kustomize")
        .arg(workspace_root().join("config").join(sub))
        .stdin(Stdio::null())
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize config/{sub}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bad value is refused before anything is rendered, with a message that
/// names it.
fn bad_values_are_refused(home: &Path) -> Result<()> {
    let cases: &[(&[&str], &[&str])] = &[
        // Wrong type.
        (&["--set", "proxy.replicas=two"], &["replicas", "integer"]),
        // Unknown keys, at the top and below.
        (&["--set", "replicas=3"], &["replicas"]),
        (&["--set", "proxy.replica=3"], &["replica"]),
        // Not one of the allowed values.
        (&["--set", "mode=both"], &["mode"]),
        (&["--set", "proxy.logFormat=xml"], &["logFormat"]),
        (
            &["--set", "agent.proxyHostKeyFingerprint=MD5:abc"],
            &["proxyHostKeyFingerprint"],
        ),
        // The agent without the proxy's address: the template says what to set.
        (
            &["--set", "mode=agent", "--set", "agent.clusterName=alpha"],
            &["agent.proxyServer"],
        ),
        (
            &[
                "--set",
                "mode=agent",
                "--set",
                "agent.proxyServer=http://tower.example.com:8080",
            ],
            &["agent.clusterName", "agent.registration.enabled"],
        ),
    ];
    for (args, words) in cases {
        let mut all = vec!["template", "tower", &*CHART, "--namespace", NS];
        all.extend_from_slice(args);
        let out = helm(home, &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "helm template {args:?} was accepted");
        for word in *words {
            ensure!(
                stderr.contains(word),
                "helm template {args:?}: the refusal does not name {word:?}:\n{stderr}"
            );
        }
    }
    Ok(())
}

/// `kubectl get -f -` of a manifest: the `kind/name` of its objects that exist.
fn existing(cluster: &KubeCluster, manifest: &str) -> Result<String> {
    cluster.kubectl_input(
        &["get", "--ignore-not-found", "-o", "name", "-f", "-"],
        manifest,
    )
}

fn deployment(cluster: &KubeCluster, name: &str) -> Result<Value> {
    serde_json::from_str(&cluster.kubectl_ok(&["-n", NS, "get", "deploy", name, "-o", "json"]))
        .context("parsing the Deployment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_matches_config_installs_upgrades_uninstalls() -> Result<()> {
    let t0 = Instant::now();
    let home = tempfile::tempdir()?;
    let home = home.path();

    // Lint, both modes (the agent needs its two required values).
    helm_ok(home, &["lint", "--strict", &CHART])?;
    helm_ok(
        home,
        &[
            "lint",
            "--strict",
            &CHART,
            "--set",
            "mode=agent,agent.clusterName=alpha,agent.proxyServer=http://tower.example.com:8080",
        ],
    )?;
    bad_values_are_refused(home)?;

    let cluster = KubeCluster::start("helm").await?;
    let kubeconfig = cluster.kubeconfig().display().to_string();
    drift::chart_renders_what_config_renders(home, &cluster)?;

    // helm template, validated by the real apiserver: the CRDs and the
    // namespace first (dry-run cannot validate objects of a namespace or
    // kind that does not exist yet), then every object of both modes.
    cluster.kubectl_ok(&["create", "namespace", NS]);
    let crds = workspace_root().join("charts/tower/crds");
    cluster.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        &crds.display().to_string(),
    ]);
    for args in [
        &["--set", "proxy.publishServiceAddress=tower.example.com"][..],
        &[
            "--set",
            "mode=agent,agent.clusterName=alpha,agent.proxyServer=http://tower.example.com:8080",
        ],
        &[
            "--set",
            "mode=agent,agent.registration.enabled=true,agent.access=impersonate",
            "--set",
            "agent.proxyServer=http://tower.example.com:8080",
        ],
    ] {
        let rendered = template(home, args)?;
        let applied =
            cluster.kubectl_input(&["apply", "--dry-run=server", "-f", "-"], &rendered)?;
        ensure!(applied.contains("(server dry run)"), "{applied}");
    }
    // helm install, as README's "Run it in clusters" says (the namespace
    // is there already: the harness runs no namespace controller to delete
    // it; --create-namespace accepts that).
    helm_ok(
        home,
        &[
            "install",
            "tower",
            &CHART,
            "--namespace",
            NS,
            "--create-namespace",
            "--kubeconfig",
            &kubeconfig,
            "--set",
            "proxy.publishServiceAddress=tower.example.com",
            "--set",
            "image.repository=registry.example.com/tower-rs,image.tag=v1",
        ],
    )?;
    cluster.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/clusters.cluster.kubesphere.io",
        "crd/clusterregistrationrequests.cluster.kubesphere.io",
        "--timeout=60s",
    ]);
    let deploy = deployment(&cluster, "tower")?;
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(
        deploy["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example.com/tower-rs:v1");
    ensure!(
        container["command"]
            .to_string()
            .contains("\"--publish-service-address\",\"tower.example.com\""),
        "{}",
        container["command"]
    );
    let manifest = helm_ok(
        home,
        &[
            "get",
            "manifest",
            "tower",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
        ],
    )?;
    let installed = existing(&cluster, &manifest)?;
    for object in [
        "serviceaccount/tower",
        "clusterrole.rbac.authorization.k8s.io/tower-proxy",
        "rolebinding.rbac.authorization.k8s.io/tower-proxy-events",
        "role.rbac.authorization.k8s.io/tower-proxy-bootstrap-tokens",
        "deployment.apps/tower",
        "service/tower",
        "service/tower-api",
        "poddisruptionbudget.policy/tower",
    ] {
        ensure!(
            installed.contains(object),
            "{object} not installed:\n{installed}"
        );
    }

    // helm upgrade: changed values reach the objects.
    helm_ok(
        home,
        &[
            "upgrade",
            "tower",
            &CHART,
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
            "--reuse-values",
            "--set",
            "proxy.replicas=3,proxy.publishServiceAddress=tower2.example.com",
            "--set",
            "proxy.service.type=NodePort,proxy.podDisruptionBudget.enabled=false",
        ],
    )?;
    let deploy = deployment(&cluster, "tower")?;
    assert_eq!(deploy["spec"]["replicas"], 3);
    let command = deploy["spec"]["template"]["spec"]["containers"][0]["command"].to_string();
    ensure!(
        command.contains("\"tower2.example.com\"") && !command.contains("\"tower.example.com\""),
        "{command}"
    );
    let service_type = cluster.kubectl_ok(&[
        "-n",
        NS,
        "get",
        "svc",
        "tower",
        "-o",
        "jsonpath={.spec.type}",
    ]);
    assert_eq!(service_type, "NodePort");
    ensure!(
        !cluster
            .kubectl(&["-n", NS, "get", "pdb", "tower"])
            .status
            .success(),
        "the PodDisruptionBudget outlived proxy.podDisruptionBudget.enabled=false"
    );
    let history = helm_ok(
        home,
        &[
            "history",
            "tower",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
        ],
    )?;
    ensure!(
        history.lines().count() == 3,
        "two revisions expected:\n{history}"
    );

    // helm uninstall: every object of the release is gone; the CRDs stay
    // (Helm never deletes crds/: the Clusters in them would go with them).
    helm_ok(
        home,
        &[
            "uninstall",
            "tower",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
            "--wait",
        ],
    )?;
    let left = existing(&cluster, &manifest)?;
    ensure!(left.trim().is_empty(), "left after helm uninstall:\n{left}");
    let crds = cluster.kubectl_ok(&["get", "crd", "-o", "name"]);
    ensure!(
        crds.contains("clusters.cluster.kubesphere.io")
            && crds.contains("clusterregistrationrequests.cluster.kubesphere.io"),
        "{crds}"
    );
    let status = helm(
        home,
        &[
            "status",
            "tower",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
        ],
    );
    ensure!(
        !status.status.success() && String::from_utf8_lossy(&status.stderr).contains("not found"),
        "the release outlived helm uninstall: {}",
        String::from_utf8_lossy(&status.stdout)
    );

    cluster.stop().await?;
    eprintln!(
        "chart_lints_matches_config_installs_upgrades_uninstalls took {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// The proxy Deployment the chart installed on `host`, run as the kubelet
/// would run it: its command with the pod's addresses and files swapped
/// for the harness's (`--host`, `--data-dir`, the aggregated API's port),
/// the host's kubeconfig standing in for the service account, the downward
/// API's env filled in, and what a proxy outside the cluster needs
/// (`--advertise-address`, its own port range, a free peer port).
fn run_proxy_like_a_kubelet(host: &KubeCluster, data: &Path, ports: &PortBlock) -> Result<Proc> {
    let command = host.deployment_command("tower")?;
    ensure!(
        command.first().map(String::as_str) == Some("/bin/proxy"),
        "{command:?}"
    );
    let mut args = Vec::new();
    let mut it = command[1..].iter();
    while let Some(arg) = it.next() {
        args.push(arg.clone());
        let swapped = match arg.as_str() {
            "--host" => "127.0.0.1".to_string(),
            "--data-dir" => data.display().to_string(),
            "--aggregated-api-port" => free_port().to_string(),
            _ => continue,
        };
        it.next()
            .with_context(|| format!("{arg} without a value"))?;
        args.push(swapped);
    }
    let mut cmd = tokio::process::Command::new(bin("proxy"));
    cmd.args(&args)
        .arg("--kubeconfig")
        .arg(host.kubeconfig())
        .args(["--advertise-address", "127.0.0.1"])
        .arg("--cluster-ports")
        .arg(ports.range())
        .arg("--peer-port")
        .arg(free_port().to_string());
    clean_env(&mut cmd);
    cmd.env("POD_NAME", "tower-0")
        .env("POD_NAMESPACE", NS)
        .env("POD_IP", "127.0.0.1");
    Proc::spawn("proxy", cmd)
}

/// Issue #16's acceptance: install the chart on the host, run the printed
/// join line on the member, `kubectl get clusters` shows it available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_on_the_host_then_the_printed_line_on_the_member() -> Result<()> {
    let t0 = Instant::now();
    let home = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let [host, member]: [KubeCluster; 2] = KubeCluster::start_many(&["host", "member"])
        .await?
        .try_into()
        .map_err(|_| anyhow::anyhow!("two clusters expected"))?;

    // On the host: the CRDs already there (KubeSphere hosts have the Cluster
    // CRD; Helm leaves existing CRDs alone), then the chart, with the address
    // agents dial (here the port the proxy will listen on).
    host.install_crd()?;
    let port = free_port();
    helm_ok(
        home.path(),
        &[
            "install",
            "tower",
            &CHART,
            "--namespace",
            NS,
            "--create-namespace",
            "--kubeconfig",
            &host.kubeconfig().display().to_string(),
            "--set",
            &format!("proxy.publishServiceAddress=127.0.0.1:{port},proxy.port={port}"),
            // Options as values reach the real binary's flag parser.
            "--set",
            "proxy.keepalive=20s,proxy.extraArgs={--cluster-status-update-frequency,30s}",
        ],
    )?;
    host.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/clusters.cluster.kubesphere.io",
        "--timeout=60s",
    ]);
    let ports = pick_ports(20)?;
    let proxy = run_proxy_like_a_kubelet(&host, &dir.path().join("proxy-data"), &ports)?;
    let line = proxy
        .wait_for_line(|l| l.contains("SSH host key"), DEADLINE)
        .await?;
    let fingerprint = fingerprint_in(&line)?;
    proxy
        .wait_for_line(|l| l.contains("listening for agents"), DEADLINE)
        .await?;

    // The printed line: the address and image come from the chart's
    // Deployment, the fingerprint from the proxy's Secret.
    let mut join = tokio::process::Command::new(bin("proxy"));
    join.arg("join-command")
        .arg("--kubeconfig")
        .arg(host.kubeconfig())
        .args(["--cluster", "alpha", "--create"]);
    clean_env(&mut join);
    let out = join.output().await.context("running proxy join-command")?;
    ensure!(
        out.status.success(),
        "proxy join-command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = String::from_utf8(out.stdout).context("the manifest is not UTF-8")?;
    ensure!(
        manifest.contains(&fingerprint)
            && manifest.contains(&format!("http://127.0.0.1:{port}"))
            && manifest.contains("tower-rs:latest"),
        "the manifest lacks the chart's address or image, or the proxy's host key {fingerprint}:\n{manifest}"
    );

    // On the member: the printed manifest, and its agent.
    member.apply_manifest(&manifest).await?;
    let token_file: PathBuf = dir.path().join("token");
    std::fs::write(&token_file, member.secret_token("tower-agent-token")?)?;
    let agent = run_agent_like_a_kubelet(&member, &[("/etc/tower/token", &token_file)], &[])?;

    // Back on the host: available, and its kubeconfig reaches the member.
    host.prove_joined("alpha", &agent, dir.path(), DEADLINE)
        .await?;
    let table = host.kubectl_ok(&["get", "clusters"]);
    // Columns may be empty (PROVIDER, ACTIVE): read AGENT at its offset.
    let header = table.lines().next().unwrap_or_default();
    let row = table
        .lines()
        .find(|l| l.starts_with("alpha "))
        .unwrap_or_default();
    let agent_column = header.find("AGENT").context("no AGENT column")?;
    ensure!(
        row.get(agent_column..)
            .is_some_and(|rest| rest.starts_with("True ")),
        "kubectl get clusters:\n{table}"
    );

    // The chart's other mode joins too: an agent installed with
    // `--set mode=agent` (the host stands in for a second member: the
    // agent's objects have names of their own, next to the proxy's).
    host.apply_manifest(
        r#"{"apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
            "metadata": {"name": "beta"},
            "spec": {"joinFederation": true, "connection": {"type": "proxy"}}}"#,
    )
    .await?;
    let token = e2e::wait_for_ok(DEADLINE, || async {
        let token = host.kubectl_ok(&[
            "get",
            "cluster",
            "beta",
            "-o",
            "jsonpath={.spec.connection.token}",
        ]);
        ensure!(!token.is_empty(), "Cluster beta has no token yet");
        Ok(token)
    })
    .await?;
    host.kubectl_ok(&[
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "tower-agent-token",
        &format!("--from-literal=token={token}"),
    ]);
    helm_ok(
        home.path(),
        &[
            "install",
            "tower-agent",
            &CHART,
            "--namespace",
            NS,
            "--skip-crds",
            "--kubeconfig",
            &host.kubeconfig().display().to_string(),
            "--set",
            "mode=agent,agent.clusterName=beta",
            "--set",
            &format!("agent.proxyServer=http://127.0.0.1:{port}"),
            "--set",
            &format!("agent.proxyHostKeyFingerprint={fingerprint}"),
        ],
    )?;
    let beta_token = dir.path().join("beta.token");
    std::fs::write(&beta_token, &token)?;
    let beta = run_agent_like_a_kubelet(&host, &[("/etc/tower/token", &beta_token)], &[])?;
    host.prove_joined("beta", &beta, dir.path(), DEADLINE)
        .await?;

    eprintln!(
        "chart_on_the_host_then_the_printed_line_on_the_member took {:?}",
        t0.elapsed()
    );
    Ok(())
}
