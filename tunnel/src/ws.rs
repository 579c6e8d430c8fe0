//! The websocket as a byte stream.
//!
//! Tower writes each chunk as one binary message and reads by concatenating
//! payloads, so message boundaries carry no meaning. [`WsStream`] does the same
//! over tokio-tungstenite: every `poll_write` is one binary message written through
//! at once (tungstenite's write buffer is off: russh writes its identification
//! line without flushing and then waits for the peer's, which would otherwise
//! deadlock both sides silently). Reads accept binary and text messages,
//! fragmented or not, and skip pings and pongs. A close frame or the end of the
//! TCP stream reads as EOF.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Largest websocket message we accept; russh never writes more than a few
/// hundred KiB at once, Go Tower much less.
pub const MAX_MESSAGE: usize = 16 << 20;

/// The websocket settings both ends use: no write buffering (see module docs).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// A websocket carrying a byte stream; see the module docs.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    pending: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wrap `io`, on which the HTTP upgrade has already happened.
    pub async fn from_upgraded(io: S, role: Role) -> Self {
        let inner = WebSocketStream::from_raw_socket(io, role, Some(config())).await;
        Self {
            inner,
            pending: Bytes::new(),
        }
    }
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(text))) => self.pending = Bytes::from(text),
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let inner = Pin::new(&mut self.inner);
        ready!(inner.poll_ready(cx)).map_err(to_io)?;
        let len = buf.len().min(MAX_MESSAGE);
        Pin::new(&mut self.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(&buf[..len])))
            .map_err(to_io)?;
        // Push it out now; if the socket is full, the next poll_ready or
        // poll_flush finishes the job.
        if let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_flush(cx) {
            return Poll::Ready(Err(to_io(e)));
        }
        Poll::Ready(Ok(len))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => match to_io(e) {
                e if e.kind() == io::ErrorKind::BrokenPipe => Poll::Ready(Ok(())),
                e => Poll::Ready(Err(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    #[tokio::test]
    async fn boundaries_do_not_matter() {
        let (a, b) = duplex(1 << 20);
        let mut raw = WebSocketStream::from_raw_socket(a, Role::Client, Some(config())).await;
        let mut stream = WsStream::from_upgraded(b, Role::Server).await;
        raw.send(Message::Binary(Bytes::from_static(b"SSH-kubesphere-")))
            .await
            .unwrap();
        raw.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        raw.send(Message::Text("v1-client\r\n".into()))
            .await
            .unwrap();
        raw.send(Message::Binary(Bytes::new())).await.unwrap();
        raw.close(None).await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"SSH-kubesphere-v1-client\r\n");
    }

    #[tokio::test]
    async fn each_write_is_one_binary_message() {
        use futures_util::StreamExt;
        let (a, b) = duplex(1 << 20);
        let mut raw = WebSocketStream::from_raw_socket(a, Role::Server, Some(config())).await;
        let mut stream = WsStream::from_upgraded(b, Role::Client).await;
        stream.write_all(b"hello").await.unwrap();
        // No flush: the message must already be on its way.
        let msg = tokio::time::timeout(std::time::Duration::from_secs(5), raw.next())
            .await
            .expect("write was not sent without a flush")
            .unwrap()
            .unwrap();
        assert_eq!(msg, Message::Binary(Bytes::from_static(b"hello")));
    }
}
