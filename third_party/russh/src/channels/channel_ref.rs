use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::mpsc::error::SendError;

use super::{ChannelReadHalf, WindowFeedback, WindowSizeRef};
use crate::{ChannelId, ChannelMsg};

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
///
/// Patched (see PATCHES.md): the queue towards the channel is unbounded so that
/// the session loop never waits on one slow reader; the peer's send window,
/// re-opened only as the reader consumes data, bounds what can pile up here.
#[derive(Debug)]
pub struct ChannelRef {
    pub(super) sender: UnboundedSender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
    pub(super) feedback: Arc<WindowFeedback>,
}

/// Patched (PATCHES.md): when the session ends it drops its channel refs; wake
/// writers waiting for window space so they see the session is gone instead
/// of waiting forever.
impl Drop for ChannelRef {
    fn drop(&mut self) {
        self.window_size.notifier.notify_waiters();
    }
}

impl ChannelRef {
    /// A new channel queue: the session's end and the application's read half.
    pub fn pair() -> (Self, ChannelReadHalf) {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let feedback = Arc::new(WindowFeedback::default());
        (
            Self {
                sender,
                window_size: WindowSizeRef::new(0),
                feedback: feedback.clone(),
            },
            ChannelReadHalf { receiver, feedback },
        )
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }

    /// Queue a message for the channel's reader. Never waits.
    pub async fn send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        self.try_send(msg)
    }

    /// Queue a message for the channel's reader. Never waits.
    pub fn try_send(&self, msg: ChannelMsg) -> Result<(), SendError<ChannelMsg>> {
        self.feedback.queueing();
        self.sender.send(msg)
    }

    /// Patched (PATCHES.md 37): received data to the reader, handed to its
    /// direct sink when it has one and nothing is queued, else (what the
    /// sink did not take) queued.
    pub fn send_data(&self, data: bytes::Bytes) -> Result<(), SendError<ChannelMsg>> {
        let taken = self.feedback.deliver(&data);
        if taken == data.len() {
            return Ok(());
        }
        self.try_send(ChannelMsg::Data {
            data: data.slice(taken..),
        })
    }

    /// Route the reader's consumption reports for channel `id` to `session`.
    pub(crate) fn bind_window_feedback(
        &self,
        id: ChannelId,
        session: &Arc<crate::SessionWindowWake>,
    ) {
        // Patched (PATCHES.md 35): called for every data message; cloning
        // (and dropping) the session's `Arc` each time bounced its count's
        // cache line, which the readers' reports share, between cores.
        if self.feedback.target.get().is_none() {
            let _ = self.feedback.target.set((id, session.clone()));
        }
    }
}
