//! The agents' way back after this replica starts leading (a restart, a
//! failover): their sessions were cut, and they dial again within seconds.
//! A pass that ran before an agent is back would write `AgentAvailable=False`
//! and an Event, and one more status write and Event when it arrives: two
//! status lies, and four writes per cluster (40,000 for a fleet of 10,000
//! restarting at once). For [`COMEBACK`] the leader leaves such a Cluster as
//! it is instead, the way Kubernetes leaves a Node's status alone for
//! `--node-monitor-grace-period` before calling it unreachable. The agent's
//! session triggers a pass of its own when it arrives; the grace's end
//! triggers one otherwise.
//!
//! Only Clusters that existed before the leadership began and whose token
//! stands wait: a new Cluster is initialised at once, and a cluster whose
//! agent was connected to this process and left is reported at once.

use std::time::{Duration, SystemTime};

use super::crd::Cluster;

/// How long agents have to come back after this replica starts leading.
pub const COMEBACK: Duration = Duration::from_secs(40);
/// A Cluster created this close to the start of the leadership counts as
/// new (the apiserver's clock and ours may differ by that much).
const CLOCK_SLACK: Duration = Duration::from_secs(5);

/// What the wait depends on.
pub struct Facts<'a> {
    pub cluster: &'a Cluster,
    /// The token the pass would leave on the Cluster.
    pub token: &'a str,
    /// An agent of the cluster is connected here or to another replica.
    pub available: bool,
    /// An agent of the cluster was connected to this process at some point.
    pub seen_here: bool,
    /// When this replica began to lead.
    pub leading_since: SystemTime,
    pub now: SystemTime,
}

/// How much longer the pass leaves the Cluster as it is; None: run it now.
pub fn wait(f: &Facts) -> Option<Duration> {
    if f.available
        || f.seen_here
        || f.token.is_empty()
        || f.token != f.cluster.spec.connection.token
    {
        return None;
    }
    let created = f.cluster.metadata.creation_timestamp.as_ref()?;
    let created = SystemTime::from(created.0);
    if created + CLOCK_SLACK > f.leading_since {
        return None;
    }
    let elapsed = f.now.duration_since(f.leading_since).unwrap_or_default();
    COMEBACK.checked_sub(elapsed).filter(|left| !left.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clusters::crd::{ClusterSpec, Connection};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const START: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(secs: i64) -> SystemTime {
        if secs >= 0 {
            START + Duration::from_secs(1_800_000_000 + secs as u64)
        } else {
            START + Duration::from_secs(1_800_000_000 - secs.unsigned_abs())
        }
    }

    fn cluster(created: i64, token: &str) -> Cluster {
        let mut c = Cluster::new(
            "alpha",
            ClusterSpec {
                connection: Connection {
                    kind: "proxy".into(),
                    token: token.into(),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        c.metadata.creation_timestamp = Some(Time(jiff::Timestamp::try_from(at(created)).unwrap()));
        c
    }

    fn facts(c: &Cluster, now: i64) -> Facts<'_> {
        Facts {
            cluster: c,
            token: "t0k3n",
            available: false,
            seen_here: false,
            leading_since: at(0),
            now: at(now),
        }
    }

    #[test]
    fn a_cluster_from_before_waits_for_its_agent_until_the_grace_ends() {
        let c = cluster(-3600, "t0k3n");
        assert_eq!(wait(&facts(&c, 0)), Some(COMEBACK));
        assert_eq!(wait(&facts(&c, 30)), Some(Duration::from_secs(10)));
        assert_eq!(wait(&facts(&c, 40)), None, "the grace is over");
        assert_eq!(wait(&facts(&c, 400)), None);
    }

    #[test]
    fn an_agent_connected_or_gone_from_here_is_reported_at_once() {
        let c = cluster(-3600, "t0k3n");
        let mut f = facts(&c, 1);
        f.available = true;
        assert_eq!(wait(&f), None, "connected: available now");
        let mut f = facts(&c, 1);
        f.seen_here = true;
        assert_eq!(wait(&f), None, "came and went: unavailable now");
    }

    #[test]
    fn new_clusters_and_new_tokens_do_not_wait() {
        let fresh = cluster(-2, "t0k3n");
        assert_eq!(wait(&facts(&fresh, 1)), None, "created with the leadership");
        let later = cluster(10, "t0k3n");
        assert_eq!(wait(&facts(&later, 11)), None, "created after it began");
        let no_token = cluster(-3600, "");
        let mut f = facts(&no_token, 1);
        f.token = "fresh";
        assert_eq!(wait(&f), None, "the pass writes its first token");
        let changed = cluster(-3600, "old");
        assert_eq!(wait(&facts(&changed, 1)), None, "the pass writes a token");
        let mut unknown = cluster(-3600, "t0k3n");
        unknown.metadata.creation_timestamp = None;
        assert_eq!(wait(&facts(&unknown, 1)), None);
    }
}
