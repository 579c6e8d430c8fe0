//! apiserver-network-proxy (konnectivity) as a peer.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::wait_for_ok;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{KONNECTIVITY, Peer, Spec, dial, module_version, registered_ports, tool};
use crate::http::Via;
use crate::setup::spawn;

/// An HTTP/1.0 GET on loopback answered 200.
async fn http_ok(addr: SocketAddr, path: &str) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    ensure!(
        answer.split(' ').nth(1) == Some("200"),
        "GET {path}: {}",
        answer.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// apiserver-network-proxy in http-connect mode: the client's front door is
/// mutual TLS (bench CA), the agent dials the server's agent port (gRPC over
/// mutual TLS) and serves any address the server asks for.
pub(super) async fn start(spec: &Spec<'_>) -> Result<Peer> {
    let (env, pki, upstream, link) = spec.parts();
    let server_bin = tool(env, "proxy-server")?;
    let agent_bin = tool(env, "proxy-agent")?;
    let p = registered_ports(6)?;
    let (front, agents, health) = (p[0], p[1], p[3]);
    let path = |p: &PathBuf| p.display().to_string();
    let server = spawn(
        "konnectivity-server",
        &server_bin,
        &[
            "--mode=http-connect".into(),
            "--uds-name=".into(),
            format!("--server-port={front}"),
            "--server-bind-address=127.0.0.1".into(),
            format!("--agent-port={agents}"),
            "--agent-bind-address=127.0.0.1".into(),
            format!("--admin-port={}", p[2]),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--health-port={health}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--server-cert={}", path(&pki.cert)),
            format!("--server-key={}", path(&pki.key)),
            format!("--server-ca-cert={}", path(&pki.ca)),
            format!("--cluster-cert={}", path(&pki.cert)),
            format!("--cluster-key={}", path(&pki.key)),
            format!("--cluster-ca-cert={}", path(&pki.ca)),
            "--server-count=1".into(),
        ],
    )?;
    let (to, relay) = dial(agents, link, "konnectivity proxy-server").await?;
    let agent = spawn(
        "konnectivity-agent",
        &agent_bin,
        &[
            format!("--proxy-server-host={}", to.ip()),
            format!("--proxy-server-port={}", to.port()),
            format!("--ca-cert={}", path(&pki.ca)),
            format!("--agent-cert={}", path(&pki.client_cert)),
            format!("--agent-key={}", path(&pki.client_key)),
            format!("--admin-server-port={}", p[4]),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--health-server-port={}", p[5]),
            "--health-server-host=127.0.0.1".into(),
        ],
    )?;
    // The server is ready once an agent is connected.
    let health_addr = SocketAddr::from(([127, 0, 0, 1], health));
    wait_for_ok(Duration::from_secs(30), || http_ok(health_addr, "/readyz"))
        .await
        .context("konnectivity: no agent connected to the proxy-server")?;
    Ok(Peer {
        name: KONNECTIVITY,
        version: format!(
            "apiserver-network-proxy {} (bench/konnectivity/go.mod)",
            module_version(env, "konnectivity", "sigs.k8s.io/apiserver-network-proxy")
        ),
        addr: SocketAddr::from(([127, 0, 0, 1], front)),
        via: Some(Via {
            tls: Some((
                pki.mtls.clone(),
                ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
            )),
            authority: upstream.to_string(),
        }),
        procs: vec![agent],
        _relay: relay,
        _server: server,
    })
}
