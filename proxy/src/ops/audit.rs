//! The audit log (`--audit-log`): one JSON object per line for every request
//! and stream through a front door, written when it ends. Fields are fixed
//! ([`Record`]); a path never carries its query and no header or body is
//! ever read into a record, so tokens cannot reach the log.
//!
//! The request path never waits on the disk: records go over a bounded queue
//! to one writer task; when the queue is full a record is dropped and counted
//! (`tower_audit_dropped_total`).

pub mod verb;

use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// Records waiting for the writer, at most.
const QUEUE: usize = 4096;
/// The status of a request the client gave up on before it was answered.
pub const CLIENT_LEFT: u16 = 499;
/// At most one "records dropped" warning this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where `--audit-log` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    /// Appended to; created with mode 0600.
    File(PathBuf),
}

impl Destination {
    /// `-` is stdout, anything else a file path.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "" => Err("--audit-log needs a file path, or - for stdout".into()),
            "-" => Ok(Self::Stdout),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("--audit-log {path}: cannot open it for appending: {source}")]
pub struct OpenError {
    path: String,
    source: std::io::Error,
}

/// Who sent the request, as far as the door knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub user: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The client certificate's common name, when it is not the user itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
    /// The member sees this user and these groups (`Impersonate-*`), not the
    /// agent's identity ([`crate::serve::listener::impersonate`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub impersonated: bool,
    /// The authenticator's extra fields, impersonated along (never audited).
    #[serde(skip)]
    pub extra: Vec<(String, Vec<String>)>,
}

impl Caller {
    pub fn named(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            groups: Vec::new(),
            cn: None,
            impersonated: false,
            extra: Vec::new(),
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// When the request arrived (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// `port` (a cluster's port), `path` (the path form on the access port),
    /// `tls` / `unix` (CONNECT doors), `hub`, `forward` (a `--forward` port),
    /// `aggregated` (the aggregated API).
    pub door: &'static str,
    pub cluster: String,
    pub caller: Caller,
    /// The address the connection came from (for one another replica
    /// relayed: the client's, as that replica saw it); none at a Unix
    /// socket and for hub streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    pub verb: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Without the query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// CONNECT's `host:port`, a hub stream's service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub status: u16,
    /// From the caller, and to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    /// Why the door refused, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip)]
    started: Option<Instant>,
}

impl Record {
    /// A record started now.
    pub fn new(door: &'static str, cluster: &str, caller: Caller, verb: &str) -> Self {
        Self {
            time: format!("{:.3}", jiff::Timestamp::now()),
            door,
            cluster: cluster.to_string(),
            caller,
            source: None,
            verb: verb.to_string(),
            method: None,
            path: None,
            target: None,
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
            reason: None,
            started: Some(Instant::now()),
        }
    }

    /// This record with the address its connection came from.
    pub fn from(mut self, source: Option<IpAddr>) -> Self {
        self.source = source;
        self
    }

    /// This record as answered by the door itself with `status`, because of
    /// `reason` (a refusal, a 404), never reaching the member.
    pub fn answered(mut self, status: u16, reason: impl Into<String>) -> Self {
        self.status = status;
        self.reason = Some(reason.into());
        self
    }

    /// An HTTP request: its method, its path without the query, its verb.
    pub fn http(
        door: &'static str,
        cluster: &str,
        caller: Caller,
        uri: &hyper::Uri,
        method: &str,
    ) -> Self {
        let verb = verb::verb(method, uri.path(), uri.query());
        let mut record = Self::new(door, cluster, caller, &verb);
        record.method = Some(method.to_string());
        record.path = Some(uri.path().to_string());
        record
    }

    fn line(&self) -> Vec<u8> {
        // A struct of strings and numbers: serializing cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// The audit log's handle, cheap to clone; [`Audit::Off`] does nothing.
#[derive(Clone, Default)]
pub enum Audit {
    #[default]
    Off,
    On(Arc<Sink>),
}

pub struct Sink {
    queue: mpsc::Sender<Record>,
    /// [`Audit::close`]: the writer writes what is queued and ends.
    close: CancellationToken,
    metrics: Arc<Metrics>,
    last_warning: Mutex<Option<Instant>>,
}

/// An opened `--audit-log`, opened while the flags are checked so a bad
/// path stops the proxy at once.
pub enum Output {
    Stdout,
    File(std::fs::File),
}

impl Destination {
    /// Open for appending (a new file gets mode 0600).
    pub fn open(&self) -> Result<Output, OpenError> {
        let path = match self {
            Self::Stdout => return Ok(Output::Stdout),
            Self::File(path) => path,
        };
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|source| OpenError {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Output::File(file))
    }
}

impl Audit {
    /// Start the writer of `output`; it ends once every handle is gone and
    /// the queue is written. Needs a tokio runtime.
    pub fn start(output: Output, metrics: Arc<Metrics>) -> (Self, JoinHandle<()>) {
        let out: Box<dyn AsyncWrite + Send + Unpin> = match output {
            Output::Stdout => Box::new(tokio::io::stdout()),
            Output::File(file) => Box::new(tokio::fs::File::from_std(file)),
        };
        Self::to_writer(out, metrics)
    }

    fn to_writer(
        out: Box<dyn AsyncWrite + Send + Unpin>,
        metrics: Arc<Metrics>,
    ) -> (Self, JoinHandle<()>) {
        let (queue, records) = mpsc::channel(QUEUE);
        let close = CancellationToken::new();
        let writer = tokio::spawn(write(records, out, close.clone()));
        let sink = Sink {
            queue,
            close,
            metrics,
            last_warning: Mutex::new(None),
        };
        (Self::On(Arc::new(sink)), writer)
    }

    /// At exit: the writer writes what is queued and ends (its handle from
    /// [`Audit::start`] then completes) though handles are still held by
    /// tasks the exit will drop; records logged after this are lost.
    pub fn close(&self) {
        if let Self::On(sink) = self {
            sink.close.cancel();
        }
    }

    /// Write `record` (its duration measured now), never waiting.
    pub fn log(&self, mut record: Record) {
        let Self::On(sink) = self else { return };
        if let Some(started) = record.started {
            record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        if sink.queue.try_send(record).is_err() {
            sink.metrics.audit_dropped.inc();
            let mut last = sink.last_warning.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *last = Some(Instant::now());
                tracing::warn!(
                    "audit log writer is behind: records dropped (tower_audit_dropped_total)"
                );
            }
        }
    }

    /// A record written when the returned guard drops; built only when on.
    pub fn begin(&self, make: impl FnOnce() -> Record) -> Pending {
        let record = match self {
            Self::Off => None,
            Self::On(_) => Some(make()),
        };
        Pending {
            audit: self.clone(),
            record,
            bytes_in: Arc::default(),
        }
    }
}

/// A request's record, written when this drops (with `bytes_in` added).
pub struct Pending {
    audit: Audit,
    record: Option<Record>,
    /// Counted by whoever reads the request body.
    pub bytes_in: Arc<AtomicU64>,
}

impl Pending {
    /// Nothing to write.
    pub fn none() -> Self {
        Self {
            audit: Audit::Off,
            record: None,
            bytes_in: Arc::default(),
        }
    }

    /// The record, to fill in; `None` when auditing is off.
    pub fn record(&mut self) -> Option<&mut Record> {
        self.record.as_mut()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.bytes_in += self.bytes_in.load(Ordering::Relaxed);
            if record.status == 0 {
                // Dropped unanswered: nginx's "client closed request".
                record.status = CLIENT_LEFT;
                record.reason = Some("the client left before the answer".into());
            }
            self.audit.log(record);
        }
    }
}

/// A stream that counts what is read from it and written to it, so a stream
/// cut short (an error, a closing port) still reports its bytes.
pub struct Counting<T> {
    inner: T,
    pub read: u64,
    pub written: u64,
}

impl<T> Counting<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn write(
    mut records: mpsc::Receiver<Record>,
    out: Box<dyn AsyncWrite + Send + Unpin>,
    close: CancellationToken,
) {
    let mut out = BufWriter::new(out);
    let mut failing = false;
    loop {
        // Queued records first: closing writes them before it ends.
        let record = tokio::select! {
            biased;
            record = records.recv() => record,
            () = close.cancelled() => records.try_recv().ok(),
        };
        let Some(record) = record else { break };
        let mut batch = record.line();
        while let Ok(more) = records.try_recv() {
            batch.extend(more.line());
        }
        let written = match out.write_all(&batch).await {
            Ok(()) => out.flush().await,
            Err(e) => Err(e),
        };
        match written {
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot write the audit log");
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
    }
}

#[cfg(test)]
mod tests;
