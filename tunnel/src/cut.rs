//! A stream that can be cut from outside: once its token is cancelled,
//! every read and write fails. The proxy hands russh's session loop a
//! [`Cut`] so that it can end a session whatever state the loop is in: a
//! peer that stops in the middle of the key exchange left the loop waiting
//! for its next packet with the disconnect queued behind the exchange, and
//! the connection open for ever (found by tests/adversarial.rs).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// `inner` until `token` is cancelled, then errors.
pub struct Cut<S> {
    inner: S,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> Cut<S> {
    pub fn new(inner: S, token: CancellationToken) -> Self {
        Self {
            inner,
            cut: Box::pin(token.cancelled_owned()),
        }
    }

    /// Ready(error) once cut; registers the task's waker otherwise.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.cut.as_mut().poll(cx).map(|()| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection cut by the proxy",
            )
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cut<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cut<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_read_waiting_for_ever_fails_once_cut() {
        let (a, mut b) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        let mut cut = Cut::new(a, token.clone());
        b.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        cut.read_exact(&mut buf).await.unwrap();
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            cut.read(&mut buf).await
        });
        token.cancel();
        let err = reading.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(b);
    }
}
