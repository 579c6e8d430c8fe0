use std::borrow::BorrowMut;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead};

use super::{ChannelMsg, ChannelReadHalf};

#[derive(Debug)]
pub struct ChannelRx<R> {
    channel: R,
    buffer: Option<(ChannelMsg, usize)>,

    ext: Option<u32>,
}

impl<R> ChannelRx<R> {
    /// The channel read from.
    pub(crate) fn channel(&self) -> &R {
        &self.channel
    }

    pub fn new(channel: R, ext: Option<u32>) -> Self {
        Self {
            channel,
            buffer: None,
            ext,
        }
    }
}

impl<R> AsyncRead for ChannelRx<R>
where
    R: BorrowMut<ChannelReadHalf> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (msg, mut idx) = match self.buffer.take() {
            Some(msg) => msg,
            None => match ready!(self.channel.borrow_mut().poll_recv(cx)) {
                Some(msg) => (msg, 0),
                None => return Poll::Ready(Ok(())),
            },
        };

        match (&msg, self.ext) {
            (ChannelMsg::Data { data }, None) => {
                let readable = buf.remaining().min(data.len() - idx);

                // Clamped to maximum `buf.remaining()` and `data.len() - idx` with `.min`
                #[allow(clippy::indexing_slicing)]
                buf.put_slice(&data[idx..idx + readable]);
                idx += readable;

                if idx != data.len() {
                    self.buffer = Some((msg, idx));
                }

                Poll::Ready(Ok(()))
            }
            (ChannelMsg::ExtendedData { data, ext }, Some(target)) if *ext == target => {
                let readable = buf.remaining().min(data.len() - idx);

                // Clamped to maximum `buf.remaining()` and `data.len() - idx` with `.min`
                #[allow(clippy::indexing_slicing)]
                buf.put_slice(&data[idx..idx + readable]);
                idx += readable;

                if idx != data.len() {
                    self.buffer = Some((msg, idx));
                }

                Poll::Ready(Ok(()))
            }
            (ChannelMsg::Eof, _) => {
                self.channel.borrow_mut().receiver.close();

                Poll::Ready(Ok(()))
            }
            _ => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

/// Patched (PATCHES.md 36): the next received data, owned, as it came.
impl<R> ChannelRx<R>
where
    R: BorrowMut<ChannelReadHalf> + Unpin,
{
    /// The rest of the data message at hand, or the next one, as the
    /// [`Bytes`] it came in; empty at the end of the stream. Unlike
    /// [`AsyncBufRead::poll_fill_buf`], the caller may hold several.
    pub fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bytes::Bytes>> {
        if ready!(Pin::new(&mut *self).poll_fill_buf(cx))?.is_empty() {
            return Poll::Ready(Ok(bytes::Bytes::new()));
        }
        Poll::Ready(Ok(match self.buffer.take() {
            Some((ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. }, idx)) => {
                data.slice(idx..)
            }
            _ => bytes::Bytes::new(),
        }))
    }
}

/// Patched (PATCHES.md 28): the data as it came, without copying it into the
/// caller's buffer (a copy of every byte received for `copy_buf` users).
impl<R> AsyncBufRead for ChannelRx<R>
where
    R: BorrowMut<ChannelReadHalf> + Unpin,
{
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        loop {
            if this.buffer.is_none() {
                match ready!(this.channel.borrow_mut().poll_recv(cx)) {
                    Some(msg) => this.buffer = Some((msg, 0)),
                    None => return Poll::Ready(Ok(&[])),
                }
            }
            let readable = match (&this.buffer, this.ext) {
                (Some((ChannelMsg::Data { data }, idx)), None) => *idx < data.len(),
                (Some((ChannelMsg::ExtendedData { data, ext }, idx)), Some(target))
                    if *ext == target =>
                {
                    *idx < data.len()
                }
                (Some((ChannelMsg::Eof, _)), _) => {
                    this.buffer = None;
                    this.channel.borrow_mut().receiver.close();
                    return Poll::Ready(Ok(&[]));
                }
                _ => false,
            };
            if !readable {
                // Not ours (or empty): skipped, as `poll_read` does.
                this.buffer = None;
                continue;
            }
            return match &this.buffer {
                Some((ChannelMsg::Data { data }, idx))
                | Some((ChannelMsg::ExtendedData { data, .. }, idx)) => {
                    #[allow(clippy::indexing_slicing)] // idx < data.len(), checked above
                    Poll::Ready(Ok(&data[*idx..]))
                }
                _ => Poll::Ready(Ok(&[])),
            };
        }
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        if let Some((ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. }, idx)) =
            &mut this.buffer
        {
            *idx = (*idx + amt).min(data.len());
            if *idx == data.len() {
                this.buffer = None;
            }
        }
    }
}
