//! Copying a tunnel stream to a TCP connection and back.
//!
//! [`join_channel`] copies between a channel and any byte stream in one
//! task. [`join_tcp`] does the same for a plain TCP connection and also lets
//! the session's task write small received messages to the connection itself
//! while the copy task has nothing left to write ([`direct`]).

mod direct;
pub use direct::join_tcp;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use russh::{ChannelId, ChannelMsg, ChannelStream};
use tokio::io::{AsyncRead, AsyncWrite};

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

/// A channel that takes and gives owned bytes, so a copy need not pass every
/// byte through a buffer of its own.
pub trait ChannelIo: AsyncWrite + Unpin {
    /// Send the first bytes of `data` as the next packet, without copying
    /// them; `Ready(n)`: n bytes are on their way.
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>>;

    /// The next received data as it came (several may be held at once);
    /// empty at the end of the stream.
    fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>>;

    /// Let the session hand received data to `sink` itself while nothing is
    /// queued for this reader ([`russh::DirectSink`]); false if it cannot.
    fn deliver_directly(&mut self, sink: Arc<dyn russh::DirectSink>) -> bool {
        let _ = sink;
        false
    }
}

impl<S> ChannelIo for ChannelStream<S>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    fn poll_write_bytes(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<io::Result<usize>> {
        ChannelStream::poll_write_bytes(self, cx, data)
    }

    fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        ChannelStream::poll_recv_bytes(self, cx)
    }

    fn deliver_directly(&mut self, sink: Arc<dyn russh::DirectSink>) -> bool {
        ChannelStream::deliver_directly(self, sink)
    }
}

/// [`join`] for a channel and a socket, with one user-space copy fewer each
/// way: socket reads land in buffers the channel's packets are slices of, and
/// the channel's packets are written to the socket as they came, those already
/// received in one vectored write.
/// `turn`: the channel's place in its session's write queue, when the
/// channel does not take its turns itself (the proxy's `TunnelStream` does).
/// Returns bytes (socket to channel, channel to socket).
pub async fn join_channel<T, C>(
    socket: &mut T,
    channel: &mut C,
    turn: Option<Turn>,
) -> io::Result<(u64, u64)>
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: ChannelIo + ?Sized,
{
    let copied = join_both(socket, channel, turn, None).await;
    copied.end.map(|()| (copied.up, copied.down))
}

/// What a copy moved each way, and how it ended (the counts stand when it
/// ended with an error).
#[derive(Debug)]
pub struct Copied {
    /// Socket to channel.
    pub up: u64,
    /// Channel to socket.
    pub down: u64,
    pub end: io::Result<()>,
}

/// [`join_channel`]; `idle` (if any) is set while the copy to the socket
/// has written everything it took and waits for more.
async fn join_both<T, C>(
    socket: &mut T,
    channel: &mut C,
    mut turn: Option<Turn>,
    idle: Option<&AtomicBool>,
) -> Copied
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: ChannelIo + ?Sized,
{
    let mut up = Up::default();
    let mut down = Down::default();
    let end = std::future::poll_fn(|cx| {
        let up_done = up
            .poll(cx, &mut *socket, &mut *channel, turn.as_mut())?
            .is_ready();
        let down_done = down.poll(cx, &mut *channel, &mut *socket, idle)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    Copied {
        up: up.copied,
        down: down.copied,
        end,
    }
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

/// Most received data [`Down`] holds for one write: a few packets.
const GATHER: usize = 256 * 1024;
/// Most packets in one vectored write.
const GATHER_SLICES: usize = 64;

/// Channel to socket: the packets already received go out in one vectored
/// write, not a write each.
#[derive(Default)]
struct Down {
    queue: std::collections::VecDeque<Bytes>,
    queued: usize,
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
        idle: Option<&AtomicBool>,
    ) -> Poll<io::Result<()>>
    where
        C: ChannelIo + ?Sized,
        T: AsyncWrite + Unpin + ?Sized,
    {
        // Busy from before taking anything from the channel until all of it
        // is written: the session writes to the socket itself only while
        // this is set and nothing is queued (see `direct`).
        if let Some(idle) = idle {
            idle.store(false, Ordering::SeqCst);
        }
        while !self.done {
            while !self.eof && self.queued < GATHER && self.queue.len() < GATHER_SLICES {
                match channel.poll_recv_bytes(cx) {
                    Poll::Ready(data) => {
                        let data = data?;
                        if data.is_empty() {
                            self.eof = true;
                        } else {
                            self.queued += data.len();
                            self.queue.push_back(data);
                        }
                    }
                    Poll::Pending => break,
                }
            }
            if self.queue.is_empty() {
                if self.eof {
                    ready!(Pin::new(&mut *socket).poll_shutdown(cx))?;
                    self.done = true;
                    continue;
                }
                // Nothing more for now: push out what the socket holds.
                if self.unflushed {
                    ready!(Pin::new(&mut *socket).poll_flush(cx))?;
                    self.unflushed = false;
                }
                if let Some(idle) = idle {
                    idle.store(true, Ordering::SeqCst);
                }
                return Poll::Pending;
            }
            let mut slices = [io::IoSlice::new(&[]); GATHER_SLICES];
            for (slice, data) in slices.iter_mut().zip(&self.queue) {
                *slice = io::IoSlice::new(data);
            }
            let slices = &slices[..self.queue.len().min(GATHER_SLICES)];
            let n = ready!(Pin::new(&mut *socket).poll_write_vectored(cx, slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
            self.copied += n as u64;
            self.unflushed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// `n` bytes of the queue were written.
    fn consume(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.queue.pop_front();
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A channel whose received packets come from a queue the test feeds
    /// (standing for the session's); writes go nowhere. It hands a direct
    /// sink it is given to the test.
    pub(super) struct Fed {
        pub(super) queue: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        pub(super) sink: Arc<std::sync::Mutex<Option<Arc<dyn russh::DirectSink>>>>,
        /// Keeps the queue open (no end yet).
        pub(super) _open: Option<tokio::sync::mpsc::UnboundedSender<Bytes>>,
        /// Writes fail (the session is gone).
        pub(super) gone: bool,
    }

    impl Fed {
        /// `packets` already received; the end follows them if `ended`.
        fn new(packets: &[&'static [u8]], ended: bool) -> Self {
            let (tx, queue) = tokio::sync::mpsc::unbounded_channel();
            for p in packets {
                let _ = tx.send(Bytes::from_static(p));
            }
            Self {
                queue,
                sink: Arc::default(),
                _open: (!ended).then_some(tx),
                gone: false,
            }
        }
    }

    impl AsyncWrite for Fed {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl ChannelIo for Fed {
        fn poll_write_bytes(
            &mut self,
            _: &mut Context<'_>,
            data: &Bytes,
        ) -> Poll<io::Result<usize>> {
            if self.gone {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            Poll::Ready(Ok(data.len()))
        }
        fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
            Poll::Ready(Ok(ready!(self.queue.poll_recv(cx)).unwrap_or_default()))
        }
        fn deliver_directly(&mut self, sink: Arc<dyn russh::DirectSink>) -> bool {
            if let Ok(mut held) = self.sink.lock() {
                *held = Some(sink);
            }
            true
        }
    }

    /// A socket that records each write call and takes at most `take` bytes
    /// of it.
    #[derive(Default)]
    struct Socket {
        calls: Vec<Vec<u8>>,
        take: Option<usize>,
        shut: bool,
    }

    impl AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(b)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let mut call: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            call.truncate(this.take.unwrap_or(usize::MAX));
            let n = call.len();
            this.calls.push(call);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn poll_down(down: &mut Down, channel: &mut Fed, socket: &mut Socket) -> Poll<io::Result<()>> {
        down.poll(
            &mut Context::from_waker(std::task::Waker::noop()),
            channel,
            socket,
            None,
        )
    }

    #[test]
    fn packets_already_received_leave_in_one_write() {
        let mut channel = Fed::new(&[b"one ", b"two ", b"three"], false);
        let mut socket = Socket::default();
        let mut down = Down::default();
        assert!(poll_down(&mut down, &mut channel, &mut socket).is_pending());
        assert_eq!(socket.calls, vec![b"one two three".to_vec()]);
        assert_eq!(down.copied, 13);
        assert!(!socket.shut);
    }

    #[test]
    fn a_socket_that_takes_part_gets_the_rest_in_order_then_the_end() {
        let mut channel = Fed::new(&[b"abc", b"defgh", b"ij"], true);
        let mut socket = Socket {
            take: Some(4),
            ..Socket::default()
        };
        let mut down = Down::default();
        assert!(matches!(
            poll_down(&mut down, &mut channel, &mut socket),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(socket.calls.concat(), b"abcdefghij");
        assert_eq!(socket.calls.len(), 3);
        assert_eq!((down.copied, down.queued), (10, 0));
        assert!(socket.shut);
    }
}
