//! More member clusters for a running [`Tower`]: Clusters created on the
//! host, one `bin/agent` each (all serving the same member kube-apiserver,
//! which is all a test of the proxy's side needs), and the kubeconfigs the
//! proxy publishes for them. For tests of many clusters at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::serde_json::{self, Value, json};

use crate::proc::Proc;
use crate::tower::{Tower, agent_args, agent_program, b64_decode, checked, run_kubectl};
use crate::wait::wait_for_ok;

const SETTLE: Duration = Duration::from_secs(180);

/// A Cluster served through the proxy, as [`Tower::join`] creates them.
pub fn proxy_cluster(name: &str) -> Value {
    json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {"joinFederation": true, "connection": {"type": "proxy"}}
    })
}

/// `status.conditions[type=kind].status` of a Cluster ("True", "False"),
/// if written.
pub fn cluster_condition(cluster: &Value, kind: &str) -> Option<String> {
    cluster["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str())
        .map(str::to_string)
}

/// A cluster [`Tower::join`] added: its agent runs while this lives.
pub struct Joined {
    pub name: String,
    /// The kubeconfig from its Cluster's `spec.connection.kubeconfig`.
    pub kubeconfig: PathBuf,
    pub agent: Proc,
}

impl Tower {
    /// Create Cluster `name` on the host and start no agent for it (the
    /// test plays it); the proxy gives it a token and ports meanwhile.
    pub fn create_cluster(&self, name: &str) -> Result<()> {
        self.host()
            .kubectl_input(&["create", "-f", "-"], &proxy_cluster(name).to_string())?;
        Ok(())
    }

    /// Create a Cluster for each of `names`, start an agent for each once
    /// the proxy gave it a token, and wait until every one is AgentAvailable
    /// with a published kubeconfig (written to the Tower's directory).
    pub async fn join(&self, names: &[String]) -> Result<Vec<Joined>> {
        let host_kc = self.host().kubeconfig().to_path_buf();
        let items: Vec<Value> = names.iter().map(|name| proxy_cluster(name)).collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
        let args = ["create", "-f", "-"];
        checked(
            &args,
            run_kubectl(Some(&host_kc), &args, Some(list.as_bytes()), &[]).await?,
        )?;
        let clusters = || async {
            let args = ["get", "clusters", "-o", "json"];
            let out = checked(&args, run_kubectl(Some(&host_kc), &args, None, &[]).await?)?;
            let list: Value = serde_json::from_str(&out).context("parsing the Clusters")?;
            let by_name: BTreeMap<String, Value> = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| Some((c["metadata"]["name"].as_str()?.to_string(), c.clone())))
                .collect();
            Ok::<_, anyhow::Error>(by_name)
        };
        let field = |c: &Value, name: &str| {
            c["spec"]["connection"][name]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let tokens = wait_for_ok(SETTLE, || async {
            let all = clusters().await?;
            names
                .iter()
                .map(|name| {
                    let token = all.get(name).map(|c| field(c, "token")).unwrap_or_default();
                    ensure!(!token.is_empty(), "Cluster {name} has no token yet");
                    Ok(token)
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let mut agents = Vec::new();
        for (name, token) in names.iter().zip(tokens) {
            std::fs::write(self.dir().join(format!("{name}.token")), token)?;
            agents.push(self.spawn_agent(name)?);
        }
        let kubeconfigs = wait_for_ok(SETTLE, || async {
            let all = clusters().await?;
            names
                .iter()
                .map(|name| {
                    let c = all.get(name).context("gone")?;
                    let available = c["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True");
                    let kubeconfig = field(c, "kubeconfig");
                    ensure!(
                        available && !kubeconfig.is_empty(),
                        "Cluster {name}: no agent available and kubeconfig yet"
                    );
                    Ok(kubeconfig)
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .context("the joined clusters never all got AgentAvailable=True and a kubeconfig")?;
        let mut joined = Vec::new();
        for ((name, b64), agent) in names.iter().zip(kubeconfigs).zip(agents) {
            let kubeconfig = self.dir().join(format!("config_{name}"));
            std::fs::write(&kubeconfig, b64_decode(&b64)?)?;
            joined.push(Joined {
                name: name.clone(),
                kubeconfig,
                agent,
            });
        }
        Ok(joined)
    }
}

impl Tower {
    /// Another `bin/agent` for a cluster [`Tower::join`] added (its token
    /// is in the Tower's directory), output collected but not echoed; it is
    /// not waited for (see [`Proc::wait_for_line`] `connected to proxy`).
    pub fn spawn_agent(&self, name: &str) -> Result<Proc> {
        let token_file = self.dir().join(format!("{name}.token"));
        ensure!(
            token_file.is_file(),
            "cluster {name} was not joined: no {}",
            token_file.display()
        );
        let mut cmd = agent_program(self.member_net());
        cmd.args(agent_args(
            name,
            &token_file,
            self.proxy_port(),
            self.fingerprint(),
            self.member(),
            self.member_net(),
        ));
        Proc::spawn_quiet(&format!("agent-{name}"), cmd)
    }
}

impl crate::cluster::KubeCluster {
    /// On a host: wait until Cluster `name` is AgentAvailable with a
    /// published kubeconfig, and return that kubeconfig (decoded).
    pub async fn available_kubeconfig(&self, name: &str, timeout: Duration) -> Result<Vec<u8>> {
        let b64 = wait_for_ok(timeout, || async {
            let c: Value =
                serde_json::from_str(&self.kubectl_ok(&["get", "cluster", name, "-o", "json"]))?;
            let available = c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "AgentAvailable" && c["status"] == "True");
            let kubeconfig = c["spec"]["connection"]["kubeconfig"]
                .as_str()
                .unwrap_or_default();
            ensure!(
                available && !kubeconfig.is_empty(),
                "Cluster {name}: no agent available or no kubeconfig yet"
            );
            Ok(kubeconfig.to_string())
        })
        .await?;
        b64_decode(&b64)
    }
}
