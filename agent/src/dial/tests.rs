use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper::header::{self, HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::wire::SUBPROTOCOL;

use super::conn::Conn;
use super::upgrade::check_upgrade_answer;
use super::*;

#[test]
fn upgrade_answers_are_checked() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mut headers = HeaderMap::new();
    headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, Upgrade"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    );
    // No subprotocol echoed, like Go Tower: fine.
    assert_eq!(check_upgrade_answer(&headers, key), Ok(()));
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    assert_eq!(check_upgrade_answer(&headers, key), Ok(()));
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("chat"),
    );
    assert!(
        check_upgrade_answer(&headers, key)
            .unwrap_err()
            .contains("not offered")
    );
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    assert!(
        check_upgrade_answer(&headers, "b3RoZXIga2V5")
            .unwrap_err()
            .contains("Accept")
    );
}

/// A websocket server in the style of Go Tower: 101 without the subprotocol,
/// then echoes every byte of the stream back.
async fn tower_like_server() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<Request<Incoming>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let seen_tx = seen_tx.clone();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let seen_tx = seen_tx.clone();
                async move {
                    let key = req.headers()[header::SEC_WEBSOCKET_KEY].as_bytes().to_vec();
                    let on = hyper::upgrade::on(&mut req);
                    let _ = seen_tx.send(req).await;
                    tokio::spawn(async move {
                        let io = TokioIo::new(on.await.unwrap());
                        let mut ws = WsStream::from_upgraded(io, Role::Server).await;
                        let mut buf = [0u8; 1024];
                        loop {
                            let n = ws.read(&mut buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            ws.write_all(&buf[..n]).await.unwrap();
                        }
                    });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::SWITCHING_PROTOCOLS)
                            .header(header::UPGRADE, "websocket")
                            .header(header::CONNECTION, "Upgrade")
                            .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
                            .body(Empty::<Bytes>::new())
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades(),
            );
        }
    });
    (addr, seen_rx)
}

/// A minimal CONNECT proxy that records the request head and requires
/// `expected_auth`.
async fn connect_proxy(
    expected_auth: &'static str,
) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if client.read(&mut byte).await.unwrap() == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8(head).unwrap();
                let _ = tx.send(head.clone()).await;
                if !head
                    .to_ascii_lowercase()
                    .contains(&expected_auth.to_ascii_lowercase())
                {
                    let _ = client
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 12\r\n\r\nwho are you?")
                        .await;
                    return;
                }
                let target = head.split(' ').nth(1).unwrap().to_string();
                let mut upstream = TcpStream::connect(target).await.unwrap();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn dials_through_a_connect_proxy_and_accepts_no_subprotocol_echo() {
    let (server, mut requests) = tower_like_server().await;
    let (proxy, mut heads) = connect_proxy("Proxy-Authorization: Basic dTpw").await;
    let endpoint = Endpoint::parse(&format!("http://{server}/tunnel?x=1")).unwrap();
    let via = HttpProxy::parse(&format!("http://u:p@{proxy}"), "HTTP_PROXY").unwrap();
    let dialer = ProxyDialer::new(endpoint, Some(via), None).unwrap();

    let mut ws = dialer.dial().await.unwrap();
    assert!(
        matches!(ws.get_ref(), Conn::Proxied(_)),
        "the CONNECT tunnel itself, out of the upgrade"
    );
    ws.write_all(b"SSH-kubesphere-v1-client\r\n").await.unwrap();
    let mut echoed = [0u8; 26];
    ws.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"SSH-kubesphere-v1-client\r\n");

    let head = heads.recv().await.unwrap();
    assert!(
        head.starts_with(&format!("CONNECT {server} HTTP/1.1\r\n")),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: {server}")),
        "{head}"
    );
    let request = requests.recv().await.unwrap();
    assert_eq!(request.uri(), "/tunnel?x=1");
    assert_eq!(
        request.headers()[header::SEC_WEBSOCKET_PROTOCOL],
        SUBPROTOCOL
    );
    assert_eq!(request.headers()[header::HOST], server.to_string().as_str());
    assert_eq!(request.headers()[header::SEC_WEBSOCKET_VERSION], "13");
}

#[tokio::test]
async fn a_proxy_refusal_shows_status_and_body() {
    let (server, _requests) = tower_like_server().await;
    let (proxy, _heads) = connect_proxy("Proxy-Authorization: Basic nobody").await;
    let endpoint = Endpoint::parse(&format!("http://{server}")).unwrap();
    let via = HttpProxy::parse(&format!("{proxy}"), "HTTP_PROXY").unwrap();
    let dialer = ProxyDialer::new(endpoint, Some(via), None).unwrap();
    let Err(e) = dialer.dial().await else {
        panic!("dial succeeded")
    };
    let e = e.to_string();
    assert!(e.contains("407") && e.contains("who are you?"), "{e}");
}

#[tokio::test]
async fn a_non_101_answer_shows_status_and_body() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let body = "x".repeat(500);
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(answer.as_bytes()).await;
    });
    let dialer = ProxyDialer::new(
        Endpoint::parse(&format!("http://{addr}")).unwrap(),
        None,
        None,
    )
    .unwrap();
    let Err(e) = dialer.dial().await else {
        panic!("dial succeeded")
    };
    match &e {
        DialError::NotUpgraded { status, body } => {
            assert_eq!(*status, StatusCode::NOT_FOUND);
            assert_eq!(body.len(), BODY_PREFIX);
        }
        other => panic!("unexpected {other}"),
    }
}

#[tokio::test]
async fn stages_time_out_with_their_name() {
    let hang = std::future::pending::<Result<(), DialError>>();
    let e = within(
        Duration::from_millis(20),
        "websocket upgrade at ws://x:1/".into(),
        hang,
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "websocket upgrade at ws://x:1/ timed out after 20ms"
    );
}

#[test]
fn proxy_ca_must_hold_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a pem").unwrap();
    let e = tls_config(Some(&empty)).unwrap_err().to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
    assert!(tls_config(Some(&dir.path().join("missing.pem"))).is_err());
    assert!(tls_config(None).is_ok());
}

/// The upgrade hands back the TCP connection itself, and the server's first
/// frame, sent in the same segment as the 101 (so hyper read it with the
/// answer), is the first thing the tunnel reads.
#[tokio::test]
async fn frames_read_with_the_answer_come_first_and_the_socket_is_bare() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(tcp.read(&mut byte).await.unwrap(), 1);
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-key: "))
            .unwrap();
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        // One unmasked binary frame, in the same write as the answer.
        answer.extend_from_slice(&[0x82, 5]);
        answer.extend_from_slice(b"hello");
        tcp.write_all(&answer).await.unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
    });
    let endpoint = Endpoint::parse(&format!("http://{addr}/")).unwrap();
    let dialer = ProxyDialer::new(endpoint, None, None).unwrap();
    let mut ws = dialer.dial().await.unwrap();
    assert!(
        matches!(ws.get_ref(), Conn::Tcp(_)),
        "the TCP socket itself"
    );
    let mut got = [0u8; 5];
    tokio::time::timeout(std::time::Duration::from_secs(10), ws.read_exact(&mut got))
        .await
        .expect("the frame read with the answer was lost")
        .unwrap();
    assert_eq!(&got, b"hello");
}
