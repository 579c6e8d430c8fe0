//! Copying a tunnel stream to a TCP connection and back.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use russh::{ChannelId, ChannelMsg, ChannelStream};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite};

use crate::write_behind::Turn;

/// Copy buffer size: one read is sent as up to two 32 KiB SSH data packets
/// (8 KiB copies cost ~35 % more CPU than 64 KiB in the spike).
pub const COPY_BUF: usize = 64 * 1024;

/// Copy both ways until both directions are done; an EOF on one side becomes a
/// half-close (shutdown) on the other. Returns bytes (a to b, b to a).
pub async fn join<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUF, COPY_BUF).await
}

/// A channel that takes owned bytes and lends what it received, so a copy
/// need not pass every byte through a buffer of its own.
pub trait ChannelIo: AsyncBufRead + AsyncWrite + Unpin {
    /// Send the first bytes of `data` as the next packet, without copying
    /// them; `Ready(n)`: n bytes are on their way.
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>>;
}

impl<S> ChannelIo for ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        ChannelStream::poll_write_bytes(self, cx, data)
    }
}

/// [`join`] for a channel and a socket, with one user-space copy fewer each
/// way: socket reads land in buffers the channel's packets are slices of, and
/// the channel's packets are written to the socket as they came.
/// `turn`: the channel's place in its session's write queue, when the
/// channel does not take its turns itself (the proxy's `TunnelStream` does).
/// Returns bytes (socket to channel, channel to socket).
pub async fn join_channel<T, C>(
    socket: &mut T,
    channel: &mut C,
    mut turn: Option<Turn>,
) -> io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: ChannelIo + ?Sized,
{
    let mut up = Up::default();
    let mut down = Down::default();
    std::future::poll_fn(|cx| {
        let up_done = up
            .poll(cx, &mut *socket, &mut *channel, turn.as_mut())?
            .is_ready();
        let down_done = down.poll(cx, &mut *channel, &mut *socket)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok((up.copied, down.copied)))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Socket to channel.
#[derive(Default)]
struct Up {
    /// Read into; what was read is split off as `pending`. Its allocation is
    /// reused once the packets cut from it are gone.
    buf: BytesMut,
    pending: Bytes,
    eof: bool,
    done: bool,
    copied: u64,
}

impl Up {
    fn poll<T, C>(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut T,
        channel: &mut C,
        mut turn: Option<&mut Turn>,
    ) -> Poll<io::Result<()>>
    where
        T: AsyncRead + Unpin + ?Sized,
        C: ChannelIo + ?Sized,
    {
        while !self.done {
            if !self.pending.is_empty() {
                if let Some(turn) = turn.as_deref_mut() {
                    ready!(turn.poll(cx));
                }
                let n = ready!(channel.poll_write_bytes(cx, &self.pending))?;
                if let Some(turn) = turn.as_deref() {
                    turn.sent(n);
                }
                self.pending.advance(n);
                self.copied += n as u64;
            } else if self.eof {
                ready!(Pin::new(&mut *channel).poll_shutdown(cx))?;
                self.done = true;
            } else {
                if self.buf.capacity() < COPY_BUF / 2 {
                    self.buf.reserve(COPY_BUF);
                }
                let n = ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut *socket),
                    cx,
                    &mut self.buf
                ))?;
                if n == 0 {
                    self.eof = true;
                    // Nothing more to read: the buffer goes.
                    self.buf = BytesMut::new();
                } else {
                    self.pending = self.buf.split().freeze();
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Channel to socket.
#[derive(Default)]
struct Down {
    eof: bool,
    done: bool,
    /// Written since the last flush.
    unflushed: bool,
    copied: u64,
}

impl Down {
    fn poll<C, T>(
        &mut self,
        cx: &mut Context<'_>,
        channel: &mut C,
        socket: &mut T,
    ) -> Poll<io::Result<()>>
    where
        C: ChannelIo + ?Sized,
        T: AsyncWrite + Unpin + ?Sized,
    {
        while !self.done {
            if self.eof {
                ready!(Pin::new(&mut *socket).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            let data = match Pin::new(&mut *channel).poll_fill_buf(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing more for now: push out what the socket holds.
                    if self.unflushed {
                        ready!(Pin::new(&mut *socket).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            };
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            let n = ready!(Pin::new(&mut *socket).poll_write(cx, data))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            Pin::new(&mut *channel).consume(n);
            self.copied += n as u64;
            self.unflushed = true;
        }
        Poll::Ready(Ok(()))
    }
}
