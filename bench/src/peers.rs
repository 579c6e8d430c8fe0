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

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{Proc, wait_for_ok};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
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
        let started = match key {
            "konnectivity" => konnectivity(env, pki, upstream, link).await,
            "frp" => frp(env, pki, upstream, link).await,
            _ => rathole(env, pki, upstream, link).await,
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
async fn konnectivity(
    env: &Env,
    pki: &PeerPki,
    upstream: SocketAddr,
    link: Option<&Link>,
) -> Result<Peer> {
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

/// frp as a reverse tunnel: frpc next to the upstream, frps exposing a TCP
/// port; TLS between them (frps forces it, frpc verifies frps's certificate).
async fn frp(env: &Env, pki: &PeerPki, upstream: SocketAddr, link: Option<&Link>) -> Result<Peer> {
    let frps = tool(env, "frps")?;
    let frpc = tool(env, "frpc")?;
    let p = registered_ports(2)?;
    let (bind, remote) = (p[0], p[1]);
    let token = "bench-frp-token";
    let path = |p: &PathBuf| p.display().to_string();
    let server = spawn_configured(
        env,
        "frps",
        &frps,
        "-c",
        &format!("frps-{bind}.toml"),
        format!(
            "bindAddr = \"127.0.0.1\"\nbindPort = {bind}\nauth.token = \"{token}\"\n\
             transport.tls.force = true\ntransport.tls.certFile = \"{}\"\ntransport.tls.keyFile = \"{}\"\n\
             log.level = \"info\"\n",
            path(&pki.cert),
            path(&pki.key)
        ),
    )?;
    let (to, relay) = dial(bind, link, "frps").await?;
    let client = spawn_configured(
        env,
        "frpc",
        &frpc,
        "-c",
        &format!("frpc-{bind}.toml"),
        format!(
            "serverAddr = \"{}\"\nserverPort = {}\nauth.token = \"{token}\"\nloginFailExit = false\n\
             transport.tls.enable = true\ntransport.tls.trustedCaFile = \"{}\"\ntransport.tls.serverName = \"127.0.0.1\"\n\
             log.level = \"info\"\n\n\
             [[proxies]]\nname = \"bench\"\ntype = \"tcp\"\nlocalIP = \"{}\"\nlocalPort = {}\nremotePort = {remote}\n",
            to.ip(),
            to.port(),
            path(&pki.ca),
            upstream.ip(),
            upstream.port()
        ),
    )?;
    client
        .wait_for_line(
            |l| l.contains("start proxy success"),
            Duration::from_secs(30),
        )
        .await
        .context("frpc did not start its proxy")?;
    Ok(Peer {
        name: FRP,
        version: format!("frp {}", version_of(&frps, &["--version"])),
        addr: SocketAddr::from(([127, 0, 0, 1], remote)),
        via: None,
        procs: vec![client],
        _relay: relay,
        _server: server,
    })
}

/// rathole: the server exposes a port, the client next to the upstream dials
/// it over its websocket transport with TLS (native-tls: the server's identity
/// as PKCS#12, made with the openssl command).
async fn rathole(
    env: &Env,
    pki: &PeerPki,
    upstream: SocketAddr,
    link: Option<&Link>,
) -> Result<Peer> {
    let bin = tool(env, "rathole")?;
    let p = registered_ports(2)?;
    let (bind, remote) = (p[0], p[1]);
    let pfx = env.work.join("peers-server.pfx");
    if !pfx.is_file() {
        let out = std::process::Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:bench"])
            .arg("-in")
            .arg(&pki.cert)
            .arg("-inkey")
            .arg(&pki.key)
            .arg("-out")
            .arg(&pfx)
            .output()
            .context("running openssl pkcs12 (rathole's TLS wants a PKCS#12 identity)")?;
        ensure!(
            out.status.success(),
            "openssl pkcs12 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let token = "bench-rathole-token";
    let server = spawn_configured(
        env,
        "rathole-server",
        &bin,
        "--server",
        &format!("rathole-server-{bind}.toml"),
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{bind}\"\n\n\
             [server.transport]\ntype = \"websocket\"\n\n\
             [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"bench\"\n\n\
             [server.transport.websocket]\ntls = true\n\n\
             [server.services.bench]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{remote}\"\n",
            pfx.display()
        ),
    )?;
    let (to, relay) = dial(bind, link, "the rathole server").await?;
    let client = spawn_configured(
        env,
        "rathole-client",
        &bin,
        "--client",
        &format!("rathole-client-{bind}.toml"),
        format!(
            "[client]\nremote_addr = \"{to}\"\n\n\
             [client.transport]\ntype = \"websocket\"\n\n\
             [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"127.0.0.1\"\n\n\
             [client.transport.websocket]\ntls = true\n\n\
             [client.services.bench]\ntoken = \"{token}\"\nlocal_addr = \"{upstream}\"\n",
            pki.ca.display()
        ),
    )?;
    client
        .wait_for_line(
            |l| l.contains("Control channel established"),
            Duration::from_secs(30),
        )
        .await
        .context("the rathole client did not connect")?;
    Ok(Peer {
        name: RATHOLE,
        version: version_of(&bin, &["--version"]),
        addr: SocketAddr::from(([127, 0, 0, 1], remote)),
        via: None,
        procs: vec![client],
        _relay: relay,
        _server: server,
    })
}

/// The paths our forward path is judged against ("ahead of every peer").
pub fn versus_forward() -> Vec<&'static str> {
    let mut v = vec![crate::setup::GO, crate::setup::CHISEL];
    v.extend(ALL.map(|(_, name)| name));
    v
}
