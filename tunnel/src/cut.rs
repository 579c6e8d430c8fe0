//! A stream that can be cut from outside: once its [`Switch`] is cut, every
//! read and write fails. The proxy hands russh's session loop a [`Cut`] so
//! that it can end a session whatever state the loop is in: a peer that stops
//! in the middle of the key exchange left the loop waiting for its next packet
//! with the disconnect queued behind the exchange, and the connection open for
//! ever (found by tests/adversarial.rs). The agent wraps its tunnels the same
//! way to close them for sure (`agent/src/killable.rs`).
//!
//! The check is on every read and write of a tunnel, so it is a load of one
//! atomic flag, and a waker is registered only when the stream has nothing to
//! give and the task is going to wait. A `CancellationToken` cost two mutex
//! round trips per call, about 1 % of each end's CPU in a small request.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Cuts every stream wrapped with it, once and for all. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Switch(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    cut: AtomicBool,
    /// The task waiting to read, and the one waiting to write (a stream has
    /// one of each at a time, as a tokio socket does).
    reader: AtomicWaker,
    writer: AtomicWaker,
    /// Tasks in [`Switch::cut_wait`].
    waiting: Notify,
}

impl Switch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cut: every read and write from now on fails, and those waiting wake.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::SeqCst);
        self.0.reader.wake();
        self.0.writer.wake();
        self.0.waiting.notify_waiters();
    }

    pub fn is_cut(&self) -> bool {
        self.0.cut.load(Ordering::SeqCst)
    }

    /// Returns once cut.
    pub async fn cut_wait(&self) {
        loop {
            let notified = self.0.waiting.notified();
            tokio::pin!(notified);
            // Registered before the check, so a cut in between still wakes it.
            notified.as_mut().enable();
            if self.is_cut() {
                return;
            }
            notified.await;
        }
    }

    /// Cuts when dropped.
    pub fn cut_on_drop(&self) -> CutOnDrop {
        CutOnDrop(self.clone())
    }

    /// `poll` (an operation on a stream) unless cut, then `gone()`. A poll
    /// that found nothing registers the task on `side`, to be woken by a cut;
    /// a cut that came before the registration is seen by the check after it.
    fn guard<T>(
        &self,
        cx: &mut Context<'_>,
        side: Side,
        gone: fn() -> io::Error,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.is_cut() {
            return Poll::Ready(Err(gone()));
        }
        let polled = poll(cx);
        if polled.is_pending() {
            match side {
                Side::Read => self.0.reader.register(cx.waker()),
                Side::Write => self.0.writer.register(cx.waker()),
            }
            if self.is_cut() {
                return Poll::Ready(Err(gone()));
            }
        }
        polled
    }
}

/// Which of a stream's waiting tasks a check registers.
#[derive(Clone, Copy, Debug)]
enum Side {
    Read,
    Write,
}

/// From [`Switch::cut_on_drop`].
#[derive(Debug)]
pub struct CutOnDrop(Switch);

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        self.0.cut();
    }
}

/// `inner` until `switch` is cut, then every operation fails with `gone()`.
pub struct Cut<S> {
    inner: S,
    switch: Switch,
    gone: fn() -> io::Error,
    /// Whether a shutdown once cut succeeds instead of failing.
    quiet_close: bool,
}

impl<S> Cut<S> {
    pub fn new(inner: S, switch: Switch, gone: fn() -> io::Error) -> Self {
        Self {
            inner,
            switch,
            gone,
            quiet_close: false,
        }
    }

    fn guard<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        side: Side,
        poll: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        let this = self.get_mut();
        this.switch.guard(cx, side, this.gone, |cx| {
            poll(Pin::new(&mut this.inner), cx)
        })
    }

    /// A shutdown after the cut succeeds: the caller closes a cut stream by
    /// dropping it, and a polite close into a full socket would wait forever.
    pub fn quiet_close(mut self) -> Self {
        self.quiet_close = true;
        self
    }
}

/// The error of a session the proxy cut.
pub fn cut_by_proxy() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection cut by the proxy",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Cut<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.guard(cx, Side::Read, |inner, cx| inner.poll_read(cx, buf))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cut<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, Side::Write, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.guard(cx, Side::Write, |inner, cx| {
            inner.poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guard(cx, Side::Write, |inner, cx| inner.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self
            .as_mut()
            .guard(cx, Side::Write, |inner, cx| inner.poll_shutdown(cx))
        {
            Poll::Ready(Err(_)) if self.quiet_close && self.switch.is_cut() => Poll::Ready(Ok(())),
            polled => polled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A waker that records that it was woken.
    struct Woken(AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn woken() -> (Arc<Woken>, std::task::Waker) {
        let w = Arc::new(Woken(AtomicBool::new(false)));
        (w.clone(), w.into())
    }

    fn aborted<T: std::fmt::Debug>(p: Poll<io::Result<T>>) -> bool {
        matches!(p, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionAborted)
    }

    #[tokio::test]
    async fn a_read_waiting_for_ever_wakes_and_fails_once_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let switch = Switch::new();
        let mut cut = Cut::new(a, switch.clone(), cut_by_proxy);
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        cut.read_exact(&mut buf).await.unwrap();

        let (flag, waker) = woken();
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 1];
        let mut rb = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut cut).poll_read(&mut cx, &mut rb).is_pending());
        switch.cut();
        assert!(flag.0.load(Ordering::SeqCst), "the cut wakes the reader");
        assert!(aborted(Pin::new(&mut cut).poll_read(&mut cx, &mut rb)));
        drop(b);
    }

    #[tokio::test]
    async fn a_write_waiting_for_room_wakes_and_fails_once_cut() {
        let (a, b) = tokio::io::duplex(4);
        let switch = Switch::new();
        let mut cut = Cut::new(a, switch.clone(), cut_by_proxy);
        cut.write_all(b"full").await.unwrap();

        let (flag, waker) = woken();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut cut).poll_write(&mut cx, b"more").is_pending());
        switch.cut();
        assert!(flag.0.load(Ordering::SeqCst), "the cut wakes the writer");
        assert!(aborted(Pin::new(&mut cut).poll_write(&mut cx, b"more")));
        drop(b);
    }

    #[tokio::test]
    async fn data_waiting_is_not_read_once_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let switch = Switch::new();
        let mut cut = Cut::new(a, switch.clone(), cut_by_proxy);
        b.write_all(b"hi").await.unwrap();
        switch.cut();
        let mut buf = [0u8; 2];
        let err = cut.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn cut_wait_returns_for_a_cut_before_or_after() {
        let before = Switch::new();
        before.cut();
        before.cut_wait().await;

        let after = Switch::new();
        let waiting = tokio::spawn({
            let after = after.clone();
            async move { after.cut_wait().await }
        });
        drop(after.cut_on_drop());
        waiting.await.unwrap();
        assert!(after.is_cut());
    }
}
