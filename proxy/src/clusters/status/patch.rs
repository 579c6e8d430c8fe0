//! What to write: a merge patch of only the status fields that changed.
//!
//! The heartbeat is coarse on purpose: it is written only when the stored one
//! is at least [`HEARTBEAT_GRANULARITY`] old (or along with another change),
//! so a connected, unchanged cluster costs one status write every one to two
//! minutes, however short `--cluster-status-update-frequency` is. The RTT
//! follows [`super::health`]'s rules and rides along with such writes.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use super::health::{self, Health};
use super::probe::Member;
use crate::clusters::crd::ClusterStatus;
use crate::clusters::kubeconfig;

/// The stored heartbeat moves only when it is at least this old.
pub const HEARTBEAT_GRANULARITY: Duration = Duration::from_secs(60);

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
    pub now: SystemTime,
}

pub(super) fn rfc3339(t: SystemTime) -> String {
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
/// heartbeat only once the stored one is [`HEARTBEAT_GRANULARITY`] old, or
/// along with another change; the RTT as [`health::rtt_patch`] says.
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
    let due = stored.is_none_or(|t| {
        seen.now
            .duration_since(t)
            .is_ok_and(|age| age >= HEARTBEAT_GRANULARITY)
    });
    let newer = stored.is_none_or(|t| seen.heartbeat > t);
    if newer && (due || !patch.is_empty()) {
        patch.insert("lastHeartbeatTime".into(), json!(rfc3339(seen.heartbeat)));
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

    fn observed(now: SystemTime, heartbeat: SystemTime) -> Observed {
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
            now,
        }
    }

    #[test]
    fn writes_only_what_changed_and_a_coarse_heartbeat() {
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
        // Pings every few seconds change nothing for a minute...
        let later = t0 + Duration::from_secs(59);
        assert!(status_patch(&stored, "", &observed(later, later)).is_empty());
        // ...then the heartbeat moves, alone.
        let later = t0 + Duration::from_secs(60);
        let beat = status_patch(&stored, "", &observed(later, later));
        assert_eq!(beat.keys().collect::<Vec<_>>(), ["lastHeartbeatTime"]);
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
