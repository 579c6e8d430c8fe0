//! Toxiproxy (Shopify's fault proxy, bin/toxiproxy-server, `make toxiproxy`)
//! between the agent and the proxy: its HTTP API spoken over a plain TCP
//! connection (one request per connection), and the member-side NAT rule
//! that sends the agent's connections to the proxy through it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{MEMBER_GATEWAY, MemberNet, Proc, bin, free_port, wait_for_ok};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::Command;

const STARTUP: Duration = Duration::from_secs(30);

/// A running toxiproxy-server with one proxy, `agent`, listening on the
/// veth's host side and forwarding to the proxy's agent port.
pub struct Toxiproxy {
    _server: Proc,
    api: String,
    /// Where the agent's connections land (`MEMBER_GATEWAY:port`).
    pub listen_port: u16,
}

impl Toxiproxy {
    /// The server on 127.0.0.1 and the `agent` proxy to `127.0.0.1:proxy_port`.
    pub async fn start(proxy_port: u16) -> Result<Toxiproxy> {
        let api_port = free_port();
        let mut cmd = Command::new(bin("toxiproxy-server"));
        cmd.args(["-host", "127.0.0.1", "-port", &api_port.to_string()]);
        let server = Proc::spawn_quiet("toxiproxy", cmd)?;
        let tp = Toxiproxy {
            _server: server,
            api: format!("127.0.0.1:{api_port}"),
            listen_port: free_port(),
        };
        wait_for_ok(STARTUP, || tp.call("GET", "/version", "")).await?;
        let body = format!(
            r#"{{"name":"agent","listen":"{MEMBER_GATEWAY}:{}","upstream":"127.0.0.1:{proxy_port}","enabled":true}}"#,
            tp.listen_port
        );
        tp.call("POST", "/proxies", &body).await?;
        Ok(tp)
    }

    /// Adds toxic `name` of `kind` on `stream` (`upstream`: agent to proxy,
    /// `downstream`: proxy to agent) with `attributes` (a JSON object).
    pub async fn add(&self, name: &str, kind: &str, stream: &str, attributes: &str) -> Result<()> {
        let body = format!(
            r#"{{"name":"{name}","type":"{kind}","stream":"{stream}","toxicity":1.0,"attributes":{attributes}}}"#
        );
        self.call("POST", "/proxies/agent/toxics", &body).await?;
        Ok(())
    }

    /// Removes toxic `name`.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.call("DELETE", &format!("/proxies/agent/toxics/{name}"), "")
            .await?;
        Ok(())
    }

    /// One HTTP/1.1 request; the response body when the status is 2xx.
    async fn call(&self, method: &str, path: &str, body: &str) -> Result<String> {
        let mut conn = TcpStream::connect(&self.api)
            .await
            .with_context(|| format!("connecting to toxiproxy's API on {}", self.api))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        );
        conn.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        tokio::time::timeout(STARTUP, conn.read_to_string(&mut response))
            .await
            .context("toxiproxy's API did not answer")??;
        let status = response.split_whitespace().nth(1).unwrap_or_default();
        ensure!(
            status.starts_with('2'),
            "toxiproxy {method} {path}: {}",
            response.lines().next().unwrap_or_default()
        );
        Ok(response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default())
    }
}

/// In the member's namespace: new connections to the proxy's agent port go
/// to `to_port` on the same address instead (toxiproxy's listener), so the
/// agent keeps its `--proxy-server` and the faults sit on its real path.
pub async fn redirect(net: &MemberNet, proxy_port: u16, to_port: u16) -> Result<()> {
    let rules = format!(
        "table ip tower_faults_nat {{
  chain output {{
    type nat hook output priority -100;
    ip daddr {MEMBER_GATEWAY} tcp dport {proxy_port} dnat to {MEMBER_GATEWAY}:{to_port}
  }}
}}
"
    );
    net.nft(&rules).await
}
