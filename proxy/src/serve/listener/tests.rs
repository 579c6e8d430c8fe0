//! The listener against a fake member API server, through a real tunnel in
//! process: one agent, one proxy port, a kubectl stand-in (set up by
//! [`fixture`]).

mod audit;
mod fixture;
mod path;
mod personal;
mod uploads;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use super::forward::{RESPONSE_HEADER_TIMEOUT, strip_hop_by_hop, upgrade_of};
use super::status::explain;
use super::upstream::{Connector, Routes};
use super::{ClusterListener, Shared};
use crate::agents::registry::Registry;
use crate::identity::ca::{Ca, Issued};
use crate::member::{MemberDialer, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::fixture::*;

// -- the tests -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_member_as_the_agent() {
    let (member, proxy, _agent) = setup(|_| {}).await;
    let req = Request::post("/api/v1/namespaces?fieldManager=x")
        .header(header::AUTHORIZATION, "Bearer the-clients-own-token")
        .header("Proxy-Authorization", "Basic c2VjcmV0")
        .body(Full::new(Bytes::from_static(b"{\"kind\":\"Namespace\"}")))
        .unwrap();
    let resp = send(proxy.listener.local_addr(), proxy.tls(), req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = body_text(resp).await;
    assert_eq!(
        body,
        format!(
            "echo ok auth=Bearer {BEARER} cn=none host={} body={{\"kind\":\"Namespace\"}}",
            member.addr
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_prefers_aes_128_both_ways_unless_the_client_puts_chacha_first() {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let (member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    let suite_with = |tls: Arc<rustls::ClientConfig>| async move {
        let stream = tls_connect(addr, tls).await.unwrap();
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .unwrap()
            .suite()
    };
    // The kubectl stand-in is rustls: AES-256-GCM is its first choice.
    let rustls_client = proxy.tls().unwrap();
    assert_eq!(
        rustls_client.crypto_provider().cipher_suites[0].suite(),
        TLS13_AES_256_GCM_SHA384
    );
    assert_eq!(suite_with(rustls_client).await, TLS13_AES_128_GCM_SHA256);
    // A client without AES instructions puts ChaCha20 first, and keeps it.
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != TLS13_CHACHA20_POLY1305_SHA256);
    let chacha_first = client_tls_with(provider, &proxy.ca, Some(&proxy.client));
    assert_eq!(
        suite_with(chacha_first).await,
        TLS13_CHACHA20_POLY1305_SHA256
    );
    // To the member (rustls, which follows its client's order), through the tunnel.
    let (code, _) = proxy.get("/api").await;
    assert_eq!(code, StatusCode::OK);
    let suites = member.suites.lock().unwrap().clone();
    assert!(
        !suites.is_empty() && suites.iter().all(|s| *s == TLS13_AES_128_GCM_SHA256),
        "{suites:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_of_our_ca_are_refused() {
    let (_member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    let foreign_ca = Ca::generate().unwrap();
    let foreign = foreign_ca
        .issue_client("kubernetes-admin", &["system:masters"], DAY)
        .unwrap();
    for (what, tls) in [
        ("no certificate", client_tls(&proxy.ca, None)),
        ("foreign certificate", client_tls(&proxy.ca, Some(&foreign))),
    ] {
        // TLS 1.3: the client learns of the refusal on its first read.
        let err = match tls_connect(addr, tls).await {
            Err(e) => e.to_string(),
            Ok(mut stream) => {
                let _ = stream
                    .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await;
                let mut buf = Vec::new();
                match stream.read_to_end(&mut buf).await {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("{what}: answered {:?}", String::from_utf8_lossy(&buf)),
                }
            }
        };
        assert!(
            err.contains("CertificateRequired")
                || err.contains("UnknownCA")
                || err.contains("BadCertificate")
                || err.contains("DecryptError"),
            "{what}: {err}"
        );
        eprintln!("{what}: {err}");
    }
    // Our own client certificate still works.
    assert_eq!(proxy.get("/echo").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_our_ca_for_another_cluster_are_forbidden() {
    let (_member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    for (cn, words) in [
        ("tower:beta", "issued for cluster \"beta\""),
        ("kubernetes-admin", "not issued for cluster"),
        ("tower-proxy-peer", "replica"),
    ] {
        let id = proxy.ca.issue_client(cn, &["system:masters"], DAY).unwrap();
        let resp = send(addr, Some(client_tls(&proxy.ca, Some(&id))), get("/echo"))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{cn}");
        let message = body_text(resp).await;
        assert!(message.contains(words), "{cn}: {message}");
        assert!(message.contains("spec.connection.kubeconfig"), "{message}");
    }
    assert_eq!(proxy.get("/echo").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_is_a_503_status() {
    let registry = registry();
    let proxy = start_proxy(&registry, RESPONSE_HEADER_TIMEOUT).await;
    let (code, body) = proxy.get("/api").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let status = parse_status(&body);
    assert_eq!(status["code"], 503);
    assert_eq!(status["reason"], "ServiceUnavailable");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("no agent of cluster \"alpha\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_ca_gets_no_unverified_connection() {
    let (member, proxy, _agent) = setup(|c| c.ca_data.clear()).await;
    let (code, body) = proxy.get("/api").await;
    assert_eq!(code, StatusCode::BAD_GATEWAY);
    let status = parse_status(&body);
    assert_eq!(status["code"], 502);
    assert!(
        status["message"].as_str().unwrap().contains("CAData"),
        "{body}"
    );
    assert_eq!(member.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_certificate_the_agents_ca_did_not_sign_is_a_502() {
    let other = Ca::generate().unwrap();
    let (_member, proxy, _agent) =
        setup(|c| c.ca_data = other.cert_pem().as_bytes().to_vec()).await;
    let (code, body) = proxy.get("/api").await;
    assert_eq!(code, StatusCode::BAD_GATEWAY);
    let message = parse_status(&body)["message"].as_str().unwrap().to_string();
    // Both test CAs are named alike: webpki finds the issuer by name and
    // then the signature does not match.
    assert!(message.contains("TLS handshake"), "{message}");
    assert!(message.contains("invalid peer certificate"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_bearer_token_the_agents_client_certificate_is_used() {
    let member = Member::start(true).await;
    let registry = registry();
    let id = member
        .ca
        .issue_client("tower-agent", &["system:masters"], DAY)
        .unwrap();
    let mut config = agent_config(&member, None);
    config.bearer_token.clear();
    config.cert_data = id.cert_pem.into_bytes();
    config.key_data = id.key_pem.into_bytes();
    let _agent = connect_agent(&registry, config, vec![member.addr.clone()]).await;
    let proxy = start_proxy(&registry, RESPONSE_HEADER_TIMEOUT).await;
    let req = Request::get("/api")
        .header(header::AUTHORIZATION, "Bearer the-clients-own-token")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send(proxy.listener.local_addr(), proxy.tls(), req)
        .await
        .unwrap();
    let body = body_text(resp).await;
    assert!(body.contains("auth=none cn=tower-agent"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_chunk_by_chunk() {
    let (mut member, proxy, _agent) = setup(|_| {}).await;
    let resp = send(proxy.listener.local_addr(), proxy.tls(), get("/stream"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let feed = member.streams.recv().await.unwrap();
    let mut body = resp.into_body();
    // Each chunk reaches the client before the member writes the next.
    for chunk in ["{\"type\":\"ADDED\"}\n", "{\"type\":\"MODIFIED\"}\n", "x"] {
        feed.send(Bytes::from(chunk)).await.unwrap();
        let mut got = Vec::new();
        while got.len() < chunk.len() {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("chunk did not arrive: the response is buffered")
                .unwrap()
                .unwrap();
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(got, chunk.as_bytes());
    }
    drop(feed);
    let end = tokio::time::timeout(WAIT, body.frame()).await.unwrap();
    assert!(end.is_none(), "body must end when the member's ends");
}

fn exec_request(path: &str) -> Request<Full<Bytes>> {
    Request::post(path)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header("X-Stream-Protocol-Version", "v4.channel.k8s.io")
        .header("X-Stream-Protocol-Version", "v3.channel.k8s.io")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_round_trip_bytes_both_ways() {
    let (_member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    let resp = send(addr, proxy.tls(), exec_request("/exec"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()[header::UPGRADE], "SPDY/3.1");
    assert_eq!(
        resp.headers()["X-Stream-Protocol-Version"],
        "v4.channel.k8s.io"
    );
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    for msg in [&b"hello"[..], &[7u8; 100_000][..]] {
        io.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, io.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg);
    }
    // Half-close: our EOF reaches the member, which still answers.
    io.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, io.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"bye");

    // A refused upgrade is passed through as is.
    let resp = send(addr, proxy.tls(), exec_request("/forbidden"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(body_text(resp).await, "no exec for you");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    let (member, proxy, _agent) = setup(|_| {}).await;
    for _ in 0..10 {
        let (code, _) = proxy.get("/api/v1/pods").await;
        assert_eq!(code, StatusCode::OK);
        // The pool takes a connection back in a task of its own once the
        // response has ended; give that task a moment on a busy machine.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted = member.accepted.load(Ordering::SeqCst);
    assert!(accepted <= 2, "10 requests took {accepted} connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_gone_under_a_request_is_a_503_to_retry() {
    // The pool asks the connector for a session the routes no longer know.
    let client: Client<Connector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(Connector {
            cluster: CLUSTER.into(),
            target: Target::KubeApiserver,
            dialer: MemberDialer::new(registry()),
            routes: Arc::new(Routes::default()),
        });
    let err = client
        .request(
            Request::get("https://s0000000000000000.tunnel/api")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap_err();
    let failure = explain(CLUSTER, "kube-apiserver", &err);
    assert_eq!(failure.code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(failure.transient);
    let resp = failure.response();
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let status = parse_status(std::str::from_utf8(&body).unwrap());
    assert_eq!(status["code"], 503);
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("session ended"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_leaves_and_returns() {
    let member = Member::start(true).await;
    let registry = registry();
    let targets = vec![member.addr.clone()];
    let agent = connect_agent(&registry, agent_config(&member, None), targets.clone()).await;
    let proxy = start_proxy(&registry, RESPONSE_HEADER_TIMEOUT).await;
    assert_eq!(proxy.get("/api").await.0, StatusCode::OK);

    agent.abort();
    tokio::time::timeout(WAIT, async {
        while registry.pick(CLUSTER).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the session ended");
    let (code, body) = proxy.get("/api").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    // A new session gets new upstream connections; the dead one's pooled
    // connection is not used.
    let _agent = connect_agent(&registry, agent_config(&member, None), targets).await;
    assert_eq!(proxy.get("/api").await.0, StatusCode::OK);
    assert_eq!(member.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_serves_new_connections() {
    let (_member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    let served = || async {
        let tls = tls_connect(addr, client_tls(&proxy.ca, Some(&proxy.client)))
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first = served().await;
    let old = proxy.cert.not_after();
    let next = proxy
        .ca
        .issue_server(
            &["127.0.0.1".into(), "mc-alpha.kubesphere-system.svc".into()],
            2 * DAY,
        )
        .unwrap();
    let next_der = CertificateDer::from_pem_slice(next.cert_pem.as_bytes()).unwrap();
    // A certificate with another certificate's key is refused, and the
    // one served stays.
    let stray = proxy.ca.issue_server(&["127.0.0.1".into()], DAY).unwrap();
    let mismatched = Issued {
        key_pem: stray.key_pem,
        ..next.clone()
    };
    let err = proxy.cert.set(mismatched).unwrap_err();
    assert!(err.to_string().contains("unusable"), "{err}");
    assert_eq!(served().await, first);
    proxy.cert.set(next).unwrap();
    assert!(proxy.cert.not_after() > old);
    let second = served().await;
    assert_ne!(first, second);
    assert_eq!(second, next_der);
    assert_eq!(proxy.get("/api").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_response_headers_are_a_504() {
    let (_member, registry, _agent) = member_with_agent(|_| {}).await;
    let proxy = start_proxy(&registry, Duration::from_millis(300)).await;
    let (code, body) = proxy.get("/hang").await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT);
    let status = parse_status(&body);
    assert_eq!(status["reason"], "Timeout");
    assert_eq!(status["code"], 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ks_apiserver_port_forwards_plain_http() {
    let member = Member::start(true).await;
    let ks = Member::start(false).await;
    let registry = registry();
    let config = agent_config(&member, Some(&ks));
    let _agent = connect_agent(
        &registry,
        config,
        vec![member.addr.clone(), ks.addr.clone()],
    )
    .await;
    let port = ClusterListener::start_kubesphere(
        CLUSTER.into(),
        "127.0.0.1:0".parse().unwrap(),
        &shared(&registry),
    )
    .await
    .unwrap();
    // ks-apiserver checks its users' tokens itself: passed through.
    let req = Request::get("/kapis/tenant.kubesphere.io/v1alpha2/workspaces")
        .header(header::AUTHORIZATION, "Bearer ks-jwt")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send(port.local_addr(), None, req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = body_text(resp).await;
    assert!(body.contains("auth=Bearer ks-jwt"), "{body}");
    assert!(body.contains(&format!("host={}", ks.addr)), "{body}");
    assert_eq!(member.accepted.load(Ordering::SeqCst), 0);

    // Without an agent: 503 there too.
    let idle = ClusterListener::start_kubesphere(
        "beta".into(),
        "127.0.0.1:0".parse().unwrap(),
        &shared(&registry),
    )
    .await
    .unwrap();
    let resp = send(idle.local_addr(), None, get("/kapis")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    parse_status(&body_text(resp).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_port_and_its_streams() {
    let (_member, proxy, _agent) = setup(|_| {}).await;
    let addr = proxy.listener.local_addr();
    let resp = send(addr, proxy.tls(), exec_request("/exec"))
        .await
        .unwrap();
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();

    proxy.listener.shutdown().await;
    // Closed at once in the proxy. A process the tests spawn meanwhile
    // (openssl, in the CA tests) may hold a copy of the socket between its
    // fork and exec, so allow for that moment.
    let closed = tokio::time::timeout(WAIT, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the port must be closed");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, io.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the upgraded stream must end with the listener"
    );
}

#[test]
fn hop_by_hop_headers_are_removed() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, X-Secret"),
    );
    h.insert("x-secret", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert("x-stream-protocol-version", HeaderValue::from_static("v4"));
    strip_hop_by_hop(&mut h);
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(h.contains_key("x-stream-protocol-version"));

    let mut h = HeaderMap::new();
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("keep-alive, Upgrade"),
    );
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    assert_eq!(upgrade_of(&h).unwrap(), "websocket");
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    assert!(upgrade_of(&h).is_none());
}
