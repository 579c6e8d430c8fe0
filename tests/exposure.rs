//! LoadBalancer exposure and metrics (issue #6, parts 1 and 3) on real
//! apiservers: the proxy turns `externalKubeAPIEnabled` plus Tower's annotation
//! into a LoadBalancer Service, writes the endpoint once the "cloud" (the test,
//! patching the Service status) gives it an address, re-issues the port's
//! certificate for it, and stops writing once nothing changes.

use std::time::Duration;

use anyhow::{Context, Result};
use e2e::metric_sample as sample;
use e2e::{CLUSTER, Tower, TowerOptions, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
const LB_ANNOTATION: &str = "tower.kubesphere.io/external-lb-service-annoations";
const LB_IP: &str = "203.0.113.7";

fn jsonpath(tower: &Tower, what: &str, path: &str) -> String {
    let mut args = vec!["get"];
    args.extend(what.split(' '));
    let expr = format!("jsonpath={path}");
    args.extend(["-o", &expr]);
    let out = tower.host().kubectl(&args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// PATCH requests the host apiserver served for `resource`, from its own metrics.
fn patches(tower: &Tower, resource: &str) -> u64 {
    let metrics = tower.host().kubectl_ok(&["get", "--raw", "/metrics"]);
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("verb=\"PATCH\"") && l.contains(&format!("resource=\"{resource}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The subjectAltName line of the certificate the cluster port serves.
fn served_sans(port: u16) -> Result<String> {
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName"
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Cluster's spec and status, but for the heartbeat.
fn cluster_without_heartbeat(tower: &Tower) -> Result<e2e::k8s_openapi::serde_json::Value> {
    let text = tower
        .host()
        .kubectl_ok(&["get", "cluster", CLUSTER, "-o", "json"]);
    let mut c: e2e::k8s_openapi::serde_json::Value = e2e::k8s_openapi::serde_json::from_str(&text)?;
    if let Some(status) = c["status"].as_object_mut() {
        status.remove("lastHeartbeatTime");
    }
    Ok(e2e::k8s_openapi::serde_json::json!({"spec": c["spec"], "status": c["status"]}))
}

async fn metrics(tower: &Tower) -> Result<String> {
    e2e::scrape_metrics("127.0.0.1", tower.proxy_port()).await
}

/// Waits for an Event of `type_` with `reason` on the host: Events are
/// written behind the status they go with.
async fn event_appears(tower: &Tower, type_: &str, reason: &str) -> Result<()> {
    let selector = format!("type={type_}");
    let events = || {
        tower
            .host()
            .kubectl_ok(&["get", "events", "-A", "--field-selector", &selector])
    };
    wait_until(DEADLINE, || async { events().contains(reason) })
        .await
        .with_context(|| format!("no {type_} {reason} Event: {}", events()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_exposure_follows_the_cluster() -> Result<()> {
    let tower = Tower::start_with(TowerOptions {
        kubelet: false,
        ..Default::default()
    })
    .await?;
    let host = tower.host();
    let svc = "svc/mc-alpha";

    host.kubectl_ok(&[
        "annotate",
        "cluster",
        CLUSTER,
        "--overwrite",
        &format!("{LB_ANNOTATION}={{\"example.com/lb-class\":\"internal\"}}"),
    ]);
    host.kubectl_ok(&[
        "patch",
        "cluster",
        CLUSTER,
        "--type=merge",
        "-p",
        r#"{"spec":{"externalKubeAPIEnabled":true}}"#,
    ]);
    wait_until(DEADLINE, || async {
        jsonpath(
            &tower,
            &format!("-n kubesphere-system {svc}"),
            "{.spec.type} {.metadata.annotations.example\\.com/lb-class}",
        ) == "LoadBalancer internal"
    })
    .await
    .context("mc-alpha did not become an annotated LoadBalancer")?;
    wait_until(DEADLINE, || async {
        jsonpath(
            &tower,
            &format!("cluster {CLUSTER}"),
            "{.status.conditions[?(@.type==\"ExternalAccessReady\")].reason}",
        ) == "WaitingForLoadBalancer"
    })
    .await?;

    // Play the cloud controller: the load balancer gets an address.
    host.kubectl_ok(&[
        "-n",
        "kubesphere-system",
        "patch",
        svc,
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{LB_IP}"}}]}}}}}}"#),
    ]);
    wait_until(DEADLINE, || async {
        jsonpath(
            &tower,
            &format!("cluster {CLUSTER}"),
            "{.spec.connection.externalKubernetesAPIEndpoint} {.status.conditions[?(@.type==\"ExternalAccessReady\")].status}",
        ) == format!("https://{LB_IP}:6443 True")
    })
    .await
    .context("the external endpoint was not written")?;
    let port = tower.kube_port();
    wait_until(DEADLINE, || async {
        served_sans(port).is_ok_and(|s| s.contains(LB_IP))
    })
    .await
    .context("the port's certificate does not cover the load balancer address")?;
    event_appears(&tower, "Normal", "LoadBalancerReady").await?;

    // Nothing changes from here: no more writes to the Cluster or the Service,
    // except the coarse heartbeat (status.lastHeartbeatTime, at most about
    // once a minute), which may fall into the window.
    let heartbeat = || {
        jsonpath(
            &tower,
            &format!("cluster {CLUSTER}"),
            "{.status.lastHeartbeatTime}",
        )
    };
    let (clusters, services, beat) = (
        patches(&tower, "clusters"),
        patches(&tower, "services"),
        heartbeat(),
    );
    let unchanged = cluster_without_heartbeat(&tower)?;
    let still = wait_until(Duration::from_secs(5), || async {
        let writes = patches(&tower, "clusters") - clusters;
        let beats = u64::from(heartbeat() != beat);
        patches(&tower, "services") != services || writes > beats
    })
    .await;
    assert!(
        still.is_err(),
        "an unchanged cluster was written again: rewrite loop"
    );
    assert_eq!(cluster_without_heartbeat(&tower)?, unchanged);

    // Invalid JSON in the annotation is reported, not a crash.
    host.kubectl_ok(&[
        "annotate",
        "cluster",
        CLUSTER,
        "--overwrite",
        &format!("{LB_ANNOTATION}=not json"),
    ]);
    wait_until(DEADLINE, || async {
        jsonpath(
            &tower,
            &format!("cluster {CLUSTER}"),
            "{.status.conditions[?(@.type==\"ExternalAccessReady\")].reason}",
        ) == "InvalidAnnotation"
    })
    .await?;
    event_appears(&tower, "Warning", "InvalidAnnotation").await?;
    assert!(tower.config_alpha().exists());
    tower.kubectl_ok(&["get", "ns"]).await?;

    // Switched off: back to ClusterIP, endpoint gone.
    host.kubectl_ok(&[
        "patch",
        "cluster",
        CLUSTER,
        "--type=merge",
        "-p",
        r#"{"spec":{"externalKubeAPIEnabled":false}}"#,
    ]);
    wait_until(DEADLINE, || async {
        jsonpath(
            &tower,
            &format!("-n kubesphere-system {svc}"),
            "{.spec.type}",
        ) == "ClusterIP"
            && jsonpath(
                &tower,
                &format!("cluster {CLUSTER}"),
                "{.spec.connection.externalKubernetesAPIEndpoint}",
            )
            .is_empty()
    })
    .await
    .context("exposure was not switched off")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_when_traffic_flows() -> Result<()> {
    let tower = Tower::start_with(TowerOptions {
        kubelet: false,
        ..Default::default()
    })
    .await?;
    let bytes = r#"tower_tunnel_bytes_total{cluster="alpha""#;
    let requests = r#"tower_request_duration_seconds_count{cluster="alpha"}"#;
    let before = metrics(&tower).await?;
    assert!(
        before.contains(r#"tower_agent_sessions{cluster="alpha"} 1"#),
        "{before}"
    );
    assert!(
        before.contains("tower_certificate_expiry_timestamp_seconds"),
        "{before}"
    );
    for _ in 0..5 {
        tower.kubectl_ok(&["get", "ns"]).await?;
    }
    let after = metrics(&tower).await?;
    assert!(sample(&after, bytes) > sample(&before, bytes), "{after}");
    assert!(
        sample(&after, requests) >= sample(&before, requests) + 5.0,
        "{after}"
    );
    Ok(())
}
