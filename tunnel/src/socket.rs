//! The tunnel's own TCP connection (agent to proxy), tuned the same on both
//! ends. See docs/protocol.md, "Fair share of a slow link": every channel's
//! bytes leave through this one socket, so what waits in front of the link
//! waits in front of every channel. The kernel is asked to hold at most
//! [`NOTSENT_LOWAT`] bytes not yet sent; the rest waits in the session's
//! write queue, where channel writers take turns
//! ([`crate::write_behind::QueueLevel::poll_turn`]).

use tokio::net::TcpStream;

/// Bytes the kernel may hold unsent on the tunnel's socket
/// (`TCP_NOTSENT_LOWAT`); data in flight (sent, not acknowledged) is not
/// counted, so a long link still fills. 128 and 256 KiB cost a lossy long
/// link 10-15 % of its throughput (`make bench`, `wan-lossy`); 512 KiB none.
pub const NOTSENT_LOWAT: u32 = 512 * 1024;

/// No delay for small writes; at most [`NOTSENT_LOWAT`] unsent in the kernel.
/// Best effort: a kernel without the option keeps its own buffering.
pub fn tune_tunnel_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value = NOTSENT_LOWAT as libc::c_int;
        // SAFETY: a valid socket fd for the call's duration, and a c_int
        // option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
        }
    }
}
