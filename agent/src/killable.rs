//! A stream the agent can cut from outside.
//!
//! `tunnel::client::run` owns the websocket and its SSH session runs in a task of
//! its own; dropping `run`'s future does not end that session while channels are
//! still open. The agent must nonetheless be able to close a tunnel for sure: a
//! rejected connection (Go Tower leaks them), the old tunnel once its replacement
//! with new credentials is up, everything on shutdown. [`Killable`] wraps the
//! stream and fails every read and write once its switch is cut, which ends
//! the SSH session, its channels, and the TCP connection under it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tunnel::cut::{Side, Switch};

pub struct Killable<S> {
    inner: S,
    kill: Switch,
}

impl<S> Killable<S> {
    pub fn new(inner: S, kill: Switch) -> Self {
        Self { inner, kill }
    }
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "tunnel closed by the agent",
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Self { inner, kill } = self.get_mut();
        kill.guard(cx, Side::Read, killed, |cx| {
            Pin::new(inner).poll_read(cx, buf)
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Self { inner, kill } = self.get_mut();
        kill.guard(cx, Side::Write, killed, |cx| {
            Pin::new(inner).poll_write(cx, buf)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Self { inner, kill } = self.get_mut();
        kill.guard(cx, Side::Write, killed, |cx| {
            Pin::new(inner).poll_write_vectored(cx, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { inner, kill } = self.get_mut();
        kill.guard(cx, Side::Write, killed, |cx| Pin::new(inner).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Self { inner, kill } = self.get_mut();
        // A killed tunnel is closed by dropping it; a polite close frame into a
        // full socket would wait forever.
        match kill.guard(cx, Side::Write, killed, |cx| {
            Pin::new(inner).poll_shutdown(cx)
        }) {
            Poll::Ready(Err(_)) if kill.is_cut() => Poll::Ready(Ok(())),
            polled => polled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_pending_read_fails_when_killed() {
        let (a, mut b) = tokio::io::duplex(64);
        let kill = Switch::new();
        let mut stream = Killable::new(a, kill.clone());
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        stream.read_exact(&mut buf).await.unwrap();
        let mut buf = [0u8; 1];
        let mut read = std::pin::pin!(stream.read(&mut buf));
        let pending =
            std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx).is_pending())).await;
        assert!(pending, "nothing to read yet: the read waits");
        kill.cut();
        let result = read.await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }
}
