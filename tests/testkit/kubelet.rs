//! Pods on the kubelet stand-in of `kube-harness --kubelet`
//! ([`KubeCluster::start_with_args`]`(name, &["--kubelet"])`): a Node,
//! [`HARNESS_NODE`], whose "containers" are local processes served by the real
//! kubelet streaming library, so `kubectl exec`, `attach`, `cp`,
//! `port-forward` and `logs -f` work against it.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let member = e2e::KubeCluster::start_with_args("member", &["--kubelet"]).await?;
//! member.run_pod("default", "box").await?;
//! let out = member.kubectl_ok(&["exec", "box", "--", "sh", "-c", "echo hi"]);
//! assert_eq!(out, "hi\n");
//! // exec runs in the container's directory: relative paths land there
//! member.kubectl_ok(&["exec", "box", "--", "sh", "-c", "echo x > f"]);
//! assert!(member.container_dir("default", "box", "main").join("f").is_file());
//! # Ok(()) }
//! ```
//!
//! * Exec runs the command as a local process in [`KubeCluster::container_dir`]
//!   (a real `sh`, `tar`, ...; the rest of the filesystem is the machine's).
//! * Attach starts `cat` (stdin echoed to stdout), or with no stdin follows
//!   the container's log.
//! * Port-forward to port P dials 127.0.0.1:P.
//! * Logs: [`KubeCluster::container_log`] gets a line every 100 ms; tests may
//!   append to it as well.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::serde_json::{self, Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::cluster::KubeCluster;
use crate::wait::wait_for_ok;

/// The Node the kubelet stand-in registers (Ready, InternalIP 127.0.0.1).
pub const HARNESS_NODE: &str = "harness-node";

/// The container of the pods [`KubeCluster::run_pod`] makes.
pub const POD_CONTAINER: &str = "main";

/// How long a new pod may take to be marked Running.
const POD_RUNNING: Duration = Duration::from_secs(60);

impl KubeCluster {
    /// Creates pod `namespace/name` with one container, [`POD_CONTAINER`],
    /// bound to [`HARNESS_NODE`] (and the namespace and its `default`
    /// service account if missing: no controllers run in the harness), and
    /// waits until the stand-in has marked it Running and ready. Needs a
    /// cluster started with `--kubelet`.
    pub async fn run_pod(&self, namespace: &str, name: &str) -> Result<()> {
        // Through kubectl, so that it works for a member in its own network
        // namespace too ([`KubeCluster::start_isolated`]).
        let objects = json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                {"apiVersion": "v1", "kind": "ServiceAccount",
                 "metadata": {"name": "default", "namespace": namespace}},
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": name, "namespace": namespace},
                 "spec": {
                     "nodeName": HARNESS_NODE,
                     "automountServiceAccountToken": false,
                     "terminationGracePeriodSeconds": 0,
                     "containers": [{"name": POD_CONTAINER, "image": "kube-harness/local-process"}]
                 }}
            ]
        });
        self.kubectl_async(&["apply", "-f", "-"], Some(objects.to_string()))
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        wait_for_ok(POD_RUNNING, || async {
            let pod: Value = serde_json::from_str(
                &self
                    .kubectl_async(&["-n", namespace, "get", "pod", name, "-o", "json"], None)
                    .await?,
            )?;
            let status = &pod["status"];
            ensure!(
                status["phase"] == "Running",
                "pod {namespace}/{name} is {} (is the cluster running with --kubelet?)",
                status["phase"]
            );
            let statuses = status["containerStatuses"].as_array();
            ensure!(
                statuses.is_some_and(|c| c.iter().all(|c| c["ready"] == true)),
                "pod {namespace}/{name}: containers not ready"
            );
            Ok(())
        })
        .await
    }

    /// kubectl with `args` (and `input` on stdin) that must succeed; its stdout.
    async fn kubectl_async(&self, args: &[&str], input: Option<String>) -> Result<String> {
        let mut cmd = self.kubectl_command();
        cmd.args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running kubectl (set KUBECTL?)")?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        ensure!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The working directory of a container on the kubelet stand-in: exec'd
    /// commands run there (`kubectl cp f pod:f` lands in it).
    pub fn container_dir(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        self.dir()
            .join("kubelet")
            .join("pods")
            .join(namespace)
            .join(pod)
            .join(container)
    }

    /// The log file of a container on the kubelet stand-in (what `kubectl
    /// logs` shows): the stand-in appends a line every 100 ms.
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        let mut p = self
            .container_dir(namespace, pod, container)
            .into_os_string();
        p.push(".log");
        PathBuf::from(p)
    }
}
