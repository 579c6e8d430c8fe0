//! A valid agent that reconnects in a loop (a crash-looping agent, a link
//! that drops every few hundred milliseconds) costs its Cluster at most one
//! reconcile pass and one status refresh a second (issue #14 part 5;
//! `proxy/src/clusters/damp.rs`), and the status ends as the sessions do.
//!
//! The agent is the adversarial tests' rogue with beta's valid token: it logs
//! in as Tower's agents do and disconnects, [`FLAPS`] times back to back, then
//! once more and stays until the status says so, then leaves. The
//! writes to Clusters are what the host kube-apiserver counts itself
//! (`apiserver_request_total`). Each session change used to be followed by a
//! pass and a refresh: a Cluster write and an Event per change, 41 and 40
//! here; with the damper 5 and 4.
//!
//! With `--leader-elect` the replica also records itself as the holder of
//! the cluster's Lease while it has a session; it releases the Lease only
//! after a second without one (`proxy/src/ha/owners`, `RELEASE_GRACE`), so
//! the same flapping costs one claim, not a claim and a release per session
//! (the Lease's `leaseTransitions` counts the claims after the first).
//!
//! Run: `make build harness && cargo test -p e2e --release --test flapping`.

#[allow(dead_code)]
#[path = "adversarial/peers.rs"]
mod peers;
#[allow(dead_code)]
#[path = "adversarial/rogue.rs"]
mod rogue;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::k8s_openapi::serde_json::{self, Value};
use e2e::{
    Tower, TowerOptions, apiserver_writes, cluster_condition, free_port, metric_sample,
    scrape_metrics, wait_for_ok, writes_between,
};

const SOON: Duration = Duration::from_secs(60);
/// Sessions of the flapping agent, and how long each lasts: long enough
/// for each change to get a pass of its own without the damper (back to
/// back logins merge in the controller's queue while a pass waits for its
/// probe), short enough to change several times a second.
const FLAPS: usize = 20;
const HOLD: Duration = Duration::from_millis(300);
/// The damper's interval (`proxy/src/clusters/damp.rs`, `INTERVAL`).
const INTERVAL: Duration = Duration::from_secs(1);
/// Writes of one follow-up at most: the pass's (its conditions) and the
/// refresh's (what the member says) when it cannot ride with the pass; and
/// the pass's Events (`AgentAvailable`'s transition, `ExternalAccessReady`'s).
const WRITES_PER_FOLLOW_UP: u64 = 2;
const EVENTS_PER_FOLLOW_UP: u64 = 2;

/// Every write the host apiserver counted so far, per `VERB resource`.
fn writes(tower: &Tower) -> BTreeMap<String, u64> {
    apiserver_writes(&tower.host().kubectl_ok(&["get", "--raw", "/metrics"]))
}

/// Of `writes`, those of `resource` (refused ones included).
fn of(writes: &BTreeMap<String, u64>, resource: &str) -> u64 {
    writes
        .iter()
        .filter(|(key, _)| key.split(' ').nth(1) == Some(resource))
        .map(|(_, n)| n)
        .sum()
}

fn beta(tower: &Tower) -> Result<Value> {
    let out = tower
        .host()
        .kubectl_ok(&["get", "cluster", "beta", "-o", "json"]);
    Ok(serde_json::from_str(&out)?)
}

/// Waits until beta has `live` sessions and its status says `available`.
async fn says(tower: &Tower, live: u32, available: &str) -> Result<()> {
    wait_for_ok(SOON, || async {
        let metrics = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
        let sessions = metric_sample(&metrics, "tower_agent_sessions{cluster=\"beta\"}");
        ensure!(sessions == f64::from(live), "beta has {sessions} sessions");
        let c = beta(tower)?;
        ensure!(
            cluster_condition(&c, "AgentAvailable").as_deref() == Some(available),
            "beta's status with {live} sessions: {}",
            c["status"]
        );
        Ok(())
    })
    .await
}

/// beta created and settled without an agent (a token, ports,
/// AgentAvailable=False): its token.
async fn settled_beta(tower: &Tower) -> Result<String> {
    tower.create_cluster("beta")?;
    wait_for_ok(SOON, || async {
        let c = beta(tower)?;
        let token = c["spec"]["connection"]["token"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            !token.is_empty()
                && cluster_condition(&c, "AgentAvailable").as_deref() == Some("False"),
            "beta not settled yet: {}",
            c["status"]
        );
        Ok(token.to_string())
    })
    .await
}

/// The flapping agent's address.
const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));

/// beta's sessions: [`FLAPS`] of [`HOLD`] back to back.
async fn flap(tower: &Tower, token: &str) -> Result<()> {
    let agents = SocketAddr::from(([127, 0, 0, 1], tower.proxy_port()));
    for _ in 0..FLAPS {
        let rogue = rogue::Rogue::login(FROM, agents, "beta", token, "127.0.0.1:9")
            .await
            .context("the flapping agent's login")?;
        // The fault's shape (a session's length), not a wait for a condition.
        tokio::time::sleep(HOLD).await;
        drop(rogue);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_agent_costs_its_cluster_one_follow_up_a_second() -> Result<()> {
    let tower = Tower::start().await?;
    let token = settled_beta(&tower).await?;
    let agents = SocketAddr::from(([127, 0, 0, 1], tower.proxy_port()));
    let before = writes(&tower);
    let start = Instant::now();
    flap(&tower, &token).await?;
    let flapped = start.elapsed();
    // The status ends as the sessions do: one more that stays is seen...
    let last = rogue::Rogue::login(FROM, agents, "beta", &token, "127.0.0.1:9").await?;
    says(&tower, 1, "True").await?;
    // ...and so is its end.
    drop(last);
    says(&tower, 0, "False").await?;
    let elapsed = start.elapsed();
    let written = writes_between(&before, &writes(&tower));
    let (clusters, events) = (of(&written, "clusters"), of(&written, "events"));

    // One follow-up at once, then at most one per interval, the trailing one
    // included; and the first connect's kubeconfig (a spec write of its own
    // when the status is a subresource).
    let follow_ups = 2 + (elapsed.as_millis() / INTERVAL.as_millis()) as u64;
    let (most, most_events) = (
        WRITES_PER_FOLLOW_UP * follow_ups + 1,
        EVENTS_PER_FOLLOW_UP * follow_ups,
    );
    eprintln!(
        "{} sessions of {HOLD:?} in {flapped:?}, the last seen and gone after {elapsed:?}: \
         {clusters} Cluster writes (at most {most}), {events} Events (at most {most_events}); \
         all writes: {written:?}",
        FLAPS + 1
    );
    ensure!(
        clusters <= most && events <= most_events,
        "{clusters} writes of Clusters and {events} Events for {} sessions in {elapsed:?}: \
         more than one pass and refresh a second",
        FLAPS + 1
    );
    Ok(())
}

/// beta's holder Lease: (holder, leaseTransitions).
fn beta_lease(tower: &Tower) -> Result<(String, u64)> {
    let out = tower.host().kubectl_ok(&[
        "get",
        "lease",
        "tower-cluster-beta",
        "-n",
        "kubesphere-system",
        "-o",
        "json",
    ]);
    let lease: Value = serde_json::from_str(&out)?;
    let spec = &lease["spec"];
    Ok((
        spec["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        spec["leaseTransitions"].as_u64().unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_leader_election_a_flapping_agent_claims_its_cluster_once() -> Result<()> {
    let peer = free_port().to_string();
    let tower = Tower::start_with(TowerOptions {
        proxy_args: [
            "--leader-elect",
            "--replica-id",
            "flap-0",
            "--peer-port",
            &peer,
            "--peer-address",
            &format!("127.0.0.1:{peer}"),
        ]
        .map(String::from)
        .to_vec(),
        ..TowerOptions::default()
    })
    .await?;
    let token = settled_beta(&tower).await?;
    flap(&tower, &token).await?;
    let agents = SocketAddr::from(([127, 0, 0, 1], tower.proxy_port()));
    let last = rogue::Rogue::login(FROM, agents, "beta", &token, "127.0.0.1:9").await?;
    says(&tower, 1, "True").await?;
    let (holder, transitions) = wait_for_ok(SOON, || async {
        let (holder, transitions) = beta_lease(&tower)?;
        ensure!(holder == "flap-0", "beta's Lease is held by {holder:?}");
        Ok((holder, transitions))
    })
    .await?;
    eprintln!(
        "{} sessions of {HOLD:?} back to back: beta's Lease held by {holder}, {transitions} claims after the first",
        FLAPS + 1
    );
    // Each session used to release the Lease when it ended and claim it
    // again at the next: about FLAPS claims after the first.
    ensure!(
        transitions <= FLAPS as u64 / 4,
        "{transitions} claims of beta's Lease for {} sessions back to back: \
         released and claimed again per session",
        FLAPS + 1
    );
    // Gone for good: released after the grace, and the status follows.
    drop(last);
    says(&tower, 0, "False").await?;
    wait_for_ok(SOON, || async {
        let (holder, _) = beta_lease(&tower)?;
        ensure!(
            holder.is_empty(),
            "beta's Lease is still held by {holder:?}"
        );
        Ok(())
    })
    .await
}
