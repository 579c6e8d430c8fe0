//! HTTP/1.1 over TLS, both ends: the upstream HTTPS server the tunnels lead to
//! (`bench upstream`, a process of its own) and the client the scenarios use.
//!
//! Upstream routes: `GET /bytes/N` answers N bytes (a fixed 64 KiB block
//! repeated), `POST /sink` reads the body and answers its length in the
//! `x-received` header. Anything else is 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Size of the block a [`Pattern`] body repeats (one frame each).
pub const BLOCK: usize = 64 * 1024;

fn block() -> Bytes {
    static BLOCK_DATA: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BLOCK_DATA
        .get_or_init(|| {
            let mut v = vec![0u8; BLOCK];
            e2e::fill_pattern(7, 0, &mut v);
            Bytes::from(v)
        })
        .clone()
}

/// A body of `remaining` bytes, sent as shared 64 KiB blocks (no copies).
pub struct Pattern {
    remaining: u64,
    block: Bytes,
}

impl Pattern {
    pub fn new(len: u64) -> Self {
        Pattern {
            remaining: len,
            block: block(),
        }
    }
}

impl hyper::body::Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.block.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

// ---------------------------------------------------------------------------
// Upstream server

/// Serve HTTPS on `listener` forever.
pub async fn serve_upstream(listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), hyper::service::service_fn(answer))
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>) -> Result<Response<Pattern>, Infallible> {
    let path = req.uri().path().to_string();
    let mut resp = Response::new(Pattern::new(0));
    match (req.method(), path.strip_prefix("/bytes/")) {
        (&Method::GET, Some(n)) => match n.parse::<u64>() {
            Ok(n) => *resp.body_mut() = Pattern::new(n),
            Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
        },
        (&Method::POST, _) if path == "/sink" => {
            let mut body = req.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => got += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => {
                        *resp.status_mut() = StatusCode::BAD_REQUEST;
                        return Ok(resp);
                    }
                }
            }
            resp.headers_mut()
                .insert("x-received", got.to_string().parse().expect("digits"));
        }
        _ => *resp.status_mut() = StatusCode::NOT_FOUND,
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------
// Client

/// Somewhere the bench client can send HTTPS requests to: the upstream
/// directly, or one of the paths that lead to it.
#[derive(Clone)]
pub struct Target {
    /// Short name, e.g. `direct`, `tower-rs https`.
    pub name: String,
    pub addr: SocketAddr,
    pub tls: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    /// The processes that carry this path (both ends of the tunnel), whose
    /// CPU time the bench counts; empty for direct.
    pub procs: Vec<u32>,
    /// An HTTP CONNECT door at `addr` that leads to the upstream.
    pub via: Option<Via>,
}

/// A byte stream the client's TLS runs over: TCP, or a CONNECT tunnel.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An HTTP CONNECT door: the client speaks TLS to it (when `tls` is set),
/// asks `CONNECT authority`, then the upstream's TLS through it.
#[derive(Clone)]
pub struct Via {
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    pub authority: String,
}

impl Via {
    async fn open(&self, tcp: TcpStream, name: &str) -> Result<Box<dyn Io>> {
        let mut io: Box<dyn Io> = match &self.tls {
            Some((config, server_name)) => Box::new(
                TlsConnector::from(config.clone())
                    .connect(server_name.clone(), tcp)
                    .await
                    .with_context(|| format!("{name}: TLS handshake with the CONNECT door"))?,
            ),
            None => Box::new(tcp),
        };
        let a = &self.authority;
        io.write_all(format!("CONNECT {a} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await?;
        io.flush().await?;
        // The answer's head byte by byte: what follows it is the upstream's TLS.
        let mut head = Vec::with_capacity(64);
        while !head.ends_with(b"\r\n\r\n") {
            ensure!(head.len() < 8192, "{name}: CONNECT answer head too long");
            head.push(
                io.read_u8()
                    .await
                    .with_context(|| format!("{name}: reading the CONNECT answer"))?,
            );
        }
        let head = String::from_utf8_lossy(&head);
        ensure!(
            head.split(' ').nth(1) == Some("200"),
            "{name}: CONNECT {a} answered {:?}",
            head.lines().next().unwrap_or_default()
        );
        Ok(io)
    }
}

impl Target {
    /// A new keep-alive connection (TCP_NODELAY, TLS, HTTP/1.1).
    pub async fn connect(&self) -> Result<Conn> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("{}: connecting to {}", self.name, self.addr))?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &self.via {
            Some(via) => via.open(tcp, &self.name).await?,
            None => Box::new(tcp),
        };
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), io)
            .await
            .with_context(|| format!("{}: TLS handshake with {}", self.name, self.addr))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .with_context(|| format!("{}: HTTP handshake", self.name))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: self.addr.to_string(),
            name: self.name.clone(),
            task,
        })
    }
}

/// One client connection; requests on it go one after the other.
pub struct Conn {
    sender: SendRequest<Pattern>,
    host: String,
    name: String,
    task: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Conn {
    fn request(&self, method: Method, path: &str, body: Pattern) -> Request<Pattern> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host)
            .body(body)
            .expect("a valid request")
    }

    /// `GET /bytes/len`: the response whose body is still to be read.
    pub async fn get_response(&mut self, len: u64) -> Result<Response<Incoming>> {
        self.sender
            .ready()
            .await
            .with_context(|| format!("{}: connection not ready", self.name))?;
        let req = self.request(Method::GET, &format!("/bytes/{len}"), Pattern::new(0));
        let resp = self
            .sender
            .send_request(req)
            .await
            .with_context(|| format!("{}: GET /bytes/{len}", self.name))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            bail!(
                "{}: GET /bytes/{len} answered {status}: {}",
                self.name,
                body.map(|b| String::from_utf8_lossy(&b[..b.len().min(300)]).into_owned())
                    .unwrap_or_default()
            );
        }
        Ok(resp)
    }

    /// `GET /bytes/len`, reading (and dropping) the whole body.
    pub async fn get(&mut self, len: u64) -> Result<()> {
        let resp = self.get_response(len).await?;
        let got = drain(resp.into_body()).await?;
        ensure!(got == len, "{}: got {got} of {len} bytes", self.name);
        Ok(())
    }

    /// `POST /sink` with a body of `len` bytes.
    pub async fn upload(&mut self, len: u64) -> Result<()> {
        self.sender.ready().await?;
        let req = self.request(Method::POST, "/sink", Pattern::new(len));
        let resp = self
            .sender
            .send_request(req)
            .await
            .with_context(|| format!("{}: POST /sink", self.name))?;
        let status = resp.status();
        let received = resp
            .headers()
            .get("x-received")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        drain(resp.into_body()).await?;
        ensure!(
            status == StatusCode::OK && received == Some(len),
            "{}: POST /sink answered {status}, received {received:?} of {len}",
            self.name
        );
        Ok(())
    }
}

/// Read a body to its end; returns its length.
pub async fn drain(mut body: Incoming) -> Result<u64> {
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame?.data_ref().map_or(0, |d| d.len() as u64);
    }
    Ok(got)
}
