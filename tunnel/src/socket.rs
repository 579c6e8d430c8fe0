//! The tunnel's own TCP connection (agent to proxy), tuned the same on both
//! ends. See docs/protocol.md, "Fair share of a slow link": every channel's
//! bytes leave through this one socket, so what waits in front of the link
//! waits in front of every channel. The kernel is asked to hold little not
//! yet sent (`TCP_NOTSENT_LOWAT`); the rest waits in the session's write
//! queue, where channel writers take turns ([`crate::write_behind::Turn`]).
//!
//! How little follows the connection ([`TunnelSocket`]): about one round
//! trip of data at the rate the connection delivers (its bandwidth-delay
//! product, from `TCP_INFO`), at least [`NOTSENT_LOWAT`] and at most
//! [`NOTSENT_LOWAT_MAX`]. After a loss on a long link TCP may send a whole
//! window again once acknowledgements come back; with less than that ready
//! the link idles (a lossy 50 ms link lost ~10 % with a fixed 512 KiB). A
//! short or slow link keeps the floor, and the fair share with it: another
//! channel's packet waits behind at most a round trip of this one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The least the kernel may hold unsent on the tunnel's socket
/// (`TCP_NOTSENT_LOWAT`); data in flight (sent, not acknowledged) is not
/// counted, so a long link still fills. 128 and 256 KiB cost a lossy long
/// link 10-15 % of its throughput (`make bench`, `wan-lossy`).
pub const NOTSENT_LOWAT: u32 = 512 * 1024;

/// The most: a link whose round trip holds more is fast, and this much
/// leaves it in a few tens of milliseconds.
pub const NOTSENT_LOWAT_MAX: u32 = 4 << 20;

/// How often the connection is measured (`TCP_INFO`), at a write.
const RETUNE_EVERY: Duration = Duration::from_millis(100);

/// The tunnel's TCP connection: no delay for small writes, and a low-water
/// mark for unsent bytes that follows the connection's bandwidth-delay
/// product.
pub struct TunnelSocket {
    tcp: TcpStream,
    /// The mark in force (0: the kernel has none).
    lowat: u32,
    /// The best delivery rate lately (bytes a second), decaying by an
    /// eighth per measurement: one sample taken while little was queued
    /// (the kernel marks the connection application-limited then) must not
    /// pull the mark down and keep it there.
    rate: u64,
    next_retune: Instant,
}

impl TunnelSocket {
    /// Tunes `tcp` (best effort: a kernel without the options keeps its own
    /// buffering).
    pub fn new(tcp: TcpStream) -> TunnelSocket {
        let _ = tcp.set_nodelay(true);
        let mut socket = TunnelSocket {
            tcp,
            lowat: 0,
            rate: 0,
            next_retune: Instant::now() + RETUNE_EVERY,
        };
        socket.set_lowat(NOTSENT_LOWAT);
        socket
    }

    /// The low-water mark in force (0 when the kernel has none).
    pub fn lowat(&self) -> u32 {
        self.lowat
    }

    /// Measures the connection and moves the mark when it should change by
    /// a quarter or more (most measurements then cost one syscall).
    fn retune(&mut self) {
        self.next_retune = Instant::now() + RETUNE_EVERY;
        if self.lowat == 0 {
            return;
        }
        let Some(measured) = measure(&self.tcp) else {
            return;
        };
        self.rate = measured.rate.max(self.rate - self.rate / 8);
        let want = lowat_for(self.rate, measured.min_rtt_us);
        if want.abs_diff(self.lowat) >= self.lowat / 4 {
            self.set_lowat(want);
        }
    }

    #[cfg(target_os = "linux")]
    fn set_lowat(&mut self, value: u32) {
        use std::os::fd::AsRawFd;
        let v = value as libc::c_int;
        // SAFETY: a valid socket fd for the call's duration, and a c_int
        // option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                self.tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            self.lowat = value;
        } else {
            tracing::debug!(error = %io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn set_lowat(&mut self, _value: u32) {}

    fn after_write(&mut self, result: &Poll<io::Result<usize>>) {
        if matches!(result, Poll::Ready(Ok(_))) && Instant::now() >= self.next_retune {
            self.retune();
        }
    }
}

/// The mark for a delivery rate (bytes a second) and a round trip
/// (microseconds): their product, between the floor and the cap.
pub fn lowat_for(rate: u64, min_rtt_us: u32) -> u32 {
    let bdp = rate.saturating_mul(u64::from(min_rtt_us)) / 1_000_000;
    bdp.clamp(NOTSENT_LOWAT.into(), NOTSENT_LOWAT_MAX.into()) as u32
}

/// What the connection measured: its delivery rate (bytes a second, the
/// kernel's latest sample) and its shortest round trip (microseconds).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Measured {
    rate: u64,
    min_rtt_us: u32,
}

#[cfg(target_os = "linux")]
fn measure(tcp: &TcpStream) -> Option<Measured> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers; all zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and a buffer of `len` bytes the kernel
    // fills at most (older kernels fill less and say so in `len`).
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Kernels before 4.10 fill no delivery rate: the floor stays.
    let filled = std::mem::offset_of!(libc::tcp_info, tcpi_delivery_rate) + 8 <= len as usize;
    (rc == 0 && filled).then_some(Measured {
        rate: info.tcpi_delivery_rate,
        min_rtt_us: info.tcpi_min_rtt,
    })
}

#[cfg(not(target_os = "linux"))]
fn measure(_tcp: &TcpStream) -> Option<Measured> {
    None
}

impl AsyncRead for TunnelSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.after_write(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.after_write(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_a_round_trip_of_data_between_floor_and_cap() {
        // Loopback: microseconds of round trip, whatever the rate.
        assert_eq!(lowat_for(16_000_000_000, 2), NOTSENT_LOWAT);
        // A slow link keeps the floor.
        assert_eq!(lowat_for(2_000_000, 20_000), NOTSENT_LOWAT);
        // 30 MB/s at 50 ms: 1.5 MB.
        assert_eq!(lowat_for(30_000_000, 50_000), 1_500_000);
        // 500 MB/s at 50 ms: capped.
        assert_eq!(lowat_for(500_000_000, 50_000), NOTSENT_LOWAT_MAX);
        assert_eq!(lowat_for(u64::MAX, u32::MAX), NOTSENT_LOWAT_MAX);
    }

    /// A real connection starts at the floor; tuning never leaves the range.
    #[tokio::test]
    async fn a_socket_starts_at_the_floor() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, _server) = (client.unwrap(), server.unwrap());
        let mut socket = TunnelSocket::new(client);
        if cfg!(target_os = "linux") {
            assert_eq!(socket.lowat(), NOTSENT_LOWAT);
        }
        socket.retune();
        assert!(socket.lowat() == 0 || socket.lowat() >= NOTSENT_LOWAT);
        assert!(socket.lowat() <= NOTSENT_LOWAT_MAX);
    }
}
