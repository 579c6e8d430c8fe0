//! The audit lines of a cluster's port, against the fake member: the caller
//! from the client certificate, refusals with theirs, bytes, no secrets.

use super::*;
use crate::ops::audit::{Audit, Destination};

/// A proxy whose audit log is `file`.
async fn audited_proxy(registry: &Registry, file: &std::path::Path) -> ProxySide {
    let output = Destination::File(file.to_path_buf()).open().unwrap();
    let (audit, _writer) = Audit::start(output, registry.metrics().clone());
    let shared = Shared {
        audit,
        ..shared(registry)
    };
    start_proxy_with(&shared, RESPONSE_HEADER_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_request_with_its_caller_and_no_secret() {
    let (_member, registry, _agent) = member_with_agent(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.log");
    let proxy = audited_proxy(&registry, &file).await;
    let addr = proxy.listener.local_addr();

    let post = Request::post("/api/v1/namespaces/default/configmaps?token=sekrit-query")
        .header(header::HOST, "proxy")
        .header(header::AUTHORIZATION, "Bearer sekrit-client-token")
        .body(Full::new(Bytes::from_static(b"sekrit-body")))
        .unwrap();
    let resp = send(addr, proxy.tls(), post).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer = body_text(resp).await;
    assert!(
        answer.contains(BEARER),
        "the member saw the agent's token: {answer}"
    );

    let beta = proxy
        .ca
        .issue_client("tower:beta", &["tower:clients"], DAY)
        .unwrap();
    let resp = send(
        addr,
        Some(client_tls(&proxy.ca, Some(&beta))),
        get("/api/v1/pods"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    drop(body_text(resp).await);

    // Lines are written as responses end, by another task.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&file).unwrap();
        if text.lines().count() >= 2 || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for secret in ["sekrit", "Bearer", BEARER, AGENT_TOKEN] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let create = &lines[0];
    assert_eq!(create["door"], "port");
    assert_eq!(create["cluster"], CLUSTER);
    assert_eq!(create["caller"]["user"], "kubeconfig of alpha");
    assert_eq!(create["caller"]["cn"], "tower:alpha");
    assert_eq!(create["verb"], "create");
    assert_eq!(create["method"], "POST");
    assert_eq!(create["path"], "/api/v1/namespaces/default/configmaps");
    assert_eq!(create["status"], 200);
    assert_eq!(create["bytes_in"], "sekrit-body".len());
    assert_eq!(create["bytes_out"], answer.len());
    let refused = &lines[1];
    assert_eq!(refused["caller"]["user"], "tower:beta");
    assert_eq!(refused["verb"], "list");
    assert_eq!(refused["status"], 403);
    assert!(
        refused["reason"].as_str().unwrap().contains("beta"),
        "{refused}"
    );
}
