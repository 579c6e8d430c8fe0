//! A long link with real packet loss, below TCP: this kernel has no
//! `sch_netem`, so a TUN device carries the connection and a task here delays
//! every packet by RTT/2 and drops a share of them. TCP itself then sees the
//! round trip and the loss (retransmits, congestion window), unlike a
//! userspace relay's delay (the bench's `Relay`), which no TCP connection sees.
//!
//! Addressing on the device (in a network namespace of the caller's own:
//! the bench's, or a test's [`crate::in_own_netns`]): the
//! device holds [`LOCAL`]; routes send [`PEER`] and [`FAR`] into it. A client
//! dials `PEER:port` from `LOCAL`; the task rewrites that packet to come from
//! `FAR` and go to `LOCAL:port`, where a listener takes it. Answers to `FAR`
//! are rewritten to come from `PEER`, so each end sees an ordinary
//! connection. Needs root (`/dev/net/tun`, `ip`).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The address on the device: listeners behind the link bind it.
pub const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// What clients dial to cross the link.
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// Where connections seem to come from, seen from behind the link.
const FAR: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
/// Jumbo frames: fewer packets for the task to move, loss still per packet.
const MTU: usize = 9000;
const TUNSETIFF: u64 = 0x4004_54ca;

/// The device and its task; dropping it closes the device (routes and
/// address go with it).
pub struct TunLink {
    task: JoinHandle<()>,
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TunLink {
    /// Each direction delayed by `one_way`; `loss_percent` of the packets in
    /// each direction dropped.
    pub async fn start(one_way: Duration, loss_percent: f64) -> Result<Arc<TunLink>> {
        let name = format!("bwan{}", std::process::id() % 100_000);
        let fd = open_tun(&name).context("creating the lossy link's TUN device (needs root)")?;
        // SAFETY: we own `fd`; it is closed only when the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        let fd = Arc::new(fd);
        let mtu = MTU.to_string();
        for args in [
            vec!["addr", "add", "10.200.0.1/32", "dev", &name],
            vec!["link", "set", "dev", &name, "mtu", &mtu, "up"],
            vec!["route", "add", "10.200.0.2/32", "dev", &name],
            vec!["route", "add", "10.200.1.1/32", "dev", &name],
        ] {
            let out = Command::new("ip").args(&args).output().await?;
            if !out.status.success() {
                bail!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let task = tokio::spawn(forward(fd, one_way, loss_percent));
        Ok(Arc::new(TunLink { task }))
    }
}

fn open_tun(name: &str) -> Result<OwnedFd> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // SAFETY: a plain open(2) of a NUL-terminated path.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= req.name.len() {
        bail!("device name {name} too long");
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out as.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(fd)
}

async fn forward(fd: Arc<AsyncFd<OwnedFd>>, one_way: Duration, loss_percent: f64) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let fd = fd.clone();
        async move {
            loop {
                let Ok(mut guard) = fd.readable().await else {
                    return;
                };
                let mut buf = vec![0u8; MTU + 64];
                let read = guard.try_io(|inner| {
                    // SAFETY: reads into `buf`, at most its length.
                    let n = unsafe {
                        libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                let n = match read {
                    Ok(Ok(n)) => n,
                    Ok(Err(_)) => return,
                    Err(_would_block) => continue,
                };
                buf.truncate(n);
                if rand::random::<f64>() * 100.0 < loss_percent {
                    continue;
                }
                if !rewrite(&mut buf) {
                    continue;
                }
                if tx.send((Instant::now() + one_way, buf)).is_err() {
                    return;
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, packet)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            loop {
                let Ok(mut guard) = fd.writable().await else {
                    return;
                };
                let wrote = guard.try_io(|inner| {
                    // SAFETY: writes `packet`, one whole IP packet.
                    let n = unsafe {
                        libc::write(inner.as_raw_fd(), packet.as_ptr().cast(), packet.len())
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                });
                match wrote {
                    Ok(_) => break,
                    Err(_would_block) => continue,
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// Re-address one IPv4 packet for the way back into the device (see the
/// module docs); false for anything else.
fn rewrite(p: &mut [u8]) -> bool {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < 20 || p.len() < ihl {
        return false;
    }
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let (src, dst) = if dst == PEER {
        (FAR, LOCAL)
    } else if dst == FAR {
        (PEER, LOCAL)
    } else {
        return false;
    };
    let mut old = [0u8; 8];
    old.copy_from_slice(&p[12..20]);
    let mut new = [0u8; 8];
    new[..4].copy_from_slice(&src.octets());
    new[4..].copy_from_slice(&dst.octets());
    p[12..20].copy_from_slice(&new);
    let ip_sum = adjust(u16::from_be_bytes([p[10], p[11]]), &old, &new);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP's checksum covers the addresses too (pseudo-header).
    if p[9] == 6 && p.len() >= ihl + 18 {
        let at = ihl + 16;
        let sum = adjust(u16::from_be_bytes([p[at], p[at + 1]]), &old, &new);
        p[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    true
}

/// RFC 1624 incremental checksum update: HC' = ~(~HC + ~m + m').
fn adjust(sum: u16, old: &[u8; 8], new: &[u8; 8]) -> u16 {
    let mut acc = u32::from(!sum);
    for i in (0..8).step_by(2) {
        acc += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        acc += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}
