//! Pull mode, the agent's side: `--hub-listen NAME=ADDR` listeners. Each
//! accepted connection becomes a hub channel to service NAME through the live
//! tunnel ([`tunnel::hub::HubLink`]); the proxy decides whether NAME is
//! published and whether this cluster opted in. The listeners are bound at
//! start and outlive reconnects; without a tunnel, a connection is closed.
//!
//! A refused connection is closed; when the proxy prohibits it, a TLS
//! client gets a fatal alert first (see [`refuse`]).
//!
//! Log lines: `hub listening` (`service`, `addr`), `hub connection refused`
//! (`service`, `reason`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tunnel::hub::{HubError, HubLink};

/// One `--hub-listen` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub service: String,
    pub addr: SocketAddr,
}

/// Parse `NAME=ADDR`, e.g. `hub-api=127.0.0.1:6443` (clap names the flag in its error).
pub fn parse_listen(value: &str) -> Result<Listen, String> {
    let example = "e.g. hub-api=127.0.0.1:6443";
    let (name, addr) = value
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDR, {example}"))?;
    tunnel::hub::check_service_name(name)?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not IP:PORT ([::1]:PORT for IPv6), {example}"))?;
    Ok(Listen {
        service: name.to_string(),
        addr,
    })
}

/// Bind every listener now, so a taken or forbidden address fails the start.
pub async fn bind(listens: &[Listen]) -> anyhow::Result<Vec<(String, TcpListener)>> {
    let mut bound = Vec::new();
    for listen in listens {
        let listener = TcpListener::bind(listen.addr).await.with_context(|| {
            format!(
                "cannot listen on --hub-listen {}={}",
                listen.service, listen.addr
            )
        })?;
        tracing::info!(service = %listen.service, addr = %listener.local_addr()?, "hub listening");
        bound.push((listen.service.clone(), listener));
    }
    Ok(bound)
}

/// Accept on `listener` until `stop`, each connection joined to a hub channel.
pub async fn serve(service: String, listener: TcpListener, link: HubLink, stop: CancellationToken) {
    loop {
        let (mut tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%service, error = %e, "hub listener cannot accept");
                    continue;
                }
            },
        };
        let (service, link) = (service.clone(), link.clone());
        tokio::spawn(async move {
            let mut channel = match link.open(&service).await {
                Ok(channel) => channel,
                Err(e) => {
                    tracing::warn!(%service, %peer, reason = %e, "hub connection refused");
                    refuse(tcp, &e).await;
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            if let Err(e) = tunnel::copy::join(&mut tcp, &mut channel).await {
                tracing::debug!(%service, %peer, error = %e, "hub stream ended with an error");
            }
        });
    }
}

/// The TLS alert description `access_denied` (RFC 8446 6.2).
const ACCESS_DENIED: u8 = 49;

/// How long a refused connection waits for its client's first bytes, and
/// then for the client to close after the alert.
const LINGER: Duration = Duration::from_secs(2);

/// A fatal TLS alert in a plaintext record (what a server sends before any
/// keys, in TLS 1.2 and 1.3 alike).
fn tls_alert(description: u8) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

/// Close a refused connection. A plain close looks transient to client-go,
/// which retries a GET ten times a second apart, so a member-side `kubectl
/// get` the proxy prohibits hung for most of a minute. For a prohibition a
/// TLS client (its first byte a handshake record) gets a fatal alert first,
/// which Go reports as `remote error: tls: access denied` and does not
/// retry; the client's bytes are read to the end, so the close is a FIN,
/// not a reset that could overtake the alert. Transient refusals (no
/// tunnel, no answer, too many hub channels, the service unreachable from
/// the proxy) and other protocols just see the close, and may retry.
async fn refuse(mut tcp: TcpStream, error: &HubError) {
    if !error.prohibited() {
        return;
    }
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(LINGER, tcp.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) || first[0] != 0x16 {
        return;
    }
    if tcp.write_all(&tls_alert(ACCESS_DENIED)).await.is_err() {
        return;
    }
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = tcp.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a client that sent `first` reads from a connection refused for
    /// `error`.
    async fn refused_answer(first: &[u8], error: HubError) -> Vec<u8> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(first).await.unwrap();
        let refusing = tokio::spawn(async move { refuse(server, &error).await });
        let mut answer = Vec::new();
        // Not TLS: the close may be a reset (the request left unread).
        match client.read_to_end(&mut answer).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("reading the refusal: {e}"),
        }
        drop(client);
        refusing.await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_prohibited_tls_client_gets_a_fatal_alert_then_the_close() {
        let hello = [0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0, 0, 1, 0];
        // SSH reason 1: administratively prohibited.
        let prohibited = || HubError::Refused {
            code: 1,
            reason: "cluster alpha does not opt in".into(),
        };
        assert_eq!(
            refused_answer(&hello, prohibited()).await,
            [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, ACCESS_DENIED]
        );
        // Transient: only the close, so the client may retry.
        for transient in [
            HubError::NoTunnel,
            HubError::Refused {
                code: 4,
                reason: "too many hub channels".into(),
            },
        ] {
            assert!(refused_answer(&hello, transient).await.is_empty());
        }
        // Not TLS: only the close.
        let get = b"GET / HTTP/1.1\r\n\r\n";
        assert!(refused_answer(get, prohibited()).await.is_empty());
    }

    #[test]
    fn listen_values() {
        assert_eq!(
            parse_listen("hub-api=127.0.0.1:6443"),
            Ok(Listen {
                service: "hub-api".into(),
                addr: "127.0.0.1:6443".parse().unwrap()
            })
        );
        assert_eq!(parse_listen("x=[::1]:1").unwrap().addr.port(), 1);
        assert!(parse_listen("hub-api").unwrap_err().contains("NAME=ADDR"));
        assert!(
            parse_listen("Hub=127.0.0.1:1")
                .unwrap_err()
                .contains("DNS label")
        );
        assert!(
            parse_listen("hub=localhost")
                .unwrap_err()
                .contains("IP:PORT")
        );
    }
}
