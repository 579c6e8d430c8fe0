//! The manifests in `config/` against a real kube-apiserver: the Cluster CRD
//! installs the way Tower's README says (`kubectl kustomize config/crd |
//! kubectl create -f -`), the proxy and agent bases pass server-side
//! validation and grant what they should (and not more), and a Cluster
//! written by KubeSphere round-trips unchanged, fields we do not know
//! included.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::{KubeCluster, kubectl_binary, workspace_root};

const CRD: &str = "crd/clusters.cluster.kubesphere.io";
const PROXY_SA: &str = "system:serviceaccount:kubesphere-system:tower";
const AGENT_SA: &str = "system:serviceaccount:kubesphere-system:tower-agent";

fn config_dir(sub: &str) -> PathBuf {
    workspace_root().join("config").join(sub)
}

fn config_arg(sub: &str) -> String {
    config_dir(sub).display().to_string()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize DIR` (no cluster involved).
fn kustomize(dir: &Path) -> Result<String> {
    let out = Command::new(kubectl_binary())
        .arg("kustomize")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout(&out))
}

/// `kubectl <args>` against `cluster` with `input` on stdin; fails unless it
/// exits 0. Returns stdout.
fn kubectl_stdin(cluster: &KubeCluster, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning kubectl")?;
    let mut stdin = child.stdin.take().context("kubectl stdin")?;
    stdin.write_all(input.as_bytes())?;
    drop(stdin);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stdout(&out)
    );
    Ok(stdout(&out))
}

/// `kubectl auth can-i VERB RESOURCE --as SUBJECT [extra]` is "yes".
fn can_i(cluster: &KubeCluster, subject: &str, verb: &str, resource: &str, extra: &[&str]) -> bool {
    let mut args = vec!["auth", "can-i", verb, resource, "--as", subject];
    args.extend_from_slice(extra);
    let out = cluster.kubectl(&args);
    let answer = stdout(&out);
    match answer.trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl {} answered {other:?}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Whether the proxy's service account may `verb` on signer `signer`
/// (a SubjectAccessReview, as the CSR admission plugin asks).
fn proxy_may_on_signer(cluster: &KubeCluster, verb: &str, signer: &str) -> Result<bool> {
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": PROXY_SA,
            "groups": ["system:serviceaccounts", "system:serviceaccounts:kubesphere-system"],
            "resourceAttributes": {
                "group": "certificates.k8s.io",
                "resource": "signers",
                "verb": verb,
                "name": signer,
            },
        },
    });
    let out = kubectl_stdin(
        cluster,
        &["create", "-o", "json", "-f", "-"],
        &review.to_string(),
    )?;
    let answer: Value = serde_json::from_str(&out)?;
    Ok(answer["status"]["allowed"] == true)
}

/// The Cluster object as KubeSphere writes it: every field of the schema,
/// plus fields this schema does not declare (as a newer KubeSphere might
/// add), at several levels.
fn kubesphere_cluster(name: &str) -> Value {
    json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": {
            "name": name,
            "labels": {"cluster-role.kubesphere.io/member": ""},
            "annotations": {
                "tower.kubesphere.io/external-lb-service-annoations": "{\"lb.kubesphere.io/v1alpha1\":\"openelb\"}"
            }
        },
        "spec": {
            "joinFederation": true,
            "enable": true,
            "provider": "kubesphere",
            // base64 of "values:\n  a: 1\n" (helm values, []byte in Go)
            "config": "dmFsdWVzOgogIGE6IDEK",
            "externalKubeAPIEnabled": false,
            "connection": {
                "type": "proxy",
                "kubernetesAPIEndpoint": "https://10.96.0.10:6443",
                "kubesphereAPIEndpoint": "http://10.96.0.10:80",
                "externalKubernetesAPIEndpoint": "https://203.0.113.7:6443",
                // base64 of "apiVersion: v1\nkind: Config\n"
                "kubeconfig": "YXBpVmVyc2lvbjogdjEKa2luZDogQ29uZmlnCg==",
                "token": "6888951db2eef4323fd4f84d05f490be86af102f43e47c3c58e6a1ddc81cc253",
                "kubernetesAPIServerPort": 6123,
                "kubesphereAPIServerPort": 16123,
                "futureConnectionField": "kept"
            },
            "futureSpecField": {"nested": ["a", "b"], "n": 3}
        }
    })
}

/// The status KubeSphere and the proxy write, plus unknown fields.
fn kubesphere_status() -> Value {
    json!({
        "conditions": [
            {
                "type": "Initialized",
                "status": "True",
                "lastUpdateTime": "2025-01-02T03:04:05Z",
                "lastTransitionTime": "2025-01-02T03:04:05Z",
                "reason": "",
                "message": "Cluster has been initialized"
            },
            {
                "type": "AgentAvailable",
                "status": "True",
                "lastUpdateTime": "2025-01-02T03:04:06Z",
                "lastTransitionTime": "2025-01-02T03:04:06Z",
                "message": "Agent has connected to proxy successfully.",
                "futureConditionField": 7
            }
        ],
        "kubernetesVersion": "v1.34.1",
        "kubeSphereVersion": "v4.1.3",
        "nodeCount": 3,
        "zones": ["zone-a", "zone-b"],
        "region": "region-1",
        "configz": {"devops": false, "monitoring": true},
        "uid": "0b6a5e3c-1f6e-4b7a-9d5e-2f3c4a5b6c7d",
        // What the proxy adds (declared in our schema).
        "agentVersion": "tower-agent/0.1.0",
        "lastHeartbeatTime": "2025-01-02T03:05:00Z",
        "certificateExpirationTime": "2025-04-02T03:04:06Z",
        "healthz": true,
        "readyz": false,
        "livez": true,
        "platform": "linux/amd64",
        "tunnelRTT": "850µs",
        "futureStatusField": {"x": true}
    })
}

fn get_cluster(cluster: &KubeCluster, name: &str) -> Result<Value> {
    let text = cluster.kubectl_ok(&["get", "cluster", name, "-o", "json"]);
    serde_json::from_str(&text).context("parsing kubectl get cluster -o json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_install_and_clusters_round_trip() -> Result<()> {
    let t0 = Instant::now();
    let host = KubeCluster::start("manifests").await?;
    eprintln!("cluster ready in {:?}", t0.elapsed());

    // ---- The CRD, as in Tower's README. ----
    host.kubectl_ok(&["apply", "--dry-run=server", "-k", &config_arg("crd")]);
    let crd_yaml = kustomize(&config_dir("crd"))?;
    let created = kubectl_stdin(&host, &["create", "-f", "-"], &crd_yaml)?;
    ensure!(
        created.contains(
            "customresourcedefinition.apiextensions.k8s.io/clusters.cluster.kubesphere.io created"
        ),
        "kubectl create said: {created}"
    );
    host.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        CRD,
        "--timeout=60s",
    ]);
    let scope = host.kubectl_ok(&["get", CRD, "-o", "jsonpath={.spec.scope}"]);
    assert_eq!(scope, "Cluster");

    // The KubeSphere-compatible variant differs only by the Cluster's status
    // subresource (the ClusterRegistrationRequest, ours alone, keeps its own).
    let compat = kustomize(&config_dir("crd/kubesphere-compat"))?;
    ensure!(
        crd_yaml.matches("subresources:").count() == 2
            && compat.matches("subresources:").count() == 1
    );
    // The status fields the proxy writes are declared in both variants.
    for field in [
        "agentVersion:",
        "lastHeartbeatTime:",
        "certificateExpirationTime:",
        "healthz:",
        "readyz:",
        "livez:",
        "platform:",
        "tunnelRTT:",
        "nodeCount:",
        "kubernetesVersion:",
    ] {
        ensure!(
            compat.contains(field),
            "{field} missing from the compat CRD"
        );
    }
    host.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-k",
        &config_arg("crd/kubesphere-compat"),
    ]);

    // ---- Proxy and agent bases: server-side validation, then for real. ----
    host.kubectl_ok(&["apply", "--dry-run=server", "-k", &config_arg("namespace")]);
    host.kubectl_ok(&["apply", "-k", &config_arg("namespace")]);
    for base in ["proxy", "agent", "agent-registration"] {
        host.kubectl_ok(&["apply", "--dry-run=server", "-k", &config_arg(base)]);
    }
    for base in ["proxy", "agent"] {
        host.kubectl_ok(&["apply", "-k", &config_arg(base)]);
    }
    let selector = host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "service",
        "tower",
        "-o",
        "jsonpath={.spec.selector.app}",
    ]);
    assert_eq!(selector, "tower", "mc-<name> Services select app=tower");

    // The proxy gets what it needs and no more.
    let ns = ["-n", "kubesphere-system"];
    let allowed: &[(&str, &str, &[&str])] = &[
        ("watch", "clusters.cluster.kubesphere.io", &[]),
        ("patch", "clusters.cluster.kubesphere.io", &[]),
        (
            "patch",
            "clusters.cluster.kubesphere.io",
            &["--subresource=status"],
        ),
        ("create", "services", &ns),
        ("patch", "services/mc-alpha", &ns),
        ("create", "secrets", &ns),
        ("get", "secrets/tower-proxy", &ns),
        // Lease tower (leader election) and the per-cluster Leases (HA).
        ("create", "leases.coordination.k8s.io", &ns),
        ("update", "leases.coordination.k8s.io/tower", &ns),
        ("watch", "leases.coordination.k8s.io", &ns),
        ("patch", "leases.coordination.k8s.io/alpha", &ns),
        ("delete", "leases.coordination.k8s.io/alpha", &ns),
        ("create", "events.events.k8s.io", &ns),
        ("create", "events", &ns),
        ("create", "events.events.k8s.io", &["-n", "default"]),
        ("patch", "events", &["-n", "default"]),
        // The aggregated API: reviews, its APIService, the front-proxy trust.
        ("create", "subjectaccessreviews.authorization.k8s.io", &[]),
        (
            "patch",
            "apiservices.apiregistration.k8s.io/v1alpha1.tower.kubesphere.io",
            &[],
        ),
        (
            "watch",
            "configmaps/extension-apiserver-authentication",
            &["-n", "kube-system"],
        ),
        // The CSR signer (docs/personal-access.md).
        (
            "watch",
            "certificatesigningrequests.certificates.k8s.io",
            &[],
        ),
        (
            "update",
            "certificatesigningrequests.certificates.k8s.io",
            &["--subresource=status"],
        ),
        // Self-registration (docs/registration.md): bootstrap tokens, the
        // requests, the Clusters it makes.
        (
            "get",
            "secrets/bootstrap-token-abcdef",
            &["-n", "kube-system"],
        ),
        (
            "create",
            "clusterregistrationrequests.cluster.kubesphere.io",
            &[],
        ),
        (
            "watch",
            "clusterregistrationrequests.cluster.kubesphere.io",
            &[],
        ),
        (
            "patch",
            "clusterregistrationrequests.cluster.kubesphere.io",
            &["--subresource=status"],
        ),
        ("create", "clusters.cluster.kubesphere.io", &[]),
    ];
    let denied: &[(&str, &str, &[&str])] = &[
        ("update", "clusters.cluster.kubesphere.io", &[]),
        ("delete", "clusters.cluster.kubesphere.io", &[]),
        (
            "update",
            "clusters.cluster.kubesphere.io",
            &["--subresource=status"],
        ),
        ("get", "secrets/tower-agent-token", &ns),
        ("list", "secrets", &ns),
        ("patch", "secrets/tower-proxy", &ns),
        ("delete", "secrets/tower-proxy", &ns),
        ("delete", "services/mc-alpha", &ns),
        ("update", "services/status", &ns),
        ("create", "leases.coordination.k8s.io", &["-n", "default"]),
        ("create", "services", &["-n", "default"]),
        ("list", "secrets", &["-n", "kube-system"]),
        ("watch", "secrets", &["-n", "kube-system"]),
        (
            "delete",
            "clusterregistrationrequests.cluster.kubesphere.io",
            &[],
        ),
        ("create", "pods", &ns),
        ("patch", "apiservices.apiregistration.k8s.io/v1.apps", &[]),
        (
            "delete",
            "apiservices.apiregistration.k8s.io/v1alpha1.tower.kubesphere.io",
            &[],
        ),
        ("get", "configmaps/coredns", &["-n", "kube-system"]),
        // It signs; people approve.
        (
            "update",
            "certificatesigningrequests.certificates.k8s.io",
            &["--subresource=approval"],
        ),
        (
            "create",
            "certificatesigningrequests.certificates.k8s.io",
            &[],
        ),
        (
            "delete",
            "certificatesigningrequests.certificates.k8s.io",
            &[],
        ),
    ];
    for (verb, resource, extra) in allowed {
        ensure!(
            can_i(&host, PROXY_SA, verb, resource, extra),
            "the proxy cannot {verb} {resource} {extra:?}"
        );
    }
    for (verb, resource, extra) in denied {
        ensure!(
            !can_i(&host, PROXY_SA, verb, resource, extra),
            "the proxy may {verb} {resource} {extra:?}"
        );
    }
    // Signers are named with a slash, which `kubectl auth can-i` cannot
    // take: ask with a SubjectAccessReview. The proxy signs for its signer
    // only.
    for (signer, verb, want) in [
        ("tower.kubesphere.io/cluster-access", "sign", true),
        ("tower.kubesphere.io/cluster-access", "approve", false),
        ("kubernetes.io/kube-apiserver-client", "sign", false),
    ] {
        ensure!(
            proxy_may_on_signer(&host, verb, signer)? == want,
            "the proxy may {verb} for {signer}: expected {want}"
        );
    }
    // The proxy Deployment as the issue asks: 2 replicas, probes on the
    // agents' port, the downward API for the HA flags, a disruption budget.
    let deployment: Value = serde_json::from_str(&host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "deployment",
        "tower",
        "-o",
        "json",
    ]))?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    ensure!(
        container["resources"]["requests"]["memory"].is_string()
            && container["resources"]["limits"]["memory"].is_string(),
        "no memory requests/limits: {container}"
    );
    let env: Vec<(&str, &str)> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default(),
            )
        })
        .collect();
    for wanted in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ] {
        ensure!(env.contains(&wanted), "env {wanted:?} missing: {env:?}");
    }
    let ports: Vec<(&str, u64)> = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default(),
                p["containerPort"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("agents", 8080), ("peer", 8443), ("aggregated", 9443)]
    );
    let aggregated = host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "service",
        "tower-api",
        "-o",
        "jsonpath={.spec.ports[0].port} {.spec.ports[0].targetPort} {.spec.selector.app}",
    ]);
    assert_eq!(
        aggregated, "443 aggregated tower",
        "the aggregated API's Service"
    );
    let pod_security = &deployment["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod_security["runAsNonRoot"], true);
    let min_available = host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "pdb",
        "tower",
        "-o",
        "jsonpath={.spec.minAvailable} {.spec.selector.matchLabels.app}",
    ]);
    assert_eq!(min_available, "1 tower");

    // The agent's identity is cluster-admin (what KubeSphere expects).
    ensure!(can_i(&host, AGENT_SA, "*", "*", &[]));
    // Its token Secret is also granted on its own (for impersonate-rbac.yaml
    // set-ups): that one Secret by name, and create.
    let token_rules = host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "get",
        "role",
        "tower-agent-token",
        "-o",
        "jsonpath={range .rules[*]}{.resourceNames}{.verbs}{\"\\n\"}{end}",
    ]);
    assert_eq!(
        token_rules.trim(),
        "[\"tower-agent-token\"][\"get\",\"update\",\"patch\"]\n[\"create\"]"
    );
    // Self-registration (docs/registration.md): its cluster ID, the
    // kube-system namespace's UID, and nothing else.
    let registration_rules = host.kubectl_ok(&[
        "get",
        "clusterrole",
        "tower-agent-registration",
        "-o",
        "jsonpath={range .rules[*]}{.resources}{.resourceNames}{.verbs}{\"\\n\"}{end}",
    ]);
    assert_eq!(
        registration_rules.trim(),
        "[\"namespaces\"][\"kube-system\"][\"get\"]"
    );
    // Its agent: the bootstrap token from the environment, no name, no token file.
    let overlay = kustomize(&config_dir("agent-registration"))?;
    ensure!(
        overlay.contains("AGENT_BOOTSTRAP_TOKEN")
            && overlay.contains("--token-secret")
            && !overlay.contains("--token-file")
            && !overlay.contains("CLUSTER_NAME"),
        "config/agent-registration:\n{overlay}"
    );
    // The optional impersonate-only RBAC is valid.
    host.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        &config_dir("agent")
            .join("impersonate-rbac.yaml")
            .to_string_lossy(),
    ]);

    // ---- A Cluster written by KubeSphere round-trips unchanged. ----
    let sent = kubesphere_cluster("alpha");
    kubectl_stdin(&host, &["create", "-f", "-"], &sent.to_string())?;
    let status = kubesphere_status();
    let patch = json!({ "status": status }).to_string();
    host.kubectl_ok(&[
        "patch",
        "cluster",
        "alpha",
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
    let got = get_cluster(&host, "alpha")?;
    assert_eq!(got["spec"], sent["spec"], "spec changed on the way");
    assert_eq!(got["status"], status, "status changed on the way");
    assert_eq!(
        got["metadata"]["annotations"],
        sent["metadata"]["annotations"]
    );

    // A spec patch (what the proxy does) leaves every other field alone.
    host.kubectl_ok(&[
        "patch",
        "cluster",
        "alpha",
        "--type=merge",
        "-p",
        r#"{"spec":{"connection":{"token":"0123"}}}"#,
    ]);
    let mut expected = sent["spec"].clone();
    expected["connection"]["token"] = json!("0123");
    assert_eq!(get_cluster(&host, "alpha")?["spec"], expected);

    // The status subresource is on: status written through the main resource
    // is ignored.
    host.kubectl_ok(&[
        "patch",
        "cluster",
        "alpha",
        "--type=merge",
        "-p",
        r#"{"status":{"kubernetesVersion":"v0.0.0"}}"#,
    ]);
    assert_eq!(get_cluster(&host, "alpha")?["status"], status);

    // The schema is enforced: bytes must be base64, ports fit in 16 bits.
    for (field, bad) in [
        ("config", json!({"config": "not base64!"})),
        (
            "kubernetesAPIServerPort",
            json!({"connection": {"kubernetesAPIServerPort": 70000}}),
        ),
    ] {
        let mut obj = kubesphere_cluster("bad");
        for (k, v) in bad.as_object().into_iter().flatten() {
            obj["spec"][k] = v.clone();
        }
        let err = kubectl_stdin(&host, &["create", "-f", "-"], &obj.to_string())
            .expect_err("an invalid Cluster was accepted");
        ensure!(
            format!("{err:#}").contains(field),
            "the rejection does not name {field}: {err:#}"
        );
    }

    // ---- Printer columns. ----
    let table = host.kubectl_ok(&["get", "clusters"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "FEDERATED",
            "PROVIDER",
            "ACTIVE",
            "AGENT",
            "VERSION",
            "AGE"
        ],
        "kubectl get clusters:\n{table}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..6],
        ["alpha", "true", "kubesphere", "true", "True", "v1.34.1"],
        "kubectl get clusters:\n{table}"
    );
    let wide = host.kubectl_ok(&["get", "clusters", "-o", "wide"]);
    let wide_header = wide.lines().next().unwrap_or_default();
    ensure!(
        wide_header.contains("TYPE") && wide_header.contains("ENDPOINT"),
        "kubectl get clusters -o wide:\n{wide}"
    );
    ensure!(wide.contains("https://10.96.0.10:6443"), "{wide}");

    host.stop().await?;
    eprintln!(
        "manifests_install_and_clusters_round_trip took {:?}",
        t0.elapsed()
    );
    Ok(())
}
