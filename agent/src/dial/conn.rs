//! The connection under the tunnel's websocket, hyper's wrapper taken off.
//!
//! hyper hands an upgraded connection over as `Upgraded`: every read and
//! write of the tunnel would go through two adapters (tokio's traits to
//! hyper's and back), a `dyn` call and a check for bytes hyper read ahead.
//! The dial knows which of four shapes it built (TCP or TLS, directly or
//! through an HTTP proxy's CONNECT), so [`Shape`] takes the connection back
//! out of the upgrade as that type, and [`Conn`] is the four of them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::client::TlsStream;
use tunnel::socket::TunnelSocket;

/// Through an HTTP proxy: the CONNECT tunnel (hyper's, left wrapped).
type Connected = TokioIo<Upgraded>;

pub enum Conn {
    Tcp(TunnelSocket),
    /// Boxed: the TLS state would size every idle agent's connection.
    Tls(Box<TlsStream<TunnelSocket>>),
    Proxied(Connected),
    ProxiedTls(Box<TlsStream<Connected>>),
    /// An upgrade that did not come back as the type dialled (not expected).
    Upgraded(TokioIo<Upgraded>),
}

/// A connection the dial builds, and what it is as a [`Conn`].
pub trait Shape: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn into_conn(self) -> Conn;
}

impl Shape for TunnelSocket {
    fn into_conn(self) -> Conn {
        Conn::Tcp(self)
    }
}

impl Shape for TlsStream<TunnelSocket> {
    fn into_conn(self) -> Conn {
        Conn::Tls(Box::new(self))
    }
}

impl Shape for Connected {
    fn into_conn(self) -> Conn {
        Conn::Proxied(self)
    }
}

impl Shape for TlsStream<Connected> {
    fn into_conn(self) -> Conn {
        Conn::ProxiedTls(Box::new(self))
    }
}

/// `$call` on whichever connection `$conn` holds, pinned.
macro_rules! each {
    ($conn:expr, $io:ident => $call:expr) => {
        match $conn {
            Conn::Tcp($io) => $call,
            Conn::Tls($io) => $call,
            Conn::Proxied($io) => $call,
            Conn::ProxiedTls($io) => $call,
            Conn::Upgraded($io) => $call,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), io => Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), io => Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, io => io.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), io => Pin::new(io).poll_shutdown(cx))
    }
}
