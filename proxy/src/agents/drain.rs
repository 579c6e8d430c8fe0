//! A replica that stops drains: every agent is asked to move to another
//! replica, and running requests and streams get a grace period to finish.

use std::time::Duration;

use super::registry::Registry;
use crate::ops::in_flight::InFlight;

/// Ask every agent to move to another replica, wait until they have
/// (`moved`) and nothing is in flight here, then return so the caller closes
/// what is left. Tunnels of agents that cannot be asked (Go Tower agents) are
/// closed as soon as nothing is in flight. `grace` bounds the wait.
pub async fn drain(
    registry: &Registry,
    in_flight: &InFlight,
    grace: Duration,
    moved: impl Fn(&str) -> bool,
) {
    if registry.total_live() == 0 {
        return;
    }
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(sessions = registry.total_live(), grace = ?grace, "draining: asking agents to move to another replica");
    let (asked, legacy) = registry.drain_all().await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let idle = in_flight.count() == 0;
        if idle {
            for session in legacy.iter().filter(|s| !s.is_closed()) {
                session.close("the proxy is shutting down, reconnect").await;
            }
        }
        if registry.total_live() == 0 || (idle && asked.iter().all(|c| moved(c))) {
            tracing::info!("drained: agents moved, nothing in progress");
            return;
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(sessions = registry.total_live(), in_flight = in_flight.count(), "grace period over: closing what is left");
                return;
            }
        }
    }
}
