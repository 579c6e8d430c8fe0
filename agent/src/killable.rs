//! A stream the agent can cut from outside.
//!
//! `tunnel::client::run` owns the websocket and its SSH session runs in a task of
//! its own; dropping `run`'s future does not end that session while channels are
//! still open. The agent must nonetheless be able to close a tunnel for sure: a
//! rejected connection (Go Tower leaks them), the old tunnel once its replacement
//! with new credentials is up, everything on shutdown. [`killable`] wraps the
//! stream in a [`Cut`] that fails every read and write once its switch is cut,
//! which ends the SSH session, its channels, and the TCP connection under it.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tunnel::cut::{Cut, Switch};

/// `inner` until `kill` is cut. A shutdown after the kill succeeds: a killed
/// tunnel is closed by dropping it, and a polite close frame into a full
/// socket would wait forever.
pub fn killable<S: AsyncRead + AsyncWrite + Unpin>(inner: S, kill: Switch) -> Cut<S> {
    Cut::new(inner, kill, killed).quiet_close()
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "tunnel closed by the agent",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_pending_read_fails_when_killed() {
        let (a, mut b) = tokio::io::duplex(64);
        let kill = Switch::new();
        let mut stream = killable(a, kill.clone());
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

    #[tokio::test]
    async fn a_shutdown_after_the_kill_succeeds_and_io_fails() {
        let (a, _b) = tokio::io::duplex(64);
        let kill = Switch::new();
        let mut stream = killable(a, kill.clone());
        kill.cut();
        stream.shutdown().await.unwrap();
        let err = stream.write(b"x").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(err.to_string(), "tunnel closed by the agent");
    }
}
