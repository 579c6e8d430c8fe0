//! Clusternet-style health in the Cluster status: `status.healthz`,
//! `status.readyz`, `status.livez` (the member kube-apiserver answered 200
//! through the tunnel), `status.platform` (the agent's `GOOS/GOARCH`) and
//! `status.tunnelRTT` (the tunnel's round trip, a Go duration like `850µs`).
//!
//! The status is refreshed every `--cluster-status-update-frequency` without
//! a write when nothing changed; two rules keep it so:
//! - the RTT is rounded ([`rtt_text`]) and written on its own only when it
//!   moved a lot ([`rtt_moved`]: more than [`RTT_FACTOR`] times and by more
//!   than [`RTT_MIN_CHANGE`]); otherwise it rides along with any other write,
//!   such as the coarse heartbeat, so it is never more than a minute or two stale;
//! - the booleans are written when they flip.
//!
//! When no agent is connected the health says nothing rather than something
//! stale: the leader removes the booleans and the RTT ([`forget`]) when it
//! marks the cluster `AgentAvailable=False`; `platform`, like
//! `kubernetesVersion`, stays as the last thing known.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::clusters::crd::ClusterStatus;

/// Written on its own, the RTT must have grown or shrunk by this factor...
pub const RTT_FACTOR: u32 = 2;
/// ...and by at least this much (local jitter is tens of microseconds to a
/// few milliseconds on a busy machine: never worth a write).
pub const RTT_MIN_CHANGE: Duration = Duration::from_millis(5);

/// Did the member's kube-apiserver answer 200 on each endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub healthz: bool,
    pub readyz: bool,
    pub livez: bool,
}

impl Health {
    /// The tunnel is up but the member's kube-apiserver cannot be reached
    /// (the agent's dial refused, or no answer in time).
    pub const DOWN: Health = Health {
        healthz: false,
        readyz: false,
        livez: false,
    };

    /// The status fields and their values.
    pub fn fields(&self) -> [(&'static str, bool); 3] {
        [
            ("healthz", self.healthz),
            ("readyz", self.readyz),
            ("livez", self.livez),
        ]
    }
}

/// The stored value of a health field.
fn stored(status: &ClusterStatus, field: &str) -> Option<bool> {
    match field {
        "healthz" => status.healthz,
        "readyz" => status.readyz,
        "livez" => status.livez,
        _ => None,
    }
}

/// The health fields of `seen` that differ from `current`.
pub fn health_patch(current: &ClusterStatus, seen: &Health, patch: &mut Map<String, Value>) {
    for (field, value) in seen.fields() {
        if stored(current, field) != Some(value) {
            patch.insert(field.into(), Value::Bool(value));
        }
    }
}

/// The agents' platforms as one text, sorted and deduplicated (a rolling
/// update across architectures shows both); None when no agent said (Go
/// Tower's).
pub fn platforms<'a>(each: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let set: std::collections::BTreeSet<&str> =
        each.into_iter().filter(|p| !p.is_empty()).collect();
    (!set.is_empty()).then(|| set.into_iter().collect::<Vec<_>>().join(", "))
}

/// `status.platform` when it changes; removed when the connected agents
/// stopped saying (a Go agent replaced ours).
pub fn platform_patch(current: &ClusterStatus, seen: Option<&str>, patch: &mut Map<String, Value>) {
    match (current.platform.as_deref(), seen) {
        (now, Some(p)) if now != Some(p) => {
            patch.insert("platform".into(), Value::String(p.into()));
        }
        (Some(_), None) => {
            patch.insert("platform".into(), Value::Null);
        }
        _ => {}
    }
}

/// `d` rounded to about two significant digits, in Go's duration syntax:
/// `850µs`, `2.5ms`, `120ms`, `1.25s`.
pub fn rtt_text(d: Duration) -> String {
    let us = d.as_micros();
    match us {
        0..1_000 => format!("{}µs", us.max(1)),
        1_000..10_000 => format!("{}ms", ((us + 50) / 100) as f64 / 10.0),
        10_000..1_000_000 => format!("{}ms", (us + 500) / 1_000),
        _ => format!("{}s", ((us + 5_000) / 10_000) as f64 / 100.0),
    }
}

/// True when the RTT moved enough to be worth a write of its own.
pub fn rtt_moved(stored: Option<Duration>, now: Duration) -> bool {
    let Some(stored) = stored else {
        return true;
    };
    let (low, high) = if now > stored {
        (stored, now)
    } else {
        (now, stored)
    };
    high - low >= RTT_MIN_CHANGE && high > low * RTT_FACTOR
}

/// `status.tunnelRTT` for the measured `rtt`: alone when it moved a lot,
/// else only when `riding` (something else is written anyway) and its text
/// changed. Call it last.
pub fn rtt_patch(current: &ClusterStatus, rtt: Option<Duration>, patch: &mut Map<String, Value>) {
    let Some(rtt) = rtt else {
        return;
    };
    let text = rtt_text(rtt);
    if current.tunnel_rtt.as_deref() == Some(text.as_str()) {
        return;
    }
    let stored = current
        .tunnel_rtt
        .as_deref()
        .and_then(|t| tunnel::cli::parse_go_duration(t).ok());
    if !patch.is_empty() || rtt_moved(stored, rtt) {
        patch.insert("tunnelRTT".into(), Value::String(text));
    }
}

/// What the leader removes from the status of a cluster with no agent
/// connected anywhere: the health booleans and the RTT, which only a live
/// tunnel can tell. Empty when `available` or already gone.
pub fn forget(current: Option<&ClusterStatus>, available: bool) -> Map<String, Value> {
    let mut patch = Map::new();
    let Some(current) = current.filter(|_| !available) else {
        return patch;
    };
    for (field, _) in Health::DOWN.fields() {
        if stored(current, field).is_some() {
            patch.insert(field.into(), Value::Null);
        }
    }
    if current.tunnel_rtt.is_some() {
        patch.insert("tunnelRTT".into(), Value::Null);
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rtt_is_rounded_go_text() {
        assert_eq!(rtt_text(Duration::from_micros(849)), "849µs");
        assert_eq!(rtt_text(Duration::ZERO), "1µs");
        assert_eq!(rtt_text(Duration::from_micros(2_549)), "2.5ms");
        assert_eq!(rtt_text(Duration::from_micros(2_000)), "2ms");
        assert_eq!(rtt_text(Duration::from_micros(119_600)), "120ms");
        assert_eq!(rtt_text(Duration::from_micros(1_254_000)), "1.25s");
        // What we write, Go (and our flag parser) reads back.
        for d in [
            Duration::from_micros(849),
            Duration::from_micros(2_549),
            ms(120),
            ms(1_250),
        ] {
            assert!(tunnel::cli::parse_go_duration(&rtt_text(d)).is_ok());
        }
    }

    #[test]
    fn rtt_alone_is_written_only_when_it_moved_a_lot() {
        assert!(rtt_moved(None, ms(1)));
        // Local jitter: big factors, tiny amounts.
        assert!(!rtt_moved(Some(Duration::from_micros(200)), ms(3)));
        // A remote link wobbling by less than double.
        assert!(!rtt_moved(Some(ms(50)), ms(90)));
        assert!(rtt_moved(Some(ms(50)), ms(120)));
        assert!(rtt_moved(Some(ms(120)), ms(50)));

        let stored = ClusterStatus {
            tunnel_rtt: Some("800µs".into()),
            ..Default::default()
        };
        let mut patch = Map::new();
        rtt_patch(&stored, Some(Duration::from_micros(1_900)), &mut patch);
        assert!(patch.is_empty(), "{patch:?}");
        // With another write it rides along, fresh.
        patch.insert("lastHeartbeatTime".into(), json!("2027-01-15T08:01:00Z"));
        rtt_patch(&stored, Some(Duration::from_micros(1_900)), &mut patch);
        assert_eq!(patch["tunnelRTT"], "1.9ms");
        // Nothing measured yet: nothing written.
        let mut patch = Map::new();
        rtt_patch(&ClusterStatus::default(), None, &mut patch);
        assert!(patch.is_empty());
    }

    #[test]
    fn health_flips_are_written_and_steady_health_is_not() {
        let up = Health {
            healthz: true,
            readyz: true,
            livez: true,
        };
        let mut patch = Map::new();
        health_patch(&ClusterStatus::default(), &up, &mut patch);
        assert_eq!(
            patch,
            *json!({"healthz": true, "readyz": true, "livez": true})
                .as_object()
                .unwrap()
        );
        let stored: ClusterStatus = serde_json::from_value(Value::Object(patch)).unwrap();
        let mut patch = Map::new();
        health_patch(&stored, &up, &mut patch);
        assert!(patch.is_empty());
        let not_ready = Health {
            readyz: false,
            ..up
        };
        health_patch(&stored, &not_ready, &mut patch);
        assert_eq!(patch, *json!({"readyz": false}).as_object().unwrap());
    }

    #[test]
    fn platform_follows_the_agents() {
        assert_eq!(
            platforms(["linux/amd64", "linux/amd64"]).as_deref(),
            Some("linux/amd64")
        );
        assert_eq!(
            platforms(["linux/arm64", "", "linux/amd64"]).as_deref(),
            Some("linux/amd64, linux/arm64")
        );
        assert_eq!(platforms([""]), None);
        let ours = ClusterStatus {
            platform: Some("linux/amd64".into()),
            ..Default::default()
        };
        let mut patch = Map::new();
        platform_patch(&ours, Some("linux/amd64"), &mut patch);
        assert!(patch.is_empty());
        // A Go agent took over: it says nothing, and neither does the status.
        platform_patch(&ours, None, &mut patch);
        assert_eq!(patch["platform"], Value::Null);
        let mut patch = Map::new();
        platform_patch(&ClusterStatus::default(), None, &mut patch);
        assert!(patch.is_empty());
    }

    #[test]
    fn no_agent_no_health() {
        let live = ClusterStatus {
            healthz: Some(true),
            readyz: Some(false),
            livez: Some(true),
            platform: Some("linux/amd64".into()),
            tunnel_rtt: Some("1ms".into()),
            ..Default::default()
        };
        assert!(forget(Some(&live), true).is_empty());
        let gone = forget(Some(&live), false);
        assert_eq!(
            gone,
            *json!({"healthz": null, "readyz": null, "livez": null, "tunnelRTT": null})
                .as_object()
                .unwrap()
        );
        // Once removed, nothing more to write.
        assert!(forget(Some(&ClusterStatus::default()), false).is_empty());
        assert!(forget(None, false).is_empty());
    }
}
