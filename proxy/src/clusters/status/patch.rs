//! What to write: a merge patch of only the status fields that changed.
//!
//! Nothing is written periodically: a connected, unchanged cluster costs no
//! write at all, however many clusters there are and however short
//! `--cluster-status-update-frequency` is (Kubernetes moved node heartbeats
//! out of the Node status into Leases for the same reason). The liveness of
//! every cluster a replica serves is that replica's Lease
//! (`tower-replica-<id>`, [`crate::ha::owners`]), renewed every few seconds
//! whatever the number of clusters. `lastHeartbeatTime` is the agent's last
//! keepalive *as of the last status change* (the first write after a connect
//! included); it rides along with other writes and never moves on its own.
//! The RTT follows [`super::health`]'s rules.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use super::health::{self, Health};
use super::probe::Member;
use crate::clusters::crd::ClusterStatus;
use crate::clusters::kubeconfig;

/// What was observed of one cluster right now.
pub struct Observed {
    /// Version and nodes; None: could not be read (the last known stay).
    pub member: Option<Member>,
    /// None: not asked (the stored health stays).
    pub health: Option<Health>,
    pub agent_version: String,
    /// The agents' `GOOS/GOARCH`; None when none said.
    pub platform: Option<String>,
    /// The tunnel's last measured round trip; None: not yet.
    pub rtt: Option<Duration>,
    pub heartbeat: SystemTime,
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .ok()
        .and_then(|t| t.round(jiff::Unit::Second).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

/// The status fields to write: only those that differ from `current`; the
/// heartbeat only along with another change (or when none is stored yet);
/// the RTT as [`health::rtt_patch`] says.
pub fn status_patch(
    current: &ClusterStatus,
    kubeconfig: &str,
    seen: &Observed,
) -> Map<String, Value> {
    let mut patch = Map::new();
    if let Some(m) = &seen.member {
        if !m.git_version.is_empty()
            && current.kubernetes_version.as_deref() != Some(&m.git_version)
        {
            patch.insert("kubernetesVersion".into(), json!(m.git_version));
        }
        if current.node_count != Some(m.nodes) {
            patch.insert("nodeCount".into(), json!(m.nodes));
        }
    }
    if let Some(h) = &seen.health {
        health::health_patch(current, h, &mut patch);
    }
    health::platform_patch(current, seen.platform.as_deref(), &mut patch);
    if current.agent_version.as_deref() != Some(seen.agent_version.as_str()) {
        patch.insert("agentVersion".into(), json!(seen.agent_version));
    }
    if let Some(expiry) = kubeconfig::read(kubeconfig)
        .and_then(|k| k.cert_not_after)
        .map(rfc3339)
        && current.certificate_expiration_time.as_deref() != Some(expiry.as_str())
    {
        patch.insert("certificateExpirationTime".into(), json!(expiry));
    }
    let stored = current.last_heartbeat_time.as_deref().and_then(parse_time);
    let newer = stored.is_none_or(|t| seen.heartbeat > t);
    if newer && (stored.is_none() || !patch.is_empty()) {
        let beat = rfc3339(seen.heartbeat);
        if current.last_heartbeat_time.as_deref() != Some(beat.as_str()) {
            patch.insert("lastHeartbeatTime".into(), json!(beat));
        }
    }
    health::rtt_patch(current, seen.rtt, &mut patch);
    patch
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Health = Health {
        healthz: true,
        readyz: true,
        livez: true,
    };

    fn observed(_now: SystemTime, heartbeat: SystemTime) -> Observed {
        Observed {
            member: Some(Member {
                git_version: "v1.34.1".into(),
                nodes: 3,
            }),
            health: Some(UP),
            agent_version: "tower-agent/0.1.0".into(),
            platform: Some("linux/amd64".into()),
            rtt: Some(Duration::from_micros(420)),
            heartbeat,
        }
    }

    #[test]
    fn writes_only_what_changed_and_no_periodic_heartbeat() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let first = status_patch(&ClusterStatus::default(), "", &observed(t0, t0));
        assert_eq!(first["kubernetesVersion"], "v1.34.1");
        assert_eq!(first["nodeCount"], 3);
        assert_eq!(first["agentVersion"], "tower-agent/0.1.0");
        assert_eq!(first["lastHeartbeatTime"], "2027-01-15T08:00:00Z");
        assert_eq!(first["readyz"], true);
        assert_eq!(first["platform"], "linux/amd64");
        assert_eq!(first["tunnelRTT"], "420µs");
        let stored: ClusterStatus = serde_json::from_value(Value::Object(first)).expect("a status");
        // Pings every few seconds change nothing, for a minute or a day:
        // the replica's Lease says the cluster is still served.
        for secs in [59, 60, 121, 86_400] {
            let later = t0 + Duration::from_secs(secs);
            assert!(status_patch(&stored, "", &observed(later, later)).is_empty());
        }
        // A real change goes out at once, with the freshest heartbeat.
        let later = t0 + Duration::from_secs(10);
        let mut seen = observed(later, later);
        seen.member = Some(Member {
            git_version: "v1.34.1".into(),
            nodes: 4,
        });
        let changed = status_patch(&stored, "", &seen);
        assert_eq!(changed["nodeCount"], 4);
        assert!(changed.contains_key("lastHeartbeatTime"));
        // A member that could not be asked keeps its last known facts.
        seen.member = None;
        seen.health = None;
        assert!(status_patch(&stored, "", &seen).is_empty());
    }

    #[test]
    fn unchanged_health_and_a_jittery_rtt_do_not_write() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let first = status_patch(&ClusterStatus::default(), "", &observed(t0, t0));
        let stored: ClusterStatus = serde_json::from_value(Value::Object(first)).expect("a status");
        // Every refresh of the next minute (every 2 s, say) sees the same
        // health and an RTT that wanders between 100 µs and 3 ms: no write.
        for (i, us) in (1..30).zip([100, 3_000, 800, 1_500, 250].into_iter().cycle()) {
            let t = t0 + Duration::from_secs(2 * i);
            let mut seen = observed(t, t);
            seen.rtt = Some(Duration::from_micros(us));
            assert!(status_patch(&stored, "", &seen).is_empty(), "refresh {i}");
        }
        // readyz failing is written at the next refresh.
        let t = t0 + Duration::from_secs(2);
        let mut seen = observed(t, t);
        seen.health = Some(Health {
            readyz: false,
            ..UP
        });
        let patch = status_patch(&stored, "", &seen);
        assert_eq!(patch["readyz"], false);
        assert!(!patch.contains_key("healthz"));
        // The member's apiserver unreachable through a live tunnel: all false.
        seen.health = Some(Health::DOWN);
        let patch = status_patch(&stored, "", &seen);
        assert_eq!(
            (&patch["healthz"], &patch["livez"]),
            (&json!(false), &json!(false))
        );
    }
}
