//! The proxy's SSH host keys and their rotation.
//!
//! Agents pin the host key's fingerprint, so a new key must be known to them
//! before the proxy shows it. The Secret `tower-proxy` says what to do: the
//! key in `ssh-host-key` is the one every new SSH handshake shows, a key in
//! `ssh-host-key-next` is the one that follows. While a next key exists the
//! proxy announces both to every connected agent (OpenSSH's
//! `hostkeys-00@openssh.com`, see [`crate::agents::announce`]), so operators
//! and agents' logs see it coming; the switch is moving the next key into
//! `ssh-host-key`. Handshakes after the switch show the new key, live sessions
//! keep going (an SSH session never re-checks its host key). Every replica
//! watches the Secret ([`super::watch`]), so all of them switch, none restarts.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use tokio::sync::watch;

/// What a new reading of the Secret changes (pure: [`decide`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// A next key appeared (or was replaced): announce it.
    NextAdded,
    /// The next key was withdrawn without a switch.
    NextRemoved,
    /// New handshakes show another key.
    Switched,
}

/// Fingerprints (current, next) before and after: what changed.
pub fn decide(before: (&str, Option<&str>), after: (&str, Option<&str>)) -> Change {
    if before.0 != after.0 {
        Change::Switched
    } else if before.1 == after.1 {
        Change::Nothing
    } else if after.1.is_some() {
        Change::NextAdded
    } else {
        Change::NextRemoved
    }
}

struct State {
    config: Arc<russh::server::Config>,
    current: PublicKey,
    next: Option<PublicKey>,
}

/// The host keys in use, shared by the agents' port, the announcer and the
/// Secret watch. [`HostKeys::config`] is what each new SSH handshake uses.
pub struct HostKeys {
    keepalive: Duration,
    state: RwLock<State>,
    /// Bumped on every change of the announced set.
    generation: watch::Sender<u64>,
}

fn fingerprint(key: &PublicKey) -> String {
    tunnel::ssh::fingerprint(key)
}

impl HostKeys {
    pub fn new(current: PrivateKey, next: Option<&PrivateKey>, keepalive: Duration) -> Self {
        let state = State {
            current: current.public_key().clone(),
            next: next.map(|k| k.public_key().clone()),
            config: Arc::new(tunnel::ssh::server_config(current, keepalive)),
        };
        Self {
            keepalive,
            state: RwLock::new(state),
            generation: watch::Sender::new(0),
        }
    }

    /// The SSH server settings for a new agent connection.
    pub fn config(&self) -> Arc<russh::server::Config> {
        self.read().config.clone()
    }

    /// The keys to announce: the current one, then the next if any.
    pub fn announced(&self) -> Vec<PublicKey> {
        let state = self.read();
        std::iter::once(state.current.clone())
            .chain(state.next.clone())
            .collect()
    }

    /// The current key's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.read().current)
    }

    /// Wakes when the announced set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Take the keys the Secret holds now; logs and returns what changed.
    pub fn set(&self, current: PrivateKey, next: Option<&PrivateKey>) -> Change {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let old_next = state.next.as_ref().map(fingerprint);
        let new_next = next.map(|k| fingerprint(k.public_key()));
        let old = fingerprint(&state.current);
        let new = fingerprint(current.public_key());
        let change = decide((&old, old_next.as_deref()), (&new, new_next.as_deref()));
        match change {
            Change::Nothing => return change,
            Change::NextAdded => tracing::info!(
                current = %old, next = ?new_next,
                "next SSH host key added: announcing it to the agents (pin it with \
                 --proxy-host-key-fingerprint before the switch)"
            ),
            Change::NextRemoved => tracing::info!(current = %old, "next SSH host key withdrawn"),
            Change::Switched => tracing::info!(
                previous = %old, current = %new, next = ?new_next,
                "SSH host key switched: new agent connections see the new key"
            ),
        }
        state.next = next.map(|k| k.public_key().clone());
        if change == Change::Switched {
            state.current = current.public_key().clone();
            state.config = Arc::new(tunnel::ssh::server_config(current, self.keepalive));
        }
        drop(state);
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        change
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_new_reading_changes() {
        assert_eq!(decide(("a", None), ("a", None)), Change::Nothing);
        assert_eq!(decide(("a", Some("b")), ("a", Some("b"))), Change::Nothing);
        assert_eq!(decide(("a", None), ("a", Some("b"))), Change::NextAdded);
        assert_eq!(
            decide(("a", Some("b")), ("a", Some("c"))),
            Change::NextAdded
        );
        assert_eq!(decide(("a", Some("b")), ("a", None)), Change::NextRemoved);
        assert_eq!(decide(("a", Some("b")), ("b", None)), Change::Switched);
        assert_eq!(decide(("a", None), ("c", None)), Change::Switched);
    }

    #[test]
    fn a_switch_changes_what_new_handshakes_show() {
        let old = tunnel::ssh::generate_host_key().unwrap();
        let new = tunnel::ssh::generate_host_key().unwrap();
        let keys = HostKeys::new(old.clone(), None, Duration::from_secs(30));
        let mut changes = keys.subscribe();
        assert_eq!(keys.announced(), [old.public_key().clone()]);

        assert_eq!(keys.set(old.clone(), Some(&new)), Change::NextAdded);
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert_eq!(
            keys.announced(),
            [old.public_key().clone(), new.public_key().clone()]
        );
        assert_eq!(keys.config().keys[0].public_key(), old.public_key());

        assert_eq!(keys.set(old.clone(), Some(&new)), Change::Nothing);
        assert!(!changes.has_changed().unwrap());

        assert_eq!(keys.set(new.clone(), None), Change::Switched);
        assert_eq!(keys.config().keys[0].public_key(), new.public_key());
        assert_eq!(keys.announced(), [new.public_key().clone()]);
        assert_eq!(keys.fingerprint(), fingerprint(new.public_key()));
    }
}
