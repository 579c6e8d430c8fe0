//! Token rotation with a grace period, as decisions without I/O
//! (docs/token-rotation.md). [`super::rotate`] does the writing and telling.
//!
//! A person asks with `kubectl annotate cluster alpha
//! tower.kubesphere.io/rotate-token=<any new value>` (optionally
//! `tower.kubesphere.io/token-grace=<Go duration>`, default 10m). The leader
//! then, in ONE update (compare-and-swap on resourceVersion), writes a fresh
//! `spec.connection.token` and annotations that hold fingerprints and times,
//! never a token:
//!
//! - `rotated-token`: the `rotate-token` value handled, so a value rotates once;
//! - `token-sha256`: the fingerprint of the token the rotation issued;
//! - `previous-token`: the fingerprint of the token it replaced;
//! - `previous-token-until`: RFC 3339 end of the grace period.
//!
//! The previous token is accepted only while `token-sha256` still names the
//! current token: a person who then writes `spec.connection.token` directly
//! revokes at once, no grace, as before rotations existed.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::agents::grace::{Grace, fingerprint};

pub const ROTATE: &str = "tower.kubesphere.io/rotate-token";
pub const GRACE: &str = "tower.kubesphere.io/token-grace";
pub const ROTATED: &str = "tower.kubesphere.io/rotated-token";
pub const TOKEN_SHA256: &str = "tower.kubesphere.io/token-sha256";
pub const PREVIOUS: &str = "tower.kubesphere.io/previous-token";
pub const PREVIOUS_UNTIL: &str = "tower.kubesphere.io/previous-token-until";
/// How long the previous token works when `token-grace` is not given.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// What a rotation writes: the new token and the annotations, one patch.
#[derive(Debug, PartialEq)]
pub struct Rotation {
    pub token: String,
    /// Merge-patch values of `metadata.annotations` (null removes).
    pub annotations: Map<String, Value>,
    /// The previous token works until then (None: there was none).
    pub until: Option<Timestamp>,
}

/// Whether `annotations` ask for a rotation not yet made; `Err` says what is
/// wrong with the request (an Event for the person who asked).
pub fn rotation(
    annotations: &BTreeMap<String, String>,
    current: &str,
    now: Timestamp,
    fresh: impl FnOnce() -> String,
) -> Option<Result<Rotation, String>> {
    let asked = annotations.get(ROTATE).filter(|v| !v.is_empty())?;
    if annotations.get(ROTATED) == Some(asked) {
        return None;
    }
    let grace = match annotations.get(GRACE) {
        None => DEFAULT_GRACE,
        Some(text) => match tunnel::cli::parse_go_duration(text.trim()) {
            Ok(d) => d,
            Err(e) => {
                return Some(Err(format!(
                    "annotation {GRACE}: {e}; write a Go duration such as 10m or 90s, or remove it for the default 10m"
                )));
            }
        },
    };
    let until = (!current.is_empty())
        .then(|| jiff::SignedDuration::try_from(grace).ok())
        .flatten()
        .and_then(|g| now.checked_add(g).ok())
        .and_then(|t| t.round(jiff::Unit::Second).ok());
    if !current.is_empty() && until.is_none() {
        return Some(Err(format!(
            "annotation {GRACE}: {grace:?} is too long; give a shorter grace period"
        )));
    }
    let token = fresh();
    let mut set = Map::new();
    set.insert(ROTATED.into(), json!(asked));
    set.insert(TOKEN_SHA256.into(), json!(fingerprint(&token)));
    match until {
        Some(until) => {
            set.insert(PREVIOUS.into(), json!(fingerprint(current)));
            set.insert(PREVIOUS_UNTIL.into(), json!(until.to_string()));
        }
        None => {
            set.insert(PREVIOUS.into(), Value::Null);
            set.insert(PREVIOUS_UNTIL.into(), Value::Null);
        }
    }
    Some(Ok(Rotation {
        token,
        annotations: set,
        until,
    }))
}

/// The grace recorded in `annotations`, if it belongs to `current` (the
/// rotation issued it) and is not over at `now`.
pub fn grace(
    annotations: &BTreeMap<String, String>,
    current: &str,
    now: Timestamp,
) -> Option<Grace> {
    let issued = annotations.get(TOKEN_SHA256)?;
    if current.is_empty() || *issued != fingerprint(current) {
        return None;
    }
    let previous = annotations.get(PREVIOUS)?.clone();
    let until: Timestamp = annotations.get(PREVIOUS_UNTIL)?.parse().ok()?;
    (now < until).then_some(Grace { previous, until })
}

#[cfg(test)]
mod tests;
