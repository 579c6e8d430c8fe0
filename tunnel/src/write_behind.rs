//! Writes that never block the SSH session loop.
//!
//! russh's session loop writes and then waits for the write to finish before it
//! reads again. When both ends of a busy tunnel do that at the same moment with
//! full socket buffers, nobody reads and the tunnel deadlocks for good (seen with
//! 100 busy channels). [`WriteBehind`] hands writes to a writer task instead, so
//! the loop always goes back to reading. What can pile up is bounded by the SSH
//! windows the peer granted (each channel's unacknowledged data), not by this
//! queue: the peer grants more only as its readers consume what we delivered.
//!
//! A peer grants the windows, though: one that grants large windows and does
//! not read its socket would have every granted byte queued here. With a
//! limit ([`WriteBehind::with_limit`], the proxy's side), writes wait once that
//! much is queued: a session that does not read costs at most the limit, and
//! only its own loop waits. The agent's side has no limit, so it always reads
//! and the two loops cannot both wait on each other.
//!
//! The writer also coalesces queued writes into larger websocket messages (one
//! vectored write, so the bytes are not copied together first). When
//! the wrapper is dropped, the writer stops at once, even mid-write into a full
//! socket, so a dead tunnel's connection is closed instead of held open.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Largest write the writer task sends in one go (one websocket message).
const MAX_BATCH: usize = 256 * 1024;
/// Most buffers handed to one vectored write (the kernel takes up to 1024).
const MAX_SLICES: usize = 64;
/// How long a clean shutdown may take before the connection is just dropped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A stream whose writes are queued to a writer task; see the module docs.
pub struct WriteBehind<S> {
    read: ReadHalf<S>,
    queue: Option<mpsc::UnboundedSender<Bytes>>,
    failed: Arc<Mutex<Option<io::ErrorKind>>>,
    queued: Arc<Queued>,
    limit: usize,
    _stop_writer: DropGuard,
}

/// Bytes handed to the writer and not written yet, and who waits for room.
#[derive(Default)]
struct Queued {
    bytes: AtomicUsize,
    room: AtomicWaker,
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> WriteBehind<S> {
    /// Writes never wait.
    pub fn new(stream: S) -> Self {
        Self::with_limit(stream, usize::MAX)
    }

    /// Writes wait while `limit` bytes or more are queued.
    pub fn with_limit(stream: S, limit: usize) -> Self {
        let (read, write) = tokio::io::split(stream);
        let (queue, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(Mutex::new(None));
        let queued = Arc::new(Queued::default());
        let stop = CancellationToken::new();
        tokio::spawn(writer(
            write,
            rx,
            failed.clone(),
            queued.clone(),
            stop.clone(),
        ));
        Self {
            read,
            queue: Some(queue),
            failed,
            queued,
            limit,
            _stop_writer: stop.drop_guard(),
        }
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    mut write: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    failed: Arc<Mutex<Option<io::ErrorKind>>>,
    queued: Arc<Queued>,
    stop: CancellationToken,
) {
    let mut batch: Vec<Bytes> = Vec::new();
    let result: io::Result<()> = async {
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                next = rx.recv() => next,
            };
            let Some(first) = first else {
                // The session shut its side down: say goodbye, briefly.
                let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, write.shutdown()).await;
                return Ok(());
            };
            // What is queued goes out as one vectored write (one websocket
            // message), not copied together first.
            let mut len = first.len();
            batch.push(first);
            while len < MAX_BATCH {
                match rx.try_recv() {
                    Ok(more) => {
                        len += more.len();
                        batch.push(more);
                    }
                    Err(_) => break,
                }
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                written = async {
                    write_all_vectored(&mut write, &mut batch).await?;
                    write.flush().await
                } => written?,
            }
            queued.bytes.fetch_sub(len, Ordering::AcqRel);
            queued.room.wake();
        }
    }
    .await;
    if let Err(e) = result
        && let Ok(mut failed) = failed.lock()
    {
        *failed = Some(e.kind());
    }
}

/// Write all of `parts` (emptied on success), as few writes as the stream takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    write: &mut W,
    parts: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut next = 0;
    while next < parts.len() {
        #[allow(clippy::indexing_slicing)] // next < parts.len()
        let slices: Vec<io::IoSlice<'_>> = parts[next..]
            .iter()
            .take(MAX_SLICES)
            .map(|p| io::IoSlice::new(p))
            .collect();
        let mut n = write.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while let Some(part) = parts.get_mut(next) {
            if n < part.len() {
                part.advance(n);
                break;
            }
            n -= part.len();
            next += 1;
        }
    }
    parts.clear();
    Ok(())
}

impl<S> WriteBehind<S> {
    fn check(&self) -> io::Result<()> {
        match self.failed.lock().ok().and_then(|f| *f) {
            Some(kind) => Err(io::Error::new(kind, "the tunnel's connection failed")),
            None => Ok(()),
        }
    }
}

impl<S: AsyncRead> AsyncRead for WriteBehind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for WriteBehind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.queued.bytes.load(Ordering::Acquire) >= self.limit {
            self.queued.room.register(cx.waker());
            // The writer may have made room meanwhile.
            if self.queued.bytes.load(Ordering::Acquire) >= self.limit {
                return Poll::Pending;
            }
        }
        match &self.queue {
            Some(queue) if queue.send(Bytes::copy_from_slice(buf)).is_ok() => {
                self.queued.bytes.fetch_add(buf.len(), Ordering::AcqRel);
                Poll::Ready(Ok(buf.len()))
            }
            _ => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer task flushes after every batch.
        Poll::Ready(self.check())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing the queue makes the writer shut the connection down after
        // what is already queued.
        self.queue = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test]
    async fn writes_do_not_wait_for_the_reader() {
        let (a, mut b) = duplex(1024);
        let mut w = WriteBehind::new(a);
        // Far more than the pipe holds, and nobody reads yet: must not block.
        for _ in 0..1000 {
            w.write_all(&[7u8; 1024]).await.unwrap();
        }
        w.flush().await.unwrap();
        let mut got = vec![0u8; 1000 * 1024];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&x| x == 7));
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn with_a_limit_writes_wait_for_the_reader() {
        let (a, mut b) = duplex(1024);
        let mut w = WriteBehind::with_limit(a, 8 * 1024);
        // Nobody reads: the queue fills to the limit, then writes wait.
        let mut written = 0;
        let filled = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                w.write_all(&[7u8; 1024]).await.unwrap();
                written += 1024;
            }
        })
        .await;
        assert!(filled.is_err(), "writes never waited");
        // The limit, plus one write past it and what the pipe took.
        assert!(written <= 10 * 1024, "{written} bytes queued, limit 8 KiB");
        // Reading makes room; everything arrives.
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 64 * 1024];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        let rest = 64 * 1024 - written;
        w.write_all(&vec![7u8; rest]).await.unwrap();
        let got = reader.await.unwrap();
        assert!(got.iter().all(|&x| x == 7));
    }

    #[tokio::test]
    async fn dropping_it_releases_the_connection_even_when_stuck() {
        let (a, mut b) = duplex(16);
        let mut w = WriteBehind::new(a);
        w.write_all(&[1u8; 4096]).await.unwrap();
        drop(w);
        // The writer gives up its half at once, the reader half went with `w`:
        // the peer sees the end after what fit into the pipe.
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), b.read_to_end(&mut got))
            .await
            .expect("the connection was held open after drop")
            .unwrap();
        assert!(got.len() <= 4096);
    }
}
