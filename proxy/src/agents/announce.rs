//! Tells every connected agent which SSH host keys the proxy holds (OpenSSH's
//! `hostkeys-00@openssh.com`): once after it joins, and again whenever the
//! set changes ([`crate::identity::host_keys`]). That is how a next host key
//! reaches agents before the switch; ours log it and warn when they do not pin
//! it, Go Tower agents ignore it. Kept apart from admission: it follows the
//! registry's joins, so joining never waits on it.
//!
//! An announcement waits for room in its session's queue, and an agent that
//! does not read its connection leaves none (what the proxy queues for it is
//! capped: [`tunnel::server::WRITE_QUEUE_LIMIT`]) for as long as it stays. So
//! each announcement is a task of its own, and one such agent holds only its
//! own. A session has at most one in flight ([`Flights`]): a change meanwhile
//! only marks it, and once that one is done another follows with the set as
//! it is then. A newer set never lands before an older one, and a stalled
//! session costs one task however often the set changes; when it closes, its
//! announcement fails and nothing follows.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tunnel::server::Session;

use super::registry::Registry;
use crate::identity::host_keys::HostKeys;

/// Announce until `stop`.
pub async fn run(registry: Registry, keys: Arc<HostKeys>, stop: CancellationToken) {
    // Subscribed before the first round: a session that joins in between is
    // told twice, which is harmless; none is missed.
    let mut joins = registry.joins();
    let mut generations = keys.subscribe();
    generations.borrow_and_update();
    let mut announcer = Announcer {
        keys,
        flights: Flights::default(),
        tasks: JoinSet::new(),
    };
    announcer.all(&registry);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = generations.changed() => {
                if changed.is_err() {
                    return;
                }
                generations.borrow_and_update();
                announcer.all(&registry);
            }
            joined = joins.recv() => match joined {
                Ok((id, cluster, session)) if !session.is_closed() => {
                    announcer.one(id, cluster, session);
                }
                Ok(_) => {}
                // Fell behind a burst of joins: tell everyone once.
                Err(RecvError::Lagged(_)) => announcer.all(&registry),
                Err(RecvError::Closed) => return,
            },
            Some(done) = announcer.tasks.join_next(), if !announcer.tasks.is_empty() => {
                // Announcements do not panic; the set is dropped only with `run`.
                if let Ok((id, cluster, session)) = done
                    && announcer.flights.done(id, session.is_closed())
                {
                    announcer.spawn(id, cluster, session);
                }
            }
        }
    }
}

/// The announcements in flight.
struct Announcer {
    keys: Arc<HostKeys>,
    flights: Flights,
    tasks: JoinSet<(u64, String, Session)>,
}

impl Announcer {
    /// Every live session: the set as it is now.
    fn all(&mut self, registry: &Registry) {
        for (id, cluster, session) in registry.all_sessions() {
            self.one(id, cluster, session);
        }
    }

    fn one(&mut self, id: u64, cluster: String, session: Session) {
        if self.flights.want(id) {
            self.spawn(id, cluster, session);
        }
    }

    /// The set is read when the task starts: after the previous announcement
    /// to this session is done.
    fn spawn(&mut self, id: u64, cluster: String, session: Session) {
        let keys = self.keys.clone();
        self.tasks.spawn(async move {
            let announced = keys.announced();
            session.announce_host_keys(&announced).await;
            tracing::debug!(%cluster, keys = announced.len(), "host keys announced");
            (id, cluster, session)
        });
    }
}

/// Sessions (by registry id) with an announcement in flight, and whether
/// another must follow it.
#[derive(Default)]
struct Flights {
    again: HashMap<u64, bool>,
}

impl Flights {
    /// Session `id` is to be told the current set: true to start now; false
    /// when one is in flight (another follows it).
    fn want(&mut self, id: u64) -> bool {
        match self.again.entry(id) {
            Entry::Occupied(mut flight) => {
                *flight.get_mut() = true;
                false
            }
            Entry::Vacant(none) => {
                none.insert(false);
                true
            }
        }
    }

    /// The announcement to `id` is done: true to start the one that follows
    /// (it is then in flight).
    fn done(&mut self, id: u64, closed: bool) -> bool {
        match self.again.get_mut(&id) {
            Some(again) if *again && !closed => {
                *again = false;
                true
            }
            _ => {
                self.again.remove(&id);
                false
            }
        }
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.again.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Flights;

    #[test]
    fn one_announcement_in_flight_per_session_and_one_follows_any_number_of_changes() {
        let mut flights = Flights::default();
        assert!(flights.want(1), "nothing in flight: start");
        assert!(
            flights.want(2),
            "another session does not wait on the first"
        );
        // Three changes while session 1's announcement waits: one follows.
        assert!(!flights.want(1));
        assert!(!flights.want(1));
        assert!(!flights.want(1));
        assert_eq!(flights.in_flight(), 2);
        assert!(flights.done(1, false), "the follower starts");
        assert!(!flights.done(1, false), "and none after it");
        assert!(!flights.done(2, false));
        assert_eq!(flights.in_flight(), 0);
        assert!(flights.want(1), "done: the next change starts at once");
    }

    #[test]
    fn a_closed_session_gets_no_follower_and_is_forgotten() {
        let mut flights = Flights::default();
        assert!(flights.want(7));
        assert!(!flights.want(7));
        assert!(!flights.done(7, true));
        assert_eq!(flights.in_flight(), 0);
    }
}
