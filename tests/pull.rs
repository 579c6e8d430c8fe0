//! Pull mode (issue #11, part 4): a process on the member side reaches the
//! HOST cluster's kube-apiserver through the agent's `--hub-listen` listener
//! and the tunnel, with the host's own credentials; the proxy publishes it
//! with `--hub-service hub-api=...`, Cluster alpha opts in with the
//! annotation `tower.kubesphere.io/hub-services`.
//!
//! - the real kubectl lists namespaces on the host and `get -w` sees one
//!   created there;
//! - before the annotation, after its removal, and for a name the proxy does
//!   not publish, the connection is refused: the agent logs the proxy's
//!   reason and `tower_hub_refusals_total` counts it;
//! - an agent whose listener address is taken fails at start, naming the flag.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{
    HOST_SERVER, Proc, Tower, TowerOptions, bin, clean_env, free_port, kubectl_binary,
    metric_sample, scrape_metrics, wait_until,
};
use tokio::process::Command;

const SOON: Duration = Duration::from_secs(60);
const ANNOTATION: &str = "tower.kubesphere.io/hub-services";

/// kubectl with the host's admin kubeconfig, but through `server`.
fn kubectl_via(tower: &Tower, server: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(kubectl_binary());
    cmd.arg("--kubeconfig")
        .arg(tower.host().kubeconfig())
        .arg(format!("--server=https://{server}"))
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    clean_env(&mut cmd);
    cmd
}

async fn metric(tower: &Tower, prefix: &str) -> Result<f64> {
    let text = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    Ok(metric_sample(&text, prefix))
}

/// Wait until the agent logged a refusal whose reason contains `text`, and
/// the proxy counted one more refusal for `reason` than `before`.
async fn refused(tower: &Tower, text: &str, reason: &str, before: f64) -> Result<()> {
    tower
        .agent()
        .wait_for_line(
            |l| l.contains("hub connection refused") && l.contains(text),
            SOON,
        )
        .await?;
    let series = format!("tower_hub_refusals_total{{cluster=\"alpha\",reason=\"{reason}\"}}");
    wait_until(SOON, || async {
        metric(tower, &series).await.is_ok_and(|n| n > before)
    })
    .await
    .with_context(|| format!("{series} did not grow"))
}

#[tokio::test]
async fn member_side_kubectl_lists_and_watches_the_host() -> Result<()> {
    let (hub, unpublished) = (free_port(), free_port());
    let hub_addr = format!("127.0.0.1:{hub}");
    let tower = Tower::start_with(TowerOptions {
        kubelet: false,
        proxy_args: vec![format!("--hub-service=hub-api={HOST_SERVER}")],
        agent_args: vec![
            format!("--hub-listen=hub-api={hub_addr}"),
            format!("--hub-listen=nope=127.0.0.1:{unpublished}"),
        ],
        ..Default::default()
    })
    .await?;
    let host = tower.host();
    let list = || async {
        kubectl_via(
            &tower,
            &hub_addr,
            &["get", "ns", "kube-system", "-o", "name"],
        )
        .output()
        .await
    };

    // No annotation yet: refused, and the agent says why. kubectl fails at
    // once on the agent's TLS alert, not after client-go's retries of a
    // closed connection.
    let out = list().await?;
    ensure!(
        !out.status.success(),
        "listed without the annotation: {out:?}"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("tls: access denied"),
        "the refusal did not reach kubectl as a TLS alert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(
        &tower,
        "cluster alpha does not opt in to hub services (annotation tower.kubesphere.io/hub-services)",
        "not_opted_in",
        0.0,
    )
    .await?;

    // Opt in; the proxy reads the annotation for every channel.
    host.kubectl_ok(&[
        "annotate",
        "cluster",
        "alpha",
        &format!("{ANNOTATION}=hub-api"),
    ]);
    wait_until(SOON, || async {
        list()
            .await
            .is_ok_and(|o| o.status.success() && o.stdout == b"namespace/kube-system\n")
    })
    .await
    .context("kubectl through the hub listener never listed the host's namespaces")?;

    // A watch through the tunnel sees a namespace created on the host.
    let mut watch = kubectl_via(&tower, &hub_addr, &["get", "ns", "-w", "-o", "name"]);
    watch.arg("--request-timeout=0");
    let watch = Proc::spawn("watch", watch)?;
    watch
        .wait_for_line(|l| l == "namespace/kube-system", SOON)
        .await?;
    host.kubectl_ok(&["create", "ns", "pulled"]);
    watch
        .wait_for_line(|l| l == "namespace/pulled", SOON)
        .await
        .context("the watch through the hub listener missed namespace/pulled")?;
    drop(watch);
    let streams = "tower_hub_streams_total{cluster=\"alpha\",service=\"hub-api\"}";
    ensure!(metric(&tower, streams).await? >= 2.0, "{streams} < 2");
    let from_hub =
        "tower_hub_bytes_total{cluster=\"alpha\",service=\"hub-api\",direction=\"from_hub\"}";
    wait_until(SOON, || async {
        metric(&tower, from_hub).await.is_ok_and(|n| n > 0.0)
    })
    .await
    .with_context(|| format!("{from_hub} stayed 0"))?;

    // A name the proxy does not publish.
    let out = kubectl_via(&tower, &format!("127.0.0.1:{unpublished}"), &["get", "ns"])
        .output()
        .await?;
    ensure!(!out.status.success(), "an unpublished name worked: {out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("tls: access denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(
        &tower,
        "hub service \"nope\" is not published",
        "not_published",
        0.0,
    )
    .await?;

    // Opting out applies to the next connection, without a reconnect.
    let series = "tower_hub_refusals_total{cluster=\"alpha\",reason=\"not_opted_in\"}";
    let before = metric(&tower, series).await?;
    host.kubectl_ok(&["annotate", "cluster", "alpha", &format!("{ANNOTATION}-")]);
    wait_until(SOON, || async {
        list().await.is_ok_and(|o| !o.status.success())
    })
    .await
    .context("still listed after the annotation was removed")?;
    refused(&tower, "does not opt in", "not_opted_in", before).await?;
    ensure!(
        !tower
            .agent()
            .lines()
            .iter()
            .any(|l| l.contains("tunnel lost")),
        "the refusals cost the tunnel"
    );
    Ok(())
}

#[tokio::test]
async fn a_taken_listen_address_fails_the_start() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let mut cmd = Command::new(bin("agent"));
    cmd.args([
        "--name=alpha",
        "--token=t",
        "--kubernetes-service=127.0.0.1:9",
    ])
    .arg(format!("--hub-listen=hub-api={addr}"));
    clean_env(&mut cmd);
    let mut agent = Proc::spawn("agent", cmd)?;
    // The line first: the exit can be seen before its output was read.
    let reason = format!("cannot listen on --hub-listen hub-api={addr}");
    agent
        .wait_for_line(|l| l.contains(&reason), SOON)
        .await
        .context("no reason naming the flag")?;
    let status = agent.wait(SOON).await?;
    ensure!(!status.success(), "the agent started: {status}");
    Ok(())
}
