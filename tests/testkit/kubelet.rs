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
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Container, Namespace, Pod, PodSpec, ServiceAccount};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::cluster::KubeCluster;
use crate::wait::wait_for_ok;

/// The Node the kubelet stand-in registers (Ready, InternalIP 127.0.0.1).
pub const HARNESS_NODE: &str = "harness-node";

/// The container of the pods [`KubeCluster::run_pod`] makes.
pub const POD_CONTAINER: &str = "main";

/// How long a new pod may take to be marked Running.
const POD_RUNNING: Duration = Duration::from_secs(60);

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        ..Default::default()
    }
}

/// Creates `obj` unless it exists.
async fn ensure_exists<K>(api: &Api<K>, obj: &K) -> Result<()>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl KubeCluster {
    /// Creates pod `namespace/name` with one container, [`POD_CONTAINER`],
    /// bound to [`HARNESS_NODE`] (and the namespace and its `default`
    /// service account if missing: no controllers run in the harness), and
    /// waits until the stand-in has marked it Running and ready. Needs a
    /// cluster started with `--kubelet`.
    pub async fn run_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let client = self.client().await?;
        ensure_exists(
            &Api::<Namespace>::all(client.clone()),
            &Namespace {
                metadata: meta(namespace, None),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating namespace {namespace}"))?;
        ensure_exists(
            &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
            &ServiceAccount {
                metadata: meta("default", Some(namespace)),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating service account {namespace}/default"))?;
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let pod = Pod {
            metadata: meta(name, Some(namespace)),
            spec: Some(PodSpec {
                node_name: Some(HARNESS_NODE.to_string()),
                automount_service_account_token: Some(false),
                termination_grace_period_seconds: Some(0),
                containers: vec![Container {
                    name: POD_CONTAINER.to_string(),
                    image: Some("kube-harness/local-process".to_string()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        wait_for_ok(POD_RUNNING, || async {
            let pod = pods.get(name).await?;
            let status = pod.status.unwrap_or_default();
            ensure!(
                status.phase.as_deref() == Some("Running"),
                "pod {namespace}/{name} is {:?} (is the cluster running with --kubelet?)",
                status.phase
            );
            ensure!(
                status
                    .container_statuses
                    .unwrap_or_default()
                    .iter()
                    .all(|c| c.ready),
                "pod {namespace}/{name}: containers not ready"
            );
            Ok(())
        })
        .await
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
