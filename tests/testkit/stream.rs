//! Checked byte streams: send a deterministic pseudo-random stream to an echo
//! (usually behind the tunnel) while reading the echo back, and compare every
//! byte with a regenerated copy of what was sent. Nothing bigger than a 64 KiB
//! block is held in memory, so gigabytes are fine.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let echo = e2e::EchoServer::start().await?;
//! e2e::echo_transfer(echo.addr(), 1 << 30, 42, None).await?; // 1 GiB each way
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pattern is made of blocks of this many bytes.
pub const PATTERN_BLOCK: usize = 64 * 1024;

/// Fills `buf` with block `index` of the pattern stream for `seed`
/// (splitmix64 output; `buf.len()` a multiple of 8, normally
/// [`PATTERN_BLOCK`]).
pub fn fill_pattern(seed: u64, index: u64, buf: &mut [u8]) {
    let mut state = seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    for chunk in buf.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
}

/// Reads `rd` until EOF, checking it against the first `len` bytes of the
/// `seed` stream. Returns how many bytes arrived (all matching); fails at the
/// first difference, with its offset. `progress` counts checked bytes.
pub async fn verify_pattern(
    rd: &mut (impl AsyncRead + Unpin),
    len: u64,
    seed: u64,
    progress: Option<&AtomicU64>,
) -> Result<u64> {
    let block = PATTERN_BLOCK as u64;
    let mut expected = vec![0u8; PATTERN_BLOCK];
    let mut cached = u64::MAX;
    let mut got = vec![0u8; PATTERN_BLOCK];
    let mut pos = 0u64;
    loop {
        let n = rd
            .read(&mut got)
            .await
            .with_context(|| format!("reading the echo after {pos} of {len} bytes"))?;
        if n == 0 {
            return Ok(pos);
        }
        ensure!(
            pos + n as u64 <= len,
            "the echo is longer than the {len} bytes sent"
        );
        let mut off = 0;
        while off < n {
            let (index, at) = (pos / block, (pos % block) as usize);
            if index != cached {
                fill_pattern(seed, index, &mut expected);
                cached = index;
            }
            let take = (PATTERN_BLOCK - at).min(n - off);
            let (got, want) = (&got[off..off + take], &expected[at..at + take]);
            if got != want {
                let i = (0..take).find(|&i| got[i] != want[i]).unwrap_or(0);
                bail!(
                    "the echo differs from what was sent at byte {}",
                    pos + i as u64
                );
            }
            off += take;
            pos += take as u64;
        }
        if let Some(p) = progress {
            p.store(pos, Ordering::Relaxed);
        }
    }
}

/// Connects to `addr`, sends `len` bytes of the `seed` stream and half-closes,
/// while reading concurrently; succeeds when exactly those bytes came back
/// and the peer closed. `progress` counts checked bytes as they arrive.
pub async fn echo_transfer(
    addr: SocketAddr,
    len: u64,
    seed: u64,
    progress: Option<Arc<AtomicU64>>,
) -> Result<()> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; PATTERN_BLOCK];
        let mut sent = 0u64;
        let mut index = 0;
        while sent < len {
            let n = (len - sent).min(PATTERN_BLOCK as u64) as usize;
            fill_pattern(seed, index, &mut buf);
            wr.write_all(&buf[..n])
                .await
                .with_context(|| format!("writing after {sent} of {len} bytes"))?;
            sent += n as u64;
            index += 1;
        }
        wr.shutdown().await.context("half-closing")?;
        anyhow::Ok(())
    });
    let read = verify_pattern(&mut rd, len, seed, progress.as_deref()).await;
    match read {
        Ok(got) if got == len => writer.await.context("the writer task")?,
        // Failed: don't wait for a writer that may be blocked on a peer that
        // no longer reads.
        Ok(got) => {
            writer.abort();
            bail!("the echo ended after {got} of {len} bytes")
        }
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn through_a_plain_echo() -> Result<()> {
        let echo = crate::EchoServer::start().await?;
        let progress = Arc::new(AtomicU64::new(0));
        let len = 3 * PATTERN_BLOCK as u64 + 17;
        echo_transfer(echo.addr(), len, 9, Some(progress.clone())).await?;
        assert_eq!(progress.load(Ordering::Relaxed), len);
        // Different seeds, different streams; same seed, same stream.
        let (mut a, mut b) = (vec![0u8; 64], vec![0u8; 64]);
        fill_pattern(1, 0, &mut a);
        fill_pattern(2, 0, &mut b);
        assert_ne!(a, b);
        fill_pattern(1, 0, &mut b);
        assert_eq!(a, b);
        // A wrong byte is found, with its offset.
        let mut data = vec![0u8; 2 * PATTERN_BLOCK];
        fill_pattern(5, 0, &mut data[..PATTERN_BLOCK]);
        fill_pattern(5, 1, &mut data[PATTERN_BLOCK..]);
        data[PATTERN_BLOCK + 3] ^= 1;
        let err = verify_pattern(&mut &data[..], data.len() as u64, 5, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("byte {}", PATTERN_BLOCK + 3)),
            "{err}"
        );
        Ok(())
    }
}
