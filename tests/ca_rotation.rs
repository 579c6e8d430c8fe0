//! CA rotation (issue #13 part 3) as an operator does it, with kubectl on the
//! proxy's Secret (docs/ca-rotation.md): a next CA made with certs/gen-ca.sh
//! is added (`ca-next.*`), switched to (`ca.*` = new, `ca-previous.*` = old),
//! then the old one is dropped. All along, kubectl runs without pause
//! against alpha through two kubeconfigs: one copied before the rotation
//! (old CA, old client certificate), until the drop, and the one the Cluster
//! holds, re-read after each step; and 50 requests per second through alpha
//! and a second cluster, beta, each on a new TLS connection with the
//! kubeconfig as it is then. Not one call fails. After the drop the
//! Cluster's kubeconfig carries the new CA alone and a client certificate of
//! the old CA is refused.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use e2e::k8s_openapi::serde_json::{Value, json};
use e2e::{CLUSTER, Tower, kubectl_binary, wait_for_ok, wait_until, workspace_root};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

const SOON: Duration = Duration::from_secs(90);
const NS: &str = "kubesphere-system";
const BETA: &str = "beta";

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    Command::new(kubectl_binary())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .context("running kubectl")
}

async fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = kubectl(kubeconfig, args).await?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `kubectl patch` the proxy's Secret with a merge patch of its `data`.
async fn patch_secret(tower: &Tower, data: Value) -> Result<()> {
    let patch = json!({ "data": data }).to_string();
    let host = tower.host().kubeconfig();
    let args = [
        "-n",
        NS,
        "patch",
        "secret",
        "tower-proxy",
        "--type",
        "merge",
    ];
    kubectl_ok(host, &[&args[..], &["-p", patch.as_str()]].concat()).await?;
    Ok(())
}

/// A key of the proxy's Secret, base64 as stored.
async fn secret_key(tower: &Tower, key: &str) -> Result<String> {
    let path = format!("jsonpath={{.data.{}}}", key.replace('.', "\\."));
    let host = tower.host().kubeconfig();
    let value = kubectl_ok(
        host,
        &["-n", NS, "get", "secret", "tower-proxy", "-o", &path],
    )
    .await?;
    ensure!(!value.is_empty(), "the Secret has no {key}");
    Ok(value)
}

/// Cluster `name`'s published kubeconfig (YAML).
async fn published(tower: &Tower, name: &str) -> Result<String> {
    let host = tower.host().kubeconfig();
    let jsonpath = "jsonpath={.spec.connection.kubeconfig}";
    let b64 = kubectl_ok(host, &["get", "cluster", name, "-o", jsonpath]).await?;
    Ok(String::from_utf8(B64.decode(b64.trim())?)?)
}

/// The value of the first `field: value` line of a kubeconfig we rendered.
fn field<'a>(yaml: &'a str, field: &str) -> Result<&'a str> {
    let prefix = format!("{field}: ");
    yaml.lines()
        .find_map(|l| l.trim_start().strip_prefix(&prefix))
        .with_context(|| format!("no {field} in the kubeconfig"))
}

fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("PEM certificates")
}

/// The CAs a kubeconfig trusts, in order.
fn trusted(yaml: &str) -> Result<Vec<CertificateDer<'static>>> {
    certs(&B64.decode(field(yaml, "certificate-authority-data")?)?)
}

/// Wait until Cluster `name`'s kubeconfig trusts exactly `cas` (in that
/// order), and write it to `path` (atomically: the loads keep reading it).
async fn follow_step(
    tower: &Tower,
    name: &str,
    cas: &[&CertificateDer<'static>],
    path: &Path,
    step: &str,
) -> Result<String> {
    let yaml = wait_for_ok(SOON, || async {
        let yaml = published(tower, name).await?;
        let now = trusted(&yaml)?;
        ensure!(
            now.iter().eq(cas.iter().copied()),
            "it trusts {} CA(s), not yet the step's {}",
            now.len(),
            cas.len()
        );
        Ok(yaml)
    })
    .await
    .with_context(|| format!("{step}: {name}'s kubeconfig never trusted the step's CAs"))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &yaml)?;
    std::fs::rename(&tmp, path)?;
    eprintln!("{step}: {name}'s kubeconfig trusts {} CA(s)", cas.len());
    Ok(yaml)
}

/// One GET of kube-system through `kubeconfig` on a new TLS connection, as a
/// client that re-reads its kubeconfig for every request would: its server,
/// its CAs and its client certificate, all from the file as it is now.
async fn https_get(kubeconfig: &Path) -> Result<()> {
    let yaml = std::fs::read_to_string(kubeconfig)?;
    let server = field(&yaml, "server")?;
    let addr = server
        .strip_prefix("https://")
        .with_context(|| format!("server {server} is not https"))?
        .to_string();
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
    let mut roots = RootCertStore::empty();
    for ca in trusted(&yaml)? {
        roots.add(ca)?;
    }
    let chain = certs(&B64.decode(field(&yaml, "client-certificate-data")?)?)?;
    let key = PrivateKeyDer::from_pem_slice(&B64.decode(field(&yaml, "client-key-data")?)?)
        .context("the client key")?;
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let name = ServerName::try_from(host.to_string())?;
    let tcp = TcpStream::connect(&addr).await?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let request = format!(
        "GET /api/v1/namespaces/kube-system HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, tls.read_to_end(&mut answer))
        .await
        .context("no answer")??;
    let head = String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned();
    ensure!(head.starts_with("HTTP/1.1 200"), "answered {head:?}");
    Ok(())
}

/// How a [`Load`] calls.
#[derive(Clone, Copy)]
enum Caller {
    /// The real kubectl, one call after the other.
    Kubectl,
    /// [`https_get`] started at this many per second, not waiting for the
    /// previous ones (calls overlap when answers are slow).
    Rate(u32),
}

/// Calls through `kubeconfig` until stopped, counting successes and
/// keeping every failure.
struct Load {
    name: &'static str,
    ok: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<String>>,
}

impl Load {
    fn start(name: &'static str, kubeconfig: PathBuf, caller: Caller) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ok2, stop2) = (ok.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
            let fail = |e: String| {
                if let Ok(mut f) = failures.lock() {
                    f.push(e);
                }
            };
            match caller {
                Caller::Kubectl => {
                    while !stop2.load(Ordering::SeqCst) {
                        let args = ["get", "ns", "kube-system", "-o", "name"];
                        match kubectl(&kubeconfig, &args).await {
                            Ok(out)
                                if out.status.success()
                                    && out.stdout.starts_with(b"namespace/") =>
                            {
                                ok2.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(out) => fail(String::from_utf8_lossy(&out.stderr).into_owned()),
                            Err(e) => fail(format!("{e:#}")),
                        }
                    }
                }
                Caller::Rate(per_second) => {
                    let mut tick =
                        tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
                    let mut calls = tokio::task::JoinSet::new();
                    while !stop2.load(Ordering::SeqCst) {
                        tick.tick().await;
                        let (kubeconfig, ok) = (kubeconfig.clone(), ok2.clone());
                        calls.spawn(async move {
                            https_get(&kubeconfig).await.map(|()| {
                                ok.fetch_add(1, Ordering::SeqCst);
                            })
                        });
                        while let Some(done) = calls.try_join_next() {
                            match done {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => fail(format!("{e:#}")),
                                Err(e) => fail(format!("{e}")),
                            }
                        }
                    }
                    while let Some(done) = calls.join_next().await {
                        match done {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => fail(format!("{e:#}")),
                            Err(e) => fail(format!("{e}")),
                        }
                    }
                }
            }
            failures.lock().map(|f| f.clone()).unwrap_or_default()
        });
        Load {
            name,
            ok,
            stop,
            task,
        }
    }

    /// Wait until `n` more calls succeeded than now.
    async fn progress(&self, n: u64) -> Result<()> {
        let target = self.ok.load(Ordering::SeqCst) + n;
        wait_until(SOON, || async { self.ok.load(Ordering::SeqCst) >= target })
            .await
            .with_context(|| format!("{}: no call succeeded for a while", self.name))
    }

    /// Stop; every call must have succeeded. Returns how many there were.
    async fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self.task.await?;
        let ok = self.ok.load(Ordering::SeqCst);
        if !failures.is_empty() {
            bail!(
                "{}: {} of {} calls failed, first: {}",
                self.name,
                failures.len(),
                failures.len() as u64 + ok,
                failures[0]
            );
        }
        eprintln!("{}: {ok} calls, none failed", self.name);
        Ok(ok)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_never_fails_through_a_ca_rotation_and_the_old_ca_is_refused_after() -> Result<()> {
    let tower = Tower::start().await?;
    let dir = tower.dir().to_path_buf();
    let old_kubeconfig = dir.join("old.kubeconfig");
    std::fs::copy(tower.config_alpha(), &old_kubeconfig)?;
    let current = dir.join("current.kubeconfig");
    std::fs::copy(tower.config_alpha(), &current)?;
    let old_yaml = std::fs::read_to_string(&old_kubeconfig)?;
    // A second cluster with its own agent: the rotation is the proxy's, for
    // every cluster at once.
    let beta = tower.join(&[BETA.to_string()]).await?.remove(0);
    let current_beta = beta.kubeconfig.clone();

    // The CA in use, and the next one, made as docs/ca-rotation.md says.
    let old_crt = secret_key(&tower, "ca.crt").await?;
    let old_key = secret_key(&tower, "ca.key").await?;
    let old = certs(&B64.decode(&old_crt)?)?.remove(0);
    let next_dir = dir.join("next-ca");
    let made = std::process::Command::new(workspace_root().join("certs/gen-ca.sh"))
        .arg(&next_dir)
        .output()?;
    ensure!(
        made.status.success(),
        "certs/gen-ca.sh: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let next_crt = B64.encode(std::fs::read(next_dir.join("ca.crt"))?);
    let next_key = B64.encode(std::fs::read(next_dir.join("ca.key"))?);
    let new = certs(&std::fs::read(next_dir.join("ca.crt"))?)?.remove(0);

    let before = Load::start(
        "kubectl, alpha's kubeconfig copied before the rotation",
        old_kubeconfig.clone(),
        Caller::Kubectl,
    );
    let following = Load::start(
        "kubectl, alpha's kubeconfig re-read",
        current.clone(),
        Caller::Kubectl,
    );
    // 50 requests per second through the two clusters, each on a new TLS
    // connection with the kubeconfig as it is at that moment.
    let rate_alpha = Load::start("25/s through alpha", current.clone(), Caller::Rate(25));
    let rate_beta = Load::start("25/s through beta", current_beta.clone(), Caller::Rate(25));
    let all = [&before, &following, &rate_alpha, &rate_beta];
    for load in all {
        load.progress(2).await?;
    }

    // 1. Add: the next CA trusted beside the old one, which still signs.
    patch_secret(
        &tower,
        json!({ "ca-next.crt": next_crt, "ca-next.key": next_key }),
    )
    .await?;
    follow_step(&tower, CLUSTER, &[&old, &new], &current, "add").await?;
    follow_step(&tower, BETA, &[&old, &new], &current_beta, "add").await?;
    for load in all {
        load.progress(3).await?;
    }

    // 2. Switch: the new CA signs, the old one is still trusted.
    patch_secret(
        &tower,
        json!({
            "ca.crt": next_crt, "ca.key": next_key,
            "ca-previous.crt": old_crt, "ca-previous.key": old_key,
            "ca-next.crt": null, "ca-next.key": null,
        }),
    )
    .await?;
    follow_step(&tower, CLUSTER, &[&new, &old], &current, "switch").await?;
    follow_step(&tower, BETA, &[&new, &old], &current_beta, "switch").await?;
    // The copy made before the rotation still works: the previous CA keeps
    // signing the serving certificates and is still trusted.
    for load in all {
        load.progress(3).await?;
    }
    before.finish().await?;

    // 3. Drop: the new CA alone.
    patch_secret(
        &tower,
        json!({ "ca-previous.crt": null, "ca-previous.key": null }),
    )
    .await?;
    let dropped = follow_step(&tower, CLUSTER, &[&new], &current, "drop").await?;
    follow_step(&tower, BETA, &[&new], &current_beta, "drop").await?;
    for load in [&following, &rate_alpha, &rate_beta] {
        load.progress(3).await?;
    }
    following.finish().await?;
    let requests = rate_alpha.finish().await? + rate_beta.finish().await?;
    eprintln!("{requests} requests on new TLS connections through alpha and beta, none failed");

    // Only the new CA validates: the old client certificate, with the
    // current server and CA, is refused in the handshake.
    let mut forged = dropped.clone();
    for key in ["client-certificate-data", "client-key-data"] {
        forged = forged.replace(field(&dropped, key)?, field(&old_yaml, key)?);
    }
    let forged_path = dir.join("old-client-cert.kubeconfig");
    std::fs::write(&forged_path, &forged)?;
    let refused = kubectl(&forged_path, &["get", "ns", "kube-system", "-o", "name"]).await?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success(),
        "a client certificate of the dropped CA was accepted"
    );
    ensure!(
        stderr.contains("certificate"),
        "refused, but not for its certificate: {stderr}"
    );
    eprintln!("old client certificate after the drop: {}", stderr.trim());
    // And the kubeconfig copied before the rotation no longer works at all.
    let stale = kubectl(&old_kubeconfig, &["get", "ns", "kube-system", "-o", "name"]).await?;
    ensure!(
        !stale.status.success(),
        "the pre-rotation kubeconfig still works after the drop"
    );
    // The current one does.
    kubectl_ok(&current, &["get", "ns", "kube-system", "-o", "name"]).await?;
    Ok(())
}
