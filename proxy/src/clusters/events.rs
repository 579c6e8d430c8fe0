//! Kubernetes Events on a Cluster: what users see in `kubectl describe`.

use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};

use super::crd::Cluster;

/// A Kubernetes Event on the Cluster; failing to record one is only logged.
pub async fn publish(
    recorder: &Recorder,
    cluster: &Cluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::debug!(cluster = %cluster.name_any(), error = %e, "cannot record an event");
    }
}
