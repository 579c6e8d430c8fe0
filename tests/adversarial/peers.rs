//! Hostile peers of the agents' port: connections from a source address of
//! their own (127.0.0.N, N > 1: legitimate agents and kubectl come from
//! 127.0.0.1) that say nothing, send garbage at each stage, or log in with
//! a valid token and abuse the session.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::ws::WsStream;

/// How long the proxy may take to close a connection it does not want
/// (its handshake deadlines are 10 s), plus a loaded machine's slack.
pub const CLOSED_WITHIN: Duration = Duration::from_secs(40);

/// A TCP connection to `to` from `source` (a loopback address of its own).
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket.connect(to).await?)
}

/// Reads until the proxy closes (EOF or reset); Err when it did not within
/// [`CLOSED_WITHIN`].
pub async fn until_closed(tcp: &mut (impl AsyncReadExt + Unpin)) -> Result<()> {
    ensure!(
        closed_within(tcp).await,
        "the proxy kept a connection open past its deadlines"
    );
    Ok(())
}

/// True when the proxy closed the connection within [`CLOSED_WITHIN`].
/// False for a silent connection it never accepted: a burst over the
/// listen backlog leaves some in the kernel's queue, which drops them
/// without a word (the proxy holds nothing for them; its fds prove it).
pub async fn closed_within(tcp: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    tokio::time::timeout(CLOSED_WITHIN, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The websocket upgrade request of Tower's agents.
pub fn upgrade_request(to: SocketAddr) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {to}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: kubesphere-v1\r\n\r\n"
    )
}

/// Sends the upgrade on `tcp` and reads the answer's head; true on 101.
pub async fn upgrade(tcp: &mut TcpStream, to: SocketAddr) -> Result<bool> {
    tcp.write_all(upgrade_request(to).as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 16 * 1024, "endless upgrade answer");
        let n = tokio::time::timeout(CLOSED_WITHIN, tcp.read(&mut byte))
            .await
            .context("no upgrade answer")??;
        if n == 0 {
            return Ok(false);
        }
        head.push(byte[0]);
    }
    Ok(head.starts_with(b"HTTP/1.1 101"))
}

/// A slowloris: `n` connections from `source` that say nothing (`ws`: that
/// upgrade to a websocket first, then say nothing). Each waits for the
/// proxy to close it; the result counts how many it closed and how many
/// it had to accept and hold meanwhile is the caller's to measure.
pub struct Slowloris {
    pub closed: Arc<AtomicUsize>,
    pub upgraded: Arc<AtomicUsize>,
    pub failed_to_connect: Arc<AtomicUsize>,
    tasks: JoinSet<Result<()>>,
}

impl Slowloris {
    pub async fn start(source: IpAddr, to: SocketAddr, n: usize, ws: bool) -> Slowloris {
        let closed = Arc::new(AtomicUsize::new(0));
        let upgraded = Arc::new(AtomicUsize::new(0));
        let failed_to_connect = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            let (closed, upgraded, failed) =
                (closed.clone(), upgraded.clone(), failed_to_connect.clone());
            tasks.spawn(async move {
                let Ok(mut tcp) = connect_from(source, to).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                };
                if ws && upgrade(&mut tcp, to).await.unwrap_or(false) {
                    upgraded.fetch_add(1, Ordering::Relaxed);
                }
                if closed_within(&mut tcp).await {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            });
            // Let the accept loop keep up a little; the burst stays a burst.
            tokio::task::yield_now().await;
        }
        Slowloris {
            closed,
            upgraded,
            failed_to_connect,
            tasks,
        }
    }

    /// Waits for every connection to be closed by the proxy.
    pub async fn finish(mut self) -> Result<()> {
        while let Some(done) = self.tasks.join_next().await {
            done??;
        }
        Ok(())
    }
}

/// A stage a garbage input is sent at.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    /// Instead of the HTTP upgrade.
    Http,
    /// Websocket frames after a good upgrade.
    Websocket,
    /// Instead of SSH's identification line, in good websocket frames.
    SshIdentification,
    /// After a good identification: instead of KEXINIT (binary packets).
    SshKex,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Http,
        Stage::Websocket,
        Stage::SshIdentification,
        Stage::SshKex,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Http => "HTTP upgrade",
            Stage::Websocket => "websocket frames",
            Stage::SshIdentification => "SSH identification",
            Stage::SshKex => "SSH kex packets",
        }
    }
}

/// The `i`th garbage input for `stage`: a few crafted ones (oversized
/// lengths, TLS where HTTP is expected, a frame of 2^63 bytes...), then
/// random bytes from a fixed seed.
pub fn garbage(stage: Stage, i: usize) -> Vec<u8> {
    let crafted: Vec<Vec<u8>> = match stage {
        Stage::Http => vec![
            // A TLS ClientHello's first bytes on the plain HTTP port.
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03],
            b"GARBAGE / HTTP/9.9\r\n\r\n".to_vec(),
            // A 1 MiB header: over hyper's limit, refused.
            [
                b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".as_slice(),
                &vec![b'a'; 1 << 20],
                b"\r\n\r\n",
            ]
            .concat(),
            // An upgrade without its key.
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: kubesphere-v1\r\n\r\n".to_vec(),
            b"\r\n\r\n\r\n".repeat(1000),
        ],
        Stage::Websocket => vec![
            // Reserved opcode 0x3.
            vec![0x83, 0x80, 1, 2, 3, 4],
            // A binary frame announcing 2^63-1 bytes.
            [
                vec![0x82, 0xff],
                (u64::MAX >> 1).to_be_bytes().to_vec(),
                vec![1, 2, 3, 4],
            ]
            .concat(),
            // An unmasked client frame.
            [vec![0x82, 0x08], b"SSH-2.0-".to_vec()].concat(),
            // A close frame at once.
            vec![0x88, 0x80, 0, 0, 0, 0],
        ],
        Stage::SshIdentification => vec![
            b"GARBAGE\r\n".to_vec(),
            // An identification line that never ends.
            vec![b'S'; 256 * 1024],
            b"SSH-1.0-old\r\n".to_vec(),
        ],
        Stage::SshKex => vec![
            // A packet length of 4 GiB - 16.
            [0xff, 0xff, 0xff, 0xf0, 4, 20].to_vec(),
            // 1 MiB: over russh's packet limit.
            [0x00, 0x10, 0x00, 0x00, 4, 20].to_vec(),
            // A zero-length packet.
            [0, 0, 0, 0].to_vec(),
            // An unknown message number in place of KEXINIT.
            [0, 0, 0, 12, 10, 200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11].to_vec(),
        ],
    };
    if let Some(c) = crafted.get(i) {
        return c.clone();
    }
    // xorshift from the stage and index: reproducible random inputs.
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (stage as u64 + 7);
    let len = 1 + (x % 4096) as usize;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends garbage input `i` at `stage` from `source`, then half-closes and
/// waits until the proxy closes the connection.
pub async fn send_garbage(source: IpAddr, to: SocketAddr, stage: Stage, i: usize) -> Result<()> {
    let input = garbage(stage, i);
    let mut tcp = connect_from(source, to).await?;
    match stage {
        Stage::Http => {
            let _ = tcp.write_all(&input).await;
            let _ = tcp.shutdown().await;
            until_closed(&mut tcp).await
        }
        Stage::Websocket => {
            ensure!(upgrade(&mut tcp, to).await?, "upgrade refused");
            let _ = tcp.write_all(&input).await;
            let _ = tcp.shutdown().await;
            until_closed(&mut tcp).await
        }
        Stage::SshIdentification | Stage::SshKex => {
            ensure!(upgrade(&mut tcp, to).await?, "upgrade refused");
            let mut ws = WsStream::from_upgraded(tcp, Role::Client).await;
            if matches!(stage, Stage::SshKex) {
                let _ = ws.write_all(b"SSH-2.0-adversary\r\n").await;
            }
            let _ = ws.write_all(&input).await;
            let _ = ws.flush().await;
            until_closed(&mut ws).await
        }
    }
}

/// Every garbage input of every stage, `per_stage` each, `parallel` at a
/// time from `source`; the number sent.
pub async fn garbage_storm(
    source: IpAddr,
    to: SocketAddr,
    per_stage: usize,
    parallel: usize,
) -> Result<usize> {
    let mut sent = 0;
    for stage in Stage::ALL {
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        for i in 0..per_stage {
            if tasks.len() >= parallel
                && let Some(done) = tasks.join_next().await
            {
                done?.with_context(|| format!("garbage at the {}", stage.name()))?;
            }
            tasks.spawn(send_garbage(source, to, stage, i));
            sent += 1;
        }
        while let Some(done) = tasks.join_next().await {
            done?.with_context(|| format!("garbage at the {}", stage.name()))?;
        }
    }
    Ok(sent)
}
