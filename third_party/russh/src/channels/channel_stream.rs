use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite};

use super::io::{ChannelCloseOnDrop, ChannelRx, ChannelTx};
use super::{ChannelId, ChannelMsg, DirectSink};
use std::sync::Arc;

/// AsyncRead/AsyncWrite wrapper for SSH Channels
pub struct ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send + 'static,
{
    tx: ChannelTx<S>,
    rx: ChannelRx<ChannelCloseOnDrop<S>>,
    /// Patched (PATCHES.md 37): the direct sink, held for as long as the
    /// stream (the session holds it weakly).
    direct: Option<Arc<dyn DirectSink>>,
}

impl<S> ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send,
{
    pub(super) fn new(tx: ChannelTx<S>, rx: ChannelRx<ChannelCloseOnDrop<S>>) -> Self {
        Self { tx, rx, direct: None }
    }

    /// Patched (PATCHES.md 37): let the session loop hand received data
    /// to `sink` itself while nothing is queued for this stream (see
    /// [`DirectSink`]). Once per stream; false if it already has one.
    pub fn deliver_directly(&mut self, sink: Arc<dyn DirectSink>) -> bool {
        if self.direct.is_some() {
            return false;
        }
        let set = std::borrow::Borrow::<crate::ChannelReadHalf>::borrow(self.rx.channel())
            .deliver_directly(&sink);
        self.direct = Some(sink);
        set
    }

    /// Patched (PATCHES.md 28): write a slice of `data` as the next packet,
    /// without copying it; see [`ChannelTx::poll_write_bytes`].
    pub fn poll_write_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &Bytes,
    ) -> Poll<Result<usize, io::Error>>
    where
        S: 'static,
    {
        self.tx.poll_write_bytes(cx, data)
    }

    /// Patched (PATCHES.md 36): the next received data, owned; empty at the
    /// end; see [`ChannelRx::poll_recv_bytes`].
    pub fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        self.rx.poll_recv_bytes(cx)
    }
}

impl<S> AsyncRead for ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

/// Patched (PATCHES.md 28): the received data without a copy.
impl<S> AsyncBufRead for ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send,
{
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().rx).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.rx).consume(amt);
    }
}

impl<S> AsyncWrite for ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + 'static + Send + Sync,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize, io::Error>> {
        Pin::new(&mut self.tx).poll_write(cx, buf)
    }

    /// Patched (PATCHES.md 31): one packet for all the slices.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<Result<usize, io::Error>> {
        Pin::new(&mut self.tx).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tx.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), io::Error>> {
        Pin::new(&mut self.tx).poll_shutdown(cx)
    }
}
