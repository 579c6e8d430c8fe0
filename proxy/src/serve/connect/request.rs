//! Reading one CONNECT request, with limits: the head within
//! [`HEAD_TIMEOUT`] and [`MAX_HEAD`] bytes, at most [`MAX_HEADERS`] headers.
//! Every way it can be wrong is a [`Refusal`] with a status and a one-line
//! reason for the client.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tunnel::addr::split_host_port;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 64;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The header naming the cluster when the credential does not.
pub const CLUSTER_HEADER: &str = "Tower-Cluster";

/// A CONNECT request.
#[derive(Debug, PartialEq, Eq)]
pub struct Connect {
    /// `host:port` as the client wrote it.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// The `Tower-Cluster` header, if sent.
    pub cluster: Option<String>,
}

/// Why a request is refused: the answer's status, a label for /metrics and
/// the sentence the client gets.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }

    /// The HTTP answer, closing the connection.
    pub fn answer(&self) -> Vec<u8> {
        let text = match self.status {
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            504 => "Gateway Timeout",
            _ => "Error",
        };
        let body = format!("{}\n", self.message.replace(['\r', '\n'], " "));
        format!(
            "HTTP/1.1 {} {text}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// Read and parse the request head; returns it and any bytes the client sent
/// after it (to go through the stream once it is open).
pub async fn read<R: AsyncRead + Unpin>(io: &mut R) -> Result<(Connect, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find_end(&buf) {
                return Ok(end);
            }
            if buf.len() > MAX_HEAD {
                return Err(too_large());
            }
            let n = io.read(&mut chunk).await.map_err(|e| {
                Refusal::new(
                    400,
                    "bad_request",
                    format!("reading the request failed: {e}"),
                )
            })?;
            if n == 0 {
                return Err(Refusal::new(
                    400,
                    "bad_request",
                    "the request ended before its head was complete",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let end = tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .map_err(|_| {
            Refusal::new(
                408,
                "timeout",
                format!("no complete request head within {HEAD_TIMEOUT:?}"),
            )
        })??;
    if end > MAX_HEAD {
        return Err(too_large());
    }
    let connect = parse(&buf[..end])?;
    Ok((connect, buf[end..].to_vec()))
}

fn too_large() -> Refusal {
    Refusal::new(
        431,
        "bad_request",
        format!("the request head is larger than {MAX_HEAD} bytes"),
    )
}

/// Where the head ends (after its blank line).
fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parse a complete request head.
pub fn parse(head: &[u8]) -> Result<Connect, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(Refusal::new(400, "bad_request", "incomplete request head"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                431,
                "bad_request",
                format!("more than {MAX_HEADERS} headers"),
            ));
        }
        Err(e) => {
            return Err(Refusal::new(
                400,
                "bad_request",
                format!("not an HTTP request: {e}"),
            ));
        }
    }
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(Refusal::new(
            405,
            "bad_request",
            format!("{method} is not supported: this port only tunnels, send CONNECT host:port"),
        ));
    }
    let authority = req.path.unwrap_or_default().to_string();
    let (host, port) = match split_host_port(&authority) {
        Some((host, Some(port))) if !host.is_empty() && port != 0 => (host, port),
        _ => {
            return Err(Refusal::new(
                400,
                "bad_request",
                format!("CONNECT needs host:port, got {authority:?}"),
            ));
        }
    };
    let cluster = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(CLUSTER_HEADER))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        .filter(|c| !c.is_empty());
    Ok(Connect {
        authority,
        host,
        port,
        cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_request() {
        let c = parse(b"CONNECT 10.0.0.5:8000 HTTP/1.1\r\nHost: 10.0.0.5:8000\r\ntower-cluster: alpha\r\n\r\n")
            .unwrap();
        assert_eq!(c.authority, "10.0.0.5:8000");
        assert_eq!((c.host.as_str(), c.port), ("10.0.0.5", 8000));
        assert_eq!(c.cluster.as_deref(), Some("alpha"));
        let v6 = parse(b"CONNECT [fd00::1]:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.cluster),
            ("fd00::1", 443, None)
        );
    }

    #[test]
    fn what_is_refused() {
        let status = |head: &[u8]| parse(head).unwrap_err().status;
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"CONNECT nohost HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT :80 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT host:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x16\x03\x01garbage\r\n\r\n"), 400);
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            status(format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[tokio::test]
    async fn heads_are_bounded_and_the_rest_is_kept() {
        let mut io: &[u8] = b"CONNECT a:1 HTTP/1.1\r\n\r\nearly bytes";
        let (c, rest) = read(&mut io).await.unwrap();
        assert_eq!(c.authority, "a:1");
        assert_eq!(rest, b"early bytes");
        let big = format!("CONNECT a:1 HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(100_000));
        let mut io = big.as_bytes();
        assert_eq!(read(&mut io).await.unwrap_err().status, 431);
        let mut cut: &[u8] = b"CONNECT a:1 HTTP/1.1\r\n";
        assert_eq!(read(&mut cut).await.unwrap_err().status, 400);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Any head: a CONNECT or a refusal with a client-error status.
            #[test]
            fn any_head_is_parsed_or_refused(head in prop::collection::vec(any::<u8>(), 0..600)) {
                if let Err(refusal) = parse(&head) {
                    prop_assert!([400, 405, 431].contains(&refusal.status), "{}", refusal.status);
                }
            }

            /// Every authority clients send, DNS names and IPv4/IPv6, comes out
            /// as the host and port it names.
            #[test]
            fn authorities_round_trip(
                host in prop_oneof![
                    "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,20}){0,3}",
                    any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
                    any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
                ],
                port in 1u16..,
                cluster in proptest::option::of("[a-z0-9-]{1,30}"),
            ) {
                let authority = tunnel::addr::join_host_port(&host, port);
                let header = cluster
                    .as_ref()
                    .map(|c| format!("tower-cluster: {c}\r\n"))
                    .unwrap_or_default();
                let head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{header}\r\n");
                let c = match parse(head.as_bytes()) {
                    Ok(c) => c,
                    Err(r) => return Err(TestCaseError::fail(format!("{head:?}: {}", r.message))),
                };
                prop_assert_eq!((c.host, c.port, c.authority, c.cluster), (host, port, authority, cluster));
            }
        }
    }

    #[test]
    fn answers_are_one_line_and_close() {
        let answer = Refusal::new(403, "not_allowed", "no\r\nsplit").answer();
        let text = String::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.contains("Connection: close"), "{text}");
        assert!(text.ends_with("\r\n\r\nno  split\n"), "{text}");
    }
}
