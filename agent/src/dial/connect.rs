//! `CONNECT host:port` through an egress proxy (`HTTP(S)_PROXY`,
//! [`crate::proxy_env`]): with its credentials if the variable had some,
//! and a refusal reported with the proxy's status and the start of its body.
//! After a 2xx answer the connection is the tunnel's, for TLS and the
//! upgrade to run over.

use http_body_util::Empty;
use hyper::Request;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::Upgraded;
use tunnel::socket::TunnelSocket;

use super::{DialError, body_prefix, http1};
use crate::proxy_env::HttpProxy;

/// Ask the egress proxy for a tunnel to `target` (`CONNECT host:port`).
pub(super) async fn connect_through(
    tcp: TunnelSocket,
    proxy: &HttpProxy,
    target: &str,
) -> Result<Upgraded, DialError> {
    let http_err = |source| DialError::Http {
        peer: format!("HTTP proxy {}", proxy.address),
        source,
    };
    let (mut sender, _conn) = http1(tcp).await.map_err(http_err)?;
    let mut request = Request::connect(target).header(header::HOST, target);
    if let Some(auth) = &proxy.authorization {
        let mut value = HeaderValue::from_str(auth).map_err(|_| {
            DialError::BadUpgrade(format!(
                "{}: the proxy credentials are not valid in a header",
                proxy.variable
            ))
        })?;
        value.set_sensitive(true);
        request = request.header(header::PROXY_AUTHORIZATION, value);
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| DialError::BadUpgrade(format!("cannot build CONNECT {target}: {e}")))?;
    let response = sender.send_request(request).await.map_err(http_err)?;
    if !response.status().is_success() {
        let status = response.status();
        return Err(DialError::ProxyRefused {
            proxy: proxy.address.clone(),
            target: target.to_string(),
            status,
            body: body_prefix(response).await,
        });
    }
    // hyper hands over the raw connection after a 2xx answer to CONNECT.
    hyper::upgrade::on(response).await.map_err(http_err)
}
