//! In-place migration from Go Tower to our proxy and back (issue #16 part 3,
//! docs/migration.md), on real kube-apiservers with the real kubectl and Go
//! Tower's agents (bin/go-agent with `--reconnect`: Go Tower's agent loop).
//!
//! The host starts as Go Tower leaves a KubeSphere host: the Cluster CRD
//! without a status subresource (two tests: config/crd/kubesphere-compat,
//! and KubeSphere's own schema, derived from it, which prunes what it does
//! not declare), for each of alpha and beta the `mc-<name>` Service and a
//! Cluster with a token, a port pair outside our `--cluster-ports` range and
//! the endpoints on the Service's ClusterIP (what KubeSphere's cluster
//! controller writes), and what KubeSphere and the user put there: labels,
//! annotations, a finalizer, `spec.provider`, `spec.config`,
//! `status.kubeSphereVersion`, the `Ready` condition and (where the CRD keeps
//! it) a field no schema declares.
//!
//! Go Tower's proxy is bin/go-proxy with Go Tower's flags (`--ca-cert`,
//! `--ca-key`, `--host`, `--port`) and its per-cluster front
//! (tests/go-peers/proxy/front.go: the cluster's HTTPS port, a serving
//! certificate of the CA, the kubeconfig with CN kubernetes-admin). go-proxy
//! does not talk to Kubernetes, so the test writes that kubeconfig and
//! `AgentAvailable` into the Cluster as Go Tower's proxy does it (get,
//! change, whole-object update; Go Tower's typed client would also drop the
//! fields its Go types lack, which this JSON update keeps), and passes it the
//! Clusters' tokens and ports as flags after checking them the way Go
//! Tower's `addCluster` does. It has no ks-apiserver port and no leader
//! election. Nothing routes a ClusterIP here, so kubectl reaches a cluster's
//! port at 127.0.0.1 with `--tls-server-name` the ClusterIP: the certificate
//! is checked for the address the kubeconfig names, as behind kube-proxy.
//!
//! Then the switch: go-proxy stops, bin/proxy starts with the same flags and
//! CA files on the same agents' port. The Go agents (never restarted)
//! reconnect by themselves; ports, token, endpoints and the Service's
//! ClusterIP stay; the kubeconfig in each Cluster is REWRITTEN (same server
//! and CA; a client certificate naming the cluster): the one Go Tower wrote
//! is refused with a 403 naming the fix, the new one works; everything the
//! user put on the Clusters is unchanged. Then back: bin/proxy stops,
//! go-proxy starts again from the Clusters as our proxy left them, the
//! agents reconnect, Go Tower's fresh kubeconfig works, and so does the one
//! our proxy wrote (Go Tower checks no client certificate).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::{KubeCluster, Proc, bin, clean_env, free_port, kubectl_binary, wait_for_ok, wait_until};
use tokio::process::Command;

const NS: &str = "kubesphere-system";
const DEADLINE: Duration = Duration::from_secs(120);
/// How long a stopped proxy gets before SIGKILL.
const GRACE: Duration = Duration::from_secs(40);
const CLUSTERS: [&str; 2] = ["alpha", "beta"];

/// What KubeSphere and the user put on a Cluster, and must find unchanged.
const LABEL: (&str, &str) = ("cluster.kubesphere.io/group", "production");
const ANNOTATION: (&str, &str) = ("kubesphere.io/description", "payments, do not touch");
const FINALIZER: &str = "finalizer.cluster.kubesphere.io";
const USER_NOTE: &str = "a field no proxy knows";

/// The member's address, CA, client certificate and key (files), as a Go
/// agent sends them.
struct MemberAccess {
    server: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn member_access(member: &KubeCluster, dir: &Path) -> Result<MemberAccess> {
    let view: Value = serde_json::from_str(
        &member.kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"]),
    )?;
    let server = view["clusters"][0]["cluster"]["server"]
        .as_str()
        .and_then(|s| s.strip_prefix("https://"))
        .context("the member's server")?
        .to_string();
    let file = |name: &str, value: &Value| -> Result<PathBuf> {
        let text = value
            .as_str()
            .with_context(|| format!("no {name} in the member's kubeconfig"))?;
        let path = dir.join(format!("{}-{name}", member.name()));
        std::fs::write(&path, B64.decode(text)?)?;
        Ok(path)
    };
    Ok(MemberAccess {
        server,
        ca: file(
            "ca.pem",
            &view["clusters"][0]["cluster"]["certificate-authority-data"],
        )?,
        cert: file(
            "cert.pem",
            &view["users"][0]["user"]["client-certificate-data"],
        )?,
        key: file("key.pem", &view["users"][0]["user"]["client-key-data"])?,
    })
}

/// A Go Tower agent for `name`: KubeSphere's agent flags, Go Tower's
/// reconnect loop (capped at 1 s between attempts here; 2m by default).
fn go_agent(agents_port: u16, access: &MemberAccess, name: &str, token: &str) -> Result<Proc> {
    let mut cmd = Command::new(bin("go-agent"));
    cmd.arg(format!("--proxy-server=http://127.0.0.1:{agents_port}"))
        .arg(format!("--name={name}"))
        .arg(format!("--token={token}"))
        .arg(format!("--kubernetes-service={}", access.server))
        .arg("--kubesphere-service=127.0.0.1:9")
        .arg("--keepalive=10s")
        .args(["--reconnect", "--max-retry-interval=1s"])
        .arg("--ca-data-file")
        .arg(&access.ca)
        .arg("--cert-data-file")
        .arg(&access.cert)
        .arg("--key-data-file")
        .arg(&access.key);
    clean_env(&mut cmd);
    Proc::spawn(&format!("go-agent-{name}"), cmd)
}

/// An RSA CA as Go Tower's --ca-cert / --ca-key (its issuer takes RSA only).
fn make_ca(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl").args(args).output()?;
        ensure!(out.status.success(), "openssl {args:?}: {out:?}");
        Ok(())
    };
    let (crt_s, key_s) = (crt.to_string_lossy(), key.to_string_lossy());
    run(&["genrsa", "-traditional", "-out", &key_s, "2048"])?;
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &key_s,
        "-sha256",
        "-days",
        "3650",
        "-subj",
        "/CN=kubesphere",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature,keyEncipherment",
        "-out",
        &crt_s,
    ])?;
    Ok((crt, key))
}

fn cluster(host: &KubeCluster, name: &str) -> Result<Value> {
    serde_json::from_str(&host.kubectl_ok(&["get", "cluster", name, "-o", "json"]))
        .context("parsing the Cluster")
}

fn conn<'a>(c: &'a Value, field: &str) -> &'a Value {
    &c["spec"]["connection"][field]
}

fn agent_available(c: &Value) -> bool {
    c["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True")
}

/// What KubeSphere's cluster controller and Go Tower leave for one member:
/// Service mc-<name>, and the Cluster with its token, ports, endpoints on the
/// Service's ClusterIP, KubeSphere's own fields and the user's.
fn go_tower_cluster(
    host: &KubeCluster,
    dir: &Path,
    name: &str,
    kube_port: u16,
    crd: Crd,
) -> Result<()> {
    let ks_port = kube_port + 10000;
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("mc-{name}"), "namespace": NS},
        "spec": {
            "selector": {"app": "tower"},
            "ports": [
                {"name": "kubernetes", "protocol": "TCP", "port": 6443, "targetPort": kube_port},
                {"name": "kubesphere", "protocol": "TCP", "port": 80, "targetPort": ks_port},
            ],
        },
    });
    let file = dir.join(format!("{name}-svc.json"));
    std::fs::write(&file, svc.to_string())?;
    host.kubectl_ok(&["create", "-f", &file.to_string_lossy()]);
    let ip = host.kubectl_ok(&[
        "get",
        "svc",
        "-n",
        NS,
        &format!("mc-{name}"),
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    ensure!(!ip.is_empty(), "mc-{name} got no ClusterIP");
    let token: String = (0..4)
        .map(|i| format!("{:016x}", u64::from(kube_port) * 0x9e37_79b9 + i * 7919))
        .collect();
    let c = json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster",
        "metadata": {
            "name": name,
            "labels": {LABEL.0: LABEL.1},
            "annotations": {ANNOTATION.0: ANNOTATION.1},
            "finalizers": [FINALIZER],
        },
        "spec": {
            "joinFederation": true,
            "enable": true,
            "provider": "on-premises",
            "config": B64.encode("kubesphere: {console: true}"),
            "connection": {
                "type": "proxy",
                "token": token,
                "kubernetesAPIServerPort": kube_port,
                "kubesphereAPIServerPort": ks_port,
                "kubernetesAPIEndpoint": format!("https://{ip}:6443"),
                "kubesphereAPIEndpoint": format!("http://{ip}:80"),
            },
        },
        "status": {
            "kubeSphereVersion": "v3.4.1",
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Ready",
                "message": "Cluster is available now",
                "lastUpdateTime": "2026-01-01T00:00:00Z",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }],
        },
    });
    let mut c = c;
    if crd == Crd::Compat {
        // A field no schema declares: our CRD keeps it (KubeSphere's refuses it).
        c["spec"]["userNote"] = json!(USER_NOTE);
    }
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, c.to_string())?;
    host.kubectl_ok(&["create", "-f", &file.to_string_lossy()]);
    Ok(())
}

/// What Go Tower's proxy writes when an agent connects (proxy.Update): the
/// kubeconfig it issued and AgentAvailable=True, by a whole-object update.
fn go_tower_update(host: &KubeCluster, dir: &Path, name: &str, kubeconfig: &Path) -> Result<()> {
    let mut c = cluster(host, name)?;
    c["spec"]["connection"]["kubeconfig"] = json!(B64.encode(std::fs::read(kubeconfig)?));
    let mut conditions: Vec<Value> = c["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["type"] != "AgentAvailable")
        .collect();
    conditions.push(json!({
        "type": "AgentAvailable", "status": "True", "reason": "",
        "message": "Agent has connected to proxy successfully.",
        "lastUpdateTime": "2026-01-01T00:00:00Z",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }));
    c["status"]["conditions"] = json!(conditions);
    let file = dir.join(format!("{name}-update.json"));
    std::fs::write(&file, c.to_string())?;
    host.kubectl_ok(&["replace", "-f", &file.to_string_lossy()]);
    Ok(())
}

/// kubectl with `kubeconfig` against cluster port `port`, the certificate
/// checked for the host the kubeconfig names (the ClusterIP).
fn kubectl_via(kubeconfig: &Path, port: u16, args: &[&str]) -> Result<Output> {
    let text = std::fs::read_to_string(kubeconfig)?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .context("no server in the kubeconfig")?;
    let host = server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .context("no host:port in the server")?
        .to_string();
    Ok(std::process::Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg(format!("--server=https://127.0.0.1:{port}"))
        .arg(format!("--tls-server-name={host}"))
        .args(["--request-timeout=20s"])
        .args(args)
        .output()?)
}

/// `kubeconfig` lists the member's own namespace `only-in-<name>`.
async fn reaches(kubeconfig: &Path, port: u16, name: &str) -> Result<()> {
    let want = format!("namespace/only-in-{name}");
    wait_for_ok(DEADLINE, || async {
        let out = kubectl_via(kubeconfig, port, &["get", "ns", "-o", "name"])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.lines().any(|l| l == want),
            "kubectl through port {port} for {name}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
    .await
}

fn kubeconfig_of(c: &Value, path: &Path) -> Result<()> {
    let b64 = conn(c, "kubeconfig")
        .as_str()
        .context("no kubeconfig in the Cluster")?;
    std::fs::write(path, B64.decode(b64)?)?;
    Ok(())
}

fn connected_count(agent: &Proc) -> usize {
    agent.lines().iter().filter(|l| *l == "connected").count()
}

/// Go Tower (go-proxy) serving the Clusters as they are on the host.
async fn start_go_tower(
    host: &KubeCluster,
    dir: &Path,
    tower_flags: &[String],
    run: &str,
) -> Result<Proc> {
    let kubeconfigs = dir.join(format!("go-tower-{run}"));
    std::fs::create_dir_all(&kubeconfigs)?;
    let mut cmd = Command::new(bin("go-proxy"));
    cmd.args(tower_flags)
        .arg("--kubeconfig-dir")
        .arg(&kubeconfigs);
    for name in CLUSTERS {
        let c = cluster(host, name)?;
        // Go Tower's addCluster serves a Cluster only with all of these.
        let token = conn(&c, "token").as_str().unwrap_or_default();
        let port = conn(&c, "kubernetesAPIServerPort").as_u64().unwrap_or(0);
        let ks_port = conn(&c, "kubesphereAPIServerPort").as_u64().unwrap_or(0);
        let server = conn(&c, "kubernetesAPIEndpoint")
            .as_str()
            .unwrap_or_default();
        let ks = conn(&c, "kubesphereAPIEndpoint")
            .as_str()
            .unwrap_or_default();
        ensure!(
            !token.is_empty() && port != 0 && ks_port != 0 && !server.is_empty() && !ks.is_empty(),
            "Go Tower would skip Cluster {name}: {}",
            c["spec"]["connection"]
        );
        ensure!(
            c["spec"]["connection"]["type"] == "proxy" && c["spec"]["enable"] == true,
            "Go Tower would drop Cluster {name}: {}",
            c["spec"]
        );
        cmd.arg(format!("--cluster={name}={token}={port}={server}"));
    }
    clean_env(&mut cmd);
    let proc = Proc::spawn(&format!("go-tower-{run}"), cmd)?;
    proc.wait_for_line(|l| l.starts_with("listening "), DEADLINE)
        .await?;
    Ok(proc)
}

/// Waits until go-proxy issued `name`'s kubeconfig (on its agent's connect)
/// and writes it into the Cluster as Go Tower does; returns its file.
async fn go_tower_connected(
    go_tower: &Proc,
    host: &KubeCluster,
    dir: &Path,
    name: &str,
) -> Result<PathBuf> {
    let prefix = format!("kubeconfig {name} ");
    let line = go_tower
        .wait_for_line(|l| l.starts_with(&prefix), DEADLINE)
        .await?;
    let path = PathBuf::from(&line[prefix.len()..]);
    go_tower_update(host, dir, name, &path)?;
    Ok(path)
}

/// Everything but what a proxy writes: must not change across a switch.
fn users_part(c: &Value) -> Value {
    let conditions: Vec<Value> = c["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"] == "Ready")
        .cloned()
        .collect();
    json!({
        "labels": c["metadata"]["labels"],
        "annotations": c["metadata"]["annotations"],
        "finalizers": c["metadata"]["finalizers"],
        "uid": c["metadata"]["uid"],
        "joinFederation": c["spec"]["joinFederation"],
        "enable": c["spec"]["enable"],
        "provider": c["spec"]["provider"],
        "config": c["spec"]["config"],
        "userNote": c["spec"]["userNote"],
        "type": conn(c, "type"),
        "token": conn(c, "token"),
        "kubernetesAPIServerPort": conn(c, "kubernetesAPIServerPort"),
        "kubesphereAPIServerPort": conn(c, "kubesphereAPIServerPort"),
        "kubernetesAPIEndpoint": conn(c, "kubernetesAPIEndpoint"),
        "kubesphereAPIEndpoint": conn(c, "kubesphereAPIEndpoint"),
        "kubeSphereVersion": c["status"]["kubeSphereVersion"],
        "ready": conditions,
    })
}

fn cluster_ip(host: &KubeCluster, name: &str) -> String {
    host.kubectl_ok(&[
        "get",
        "svc",
        "-n",
        NS,
        &format!("mc-{name}"),
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])
}

/// A kube port (and its +10000 ks port) free now, outside our default
/// `--cluster-ports` 16000-16999, as KubeSphere picks them; each test of
/// this file has its own half of 6000-6999 (they run at once, in one
/// process, and bind their ports only later).
fn go_tower_port(crd: Crd, taken: &[u16]) -> Result<u16> {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let base = match crd {
        Crd::Compat => 6000,
        Crd::KubeSpheres => 6500,
    };
    let start = base + (std::process::id() % 400) as u16;
    (start..base + 500)
        .chain(base..start)
        .find(|&p| !taken.contains(&p) && free(p) && free(p + 10000))
        .with_context(|| format!("no free port pair in {base}-{}", base + 499))
}

/// The Cluster CRD on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Crd {
    /// config/crd/kubesphere-compat: ours without the status subresource.
    Compat,
    /// KubeSphere's own schema: the compat CRD without our status fields
    /// and without x-kubernetes-preserve-unknown-fields (so the API server
    /// prunes what it does not declare, as on a KubeSphere host).
    KubeSpheres,
}

/// Our status fields, which KubeSphere's CRD does not declare.
const OUR_STATUS_FIELDS: [&str; 8] = [
    "agentVersion",
    "lastHeartbeatTime",
    "certificateExpirationTime",
    "healthz",
    "readyz",
    "livez",
    "platform",
    "tunnelRTT",
];

impl Crd {
    /// Writes the CRD (JSON) into `dir`; returns its file.
    fn write(self, host: &KubeCluster, dir: &Path) -> Result<PathBuf> {
        let yaml = std::process::Command::new(kubectl_binary())
            .arg("kustomize")
            .arg(e2e::workspace_root().join("config/crd/kubesphere-compat"))
            .output()?;
        ensure!(yaml.status.success(), "kubectl kustomize: {yaml:?}");
        let yaml_file = dir.join("crd.yaml");
        std::fs::write(&yaml_file, &yaml.stdout)?;
        // One JSON object per document, one after the other.
        let objects = host.kubectl_ok(&[
            "create",
            "--dry-run=client",
            "-o",
            "json",
            "-f",
            &yaml_file.to_string_lossy(),
        ]);
        let mut crd = serde_json::Deserializer::from_str(&objects)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .find(|i| i["metadata"]["name"] == "clusters.cluster.kubesphere.io")
            .context("no Cluster CRD in config/crd/kubesphere-compat")?;
        if self == Crd::KubeSpheres {
            let schema = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            if let Some(status) = schema["properties"]["status"]["properties"].as_object_mut() {
                for field in OUR_STATUS_FIELDS {
                    status.remove(field);
                }
            }
            strip_preserve_unknown(schema);
        }
        let file = dir.join("crd.json");
        std::fs::write(&file, crd.to_string())?;
        Ok(file)
    }
}

fn strip_preserve_unknown(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("x-kubernetes-preserve-unknown-fields");
            map.values_mut().for_each(strip_preserve_unknown);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_preserve_unknown),
        _ => {}
    }
}

#[tokio::test]
async fn go_tower_host_with_the_kubesphere_compat_crd_moves_to_our_proxy_and_back() -> Result<()> {
    migrate(Crd::Compat).await
}

#[tokio::test]
async fn go_tower_host_with_kubesphere_s_own_crd_moves_to_our_proxy_and_back() -> Result<()> {
    migrate(Crd::KubeSpheres).await
}

async fn migrate(crd: Crd) -> Result<()> {
    let t0 = Instant::now();
    let [host, alpha, beta]: [KubeCluster; 3] = KubeCluster::start_many(&["host", "alpha", "beta"])
        .await?
        .try_into()
        .map_err(|_| anyhow::anyhow!("three clusters"))?;
    let members = [&alpha, &beta];
    for (m, name) in members.iter().zip(CLUSTERS) {
        m.kubectl_ok(&["create", "ns", &format!("only-in-{name}")]);
    }
    let tmp = tempfile::Builder::new().prefix("migration-").tempdir()?;
    let dir = tmp.path();

    // The host as Go Tower leaves it: the CRD without the status subresource
    // (Go Tower writes status with whole-object updates), the namespace,
    // Services and Clusters.
    let crd_file = crd.write(&host, dir)?;
    host.kubectl_ok(&["create", "-f", &crd_file.to_string_lossy()]);
    host.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "crd/clusters.cluster.kubesphere.io",
        "--timeout=120s",
    ]);
    host.kubectl_ok(&["create", "ns", NS]);
    let mut ports = Vec::new();
    for name in CLUSTERS {
        let port = go_tower_port(crd, &ports)?;
        ports.push(port);
        go_tower_cluster(&host, dir, name, port, crd)?;
    }
    let before: Vec<Value> = CLUSTERS
        .iter()
        .map(|n| cluster(&host, n).map(|c| users_part(&c)))
        .collect::<Result<_>>()?;
    ensure!(
        crd != Crd::Compat || before.iter().all(|c| c["userNote"] == USER_NOTE),
        "the unknown field did not make it into the Clusters: {before:?}"
    );
    let ips: Vec<String> = CLUSTERS.iter().map(|n| cluster_ip(&host, n)).collect();

    // Go Tower's flags, shared by both proxies: the CA files and the agents' port.
    let (ca_crt, ca_key) = make_ca(dir)?;
    let agents_port = free_port();
    let tower_flags = vec![
        format!("--ca-cert={}", ca_crt.display()),
        format!("--ca-key={}", ca_key.display()),
        "--host=127.0.0.1".to_string(),
        format!("--port={agents_port}"),
    ];

    // Go Tower serving, the Go agents connected, kubectl through the
    // kubeconfigs Go Tower wrote into the Clusters.
    let mut go_tower = start_go_tower(&host, dir, &tower_flags, "before").await?;
    let mut agents = Vec::new();
    for (m, name) in members.iter().zip(CLUSTERS) {
        let access = member_access(m, dir)?;
        let token = conn(&cluster(&host, name)?, "token")
            .as_str()
            .unwrap_or_default()
            .to_string();
        agents.push(go_agent(agents_port, &access, name, &token)?);
    }
    let mut go_kubeconfigs = Vec::new();
    for (i, name) in CLUSTERS.iter().enumerate() {
        go_tower_connected(&go_tower, &host, dir, name).await?;
        // The copy a user (or KubeSphere) took from the Cluster.
        let saved = dir.join(format!("go-tower-{name}.kubeconfig"));
        kubeconfig_of(&cluster(&host, name)?, &saved)?;
        reaches(&saved, ports[i], name).await?;
        go_kubeconfigs.push(saved);
    }
    let pids: Vec<u32> = agents.iter().map(Proc::pid).collect();
    eprintln!(
        "migration: Go Tower serving alpha and beta after {:?}",
        t0.elapsed()
    );

    // The switch: Go Tower stops, our proxy starts with its flags, CA files
    // and agents' port (plus what a process here lacks and a pod has).
    go_tower.terminate(GRACE).await?;
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(&tower_flags)
        .args(["--v=4", "--leader-elect=true"])
        .arg(format!("--kubeconfig={}", host.kubeconfig().display()))
        .arg(format!("--peer-port={}", free_port()))
        .arg("--data-dir")
        .arg(dir.join("proxy-data"))
        .env("POD_NAME", "tower-0")
        .env("POD_NAMESPACE", NS);
    clean_env(&mut cmd);
    let mut proxy = Proc::spawn("proxy", cmd)?;

    // The Go agents, never restarted, are back, and each Cluster carries a
    // kubeconfig our proxy rewrote: same server, same CA, a client
    // certificate for this cluster.
    for (i, name) in CLUSTERS.iter().enumerate() {
        let agent = &agents[i];
        wait_until(DEADLINE, || async { connected_count(agent) >= 2 })
            .await
            .with_context(|| format!("go-agent {name} never reconnected"))?;
        let go_written = std::fs::read(&go_kubeconfigs[i])?;
        let c = wait_for_ok(DEADLINE, || async {
            let c = cluster(&host, name)?;
            let kc = B64.decode(conn(&c, "kubeconfig").as_str().unwrap_or_default())?;
            ensure!(
                kc != go_written && agent_available(&c),
                "Cluster {name}: kubeconfig not rewritten or agent not available yet"
            );
            Ok(c)
        })
        .await?;
        let ours = dir.join(format!("ours-{name}.kubeconfig"));
        kubeconfig_of(&c, &ours)?;
        let text = std::fs::read_to_string(&ours)?;
        let go_text = String::from_utf8(go_written)?;
        let field = |t: &str, key: &str| -> Option<String> {
            t.lines()
                .find_map(|l| l.trim().strip_prefix(key).map(str::to_string))
        };
        for key in ["server: ", "certificate-authority-data: "] {
            ensure!(
                field(&text, key).is_some() && field(&text, key) == field(&go_text, key),
                "{name}: our kubeconfig's {key:?} differs from Go Tower's:\n{text}"
            );
        }
        reaches(&ours, ports[i], name).await?;
        // The member's status through the tunnel: KubeSphere's fields
        // always; ours only where the CRD declares them.
        let c = wait_for_ok(DEADLINE, || async {
            let c = cluster(&host, name)?;
            let status = &c["status"];
            ensure!(
                status["kubernetesVersion"].is_string()
                    && (crd != Crd::Compat || status["agentVersion"].is_string()),
                "Cluster {name}: no member status yet: {status}"
            );
            Ok(c)
        })
        .await?;
        if crd == Crd::KubeSpheres {
            ensure!(
                c["status"]["agentVersion"].is_null(),
                "KubeSphere's schema kept our status field: {}",
                c["status"]
            );
        }
        // The copy of Go Tower's: its CN kubernetes-admin certificate
        // (signed by the same CA) names no cluster: refused, with the fix.
        let out = kubectl_via(&go_kubeconfigs[i], ports[i], &["get", "ns"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success()
                && stderr.contains("kubernetes-admin")
                && stderr.contains("spec.connection.kubeconfig"),
            "Go Tower's kubeconfig for {name} through our proxy: {}\n{stderr}",
            out.status
        );
        // Nothing the user, KubeSphere or Go Tower set is lost.
        ensure!(
            users_part(&c) == before[i],
            "Cluster {name} changed:\nbefore {}\nafter  {}",
            before[i],
            users_part(&c)
        );
        ensure!(
            cluster_ip(&host, name) == ips[i],
            "mc-{name}'s ClusterIP changed"
        );
    }
    for (agent, pid) in agents.iter_mut().zip(&pids) {
        ensure!(
            agent.is_running() && agent.pid() == *pid,
            "a go-agent exited"
        );
    }
    // No status subresource here: the proxy asked API discovery instead of
    // finding out from a 404 on each status write, and writes spec and
    // status of a Cluster together (its requests are in its --v=4 log).
    let patches: Vec<String> = proxy
        .lines()
        .into_iter()
        .filter(|l| l.contains("http.method=PATCH") && l.contains("/clusters/"))
        .collect();
    let to_status = patches.iter().filter(|l| l.contains("/status?")).count();
    ensure!(
        to_status == 0,
        "{to_status} status writes tried the missing subresource: {patches:#?}"
    );
    eprintln!(
        "migration: our proxy serving alpha and beta after {:?}",
        t0.elapsed()
    );

    // Back to Go Tower: it accepts the Clusters as our proxy left them.
    let ours: Vec<PathBuf> = CLUSTERS
        .iter()
        .map(|n| dir.join(format!("ours-{n}.kubeconfig")))
        .collect();
    proxy.terminate(GRACE).await?;
    let go_tower = start_go_tower(&host, dir, &tower_flags, "after").await?;
    for (i, name) in CLUSTERS.iter().enumerate() {
        let agent = &agents[i];
        wait_until(DEADLINE, || async { connected_count(agent) >= 3 })
            .await
            .with_context(|| format!("go-agent {name} never came back to Go Tower"))?;
        let issued = go_tower_connected(&go_tower, &host, dir, name).await?;
        reaches(&issued, ports[i], name).await?;
        // Go Tower verifies no client certificate: ours works there too.
        reaches(&ours[i], ports[i], name).await?;
        let c = cluster(&host, name)?;
        ensure!(
            users_part(&c) == before[i],
            "Cluster {name} changed on the way back:\nbefore {}\nafter  {}",
            before[i],
            users_part(&c)
        );
    }
    for (agent, pid) in agents.iter_mut().zip(&pids) {
        ensure!(
            agent.is_running() && agent.pid() == *pid,
            "a go-agent exited"
        );
    }
    eprintln!("migration: back on Go Tower after {:?}", t0.elapsed());
    Ok(())
}
