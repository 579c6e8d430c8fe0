//! Tower's own stack (go-proxy + go-agent from tests/go-peers).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use e2e::{Proc, bin};

use super::procs::spawn;
use crate::relay::{Link, Relay};

/// go-proxy + go-agent (x/crypto/ssh + gorilla websocket, Tower's stack).
pub struct GoPeers {
    pub agent: Proc,
    /// Kept alive for the connection's sake.
    pub _relay: Option<Relay>,
    pub proxy: Proc,
    pub forward: SocketAddr,
}

impl GoPeers {
    /// `link`: put a [`Relay`] over this link between them.
    pub async fn start(upstream: SocketAddr, link: Option<Link>) -> Result<GoPeers> {
        let token = "bench-go-token";
        let proxy = spawn(
            "go-proxy",
            &bin("go-proxy"),
            &[
                "--listen=127.0.0.1:0".into(),
                "--name=bench".into(),
                format!("--token={token}"),
                "--forward=127.0.0.1:0".into(),
            ],
        )?;
        let listen = proxy
            .wait_for_line(|l| l.starts_with("listening "), Duration::from_secs(10))
            .await?;
        let forward = proxy
            .wait_for_line(|l| l.starts_with("forward "), Duration::from_secs(10))
            .await?;
        let listen: SocketAddr = listen["listening ".len()..].trim().parse()?;
        let forward = forward["forward ".len()..].trim().parse()?;
        let relay = match &link {
            Some(l) => Some(Relay::start(listen, l).await?),
            None => None,
        };
        let listen = relay.as_ref().map_or(listen, |r| r.addr);
        let agent = spawn(
            "go-agent",
            &bin("go-agent"),
            &[
                format!("--proxy-server=http://{listen}"),
                "--name=bench".into(),
                format!("--token={token}"),
                format!("--kubernetes-service={upstream}"),
                format!("--kubesphere-service={upstream}"),
            ],
        )?;
        agent
            .wait_for_line(|l| l == "connected", Duration::from_secs(20))
            .await?;
        Ok(GoPeers {
            agent,
            _relay: relay,
            proxy,
            forward,
        })
    }
}
