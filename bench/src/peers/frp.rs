//! frp as a peer.

use std::path::PathBuf;

use anyhow::Result;

use super::{
    FRP, Peer, Spec, dial, once_ready, registered_ports, spawn_configured, tool, version_of,
};

/// frp as a reverse tunnel: frpc next to the upstream, frps exposing a TCP
/// port; TLS between them (frps forces it, frpc verifies frps's certificate).
pub(super) async fn start(spec: &Spec<'_>) -> Result<Peer> {
    let (env, pki, upstream, link) = spec.parts();
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
    once_ready(
        FRP,
        format!("frp {}", version_of(&frps, &["--version"])),
        remote,
        (server, client),
        relay,
        "start proxy success",
    )
    .await
}
