//! Chisel in reverse mode.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use e2e::Proc;

use super::Env;
use super::procs::spawn;
use crate::relay::{Link, Relay};

/// Chisel in reverse mode: the server listens for the client's reverse port.
pub struct Chisel {
    pub client: Proc,
    /// Kept alive for the connection's sake.
    pub _relay: Option<Relay>,
    pub server: Proc,
    pub forward: SocketAddr,
    pub version: String,
}

impl Chisel {
    /// `link`: put a [`Relay`] over this link between them.
    pub async fn start(env: &Env, upstream: SocketAddr, link: Option<Link>) -> Result<Chisel> {
        let chisel = env.chisel();
        if !chisel.is_file() {
            bail!(
                "{} is missing: `make bench` installs it (target chisel)",
                chisel.display()
            );
        }
        let version = std::process::Command::new(&chisel)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let port = e2e::free_port();
        let rport = e2e::free_port();
        let server = spawn(
            "chisel-server",
            &chisel,
            &[
                "server".into(),
                "--host=127.0.0.1".into(),
                format!("--port={port}"),
                "--reverse".into(),
            ],
        )?;
        server
            .wait_for_line(|l| l.contains("Listening on"), Duration::from_secs(10))
            .await?;
        let relay = match &link {
            Some(l) => Some(Relay::start(SocketAddr::from(([127, 0, 0, 1], port)), l).await?),
            None => None,
        };
        let server_addr = relay
            .as_ref()
            .map_or(SocketAddr::from(([127, 0, 0, 1], port)), |r| r.addr);
        let client = spawn(
            "chisel-client",
            &chisel,
            &[
                "client".into(),
                format!("http://{server_addr}"),
                format!("R:127.0.0.1:{rport}:{upstream}"),
            ],
        )?;
        server
            .wait_for_line(
                |l| l.contains(&format!(":{rport}")) && l.contains("Listening"),
                Duration::from_secs(20),
            )
            .await?;
        Ok(Chisel {
            client,
            _relay: relay,
            server,
            forward: SocketAddr::from(([127, 0, 0, 1], rport)),
            version,
        })
    }
}
