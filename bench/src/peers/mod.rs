//! The stronger peers (issue #15): apiserver-network-proxy (konnectivity),
//! frp and rathole, each started in front of the same upstream as our paths.
//!
//! ```text
//!   konnectivity: mTLS + CONNECT ─> proxy-server ─> gRPC/mTLS ─> proxy-agent ─> upstream
//!   frp:          TLS ─> frps remote port ─> TLS (yamux) ─> frpc ───────────> upstream
//!   rathole:      TLS ─> rathole server port ─> wss ─> rathole client ───────> upstream
//! ```
//!
//! `make bench` builds them (hack/bench-peers.sh): konnectivity and frp from
//! Go modules (bench/konnectivity, bench/frp), rathole with `cargo install`.
//! A peer that did not build left `<tool>.skipped` with the reason; the bench
//! reports it as skipped and goes on.

mod frp;
mod konnectivity;
mod rathole;

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use e2e::{Proc, wait_for_ok};
use rustls::ClientConfig;
use tokio::net::TcpStream;

use crate::http::{Target, Via};
use crate::relay::{Link, Relay};
use crate::setup::{Env, spawn};
use crate::tls::{self, Pki};

pub const KONNECTIVITY: &str = "konnectivity (CONNECT, mTLS)";
pub const FRP: &str = "frp (TLS)";
pub const RATHOLE: &str = "rathole (websocket+TLS)";

/// The peers in table order: (BENCH_PATHS key, path name).
pub const ALL: [(&str, &str); 3] = [
    ("konnectivity", KONNECTIVITY),
    ("frp", FRP),
    ("rathole", RATHOLE),
];

/// The bench PKI as files, for the peers' flags and configs.
pub struct PeerPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Trusts the bench CA, presents the client certificate.
    pub mtls: Arc<ClientConfig>,
}

impl PeerPki {
    pub fn write(dir: &Path, pki: &Pki) -> Result<PeerPki> {
        let file = |name: &str, text: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        Ok(PeerPki {
            ca: file("peers-ca.crt", &pki.ca_pem)?,
            cert: file("peers-server.crt", &pki.server_cert_pem)?,
            key: file("peers-server.key", &pki.server_key_pem)?,
            client_cert: file("peers-client.crt", &pki.client_cert_pem)?,
            client_key: file("peers-client.key", &pki.client_key_pem)?,
            mtls: tls::mtls_client_config(pki)?,
        })
    }
}

/// One running peer: its processes (server side first) and where the bench
/// client goes.
pub struct Peer {
    pub name: &'static str,
    pub version: String,
    pub addr: SocketAddr,
    pub via: Option<Via>,
    // Drop order: the client end, the link, then the server end.
    procs: Vec<Proc>,
    _relay: Option<Relay>,
    _server: Proc,
}

impl Peer {
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self._server.pid())
            .chain(self.procs.iter().map(Proc::pid))
            .collect()
    }

    /// The bench client's target through this peer (`base`: direct's).
    pub fn target(&self, base: &Target, count_cpu: bool) -> Target {
        Target {
            name: self.name.to_string(),
            addr: self.addr,
            procs: if count_cpu { self.pids() } else { Vec::new() },
            via: self.via.clone(),
            ..base.clone()
        }
    }
}

/// What every peer starts with: the bench's files, the upstream it serves,
/// and the link between its two ends (none: loopback).
struct Spec<'a> {
    env: &'a Env,
    pki: &'a PeerPki,
    upstream: SocketAddr,
    link: Option<&'a Link>,
}

impl<'a> Spec<'a> {
    fn parts(&self) -> (&'a Env, &'a PeerPki, SocketAddr, Option<&'a Link>) {
        (self.env, self.pki, self.upstream, self.link)
    }
}

/// Every wanted peer that starts, in [`ALL`]'s order; one that cannot (not
/// built, or failing) is reported as skipped with the reason.
pub async fn start_all(
    env: &Env,
    pki: &PeerPki,
    upstream: SocketAddr,
    link: Option<&Link>,
    report: &mut crate::report::Report,
    context: &str,
) -> Vec<Peer> {
    let mut peers = Vec::new();
    for (key, name) in ALL {
        if !env.wants_path(key) {
            continue;
        }
        eprintln!("{context}: starting {name}");
        let spec = Spec {
            env,
            pki,
            upstream,
            link,
        };
        let started = match key {
            "konnectivity" => konnectivity::start(&spec).await,
            "frp" => frp::start(&spec).await,
            _ => rathole::start(&spec).await,
        };
        match started {
            Ok(p) => peers.push(p),
            Err(e) => report.skip(&format!("{context}: {name}"), &e),
        }
    }
    peers
}

/// `tool` in the bench's tool directories, or why it is not there.
fn tool(env: &Env, name: &str) -> Result<PathBuf> {
    let path = if name == "rathole" {
        env.tools().join("cargo").join("bin").join(name)
    } else {
        env.tools().join("gobin").join(name)
    };
    if path.is_file() {
        return Ok(path);
    }
    let skipped = path.with_file_name(format!("{name}.skipped"));
    match std::fs::read_to_string(&skipped) {
        Ok(why) => bail!("{name} did not build: {}", why.trim()),
        Err(_) => bail!(
            "{} is missing: `make bench` builds it (hack/bench-peers.sh)",
            path.display()
        ),
    }
}

fn version_of(program: &Path, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let out = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            // rathole prints its name alone, then `Build Version: X`.
            out.lines()
                .find_map(|l| l.trim().strip_prefix("Build Version:"))
                .map(|v| format!("rathole {}", v.trim()))
                .unwrap_or_else(|| out.lines().next().unwrap_or_default().trim().to_string())
        })
        .unwrap_or_default()
}

/// The version `bench/<dir>/go.mod` requires of `module` (the build's pin).
fn module_version(env: &Env, dir: &str, module: &str) -> String {
    std::fs::read_to_string(env.root.join("bench").join(dir).join("go.mod"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let first = w.next()?;
            let m = if first == "require" { w.next()? } else { first };
            (m == module)
                .then(|| w.next().map(str::to_string))
                .flatten()
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

/// `n` free ports in 1024..49151 (konnectivity refuses ephemeral ones).
fn registered_ports(n: usize) -> Result<Vec<u16>> {
    let start = 41_000 + (rand::random::<u16>() % 7_000);
    let mut held = Vec::new();
    for port in (start..49_000).chain(41_000..start) {
        if let Ok(l) = StdListener::bind((Ipv4Addr::LOCALHOST, port)) {
            held.push(l);
            if held.len() == n {
                return Ok(held
                    .iter()
                    .map(|l| l.local_addr().map(|a| a.port()))
                    .collect::<std::io::Result<_>>()?);
            }
        }
    }
    bail!("no {n} free ports in 41000..49000")
}

/// Once the server end listens on 127.0.0.1:`port`: where the client end
/// dials it, straight or through a relay over `link`.
async fn dial(port: u16, link: Option<&Link>, what: &str) -> Result<(SocketAddr, Option<Relay>)> {
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_ok(Duration::from_secs(20), || async {
        TcpStream::connect(server).await?;
        Ok(())
    })
    .await
    .with_context(|| format!("{what} does not listen on {server}"))?;
    match link {
        Some(l) => {
            let r = Relay::start(server, l).await?;
            Ok((r.addr, Some(r)))
        }
        None => Ok((server, None)),
    }
}

/// A peer whose client end (`ends.1`) logs a line containing `ready` once it
/// serves 127.0.0.1:`remote` through the server end (`ends.0`).
async fn once_ready(
    name: &'static str,
    version: String,
    remote: u16,
    ends: (Proc, Proc),
    relay: Option<Relay>,
    ready: &str,
) -> Result<Peer> {
    let (server, client) = ends;
    client
        .wait_for_line(|l| l.contains(ready), Duration::from_secs(30))
        .await
        .with_context(|| format!("{name}: the client end never said {ready:?}"))?;
    Ok(Peer {
        name,
        version,
        addr: SocketAddr::from(([127, 0, 0, 1], remote)),
        via: None,
        procs: vec![client],
        _relay: relay,
        _server: server,
    })
}

/// Write `text` to the work directory as `file` and spawn `program FLAG <file>`.
fn spawn_configured(
    env: &Env,
    name: &str,
    program: &Path,
    flag: &str,
    file: &str,
    text: String,
) -> Result<Proc> {
    let path = env.work.join(file);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    spawn(name, program, &[flag.into(), path.display().to_string()])
}

/// The paths our forward path is judged against ("ahead of every peer").
pub fn versus_forward() -> Vec<&'static str> {
    let mut v = vec![crate::setup::GO, crate::setup::CHISEL];
    v.extend(ALL.map(|(_, name)| name));
    v
}
