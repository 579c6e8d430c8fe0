//! The drift test of tests/helm.rs: charts/tower and config/ render the
//! same objects ([`chart_renders_what_config_renders`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{KubeCluster, workspace_root};

use super::{NS, kustomize, template};

/// Values config/ leaves as placeholders for the user to replace
/// (config/README.md): the drift test fills them the same way on both sides.
const ADDRESS: &str = "tower.example.com";
const NAME: &str = "alpha";

/// `kind/namespace/name` (namespace empty for cluster-scoped objects).
type Key = String;

/// The objects of a multi-document YAML stream, parsed by kubectl itself
/// (`create --dry-run=client -o json`: nothing is sent to the server, the
/// YAML is read exactly as `kubectl apply` reads it), by key.
fn objects(cluster: &KubeCluster, yaml: &str) -> Result<BTreeMap<Key, Value>> {
    let json = cluster.kubectl_input(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        yaml,
    )?;
    let mut out = BTreeMap::new();
    for doc in serde_json::Deserializer::from_str(&json).into_iter::<Value>() {
        let doc = doc.context("parsing kubectl's JSON")?;
        let items = match doc["kind"].as_str() {
            Some("List") => doc["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![doc],
        };
        for item in items {
            let key = format!(
                "{}/{}/{}",
                item["kind"].as_str().unwrap_or_default(),
                item["metadata"]["namespace"].as_str().unwrap_or_default(),
                item["metadata"]["name"].as_str().unwrap_or_default()
            );
            ensure!(
                out.insert(key.clone(), normalise(item)).is_none(),
                "{key} twice"
            );
        }
    }
    Ok(out)
}

/// Label keys Helm's conventions add to the chart's objects' metadata
/// (`helm.sh/chart`, `app.kubernetes.io/managed-by`, `.../name`,
/// `.../instance`, `.../version`, `.../component`).
const HELM_LABELS: [&str; 2] = ["helm.sh/", "app.kubernetes.io/"];

/// What the drift test compares of an object: everything, except the
/// labels Helm adds to `metadata.labels` ([`HELM_LABELS`]; only there: the
/// pod templates' labels and the selectors must be equal) and lists that
/// are empty or values that are null (kustomize's `$patch: delete` leaves
/// `volumeMounts: []` where the chart leaves the field out; both mean
/// none).
fn normalise(mut obj: Value) -> Value {
    if let Some(labels) = obj
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.retain(|k, _| !HELM_LABELS.iter().any(|p| k.starts_with(p)));
    }
    prune(&mut obj);
    obj
}

fn prune(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                prune(child);
            }
            map.retain(|_, c| !(c.is_null() || c.as_array().is_some_and(Vec::is_empty)));
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

/// Equal object sets, or an error naming each object that differs and how.
fn same(what: &str, config: &BTreeMap<Key, Value>, chart: &BTreeMap<Key, Value>) -> Result<()> {
    let mut problems = Vec::new();
    for (key, want) in config {
        match chart.get(key) {
            None => problems.push(format!("{key}: in config/, not rendered by the chart")),
            Some(got) if got != want => problems.push(format!(
                "{key} differs at {}",
                difference(want, got, String::new())
            )),
            Some(_) => {}
        }
    }
    for key in chart.keys().filter(|k| !config.contains_key(*k)) {
        problems.push(format!("{key}: rendered by the chart, not in config/"));
    }
    if !problems.is_empty() {
        bail!(
            "{what}: charts/tower and config/ have drifted apart (change both):\n{}",
            problems.join("\n")
        );
    }
    Ok(())
}

/// Where `a` (config/) and `b` (the chart) first differ: a JSON path and
/// both values there.
fn difference(a: &Value, b: &Value, at: String) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()) {
                let (u, v) = (&x.get(key), &y.get(key));
                if u != v {
                    return match (u, v) {
                        (Some(u), Some(v)) => difference(u, v, format!("{at}.{key}")),
                        _ => format!("{at}.{key}: config/ {u:?}, chart {v:?}"),
                    };
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                if u != v {
                    return difference(u, v, format!("{at}[{i}]"));
                }
            }
        }
        _ => {}
    }
    format!("{at}: config/ {a}, chart {b}")
}

/// config/ with its placeholders filled as a user fills them (sed).
fn filled(yaml: &str) -> String {
    yaml.replace("PROXY_ADDRESS", ADDRESS)
        .replace("CLUSTER_NAME", NAME)
}

/// The drift test. The chart and config/ must render the same objects
/// (same kind, namespace and name, no more, no fewer) with the same
/// content, compared as parsed by kubectl after [`normalise`]: the labels
/// Helm adds to `metadata.labels` are dropped, empty lists and nulls are
/// dropped; everything else (spec, rules, subjects, roleRef, the pod
/// template with its labels, command, env, probes, resources, security
/// contexts, CRD schemas, annotations) must be equal.
///
/// The chart is rendered with its default values, `--include-crds`, and only
/// the values config/ leaves as placeholders for the user
/// (`PROXY_ADDRESS`, `CLUSTER_NAME`), which are filled with the same values
/// on both sides:
///
/// | config/ | chart values |
/// |---|---|
/// | `crd` + `proxy` | `proxy.publishServiceAddress` |
/// | `agent` | `mode=agent`, `agent.clusterName`, `agent.proxyServer` |
/// | `agent-registration` | the same with `agent.registration.enabled=true`, no name |
/// | `agent` with `impersonate-rbac.yaml` instead of `rbac.yaml` | `agent.access=impersonate` |
///
/// `config/namespace` holds the namespace only, which the chart leaves to
/// `helm install --create-namespace`: it must stay exactly
/// `kubesphere-system` with nothing else set. The CRD files are also
/// checked byte for byte (`charts/tower/crds/` is a copy of
/// `config/crd/bases/`). So an edit to any file of config/ that the chart
/// does not follow fails here, and the other way round.
pub fn chart_renders_what_config_renders(home: &Path, cluster: &KubeCluster) -> Result<()> {
    // The CRDs: Helm installs charts/tower/crds/ as they are.
    let bases = workspace_root().join("config/crd/bases");
    let crds = workspace_root().join("charts/tower/crds");
    let mut names: Vec<String> = std::fs::read_dir(&bases)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    names.sort();
    let mut copied: Vec<String> = std::fs::read_dir(&crds)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    copied.sort();
    ensure!(
        names == copied,
        "charts/tower/crds/ holds {copied:?}, config/crd/bases/ {names:?}: copy them over"
    );
    for name in &names {
        ensure!(
            std::fs::read(bases.join(name))? == std::fs::read(crds.join(name))?,
            "charts/tower/crds/{name} differs from config/crd/bases/{name}: cp config/crd/bases/{name} charts/tower/crds/"
        );
    }

    let address = format!("proxy.publishServiceAddress={ADDRESS}");
    let proxy_server = format!("agent.proxyServer=http://{ADDRESS}:8080");
    let name = format!("agent.clusterName={NAME}");

    let mut config = objects(cluster, &filled(&kustomize("crd")?))?;
    config.extend(objects(cluster, &filled(&kustomize("proxy")?))?);
    let chart = objects(
        cluster,
        &template(home, &["--include-crds", "--set", &address])?,
    )?;
    same("config/crd + config/proxy", &config, &chart)?;

    let agent_config = objects(cluster, &filled(&kustomize("agent")?))?;
    let agent_chart = objects(
        cluster,
        &template(
            home,
            &[
                "--set",
                "mode=agent",
                "--set",
                &name,
                "--set",
                &proxy_server,
            ],
        )?,
    )?;
    same("config/agent", &agent_config, &agent_chart)?;

    let registration = objects(cluster, &filled(&kustomize("agent-registration")?))?;
    let registration_chart = objects(
        cluster,
        &template(
            home,
            &[
                "--set",
                "mode=agent",
                "--set",
                "agent.registration.enabled=true",
                "--set",
                &proxy_server,
            ],
        )?,
    )?;
    same(
        "config/agent-registration",
        &registration,
        &registration_chart,
    )?;

    let mut impersonate = agent_config.clone();
    ensure!(
        impersonate
            .remove("ClusterRoleBinding//tower-agent")
            .is_some(),
        "config/agent has no ClusterRoleBinding tower-agent"
    );
    let file =
        std::fs::read_to_string(workspace_root().join("config/agent/impersonate-rbac.yaml"))?;
    impersonate.extend(objects(cluster, &file)?);
    let impersonate_chart = objects(
        cluster,
        &template(
            home,
            &[
                "--set",
                "mode=agent",
                "--set",
                "agent.access=impersonate",
                "--set",
                &name,
                "--set",
                &proxy_server,
            ],
        )?,
    )?;
    same(
        "config/agent with impersonate-rbac.yaml",
        &impersonate,
        &impersonate_chart,
    )?;

    let namespace = objects(cluster, &kustomize("namespace")?)?;
    let want = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NS},
    });
    ensure!(
        namespace.len() == 1 && namespace.get(&format!("Namespace//{NS}")) == Some(&want),
        "config/namespace changed ({namespace:?}): the chart leaves the namespace to \
         helm install --create-namespace; carry the change into charts/tower and this test"
    );
    Ok(())
}
