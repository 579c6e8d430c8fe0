//! rathole as a peer.

use anyhow::{Context, Result, ensure};

use super::{
    Peer, RATHOLE, Spec, dial, once_ready, registered_ports, spawn_configured, tool, version_of,
};

/// rathole: the server exposes a port, the client next to the upstream dials
/// it over its websocket transport with TLS (native-tls: the server's identity
/// as PKCS#12, made with the openssl command).
pub(super) async fn start(spec: &Spec<'_>) -> Result<Peer> {
    let (env, pki, upstream, link) = spec.parts();
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
    once_ready(
        RATHOLE,
        version_of(&bin, &["--version"]),
        remote,
        (server, client),
        relay,
        "Control channel established",
    )
    .await
}
