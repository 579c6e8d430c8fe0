//! The websocket upgrade, the last stage of a dial: `GET` with
//! `Upgrade: websocket` and our subprotocol, then the 101 answer checked.
//!
//! Checked as RFC 6455 asks but for one thing: Go Tower's proxy does not
//! echo the subprotocol, so a missing one is accepted (a wrong one is not).
//! A refusal's status and the start of its body go into the error.

use base64::Engine as _;
use http_body_util::Empty;
use hyper::header::{self, HeaderMap};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::wire::SUBPROTOCOL;
use tunnel::ws::WsStream;

use super::conn::{Conn, Shape};
use super::{DialError, ProxyDialer, ProxyStream, UPGRADE_TIMEOUT, body_prefix, http1, within};

impl ProxyDialer {
    pub(super) async fn upgrade<S: Shape>(&self, io: S) -> Result<ProxyStream, DialError> {
        let peer = self.endpoint.url();
        let stage = format!("websocket upgrade at {peer}");
        let upgraded = within(UPGRADE_TIMEOUT, stage, async {
            let http_err = |source| DialError::Http {
                peer: peer.clone(),
                source,
            };
            let (mut sender, _conn) = http1(io).await.map_err(http_err)?;
            let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
            let request = Request::get(self.endpoint.path())
                .header(header::HOST, self.endpoint.host_header())
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_VERSION, "13")
                .header(header::SEC_WEBSOCKET_KEY, &key)
                .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
                .header(
                    header::USER_AGENT,
                    concat!("tower-agent/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::new())
                .map_err(|e| DialError::BadUpgrade(format!("cannot build the request: {e}")))?;
            let response = sender.send_request(request).await.map_err(http_err)?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = response.status();
                let body = body_prefix(response).await;
                return Err(DialError::NotUpgraded { status, body });
            }
            check_upgrade_answer(response.headers(), &key).map_err(DialError::BadUpgrade)?;
            hyper::upgrade::on(response).await.map_err(http_err)
        })
        .await?;
        // The connection itself, not hyper's wrapper (see `conn`); what
        // hyper read past the answer comes first.
        Ok(match upgraded.downcast::<TokioIo<S>>() {
            Ok(parts) => WsStream::from_upgraded(parts.io.into_inner().into_conn(), Role::Client)
                .await
                .read_ahead(&parts.read_buf),
            Err(upgraded) => {
                WsStream::from_upgraded(Conn::Upgraded(TokioIo::new(upgraded)), Role::Client).await
            }
        })
    }
}

/// Check a 101 answer: `Upgrade: websocket`, `Connection: upgrade`, the accept
/// key; the subprotocol may be missing (Go Tower does not echo it) but, if
/// present, must be ours.
pub(super) fn check_upgrade_answer(headers: &HeaderMap, key: &str) -> Result<(), String> {
    let text = |name: &header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if !text(&header::UPGRADE).eq_ignore_ascii_case("websocket") {
        return Err(format!(
            "Upgrade is {:?}, not websocket",
            text(&header::UPGRADE)
        ));
    }
    let connection = text(&header::CONNECTION);
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err(format!("Connection is {connection:?}, not upgrade"));
    }
    let accept = text(&header::SEC_WEBSOCKET_ACCEPT);
    if accept != derive_accept_key(key.as_bytes()) {
        return Err(format!(
            "Sec-WebSocket-Accept {accept:?} does not match the key sent"
        ));
    }
    match headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        None => Ok(()),
        Some(p) if p.as_bytes() == SUBPROTOCOL.as_bytes() => Ok(()),
        Some(p) => Err(format!(
            "subprotocol {p:?} was not offered (only {SUBPROTOCOL})"
        )),
    }
}
