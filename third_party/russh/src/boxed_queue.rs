//! Patched (PATCHES.md 18): unbounded queues whose slots hold a `Box`.
//!
//! tokio's mpsc allocates a block of 32 slots per queue up front, each slot
//! as large as the message. Queues that stay empty for most of a session's
//! life (channel-open replies, authentication replies) then cost 32 large
//! messages per idle connection; boxed, a slot is one pointer and a message
//! costs an allocation only when one is sent. Same API as the tokio types
//! russh uses on them.

use tokio::sync::mpsc::error::{SendError, TryRecvError};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

pub(crate) struct BoxSender<T>(UnboundedSender<Box<T>>);

pub(crate) struct BoxReceiver<T>(UnboundedReceiver<Box<T>>);

/// An unbounded queue of boxed messages.
pub(crate) fn unbounded<T>() -> (BoxSender<T>, BoxReceiver<T>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (BoxSender(tx), BoxReceiver(rx))
}

impl<T> Clone for BoxSender<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> std::fmt::Debug for BoxSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxSender")
    }
}

impl<T> std::fmt::Debug for BoxReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxReceiver")
    }
}

impl<T> BoxSender<T> {
    pub(crate) fn send(&self, message: T) -> Result<(), SendError<T>> {
        self.0
            .send(Box::new(message))
            .map_err(|SendError(m)| SendError(*m))
    }
}

impl<T> BoxReceiver<T> {
    /// Cancel-safe, like tokio's.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        self.0.recv().await.map(|m| *m)
    }

    pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.0.try_recv().map(|m| *m)
    }

    pub(crate) fn close(&mut self) {
        self.0.close()
    }
}
