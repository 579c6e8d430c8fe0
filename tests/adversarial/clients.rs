//! Hostile clients of a cluster's HTTPS port (alpha's kube-apiserver on the
//! proxy), from source addresses of their own: TLS connections that never
//! handshake, handshaken ones (with alpha's kubeconfig certificate) that
//! stay idle, huge headers, endless chunked bodies.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::peers::{closed_within, connect_from, until_closed};

/// A TLS client with the certificate of a kubeconfig (alpha's).
#[derive(Clone)]
pub struct Certified {
    connector: TlsConnector,
}

impl Certified {
    pub fn from_kubeconfig(path: &Path) -> Result<Certified> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = e2e::kube::config::Kubeconfig::read_from(path)?;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s.trim());
        let cluster = kc
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .context("no cluster")?;
        let ca = b64(cluster
            .certificate_authority_data
            .as_deref()
            .context("no CA data")?)?;
        let user = kc
            .auth_infos
            .first()
            .and_then(|a| a.auth_info.clone())
            .context("no user")?;
        let cert = b64(user
            .client_certificate_data
            .as_deref()
            .context("no client cert")?)?;
        let key = {
            use secrecy::ExposeSecret as _;
            b64(user
                .client_key_data
                .as_ref()
                .context("no client key")?
                .expose_secret())?
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c?)?;
        }
        let chain = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&key)?;
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Certified {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// A TLS connection from `source` to `to` with the certificate.
    pub async fn connect(&self, source: IpAddr, to: SocketAddr) -> Result<TlsStream<TcpStream>> {
        let tcp = connect_from(source, to).await?;
        let name = ServerName::IpAddress(to.ip().into());
        Ok(
            tokio::time::timeout(Duration::from_secs(30), self.connector.connect(name, tcp))
                .await
                .context("TLS handshake timed out")??,
        )
    }
}

/// `n` connections held until the proxy closes them: plain TCP that never
/// starts TLS (`certified` None), or handshaken with the certificate and
/// then silent. Handshakes go `64` at a time (more from one source would
/// meet the per-source cap, which is the other test).
pub struct IdleTls {
    pub established: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    /// Handshakes the proxy cut (its per-source cap on pending handshakes).
    pub refused: Arc<AtomicUsize>,
    tasks: JoinSet<Result<()>>,
}

impl IdleTls {
    pub fn start(
        source: IpAddr,
        to: SocketAddr,
        n: usize,
        certified: Option<Certified>,
    ) -> IdleTls {
        let established = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(64));
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            let (established, closed, refused, gate, certified) = (
                established.clone(),
                closed.clone(),
                refused.clone(),
                gate.clone(),
                certified.clone(),
            );
            tasks.spawn(async move {
                match certified {
                    None => {
                        let mut tcp = connect_from(source, to).await?;
                        established.fetch_add(1, Ordering::Relaxed);
                        if !closed_within(&mut tcp).await {
                            return Ok(());
                        }
                    }
                    Some(c) => {
                        let permit = gate.acquire_owned().await?;
                        let tls = c.connect(source, to).await;
                        drop(permit);
                        let Ok(mut tls) = tls else {
                            refused.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        };
                        established.fetch_add(1, Ordering::Relaxed);
                        until_closed(&mut tls).await?;
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
        }
        IdleTls {
            established,
            closed,
            refused,
            tasks,
        }
    }

    pub async fn finish(mut self) -> Result<()> {
        while let Some(done) = self.tasks.join_next().await {
            done??;
        }
        Ok(())
    }
}

/// The status line the proxy answered `tls` with, or "closed".
async fn answer(tls: &mut TlsStream<TcpStream>) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    text.lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .map_or_else(|| "closed".to_string(), str::to_string)
}

/// `n` requests with a `header_bytes` header each, 16 at a time; what the
/// proxy answered each (a status line or "closed").
pub async fn huge_headers(
    c: &Certified,
    source: IpAddr,
    to: SocketAddr,
    n: usize,
    header_bytes: usize,
) -> Result<Vec<String>> {
    let mut tasks = JoinSet::new();
    let gate = Arc::new(Semaphore::new(16));
    for _ in 0..n {
        let (c, gate) = (c.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut tls = c.connect(source, to).await?;
            let big = vec![b'a'; header_bytes];
            let _ = tls
                .write_all(b"GET /api/v1/namespaces/default HTTP/1.1\r\nHost: x\r\nX-Big: ")
                .await;
            // In 16 KiB writes: with this kernel's preemption model (none),
            // one 1 MiB write on loopback holds a CPU through the whole send
            // and its receive softirq, whatever the attacker's priority.
            for piece in big.chunks(16 * 1024) {
                if tls.write_all(piece).await.is_err() {
                    break;
                }
            }
            let _ = tls.write_all(b"\r\n\r\n").await;
            let seen = tokio::time::timeout(Duration::from_secs(60), answer(&mut tls))
                .await
                .context("no answer to a huge header")?;
            anyhow::Ok(seen)
        });
    }
    let mut seen = Vec::new();
    while let Some(done) = tasks.join_next().await {
        seen.push(done??);
    }
    Ok(seen)
}

/// `n` POSTs of a ConfigMap whose chunked body never ends (64 KiB chunks,
/// written until the proxy answers or closes); what each saw.
pub async fn endless_bodies(
    c: &Certified,
    source: IpAddr,
    to: SocketAddr,
    n: usize,
) -> Result<Vec<String>> {
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let c = c.clone();
        tasks.spawn(async move {
            let tls = c.connect(source, to).await?;
            let (mut rd, mut wr) = tokio::io::split(tls);
            let head = "POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: x\r\n\
                        Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
            wr.write_all(head.as_bytes()).await?;
            let writer = tokio::spawn(async move {
                let chunk = [
                    format!("{:x}\r\n", 64 * 1024).into_bytes(),
                    vec![b' '; 64 * 1024],
                    b"\r\n".to_vec(),
                ]
                .concat();
                let _ = wr.write_all(b"4\r\n{\"a\"\r\n").await;
                let mut sent = 0u64;
                while wr.write_all(&chunk).await.is_ok() {
                    sent += chunk.len() as u64;
                }
                sent
            });
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            let read = tokio::time::timeout(Duration::from_secs(120), async {
                while !head.windows(2).any(|w| w == b"\r\n") {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            writer.abort();
            ensure!(
                read.is_ok(),
                "an endless body got neither an answer nor a close in 120 s"
            );
            let text = String::from_utf8_lossy(&head);
            anyhow::Ok(
                text.lines()
                    .next()
                    .filter(|l| l.starts_with("HTTP/"))
                    .map_or_else(|| "closed".to_string(), str::to_string),
            )
        });
    }
    let mut seen = Vec::new();
    while let Some(done) = tasks.join_next().await {
        seen.push(done??);
    }
    Ok(seen)
}

/// Counts of each distinct answer, for the report line.
pub fn tally(seen: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for s in seen {
        let key = s.split_whitespace().skip(1).take(1).collect::<String>();
        let key = if key.is_empty() { s.clone() } else { key };
        *counts.entry(key).or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{v}x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}
