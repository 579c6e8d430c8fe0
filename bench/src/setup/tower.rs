//! Our proxy in Kubernetes mode, its two agents, and what it publishes in
//! the Clusters.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use e2e::{KubeCluster, Proc, bin, kubectl_binary, wait_for_ok};
use tokio::process::Command;

use super::procs::{kubectl, log_field, log_message_is, spawn, started_proxy};
use super::{Env, Variant};
use crate::http::Target;
use crate::tls;

/// Our proxy in Kubernetes mode with its two agents.
pub struct TowerRs {
    // Drop order: agents before the proxy, the proxy before the clusters.
    pub alpha_agent: Option<Proc>,
    pub bench_agent: Proc,
    pub proxy: Proc,
    pub agents_addr: SocketAddr,
    pub forward: SocketAddr,
    /// `--connect-port`: the HTTP CONNECT door (mutual TLS).
    pub connect: SocketAddr,
    pub fingerprint: String,
    pub alpha_token: PathBuf,
    /// `config_alpha`: reaches the member kube-apiserver through the tunnel.
    pub alpha_kubeconfig: PathBuf,
    /// The Cluster `bench` kubeconfig: reaches the upstream through the tunnel.
    pub bench_kubeconfig: PathBuf,
}

/// The cluster resources the proxy manages.
const CLUSTERS: &str = "apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: bench
spec:
  joinFederation: true
  connection:
    type: proxy
---
apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: alpha
spec:
  joinFederation: true
  connection:
    type: proxy
";

impl TowerRs {
    /// `variant`: the build to run ([`Variant::current`], or `BENCH_B_*`'s
    /// on a host cluster of its own); its files in the work directory and
    /// its port range are its own.
    pub async fn start(
        env: &Env,
        host: &KubeCluster,
        member: &KubeCluster,
        upstream_kubeconfig: &Path,
        variant: &Variant,
    ) -> Result<TowerRs> {
        let hkc = host.kubeconfig();
        let tag = variant.tag();
        let crd = Command::new(kubectl_binary())
            .arg("kustomize")
            .arg(env.root.join("config/crd"))
            .output()
            .await?;
        ensure!(crd.status.success(), "kubectl kustomize config/crd failed");
        let crd_file = env.work.join("crd.yaml");
        std::fs::write(&crd_file, &crd.stdout)?;
        kubectl(hkc, &["apply", "-f", &crd_file.display().to_string()]).await?;
        kubectl(
            hkc,
            &[
                "wait",
                "--for",
                "condition=established",
                "crd/clusters.cluster.kubesphere.io",
                "--timeout=60s",
            ],
        )
        .await?;
        let _ = kubectl(hkc, &["create", "namespace", "kubesphere-system"]).await;

        let ports = match tag.is_empty() {
            true => std::env::var("BENCH_CLUSTER_PORTS").unwrap_or_else(|_| "24600-24649".into()),
            false => "24650-24699".into(),
        };
        let proxy = variant.spawn(
            &format!("proxy{tag}"),
            "proxy",
            vec![
                "--host=127.0.0.1".into(),
                "--port=0".into(),
                format!("--kubeconfig={}", hkc.display()),
                "--advertise-address=127.0.0.1".into(),
                format!(
                    "--data-dir={}",
                    env.work.join(format!("proxy-data{tag}")).display()
                ),
                format!("--cluster-ports={ports}"),
                "--forward=bench=127.0.0.1:0".into(),
                "--connect-port=0".into(),
                "--log-format=json".into(),
                // The bulk uploads measure the tunnel, like the peers'
                // (which pace nothing): one client's request bodies are not
                // paced here (by default 8 MiB/s after 32 MiB).
                "--request-body-rate-per-source=0".into(),
            ],
        )?;
        let (agents_addr, forward, fingerprint) = started_proxy(&proxy).await?;
        let door = proxy
            .wait_for_line(
                |l| log_message_is(l, "CONNECT port listening (mutual TLS)"),
                Duration::from_secs(10),
            )
            .await?;
        let connect: SocketAddr = log_field(&door, "addr").context("addr")?.parse()?;

        let clusters = env.work.join(format!("clusters{tag}.yaml"));
        std::fs::write(&clusters, CLUSTERS)?;
        kubectl(hkc, &["apply", "-f", &clusters.display().to_string()]).await?;
        let mut tokens = Vec::new();
        for name in ["bench", "alpha"] {
            let token = connection_field(hkc, name, "token", Duration::from_secs(30)).await?;
            let file = env.work.join(format!("{name}{tag}.token"));
            std::fs::write(&file, token)?;
            tokens.push(file);
        }
        let alpha_token = tokens.pop().expect("two");
        let bench_token = tokens.pop().expect("two");

        let bench_agent = variant.spawn(
            &format!("agent-bench{tag}"),
            "agent",
            agent_args(
                "bench",
                &bench_token,
                agents_addr,
                &fingerprint,
                upstream_kubeconfig,
            ),
        )?;
        let alpha_agent = variant.spawn(
            &format!("agent-alpha{tag}"),
            "agent",
            agent_args(
                "alpha",
                &alpha_token,
                agents_addr,
                &fingerprint,
                member.kubeconfig(),
            ),
        )?;
        for a in [&bench_agent, &alpha_agent] {
            a.wait_for_line(
                |l| log_message_is(l, "connected to proxy"),
                Duration::from_secs(30),
            )
            .await?;
        }
        let bench_kubeconfig = published_kubeconfig(env, hkc, "bench", &tag).await?;
        let alpha_kubeconfig = published_kubeconfig(env, hkc, "alpha", &tag).await?;
        Ok(TowerRs {
            alpha_agent: Some(alpha_agent),
            bench_agent,
            proxy,
            agents_addr,
            forward,
            connect,
            fingerprint,
            alpha_token,
            alpha_kubeconfig,
            bench_kubeconfig,
        })
    }

    /// The https path (a) through this proxy: the bench Cluster's
    /// kubeconfig, named `name`.
    pub fn https_target(&self, name: &str) -> Result<Target> {
        let k = tls::from_kubeconfig(&self.bench_kubeconfig)?;
        Ok(Target {
            name: name.into(),
            addr: k.addr,
            tls: k.tls,
            server_name: k.server_name,
            procs: vec![self.proxy.pid(), self.bench_agent.pid()],
            via: None,
        })
    }

    /// Spawn the alpha agent (the previous one must be gone).
    pub fn spawn_alpha_agent(&self, member: &KubeCluster) -> Result<Proc> {
        spawn(
            "agent-alpha",
            &bin("agent"),
            &agent_args(
                "alpha",
                &self.alpha_token,
                self.agents_addr,
                &self.fingerprint,
                member.kubeconfig(),
            ),
        )
    }
}

pub fn agent_args(
    name: &str,
    token: &Path,
    proxy: SocketAddr,
    fingerprint: &str,
    kubeconfig: &Path,
) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--token-file={}", token.display()),
        format!("--proxy-server=http://{proxy}"),
        format!("--proxy-host-key-fingerprint={fingerprint}"),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--kubesphere-service=127.0.0.1:9".into(),
        "--log-format=json".into(),
    ]
}

/// `spec.connection.<field>` of Cluster `name`, once the proxy has written it.
async fn connection_field(
    host_kubeconfig: &Path,
    name: &str,
    field: &str,
    within: Duration,
) -> Result<String> {
    let jsonpath = format!("jsonpath={{.spec.connection.{field}}}");
    wait_for_ok(within, || async {
        let v = kubectl(host_kubeconfig, &["get", "cluster", name, "-o", &jsonpath]).await?;
        ensure!(!v.trim().is_empty(), "no {field} yet in Cluster {name}");
        Ok(v.trim().to_string())
    })
    .await
}

/// The kubeconfig the proxy wrote into Cluster `name`, saved as
/// `config_<name><tag>`.
async fn published_kubeconfig(
    env: &Env,
    host_kubeconfig: &Path,
    name: &str,
    tag: &str,
) -> Result<PathBuf> {
    let b64 =
        connection_field(host_kubeconfig, name, "kubeconfig", Duration::from_secs(60)).await?;
    let yaml = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("the Cluster's kubeconfig is not base64")?;
    let file = env.work.join(format!("config_{name}{tag}"));
    std::fs::write(&file, yaml)?;
    Ok(file)
}
