//! The path form ([`crate::serve::access`]) against the same fake member:
//! the cluster prefix comes off before the member sees the request, an
//! upgrade goes through, another cluster's certificate is refused, paths
//! that name no served cluster are 404s saying why, and a cluster's handler
//! goes with its last session.

use super::*;
use crate::serve::access::{Access, Options};
use crate::serve::connect::Known;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_serves_each_cluster_at_its_path() {
    let (_member, registry, agent) = member_with_agent(|_| {}).await;
    let ca = Arc::new(Ca::generate().unwrap());
    let gate = gate(&registry);
    let known: Known = Arc::new(move |cluster: &str| gate.knows(cluster));
    let stop = CancellationToken::new();
    let access = Arc::new(Access::new(shared(&registry), known, &stop));
    let options = Options {
        port: 0,
        names: vec![],
    };
    let addr = access
        .open(&options, "127.0.0.1".parse().unwrap(), Some(&ca), &stop)
        .await
        .unwrap();
    let issue = |cn: &str| ca.issue_client(cn, &["tower:clients"], DAY).unwrap();
    let alpha = Some(client_tls(&ca, Some(&issue("tower:alpha"))));

    // The member sees its own path: it answers /exec with an upgrade.
    let resp = send(addr, alpha.clone(), exec_request("/clusters/alpha/exec"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(WAIT, io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello");
    drop(io);
    let resp = send(
        addr,
        alpha.clone(),
        get("/clusters/alpha/api/v1/pods?watch=1"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_text(resp).await.contains(BEARER), "as the agent");

    // beta's certificate does not open alpha: 403 in plain text.
    let beta = Some(client_tls(&ca, Some(&issue("tower:beta"))));
    let resp = send(addr, beta, get("/clusters/alpha/api/v1/pods"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let why = body_text(resp).await;
    assert!(why.contains("issued for cluster \"beta\""), "{why}");

    // No cluster in the path, or one the proxy does not serve: 404s.
    let resp = send(addr, alpha.clone(), get("/api/v1/pods"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let status = parse_status(&body_text(resp).await);
    assert_eq!(status["reason"], "NotFound");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("/clusters/<cluster>/")
    );
    let zeta = Some(client_tls(&ca, Some(&issue("tower:zeta"))));
    let resp = send(addr, zeta, get("/clusters/zeta/api")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let status = parse_status(&body_text(resp).await);
    assert!(
        status["message"].as_str().unwrap().contains("not served"),
        "{status}"
    );

    // No client certificate: no answer (the same TLS as a cluster's port).
    let anonymous = Some(client_tls(&ca, None));
    assert!(
        send(addr, anonymous, get("/clusters/alpha/api"))
            .await
            .is_err()
    );

    // The agent goes: alpha's handler with it; the answer is the 503 of
    // a cluster without an agent.
    agent.abort();
    sessions_until(&registry, |r| r.live(CLUSTER) == 0, "the session ended").await;
    let resp = send(addr, alpha, get("/clusters/alpha/api")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    stop.cancel();
}
