//! Clusternet-style health in the Cluster status: `status.healthz`,
//! `status.readyz`, `status.livez` (the member kube-apiserver answered 200
//! through the tunnel), `status.platform` (the agent's `GOOS/GOARCH`) and
//! `status.tunnelRTT` (the tunnel's round trip, a Go duration like `850µs`).
//!
//! The status is refreshed every `--cluster-status-update-frequency` without
//! a write when nothing changed; two rules keep it so:
//! - the RTT is rounded ([`rtt_text`]) and written on its own only when none
//!   is stored (the first measured since the agent connected); then it
//!   rides along with any other write (the first one after an agent
//!   connects, a health flip, a new agent version...), so it is the round
//!   trip as of the last status change. Written alone it would be a write per
//!   cluster whenever the proxy is busy (a fleet reconnecting after a restart
//!   measures inflated round trips, then normal ones): noise, at 10,000
//!   clusters thousands of writes;
//! - the booleans are written when they flip.
//!
//! When no agent is connected the health says nothing rather than something
//! stale: the leader removes the booleans and the RTT ([`forget`]) when it
//! marks the cluster `AgentAvailable=False`; `platform`, like
//! `kubernetesVersion`, stays as the last thing known.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::clusters::crd::ClusterStatus;

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

/// `status.tunnelRTT` for the measured `rtt`: the first one measured since
/// the agent connected (none stored), then only when something else is
/// written anyway and its text changed. Call it last.
pub fn rtt_patch(current: &ClusterStatus, rtt: Option<Duration>, patch: &mut Map<String, Value>) {
    let Some(rtt) = rtt else {
        return;
    };
    let text = rtt_text(rtt);
    let riding = !patch.is_empty() || current.tunnel_rtt.is_none();
    if riding && current.tunnel_rtt.as_deref() != Some(text.as_str()) {
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
    fn rtt_is_never_written_alone() {
        let stored = ClusterStatus {
            tunnel_rtt: Some("800µs".into()),
            ..Default::default()
        };
        // Whatever it measures, alone it is noise: no write.
        for rtt in [Duration::from_micros(1_900), ms(120), ms(5_000)] {
            let mut patch = Map::new();
            rtt_patch(&stored, Some(rtt), &mut patch);
            assert!(patch.is_empty(), "{patch:?}");
        }
        // With another write it rides along, fresh.
        let mut patch = Map::new();
        patch.insert("readyz".into(), json!(false));
        rtt_patch(&stored, Some(Duration::from_micros(1_900)), &mut patch);
        assert_eq!(patch["tunnelRTT"], "1.9ms");
        // Unchanged text: not repeated.
        let mut patch = Map::new();
        patch.insert("readyz".into(), json!(false));
        rtt_patch(&stored, Some(Duration::from_micros(800)), &mut patch);
        assert!(!patch.contains_key("tunnelRTT"));
        // Nothing measured yet: nothing written.
        let mut patch = Map::new();
        rtt_patch(&ClusterStatus::default(), None, &mut patch);
        assert!(patch.is_empty());
        // The first measured since the agent connected: written, alone.
        rtt_patch(&ClusterStatus::default(), Some(ms(3)), &mut patch);
        assert_eq!(patch["tunnelRTT"], "3ms");
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
