//! Request bodies paced per client (`--request-body-rate-per-source`).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};

use super::super::Shared;
use super::super::forward::RESPONSE_HEADER_TIMEOUT;
use super::fixture::*;
use crate::ops::metrics::Metrics;
use crate::ops::uploads::Pacer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_its_clients_burst_waits_its_turn_and_arrives_whole() {
    let (_member, registry, _agent) = member_with_agent(|_| {}).await;
    // 64 KiB at once, then 1 MiB a second: a 1 MiB body waits most of a second.
    let shared = Shared {
        uploads: Pacer::new(1 << 20, 64 << 10),
        ..shared(&registry)
    };
    let proxy = start_proxy_with(&shared, RESPONSE_HEADER_TIMEOUT).await;
    let body = vec![b'x'; 1 << 20];
    let req = Request::post("/api/v1/namespaces/default/configmaps")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = send(proxy.listener.local_addr(), proxy.tls(), req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echoed = body_text(resp).await;
    assert!(
        echoed.ends_with(&format!("body={}", String::from_utf8_lossy(&body))),
        "the member got the whole body ({} bytes echoed)",
        echoed.len()
    );
    let paced = registry
        .metrics()
        .paced_seconds
        .get_or_create(&Metrics::cluster(CLUSTER))
        .get();
    assert!(paced > 0.0, "the body never waited for its turn");
}
