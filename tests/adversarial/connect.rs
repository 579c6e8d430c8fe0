//! A legitimate client of the proxy's HTTP CONNECT door (`--connect-port`,
//! mutual TLS with alpha's kubeconfig certificate), from 127.0.0.1: while
//! an attack runs, its CONNECT must still open a stream to the member.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::clients::Certified;

/// How long one step of the legitimate CONNECT may take before it counts as stuck.
const STEP: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct ConnectClient {
    pub certified: Certified,
    /// The proxy's `--connect-port`.
    pub door: SocketAddr,
}

impl ConnectClient {
    /// `CONNECT alpha:443`, then a plain HTTP request through the stream:
    /// the member's kube-apiserver (a Go TLS server) answers it `400`, so
    /// the stream reached it.
    pub async fn reaches_member(&self) -> Result<()> {
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut tls = self.certified.connect(local, self.door).await?;
        let steps: [(&[u8], &str, &str); 2] = [
            (
                b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n",
                "HTTP/1.1 200 ",
                "the proxy's answer to CONNECT alpha:443",
            ),
            (
                b"GET /version HTTP/1.1\r\nHost: alpha\r\n\r\n",
                "HTTP/1.0 400 ",
                "through the stream, the member kube-apiserver's 400 to plain HTTP",
            ),
        ];
        for (send, want, what) in steps {
            tls.write_all(send).await?;
            let got = tokio::time::timeout(STEP, head(&mut tls))
                .await
                .with_context(|| format!("no answer: {what}"))??;
            ensure!(got.starts_with(want), "{what}: got {got:?}");
        }
        Ok(())
    }
}

/// An HTTP answer's head, read byte by byte (what follows is the stream's).
async fn head(io: &mut (impl AsyncRead + Unpin)) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(head.len() < 16 * 1024, "endless answer head");
        if io.read(&mut byte).await? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
