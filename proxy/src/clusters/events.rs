//! Kubernetes Events on a Cluster: what users see in `kubectl describe`.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, Resource, ResourceExt};

use super::crd::Cluster;
use crate::identity::names::MANAGER;

/// Records Events with a fresh kube-runtime recorder each time. Its
/// recorder keeps every Event it published for 6 minutes (to count repeats
/// into a series), keyed by the object's reference including its
/// resourceVersion, which every status write changes: with agents coming and
/// going that is a new entry per Event, never a repeat, only dropped when a
/// later Event is published (found looking for why the proxy's RSS grew in
/// the churn soak, tests/churn.rs). Nothing is kept here.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Reporter,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self { client, reporter }
    }

    pub async fn publish(
        &self,
        event: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        kube::runtime::events::Recorder::new(self.client.clone(), self.reporter.clone())
            .publish(event, reference)
            .await
    }
}

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
