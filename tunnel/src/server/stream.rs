//! [`TunnelStream`]: one `kubesphere` channel as a byte stream, for whatever
//! the proxy sends through it (a kube API request, a TLS connection).
//!
//! It wraps russh's channel stream and keeps its session's books: the open
//! streams that make its [`Session::load`](super::Session::load), and the
//! bytes each way of [`Session::bytes`](super::Session::bytes). Reads and
//! writes can take and hand over [`Bytes`] ([`crate::copy::ChannelIo`]), so a
//! copy through the tunnel needs no buffer of its own.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use russh::server::Msg;
use russh::{Channel, ChannelStream, DirectSink};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::SessionInner;
use crate::write_behind::Turn;

/// A byte stream through one `kubesphere` channel. Counts towards its session's
/// load until dropped.
pub struct TunnelStream {
    inner: ChannelStream<Msg>,
    session: Arc<SessionInner>,
    /// Its writes take turns with the session's other channels.
    turn: Turn,
}

impl TunnelStream {
    pub(super) fn new(channel: Channel<Msg>, session: Arc<SessionInner>) -> Self {
        session.open_streams.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: channel.into_stream(),
            turn: Turn::new(session.write_queue.clone()),
            session,
        }
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        self.session.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.session.received.fetch_add(n, Ordering::Relaxed);
        poll
    }
}

impl TunnelStream {
    /// `write` on this stream's turn, its bytes counted for the session.
    fn poll_turn_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut ChannelStream<Msg>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let inner = &mut self.inner;
        let poll = self.turn.poll_write(cx, |cx| write(inner, cx));
        if let Poll::Ready(Ok(n)) = poll {
            self.session.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl crate::copy::ChannelIo for TunnelStream {
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        self.poll_turn_write(cx, |inner, cx| inner.poll_write_bytes(cx, data))
    }

    fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let data = ready!(self.inner.poll_recv_bytes(cx))?;
        self.session
            .received
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(data))
    }

    fn deliver_directly(&mut self, sink: Arc<dyn DirectSink>) -> bool {
        let session = self.session.clone();
        self.inner
            .deliver_directly(Arc::new(Counted { sink, session }))
    }
}

/// A direct sink whose bytes count as received for the session's books.
struct Counted {
    sink: Arc<dyn DirectSink>,
    session: Arc<SessionInner>,
}

impl DirectSink for Counted {
    fn try_take(&self, data: &[u8]) -> usize {
        let n = self.sink.try_take(data);
        self.session.received.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_turn_write(cx, |inner, cx| Pin::new(inner).poll_write(cx, buf))
    }
    /// One SSH packet for all the slices (a TLS stream's records).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_turn_write(cx, |inner, cx| {
            Pin::new(inner).poll_write_vectored(cx, bufs)
        })
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
