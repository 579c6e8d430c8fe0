//! Personal access by CSR (issue #12 part 5) the way a user and an admin do
//! it, with the real openssl and kubectl: jane makes a key and a request
//! naming cluster alpha, the admin creates the CertificateSigningRequest for
//! the signer `tower.kubesphere.io/cluster-access` and approves it, the proxy
//! signs it, and jane's kubeconfig (the proxy's CA and alpha's address, her
//! certificate) reaches alpha as jane: the MEMBER's RBAC decides, through
//! impersonation. The certificate opens alpha only (beta's port and the
//! CONNECT door for beta refuse it); a denied request never gets a
//! certificate; requests naming no cluster or an unknown one fail with the
//! reason; the audit log names jane.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use e2e::k8s_openapi::serde_json::{self, Value, json};
use e2e::{Proc, Tower, TowerOptions, bin, clean_env, free_port, kubectl_binary, wait_for_ok};
use tokio::process::Command;

const SIGNER: &str = "tower.kubesphere.io/cluster-access";
const SOON: Duration = Duration::from_secs(60);

async fn output(mut cmd: Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.output().await.context("spawning a command")
}

fn ok(what: &str, out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The real kubectl with `kubeconfig`, whatever its exit status.
async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(kubectl_binary());
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    output(cmd).await
}

async fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    ok(
        &format!("kubectl {}", args.join(" ")),
        kubectl(kubeconfig, args).await?,
    )
}

async fn openssl(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    clean_env(&mut cmd);
    ok(&format!("openssl {}", args.join(" ")), output(cmd).await?).map(drop)
}

/// A key and a request, as docs/personal-access.md says.
async fn request(dir: &Path, name: &str, subject: &str, cluster: Option<&str>) -> Result<PathBuf> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let (key_s, csr_s) = (key.to_string_lossy(), csr.to_string_lossy());
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &key_s,
    ])
    .await?;
    let san = cluster.map(|c| format!("subjectAltName=URI:tower://{c}"));
    let mut args = vec![
        "req", "-new", "-key", &key_s, "-subj", subject, "-out", &csr_s,
    ];
    if let Some(san) = &san {
        args.extend(["-addext", san]);
    }
    openssl(&args).await?;
    Ok(csr)
}

/// `kubectl create -f` of a CertificateSigningRequest for our signer.
async fn create_csr(host: &Path, dir: &Path, name: &str, csr: &Path) -> Result<()> {
    let pem = std::fs::read(csr)?;
    let object = json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": SIGNER,
            "expirationSeconds": 3600,
            "usages": ["client auth"],
        }
    });
    let file = dir.join(format!("{name}.csr.json"));
    std::fs::write(&file, object.to_string())?;
    kubectl_ok(host, &["create", "-f", &file.to_string_lossy()]).await?;
    Ok(())
}

async fn get_csr(host: &Path, name: &str) -> Result<Value> {
    let out = kubectl_ok(host, &["get", "csr", name, "-o", "json"]).await?;
    Ok(serde_json::from_str(&out)?)
}

fn condition<'a>(csr: &'a Value, kind: &str) -> Option<&'a Value> {
    csr["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Cluster `name` on the host (its kubeconfig field decoded when present).
async fn cluster(host: &Path, name: &str) -> Result<Value> {
    let out = kubectl_ok(host, &["get", "cluster", name, "-o", "json"]).await?;
    Ok(serde_json::from_str(&out)?)
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_csr_opens_one_cluster_as_the_person() -> Result<()> {
    let scratch = tempfile::Builder::new().prefix("tower-csr-").tempdir()?;
    let dir = scratch.path();
    let audit = dir.join("audit.log");
    let connect_port = free_port();
    let tower = Tower::start_with(TowerOptions {
        kubelet: false,
        proxy_args: vec![
            format!("--audit-log={}", audit.display()),
            format!("--connect-port={connect_port}"),
        ],
        ..Default::default()
    })
    .await?;
    let host = tower.host().kubeconfig().to_path_buf();

    // The fence first: a denied request, then a malformed approved one, then
    // jane's approved one. The signer sees them in that order.
    let denied = request(dir, "mallory", "/CN=mallory/O=dev", Some("alpha")).await?;
    create_csr(&host, dir, "mallory-alpha", &denied).await?;
    kubectl_ok(&host, &["certificate", "deny", "mallory-alpha"]).await?;
    let no_uri = request(dir, "joe", "/CN=joe/O=dev", None).await?;
    create_csr(&host, dir, "joe-nowhere", &no_uri).await?;
    kubectl_ok(&host, &["certificate", "approve", "joe-nowhere"]).await?;
    let lost = request(dir, "ann", "/CN=ann/O=dev", Some("gamma")).await?;
    create_csr(&host, dir, "ann-gamma", &lost).await?;
    kubectl_ok(&host, &["certificate", "approve", "ann-gamma"]).await?;
    let jane = request(dir, "jane", "/CN=jane/O=dev", Some("alpha")).await?;
    create_csr(&host, dir, "jane-alpha", &jane).await?;
    // What the approver sees.
    let described = kubectl_ok(&host, &["describe", "csr", "jane-alpha"]).await?;
    ensure!(
        described.contains("jane") && described.contains("dev") && described.contains(SIGNER),
        "{described}"
    );
    kubectl_ok(&host, &["certificate", "approve", "jane-alpha"]).await?;

    let cert = wait_for_ok(SOON, || async {
        let csr = get_csr(&host, "jane-alpha").await?;
        let cert = csr["status"]["certificate"].as_str().unwrap_or_default();
        ensure!(!cert.is_empty(), "jane-alpha has no certificate yet: {csr}");
        Ok(base64::engine::general_purpose::STANDARD.decode(cert)?)
    })
    .await?;
    let failed = wait_for_ok(SOON, || async {
        let csr = get_csr(&host, "joe-nowhere").await?;
        condition(&csr, "Failed")
            .cloned()
            .with_context(|| format!("joe-nowhere has no Failed condition yet: {csr}"))
    })
    .await?;
    ensure!(
        failed["status"] == "True"
            && failed["reason"] == "InvalidRequest"
            && failed["message"]
                .as_str()
                .is_some_and(|m| m.contains("names no cluster") && m.contains("URI:tower://")),
        "{failed}"
    );
    ensure!(
        get_csr(&host, "joe-nowhere").await?["status"]["certificate"].is_null(),
        "a failed request got a certificate"
    );
    // A cluster without a Cluster resource.
    let ann = wait_for_ok(SOON, || async {
        let csr = get_csr(&host, "ann-gamma").await?;
        ensure!(
            condition(&csr, "Failed").is_some(),
            "ann-gamma has no Failed condition yet: {csr}"
        );
        Ok(csr)
    })
    .await?;
    let unknown = condition(&ann, "Failed").context("Failed")?;
    ensure!(
        unknown["reason"] == "UnknownCluster"
            && unknown["message"]
                .as_str()
                .is_some_and(|m| m.contains("no Cluster \"gamma\"")),
        "{ann}"
    );
    ensure!(ann["status"]["certificate"].is_null(), "{ann}");
    // Issued after the denied one was seen: the denied one never gets one.
    let mallory = get_csr(&host, "mallory-alpha").await?;
    ensure!(
        mallory["status"]["certificate"].is_null() && condition(&mallory, "Denied").is_some(),
        "{mallory}"
    );
    let cert_file = dir.join("jane.crt");
    std::fs::write(&cert_file, &cert)?;

    // jane's kubeconfig: alpha's address and the proxy's CA, her certificate.
    let alpha_config = tower.config_alpha();
    let server = kubectl_ok(
        alpha_config,
        &[
            "config",
            "view",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
    )
    .await?;
    let ca_b64 = kubectl_ok(
        alpha_config,
        &[
            "config",
            "view",
            "--raw",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ],
    )
    .await?;
    let ca_file = dir.join("tower-ca.crt");
    std::fs::write(
        &ca_file,
        base64::engine::general_purpose::STANDARD.decode(ca_b64.trim())?,
    )?;
    let jane_config = dir.join("jane-alpha.kubeconfig");
    let (ca_s, key_s) = (ca_file.to_string_lossy(), dir.join("jane.key"));
    let key_s = key_s.to_string_lossy();
    let cert_s = cert_file.to_string_lossy();
    for args in [
        vec![
            "config",
            "set-cluster",
            "alpha",
            "--server",
            server.trim(),
            "--certificate-authority",
            &ca_s,
            "--embed-certs",
        ],
        vec![
            "config",
            "set-credentials",
            "jane",
            "--client-certificate",
            &cert_s,
            "--client-key",
            &key_s,
            "--embed-certs",
        ],
        vec![
            "config",
            "set-context",
            "alpha",
            "--cluster",
            "alpha",
            "--user",
            "jane",
        ],
        vec!["config", "use-context", "alpha"],
    ] {
        kubectl_ok(&jane_config, &args).await?;
    }

    // The member lets group dev read namespaces, nothing more.
    let member = tower.member();
    member.kubectl_ok(&[
        "create",
        "clusterrole",
        "ns-reader",
        "--verb=get,list,watch",
        "--resource=namespaces",
    ]);
    member.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "dev-reads-namespaces",
        "--clusterrole=ns-reader",
        "--group=dev",
    ]);
    let listed = kubectl_ok(&jane_config, &["get", "ns", "-o", "name"]).await?;
    ensure!(listed.contains("namespace/kube-system"), "{listed}");
    // A verb the member does not grant: the member's 403, naming jane.
    let out = kubectl(&jane_config, &["create", "ns", "janes-own"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && stderr.contains("User \"jane\" cannot create resource \"namespaces\""),
        "create ns as jane: {stderr}"
    );

    // A second cluster, beta: its port refuses jane's certificate.
    let (_beta_agent, beta_port) = start_beta(&tower, &host, dir).await?;
    let out = kubectl(
        &jane_config,
        &[
            "get",
            "ns",
            "--server",
            &format!("https://127.0.0.1:{beta_port}"),
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("issued for cluster \"alpha\""),
        "jane at beta's port: {stderr}"
    );
    // The CONNECT door: alpha opens, beta does not (named the way a
    // certificate bound to no cluster would name it).
    let curl = |cluster: &'static str| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-v", "-k", "--max-time", "30", "-p", "--proxy"])
            .arg(format!("https://127.0.0.1:{connect_port}"))
            .arg("--proxy-cacert")
            .arg(&ca_file)
            .arg("--proxy-cert")
            .arg(&cert_file)
            .arg("--proxy-key")
            .arg(dir.join("jane.key"))
            .arg("--proxy-header")
            .arg(format!("Tower-Cluster: {cluster}"))
            .arg(format!("https://{cluster}:443/version"));
        clean_env(&mut cmd);
        output(cmd)
    };
    let alpha = curl("alpha").await?;
    let stderr = String::from_utf8_lossy(&alpha.stderr);
    ensure!(
        stderr.contains("HTTP/1.1 200 Connection established"),
        "{stderr}"
    );
    // (curl does not show a refused CONNECT's body: the reason is checked
    // in the audit log below.)
    let beta = curl("beta").await?;
    let stderr = String::from_utf8_lossy(&beta.stderr);
    ensure!(
        stderr.contains("< HTTP/1.1 403"),
        "CONNECT beta:443 with jane's certificate: {stderr}"
    );

    // The audit log: jane, her groups, what the member answered.
    wait_for_ok(SOON, || async {
        let lines = audit_lines(&audit);
        let jane_lines = || lines.iter().filter(|r| r["caller"]["user"] == "jane");
        let seen = |door: &str, cluster: &str, status: u64, verb: &str| {
            jane_lines().any(|r| {
                r["door"] == door
                    && r["cluster"] == cluster
                    && r["status"] == status
                    && r["verb"] == verb
            })
        };
        ensure!(
            seen("port", "alpha", 200, "list"),
            "no list by jane: {lines:?}"
        );
        ensure!(
            seen("port", "alpha", 403, "create"),
            "no refused create by jane"
        );
        ensure!(
            jane_lines()
                .any(|r| r["door"] == "port" && r["cluster"] == "beta" && r["status"] == 403),
            "no refusal at beta's port"
        );
        ensure!(
            seen("tls", "alpha", 200, "connect"),
            "no CONNECT to alpha by jane"
        );
        ensure!(
            jane_lines().any(|r| r["door"] == "tls"
                && r["status"] == 403
                && r["target"] == "beta:443"
                && r["reason"]
                    .as_str()
                    .is_some_and(|m| m.contains("opens cluster \"alpha\" only"))),
            "no refused CONNECT to beta by jane: {:?}",
            jane_lines()
                .filter(|r| r["door"] == "tls")
                .collect::<Vec<_>>()
        );
        let list = jane_lines().find(|r| r["verb"] == "list").context("list")?;
        ensure!(list["caller"]["groups"] == json!(["dev"]), "{list}");
        ensure!(list["caller"]["impersonated"] == true, "{list}");
        let text = std::fs::read_to_string(&audit)?;
        ensure!(
            !text.contains("PRIVATE KEY") && !text.contains("BEGIN CERTIFICATE"),
            "secrets in the audit log"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// Cluster beta with its own agent (same member); the agent, and beta's kube
/// port once open.
async fn start_beta(tower: &Tower, host: &Path, dir: &Path) -> Result<(Proc, u16)> {
    let beta = json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": "beta"},
        "spec": {"joinFederation": true, "connection": {"type": "proxy"}}
    });
    let file = dir.join("beta.json");
    std::fs::write(&file, beta.to_string())?;
    kubectl_ok(host, &["create", "-f", &file.to_string_lossy()]).await?;
    let token = wait_for_ok(SOON, || async {
        let c = cluster(host, "beta").await?;
        let token = c["spec"]["connection"]["token"]
            .as_str()
            .unwrap_or_default();
        ensure!(!token.is_empty(), "beta has no token yet");
        Ok(token.to_string())
    })
    .await?;
    let token_file = dir.join("beta.token");
    std::fs::write(&token_file, token)?;
    let mut cmd = Command::new(bin("agent"));
    cmd.args(["--name", "beta"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--proxy-server")
        .arg(format!("http://127.0.0.1:{}", tower.proxy_port()))
        .arg("--kubeconfig")
        .arg(tower.member().kubeconfig())
        .args(["--kubesphere-service", "127.0.0.1:9"])
        .arg("--proxy-host-key-fingerprint")
        .arg(tower.fingerprint());
    let agent = Proc::spawn("agent-beta", cmd)?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    let port = wait_for_ok(SOON, || async {
        let c = cluster(host, "beta").await?;
        ensure!(
            !c["spec"]["connection"]["kubeconfig"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "beta has no kubeconfig yet (its port is not open)"
        );
        c["spec"]["connection"]["kubernetesAPIServerPort"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("beta has no port")
    })
    .await?;
    Ok((agent, port))
}
