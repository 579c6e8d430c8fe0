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
//! much is queued: a session that does not read costs about the limit, and
//! only its own loop waits. The agent's side has no limit, so it always reads
//! and the two loops cannot both wait on each other.
//!
//! What the limit counts ([`QueueLevel`]): each write whole, from the moment
//! it is queued until the batch that holds it is written out whole. A write
//! is taken whole even past the limit, and a batch the connection took in
//! part still counts whole: the session may wait with up to one batch (a
//! session's write is its whole output buffer, megabytes at times) fewer
//! bytes than the limit left to send.
//!
//! The writer also coalesces queued writes into larger websocket messages (one
//! vectored write, so the bytes are not copied together first).
//!
//! When nothing is queued and the writer is not writing, a write goes to the
//! connection at once, from the session's own task, if the connection takes
//! it without waiting: no copy into the queue and no wake-up of the writer
//! task (a small request's round trip crosses four such writes). What the
//! connection does not take, or a flush it cannot finish, goes to the writer
//! as before, so the session loop still never waits on the connection. When
//! the wrapper is dropped, the writer stops at once, even mid-write into a full
//! socket, so a dead tunnel's connection is closed instead of held open.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

mod turn;
pub use turn::{TURN_MAX, TURN_MIN, TURN_TARGET, Turn, turn_bound};

/// Largest write the writer task sends in one go (one websocket message).
const MAX_BATCH: usize = 256 * 1024;
/// Most buffers handed to one vectored write (the kernel takes up to 1024).
const MAX_SLICES: usize = 64;
/// How long a clean shutdown may take before the connection is just dropped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// A stream whose writes are queued to a writer task; see the module docs.
pub struct WriteBehind<S> {
    read: ReadHalf<S>,
    shared: Arc<Shared>,
    /// The connection's write half, shared with the writer task: each takes
    /// it only for one poll, the writer only while [`Pending::busy`].
    conn: Arc<Mutex<Watched<WriteHalf<S>>>>,
    /// This side shut down: later writes fail.
    shut: bool,
    _stop_writer: DropGuard,
}

/// How full a [`WriteBehind`]'s queue is, readable from outside (the proxy's
/// metrics) without holding the queue itself.
#[derive(Debug)]
pub struct QueueLevel {
    /// Bytes handed to the writer and not written yet: the whole batch the
    /// writer is on counts until all of it is written.
    bytes: AtomicUsize,
    /// The writer waits for the connection to take more (its last write or
    /// flush was pending).
    connection_full: AtomicBool,
    limit: usize,
    /// Channel writers waiting for their turn ([`Turn::poll`]).
    turns: Mutex<Vec<Waker>>,
    /// Channel data handed to the session ([`Turn::sent`]) and not yet
    /// written out, as far as the writer's batches tell (they also carry the
    /// session's own messages, so this errs low, never high).
    debt: AtomicUsize,
    /// Writers that wait for a turn and have not had it yet.
    wanting: AtomicUsize,
    /// Counts the times the queue got under its bound: one turn per writer
    /// per round while others want one.
    round: AtomicU64,
    /// Queued bytes under which channel data may be queued: what the
    /// connection drains in [`TURN_TARGET`], measured ([`Self::drained`]).
    turn_below: AtomicUsize,
    /// The connection's write was pending during the current batch.
    batch_waited: AtomicBool,
    /// The writer has stopped: no turn is waited for any more.
    closed: AtomicBool,
}

impl QueueLevel {
    fn new(limit: usize) -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            connection_full: AtomicBool::new(false),
            limit,
            turns: Mutex::default(),
            debt: AtomicUsize::new(0),
            wanting: AtomicUsize::new(0),
            round: AtomicU64::new(0),
            turn_below: AtomicUsize::new(TURN_MAX),
            batch_waited: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// Bytes queued and not yet written out whole (what the limit counts).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// The queue is at its limit: the next write waits.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.limit
    }

    /// The queue is at its limit and the connection takes nothing more: the
    /// writer waits for the peer to read, and the writer's user waits for
    /// the writer.
    pub fn stalled(&self) -> bool {
        self.is_full() && self.connection_full.load(Ordering::Acquire)
    }
}

/// What the session and the writer task share. The queue is a `VecDeque`, not
/// a tokio mpsc: that one allocates a block of 32 slots per queue up front,
/// about 1 KiB for every idle tunnel (issue #15 part 4).
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer when `pending` changed.
    wake: Notify,
    failed: Mutex<Option<io::ErrorKind>>,
    /// Apart from the rest: whoever reads it must not keep queued data alive.
    level: Arc<QueueLevel>,
    /// Who waits for room under the limit.
    room: AtomicWaker,
}

#[derive(Default)]
struct Pending {
    writes: VecDeque<Bytes>,
    /// The session shut its side down: write what is queued, then shut down.
    closed: bool,
    /// The writer has a batch or a flush in hand: writes must queue behind it.
    busy: bool,
    /// A write that went straight to the connection left a flush to finish.
    flush_owed: bool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Nothing panics while holding it; a poisoned queue is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection failed: every later write fails with this kind.
    fn fail(&self, e: &io::Error) {
        if let Ok(mut failed) = self.failed.lock() {
            *failed = Some(e.kind());
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> WriteBehind<S> {
    /// Writes never wait.
    pub fn new(stream: S) -> Self {
        Self::with_limit(stream, usize::MAX)
    }

    /// Writes wait while `limit` bytes or more are queued.
    pub fn with_limit(stream: S, limit: usize) -> Self {
        let (read, write) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            wake: Notify::new(),
            failed: Mutex::default(),
            level: Arc::new(QueueLevel::new(limit)),
            room: AtomicWaker::new(),
        });
        let stop = CancellationToken::new();
        let conn = Arc::new(Mutex::new(Watched {
            inner: write,
            level: shared.level.clone(),
        }));
        tokio::spawn(writer(conn.clone(), shared.clone(), stop.clone()));
        Self {
            read,
            shared,
            conn,
            shut: false,
            _stop_writer: stop.drop_guard(),
        }
    }
}

impl<S> WriteBehind<S> {
    /// How full the queue is, for as long as the caller keeps it.
    pub fn level(&self) -> Arc<QueueLevel> {
        self.shared.level.clone()
    }
}

/// The connection's write half, noting whether it waits for room
/// ([`QueueLevel::stalled`]).
struct Watched<W> {
    inner: W,
    level: Arc<QueueLevel>,
}

impl<W> Watched<W> {
    fn note<T>(&self, poll: Poll<T>) -> Poll<T> {
        self.level
            .connection_full
            .store(poll.is_pending(), Ordering::Release);
        if poll.is_pending() {
            self.level.batch_waited.store(true, Ordering::Relaxed);
        }
        poll
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.note(poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the writer takes from the queue at once.
enum Next {
    /// This many bytes were moved into the batch.
    Write(usize),
    Wait,
    Shutdown,
}

/// Move what is queued into `batch` (up to [`MAX_BATCH`] bytes): it goes out
/// as one vectored write (one websocket message), not copied together first.
/// A flush owed by a direct write is an empty batch.
fn next(shared: &Shared, batch: &mut Vec<Bytes>) -> Next {
    let mut pending = shared.pending();
    let mut len = 0;
    while len < MAX_BATCH {
        match pending.writes.pop_front() {
            Some(more) => {
                len += more.len();
                batch.push(more);
            }
            None => break,
        }
    }
    let owed = std::mem::take(&mut pending.flush_owed);
    pending.busy = len > 0 || owed || pending.closed;
    match len {
        0 if owed => Next::Write(0),
        0 if pending.closed => Next::Shutdown,
        0 => Next::Wait,
        len => Next::Write(len),
    }
}

fn lock<W>(conn: &Mutex<W>) -> MutexGuard<'_, W> {
    // Nothing panics while holding it; a poisoned lock still holds the stream.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

async fn writer<W: AsyncWrite + Unpin>(
    conn: Arc<Mutex<W>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut batch: Vec<Bytes> = Vec::new();
    let result: io::Result<()> = async {
        loop {
            let len = match next(&shared, &mut batch) {
                Next::Write(len) => len,
                Next::Wait => {
                    shared.level.idle();
                    // A push after `next` looked left a permit: this returns at once.
                    tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        () = shared.wake.notified() => continue,
                    }
                }
                Next::Shutdown => {
                    // The session shut its side down: say goodbye, briefly.
                    let shutdown =
                        std::future::poll_fn(|cx| Pin::new(&mut *lock(&conn)).poll_shutdown(cx));
                    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, shutdown).await;
                    return Ok(());
                }
            };
            shared.level.batch_waited.store(false, Ordering::Relaxed);
            let started = tokio::time::Instant::now();
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                written = async {
                    write_all_vectored(&conn, &mut batch).await?;
                    std::future::poll_fn(|cx| Pin::new(&mut *lock(&conn)).poll_flush(cx)).await
                } => written?,
            }
            if shared.level.batch_waited.load(Ordering::Relaxed) {
                shared.level.drained(len, started.elapsed());
            }
            shared.level.written(len);
            shared.room.wake();
        }
    }
    .await;
    if let Err(e) = &result {
        shared.fail(e);
    }
    // Writers waiting for a turn go on, to find the session gone.
    shared.level.close();
}

/// Write all of `parts` (emptied on success), as few writes as the stream takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    conn: &Mutex<W>,
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
        let mut n =
            std::future::poll_fn(|cx| Pin::new(&mut *lock(conn)).poll_write_vectored(cx, &slices))
                .await?;
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
        match self.shared.failed.lock().ok().and_then(|f| *f) {
            Some(kind) => Err(io::Error::new(kind, "the tunnel's connection failed")),
            None => Ok(()),
        }
    }
}

impl<S: AsyncWrite> WriteBehind<S> {
    /// Write `buf` to the connection now if nothing is queued or being
    /// written and the connection takes it without waiting; `None`: queue it.
    /// Called with the queue locked, so the writer cannot start meanwhile.
    fn write_now(&self, pending: &mut Pending, buf: &[u8]) -> Option<io::Result<usize>> {
        // `closed` needs no check: it comes with `shut`, which refuses writes.
        if pending.busy || !pending.writes.is_empty() {
            return None;
        }
        let mut conn = lock(&self.conn);
        let mut cx = Context::from_waker(Waker::noop());
        let n = match Pin::new(&mut *conn).poll_write(&mut cx, buf) {
            Poll::Ready(Ok(0)) | Poll::Pending => return None,
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Some(Err(e)),
        };
        match Pin::new(&mut *conn).poll_flush(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Some(Err(e)),
            Poll::Pending => {
                // The rest of the frame waits in the stream for the writer.
                pending.busy = true;
                pending.flush_owed = true;
                self.shared.wake.notify_one();
            }
        }
        self.shared.level.sent_out(n);
        Some(Ok(n))
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

impl<S: AsyncWrite> AsyncWrite for WriteBehind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let shared = &self.shared;
        if shared.level.is_full() {
            shared.room.register(cx.waker());
            // The writer may have made room meanwhile.
            if shared.level.is_full() {
                return Poll::Pending;
            }
        }
        if self.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut pending = shared.pending();
        if let Some(written) = self.write_now(&mut pending, buf) {
            if let Err(e) = &written {
                shared.fail(e);
            }
            return Poll::Ready(written);
        }
        // Counted before the writer can take it, so its subtraction never wraps.
        // Taken whole, even past the limit: a session's write is its buffer.
        shared.level.bytes.fetch_add(buf.len(), Ordering::AcqRel);
        pending.writes.push_back(Bytes::copy_from_slice(buf));
        drop(pending);
        shared.wake.notify_one();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer task flushes after every batch.
        Poll::Ready(self.check())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer shuts the connection down after what is already queued.
        self.shut = true;
        self.shared.pending().closed = true;
        self.shared.wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

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

    /// The writer sleeps on a `Notify` between writes: on two threads, no write
    /// may be left queued without a wake-up (each one is read back in turn).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_write_wakes_the_writer_across_threads() {
        let (a, mut b) = duplex(1024);
        let mut w = WriteBehind::new(a);
        let mut got = [0u8; 3];
        for i in 0..2000u32 {
            let sent = [(i % 251) as u8, 1, 2];
            w.write_all(&sent).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), b.read_exact(&mut got))
                .await
                .expect("a queued write was left without a wake-up")
                .unwrap();
            assert_eq!(got, sent);
        }
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

    /// Yield to the writer task until `done` holds (a deadline, no sleeps).
    async fn until(what: &str, done: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never: {what}"));
    }

    /// The accounting behind the proxy's metrics and its e2e test of a
    /// stalled agent: what the limit counts is not what is left to send.
    #[tokio::test]
    async fn the_level_counts_writes_whole_until_their_batch_is_written() {
        use futures_util::FutureExt as _;
        let (a, mut b) = duplex(1024);
        let mut w = WriteBehind::with_limit(a, 64 * 1024);
        let level = w.level();
        assert_eq!(
            (level.bytes(), level.is_full(), level.stalled()),
            (0, false, false)
        );
        // What fits goes straight into the pipe, queued nowhere.
        w.write_all(&[0u8; 1024]).await.unwrap();
        assert_eq!(level.bytes(), 0);

        // One write, and the pipe is full: all of it counts until written.
        w.write_all(&[1u8; 48 * 1024]).await.unwrap();
        until("the writer waits for the pipe", || {
            level.connection_full.load(Ordering::Acquire)
        })
        .await;
        assert_eq!(level.bytes(), 48 * 1024);
        assert!(!level.is_full() && !level.stalled());

        // Below the limit, a write is taken whole however large: the queue
        // goes past the limit by up to one write.
        w.write_all(&[2u8; 32 * 1024]).await.unwrap();
        assert_eq!(level.bytes(), 80 * 1024);
        assert!(level.is_full() && level.stalled());
        assert!(
            w.write(&[3u8]).now_or_never().is_none(),
            "a write did not wait at the limit"
        );

        // Reading it all empties the queue.
        let mut got = vec![0u8; 81 * 1024];
        b.read_exact(&mut got).await.unwrap();
        until("the queue is empty", || level.bytes() == 0).await;
        assert!(!level.is_full() && !level.stalled());
        assert!(got[..1024].iter().all(|&x| x == 0));
        assert!(got[1024..49 * 1024].iter().all(|&x| x == 1));
        assert!(got[49 * 1024..].iter().all(|&x| x == 2));
    }

    #[tokio::test]
    async fn without_a_limit_the_queue_is_never_full() {
        let (a, _b) = duplex(16);
        let mut w = WriteBehind::new(a);
        let level = w.level();
        // The first 16 bytes fill the pipe at once; the rest is queued.
        w.write_all(&[1u8; 16]).await.unwrap();
        w.write_all(&[1u8; 1 << 20]).await.unwrap();
        until("the writer waits for the pipe", || {
            level.connection_full.load(Ordering::Acquire)
        })
        .await;
        assert_eq!(level.bytes(), 1 << 20);
        assert!(!level.is_full() && !level.stalled());
    }

    /// On an idle connection a write is written by the caller's task: the
    /// bytes are in the pipe before the writer task could have run (this
    /// runtime has one thread and the write never yielded).
    #[tokio::test]
    async fn a_write_to_an_idle_connection_goes_straight_out() {
        use futures_util::FutureExt as _;
        let (a, mut b) = duplex(1024);
        let mut w = WriteBehind::new(a);
        for i in 0..10u8 {
            w.write_all(&[i; 100])
                .now_or_never()
                .expect("a write waited")
                .unwrap();
            let mut got = [0u8; 100];
            b.read_exact(&mut got)
                .now_or_never()
                .expect("the write was left to the writer task")
                .unwrap();
            assert_eq!(got, [i; 100]);
        }
        assert_eq!(w.level().bytes(), 0);
    }

    /// A direct write the connection took but could not flush (a websocket
    /// frame partly on the socket) leaves the flush to the writer, and later
    /// writes queue behind it: nothing is reordered.
    #[tokio::test]
    async fn writes_after_an_unfinished_flush_keep_their_order() {
        let (a, mut b) = duplex(16);
        let mut w = WriteBehind::new(tokio::io::BufWriter::with_capacity(64, a));
        // Into the buffer at once; its flush fills the pipe and waits.
        w.write_all(&[b'a'; 48]).await.unwrap();
        w.write_all(&[b'b'; 48]).await.unwrap();
        w.write_all(&[b'c'; 200]).await.unwrap();
        let mut got = vec![0u8; 296];
        tokio::time::timeout(Duration::from_secs(10), b.read_exact(&mut got))
            .await
            .expect("the owed flush was never finished")
            .unwrap();
        assert!(got[..48].iter().all(|&x| x == b'a'));
        assert!(got[48..96].iter().all(|&x| x == b'b'));
        assert!(got[96..].iter().all(|&x| x == b'c'));
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

    /// A channel writer waiting for its turn when the connection goes is let
    /// go (its write then fails as the session's do), never left waiting.
    #[tokio::test]
    async fn a_writer_waiting_for_its_turn_is_let_go_when_the_writer_stops() {
        let (a, _b) = duplex(16);
        let mut w = WriteBehind::new(a);
        let level = w.level();
        level.turn_below.store(TURN_MIN, Ordering::Relaxed);
        // More than the bound, and the peer never reads.
        w.write_all(&vec![1u8; 2 * TURN_MIN]).await.unwrap();
        let mut turn = Turn::new(level.clone());
        let mut noop = Context::from_waker(Waker::noop());
        assert!(
            turn.poll(&mut noop).is_pending(),
            "over its bound: the turn waits"
        );
        drop(w);
        tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| turn.poll(cx)),
        )
        .await
        .expect("a writer waiting for its turn was left waiting after the connection went");
    }
}
