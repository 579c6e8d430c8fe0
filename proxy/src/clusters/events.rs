//! Kubernetes Events on a Cluster: what users see in `kubectl describe`.
//!
//! Events are written behind the work they describe, as client-go's event
//! broadcaster does: [`publish`] queues the Event and returns, and
//! [`WRITERS`] tasks write the queue, each the Events of its share of the
//! clusters one at a time, so one cluster's Events keep their order. So a
//! reconcile pass never waits for its Event (at a fleet's start that was one
//! write in three of every pass, holding one of its slots), and the status
//! writes that make clusters available go ahead of the Events saying so.
//! An Event's time is when it is written (kube-runtime stamps it), so in a
//! rush it can trail its change by seconds. The queue is bounded: past
//! [`QUEUED`] Events not yet written (an apiserver down, a storm of refused
//! agents) new ones are dropped and counted in the log, never held in
//! memory. Events still queued when the proxy stops are not written.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Reporter};
use kube::{Client, Resource};
use tokio::sync::mpsc;

use super::crd::Cluster;
use crate::identity::names::MANAGER;

/// Events waiting to be written, at most (one per cluster at a start of
/// 10,000, with room; each a few hundred bytes).
pub const QUEUED: usize = 16_384;

struct Pending {
    event: Event,
    reference: ObjectReference,
}

/// Tasks writing Events at once: one in order would take minutes to write
/// a fleet's start, and its Events would still be going out at steady state.
pub const WRITERS: usize = 4;

/// Queues Events for the writer tasks [`Recorder::new`] starts; they end
/// once every clone of the recorder is dropped and the queue is written.
#[derive(Clone)]
pub struct Recorder {
    queues: Arc<[mpsc::Sender<Pending>]>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Starts the writer tasks: call it inside the tokio runtime.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        let queues = (0..WRITERS)
            .map(|_| {
                let (queue, pending) = mpsc::channel(QUEUED / WRITERS);
                tokio::spawn(write_all(client.clone(), reporter.clone(), pending));
                queue
            })
            .collect();
        Self {
            queues,
            dropped: Arc::default(),
        }
    }

    /// Queues `event`; when the queue is full it is dropped.
    pub fn publish(&self, event: Event, reference: ObjectReference) {
        // The same writer for every Event of an object: they stay in order.
        let mut hasher = std::hash::DefaultHasher::new();
        reference.name.hash(&mut hasher);
        let queue = &self.queues[hasher.finish() as usize % self.queues.len()];
        if let Err(refused) = queue.try_send(Pending { event, reference }) {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Once per thousand, not per Event: the log is not the queue.
            if dropped % 1000 == 1 {
                let reason = refused.into_inner().event.reason;
                tracing::warn!(
                    %reason, dropped, queued = QUEUED,
                    "Events are not being written as fast as they come (is the apiserver \
                     reachable?): this one and later ones are dropped"
                );
            }
        }
    }
}

/// Writes one share of the queued Events one at a time, in order. A fresh
/// kube-runtime recorder each time: its own keeps every Event it published for 6 minutes
/// (to count repeats into a series), keyed by the object's reference
/// including its resourceVersion, which every status write changes: with
/// agents coming and going that is a new entry per Event, never a repeat
/// (found looking for why the proxy's RSS grew in the churn soak,
/// tests/churn.rs).
async fn write_all(client: Client, reporter: Reporter, mut pending: mpsc::Receiver<Pending>) {
    while let Some(Pending { event, reference }) = pending.recv().await {
        let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter.clone());
        if let Err(e) = recorder.publish(&event, &reference).await {
            let object = reference.name.as_deref().unwrap_or_default();
            tracing::debug!(%object, reason = %event.reason, error = %e, "cannot record an event");
        }
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

/// Queues a Kubernetes Event on the Cluster; one that cannot be written is
/// only logged.
pub fn publish(
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
    recorder.publish(event, cluster.object_ref(&()));
}
