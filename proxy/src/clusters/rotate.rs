//! Token rotation's I/O ([`super::rotation`] decides): the leader writes a
//! requested rotation; every replica keeps the sessions the grace period
//! allows, hands their agents the new token over the tunnel, and closes them
//! once the grace is over (its reconcile is requeued for that moment). A
//! session whose agent confirmed it stored the new token counts as holding
//! it: it is not closed at the end of the grace, so the streams it still
//! carries (a watch, an exec) finish; the agent closes it once they have.

use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::Ports;
use super::crd::Cluster;
use super::events::publish;
use super::reconcile::{Context, Error, new_token};
use super::rotation;
use crate::agents::registry::tokens_match;
use crate::agents::token::{Delivered, deliver_token};

/// Leader only: write the rotation `cluster`'s annotations ask for, in one
/// compare-and-swap update. True when it wrote (the change comes back
/// through the watch and is reconciled then).
pub(super) async fn rotate_if_asked<P: Ports>(
    cluster: &Cluster,
    ctx: &Context<P>,
) -> Result<bool, Error> {
    let name = cluster.name_any();
    let Some(annotations) = cluster.metadata.annotations.as_ref() else {
        return Ok(false);
    };
    let current = &cluster.spec.connection.token;
    let rotation = match rotation::rotation(annotations, current, Timestamp::now(), new_token) {
        None => return Ok(false),
        Some(Ok(r)) => r,
        Some(Err(why)) => {
            tracing::warn!(cluster = %name, reason = %why, "token rotation refused");
            publish(
                &ctx.recorder,
                cluster,
                EventType::Warning,
                "InvalidAnnotation",
                why,
            );
            return Ok(false);
        }
    };
    let patch = json!({
        "metadata": {
            "resourceVersion": cluster.resource_version(),
            "annotations": rotation.annotations,
        },
        "spec": {"connection": {"token": rotation.token}},
    });
    let api: Api<Cluster> = Api::all(ctx.client.clone());
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let note = match rotation.until {
        Some(until) => {
            format!("new agent token issued; the previous one is accepted until {until}")
        }
        None => "new agent token issued".to_string(),
    };
    tracing::info!(cluster = %name, until = ?rotation.until.map(|t| t.to_string()), "agent token rotated");
    publish(
        &ctx.recorder,
        cluster,
        EventType::Normal,
        "TokenRotated",
        note,
    );
    Ok(true)
}

/// Close the sessions of `cluster` admitted with neither `token` nor, during
/// a rotation's grace, the previous token; hand the grace sessions' agents
/// `token` (once per session). Returns how long until the grace ends.
pub(super) async fn keep_and_tell<P: Ports>(
    cluster: &Cluster,
    token: &str,
    ctx: &Context<P>,
) -> Option<Duration> {
    let name = cluster.name_any();
    let now = Timestamp::now();
    let annotations = cluster.metadata.annotations.as_ref();
    let grace = annotations.and_then(|a| rotation::grace(a, token, now));
    let rotated = annotations
        .and_then(|a| a.get(rotation::TOKEN_SHA256))
        .is_some_and(|f| *f == crate::agents::grace::fingerprint(token));
    let reason = if rotated {
        "the cluster's token was rotated and the previous one's grace period is over"
    } else {
        "the cluster's token changed"
    };
    let keep =
        |t: &str| tokens_match(token, t) || grace.as_ref().is_some_and(|g| g.accepts(t, now));
    ctx.registry.revoke_unless(&name, keep, reason).await;
    let grace = grace?;
    let told = ctx.registry.to_tell(&name, token);
    if !told.is_empty() {
        tracing::info!(cluster = %name, sessions = told.len(), "handing agents the rotated token");
        for (id, session) in told {
            let (token, registry, name) = (token.to_string(), ctx.registry.clone(), name.clone());
            tokio::spawn(async move {
                // The agent holds the new token: new streams go to the tunnel
                // it opens with it, and this one may finish its streams after
                // the grace (the agent closes it once they are done).
                if let Ok(Delivered::Stored) = deliver_token(&session, &token).await {
                    registry.retoken(&name, id, &token);
                }
            });
        }
    }
    let left = grace.until.duration_since(now);
    // A little after the end, so the check at wake-up sees it over.
    Some(Duration::try_from(left).unwrap_or_default() + Duration::from_millis(500))
}
