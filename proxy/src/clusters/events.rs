//! Kubernetes Events on a Cluster: what users see in `kubectl describe`.

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use super::crd::Cluster;
use crate::identity::names::MANAGER;

/// The recorder the proxy's Events come from (`reportingController` is the
/// proxy's field manager name, the instance its pod).
pub fn recorder(client: Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

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
