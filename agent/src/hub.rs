//! Pull mode, the agent's side: `--hub-listen NAME=ADDR` listeners. Each
//! accepted connection becomes a hub channel to service NAME through the live
//! tunnel ([`tunnel::hub::HubLink`]); the proxy decides whether NAME is
//! published and whether this cluster opted in. The listeners are bound at
//! start and outlive reconnects; without a tunnel, a connection is closed.
//!
//! Log lines: `hub listening` (`service`, `addr`), `hub connection refused`
//! (`service`, `reason`).

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel::hub::HubLink;

/// One `--hub-listen` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub service: String,
    pub addr: SocketAddr,
}

/// Parse `NAME=ADDR`, e.g. `hub-api=127.0.0.1:6443` (clap names the flag in its error).
pub fn parse_listen(value: &str) -> Result<Listen, String> {
    let example = "e.g. hub-api=127.0.0.1:6443";
    let (name, addr) = value
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDR, {example}"))?;
    tunnel::hub::check_service_name(name)?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not IP:PORT ([::1]:PORT for IPv6), {example}"))?;
    Ok(Listen {
        service: name.to_string(),
        addr,
    })
}

/// Bind every listener now, so a taken or forbidden address fails the start.
pub async fn bind(listens: &[Listen]) -> anyhow::Result<Vec<(String, TcpListener)>> {
    let mut bound = Vec::new();
    for listen in listens {
        let listener = TcpListener::bind(listen.addr).await.with_context(|| {
            format!(
                "cannot listen on --hub-listen {}={}",
                listen.service, listen.addr
            )
        })?;
        tracing::info!(service = %listen.service, addr = %listener.local_addr()?, "hub listening");
        bound.push((listen.service.clone(), listener));
    }
    Ok(bound)
}

/// Accept on `listener` until `stop`, each connection joined to a hub channel.
pub async fn serve(service: String, listener: TcpListener, link: HubLink, stop: CancellationToken) {
    loop {
        let (mut tcp, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%service, error = %e, "hub listener cannot accept");
                    continue;
                }
            },
        };
        let (service, link) = (service.clone(), link.clone());
        tokio::spawn(async move {
            let mut channel = match link.open(&service).await {
                Ok(channel) => channel,
                Err(e) => {
                    tracing::warn!(%service, %peer, reason = %e, "hub connection refused");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            if let Err(e) = tunnel::copy::join(&mut tcp, &mut channel).await {
                tracing::debug!(%service, %peer, error = %e, "hub stream ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values() {
        assert_eq!(
            parse_listen("hub-api=127.0.0.1:6443"),
            Ok(Listen {
                service: "hub-api".into(),
                addr: "127.0.0.1:6443".parse().unwrap()
            })
        );
        assert_eq!(parse_listen("x=[::1]:1").unwrap().addr.port(), 1);
        assert!(parse_listen("hub-api").unwrap_err().contains("NAME=ADDR"));
        assert!(
            parse_listen("Hub=127.0.0.1:1")
                .unwrap_err()
                .contains("DNS label")
        );
        assert!(
            parse_listen("hub=localhost")
                .unwrap_err()
                .contains("IP:PORT")
        );
    }
}
