//! Received data written by the session's task itself.
//!
//! Without this, every message a channel receives goes through a queue to
//! the connection's copy task, which the session's task wakes; for a small
//! request that hand-off (wake, schedule, queue, waker) costs more than the
//! write. [`join_tcp`] shares the TCP connection with the session: while the
//! copy task has written everything it took and nothing is queued for it,
//! the session writes a small message straight to the socket
//! (`try_write`, never waiting) and queues only what the socket did not take.
//!
//! Order: the session offers data only while its queue to the reader is
//! empty (russh counts the messages in it), and [`DirectSocket`] takes it
//! only while the copy task is idle. The copy task clears `idle` before it
//! takes anything from the queue and sets it only after writing all of it,
//! so bytes written directly never overtake bytes the copy task holds. Only
//! the session's task queues data, so nothing is queued while it writes.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use russh::DirectSink;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::{ChannelIo, Copied, join_both};
use crate::write_behind::Turn;

/// Largest message the session writes itself. Bulk data comes in full
/// 32 KiB packets; those stay with the copy task, which gathers the packets
/// already received into one vectored write (a write each would cost more
/// syscalls than the hand-off saves).
pub const DIRECT_MAX: usize = 16 * 1024;

/// [`super::join_channel`] for a TCP connection, with small received
/// messages written by the session's task when the copy task is idle.
pub async fn join_tcp<C>(tcp: TcpStream, channel: &mut C, turn: Option<Turn>) -> Copied
where
    C: ChannelIo + ?Sized,
{
    let direct = Arc::new(DirectSocket {
        tcp,
        idle: AtomicBool::new(false),
        written: AtomicU64::new(0),
    });
    channel.deliver_directly(direct.clone());
    let mut socket = SharedSocket(direct.clone());
    let mut copied = join_both(&mut socket, channel, turn, Some(&direct.idle)).await;
    // The copy is over (an error may have ended it while the copy task was
    // idle): the session writes no more, and what it wrote is counted.
    direct.idle.store(false, Ordering::SeqCst);
    copied.down += direct.written.load(Ordering::SeqCst);
    copied
}

/// The connection as the session sees it.
struct DirectSocket {
    tcp: TcpStream,
    /// The copy task wrote everything it took from the channel and waits.
    idle: AtomicBool,
    /// Bytes the session wrote.
    written: AtomicU64,
}

impl DirectSink for DirectSocket {
    fn try_take(&self, data: &[u8]) -> usize {
        if data.len() > DIRECT_MAX || !self.idle.load(Ordering::SeqCst) {
            return 0;
        }
        match self.tcp.try_write(data) {
            Ok(n) => {
                self.written.fetch_add(n as u64, Ordering::SeqCst);
                n
            }
            // Full, or an error the copy task will meet on its next write.
            Err(_) => 0,
        }
    }
}

/// The connection as the copy task sees it: the same socket, through
/// tokio's readiness (`&TcpStream` has no `AsyncRead`/`AsyncWrite`).
struct SharedSocket(Arc<DirectSocket>);

/// One read or write of `tcp` (`transfer`, which moves up to `wanted`
/// bytes), as tokio's own `TcpStream` does it: wait until the socket is
/// ready, and when the transfer moved less than asked (the socket is drained
/// or full), clear that readiness as of before the transfer (a later event
/// stands). That saves the call that would find nothing.
fn poll_transfer(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    wanted: usize,
    mut transfer: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        if interest.is_readable() {
            ready!(tcp.poll_read_ready(cx))?;
        } else {
            ready!(tcp.poll_write_ready(cx))?;
        }
        let mut moved = None;
        let polled = tcp.try_io(interest, || {
            let n = transfer()?;
            moved = Some(n);
            // Saying "would block" is what clears the readiness.
            if n > 0 && n < wanted {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        match (moved, polled) {
            (Some(n), _) => return Poll::Ready(Ok(n)),
            (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (None, polled) => return Poll::Ready(polled.map(|()| 0)),
        }
    }
}

impl AsyncRead for SharedSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.0.tcp;
        let wanted = buf.remaining();
        poll_transfer(tcp, cx, Interest::READABLE, wanted, || {
            tcp.try_read_buf(buf)
        })
        .map_ok(|_| ())
    }
}

impl AsyncWrite for SharedSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let tcp = &self.0.tcp;
        let wanted = bufs.iter().map(|b| b.len()).sum();
        poll_transfer(tcp, cx, Interest::WRITABLE, wanted, || {
            tcp.try_write_vectored(bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-close: the session may still hold the socket, so closing it is
    /// not enough.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the descriptor is owned by `tcp`, alive for this call.
        let rc = unsafe { libc::shutdown(self.0.tcp.as_raw_fd(), libc::SHUT_WR) };
        if rc == 0 {
            return Poll::Ready(Ok(()));
        }
        let e = io::Error::last_os_error();
        // Already shut, or the peer went: nothing left to end.
        match e.raw_os_error() {
            Some(libc::ENOTCONN) => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Fed;
    use super::*;
    use bytes::Bytes;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    type Join = tokio::task::JoinHandle<Copied>;

    /// A copy between a loopback connection and a [`Fed`] channel (whose
    /// writes fail if `gone`): the peer's end, the channel's queue, the
    /// sink the copy gave the channel, the copy.
    async fn start(
        gone: bool,
    ) -> (
        TcpStream,
        mpsc::UnboundedSender<Bytes>,
        Arc<dyn DirectSink>,
        Join,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let (queue, rx) = mpsc::unbounded_channel();
        let held = Arc::new(Mutex::new(None));
        let mut channel = Fed {
            queue: rx,
            sink: held.clone(),
            _open: None,
            gone,
        };
        let join = tokio::spawn(async move { join_tcp(ours, &mut channel, None).await });
        loop {
            if let Some(sink) = held.lock().unwrap().clone() {
                return (peer, queue, sink, join);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Offers `data` to the sink until it takes some, within a deadline.
    async fn take_when_idle(sink: &Arc<dyn DirectSink>, data: &[u8]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = sink.try_take(data);
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_bytes_wait_for_what_the_copy_holds_and_are_counted() {
        let (mut peer, queue, sink, join) = start(false).await;

        // More than the sockets hold, queued while the peer reads nothing:
        // the copy task keeps some of it, so the sink must refuse.
        let bulk: Vec<u8> = (0..32 << 20).map(|i| (i % 251) as u8).collect();
        for chunk in bulk.chunks(32 * 1024) {
            queue.send(Bytes::copy_from_slice(chunk)).unwrap();
        }
        let mut first = vec![0u8; 1 << 20];
        peer.read_exact(&mut first).await.unwrap();
        assert_eq!(
            sink.try_take(b"early"),
            0,
            "taken while the copy held bytes"
        );

        // Once the peer took everything the copy task idles: small data goes
        // straight to the socket, after all of the queued bytes.
        let reader = tokio::spawn(async move {
            let mut rest = vec![0u8; bulk.len() - first.len() + 4];
            peer.read_exact(&mut rest).await.unwrap();
            first.extend_from_slice(&rest);
            (peer, first, bulk)
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "the peer never got the bytes");
            if take_when_idle(&sink, b"tail").await == 4 {
                break;
            }
        }
        let (mut peer, got, bulk) = reader.await.unwrap();
        assert_eq!(
            &got[..bulk.len()],
            &bulk[..],
            "the queued bytes came first, in order"
        );
        assert_eq!(&got[bulk.len()..], b"tail");
        assert_eq!(
            sink.try_take(&[0u8; DIRECT_MAX + 1]),
            0,
            "bulk-sized data stays queued"
        );

        // The end: the queue's end half-closes the socket, the peer's ends
        // the copy; the direct bytes count as written.
        drop(queue);
        let mut end = Vec::new();
        peer.read_to_end(&mut end).await.unwrap();
        assert!(end.is_empty());
        peer.shutdown().await.unwrap();
        let copied = join.await.unwrap();
        copied.end.unwrap();
        assert_eq!(copied.down, (32 << 20) + 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_copy_ends_in_error_the_session_writes_nothing() {
        let (mut peer, queue, sink, join) = start(true).await;
        // The copy task idles, so the session may write.
        assert_eq!(take_when_idle(&sink, b"ok").await, 2);
        // What the peer sends cannot go into the channel: the copy ends,
        // the socket still open.
        peer.write_all(b"x").await.unwrap();
        let copied = join.await.unwrap();
        assert!(copied.end.is_err());
        assert_eq!(copied.down, 2);
        assert_eq!(sink.try_take(b"late"), 0, "written after the copy ended");
        drop(queue);
    }
}
