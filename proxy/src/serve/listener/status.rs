//! Failures as Kubernetes `Status` answers, which kubectl prints as the error:
//! no agent 503 (with `Retry-After` when a session went away under the
//! request, so client-go retries), the member's server down (the agent's dial
//! refused) 503, no usable access or a failed TLS handshake 502, timeouts 504.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tunnel::server::DialError;

use crate::member::ReachError;

/// The HTTP bodies this proxy answers with.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Why a request to the member failed, as the client will be told.
pub struct Failure {
    pub code: StatusCode,
    pub message: String,
    /// The session went away under the request: client-go retries a 5xx
    /// that carries `Retry-After`, and the next try picks another session.
    pub transient: bool,
}

impl Failure {
    pub fn response(&self) -> Response<Body> {
        let mut resp = status(self.code, &self.message);
        if self.transient {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The HTTP status for a member that could not be reached. The agent's dial
/// refused is the member's server being down (or not there): unavailable, as
/// Kubernetes says of an apiserver it cannot reach, not a broken gateway.
pub fn reach_status(e: &ReachError) -> StatusCode {
    match e {
        ReachError::NoAgent(_)
        | ReachError::SessionGone
        | ReachError::Dial(DialError::Closed | DialError::Refused { .. }) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        ReachError::Dial(DialError::Timeout(_)) | ReachError::TlsTimeout(_) => {
            StatusCode::GATEWAY_TIMEOUT
        }
        ReachError::Prepare(_) | ReachError::Tls { .. } => StatusCode::BAD_GATEWAY,
    }
}

/// Explain a failed upstream request to `what` (kube-apiserver, ks-apiserver).
pub fn explain(cluster: &str, what: &str, e: &hyper_util::client::legacy::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(reach) = err.downcast_ref::<ReachError>() {
            let hint = match reach {
                ReachError::Dial(DialError::Refused { .. }) => {
                    format!(" (the agent is connected; is the member's {what} running?)")
                }
                _ => String::new(),
            };
            return Failure {
                code: reach_status(reach),
                message: format!(
                    "cannot reach the member {what} of cluster {cluster:?} through its tunnel: \
                     {reach}{hint}"
                ),
                transient: reach.is_transient(),
            };
        }
        if let Some(hyper_err) = err.downcast_ref::<hyper::Error>()
            && hyper_err.is_timeout()
        {
            return Failure {
                code: StatusCode::GATEWAY_TIMEOUT,
                message: format!("the member {what} of cluster {cluster:?} timed out: {hyper_err}"),
                transient: false,
            };
        }
        source = err.source();
    }
    Failure {
        code: StatusCode::BAD_GATEWAY,
        message: format!(
            "the connection to the member {what} of cluster {cluster:?} failed: {}",
            error_chain(e)
        ),
        transient: false,
    }
}

/// `e: cause: cause ...`, skipping repeats.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}

pub fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// A one-line plain-text answer: what kubectl prints for a failed
/// discovery request (it shows a JSON `Status` there as "unknown").
pub fn text(code: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A Kubernetes `Status` answer, which kubectl prints as the error.
pub fn status(code: StatusCode, message: &str) -> Response<Body> {
    let reason = match code {
        StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
        StatusCode::GATEWAY_TIMEOUT => "Timeout",
        StatusCode::BAD_REQUEST => "BadRequest",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::NOT_FOUND => "NotFound",
        StatusCode::INTERNAL_SERVER_ERROR => "InternalError",
        _ => "BadGateway",
    };
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json(code, &body)
}

/// A JSON answer.
pub fn json(code: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_dial_is_the_member_unavailable() {
        let refused = ReachError::Dial(DialError::Refused {
            target: "127.0.0.1:6443".into(),
            reason: "ConnectFailed".into(),
        });
        assert_eq!(reach_status(&refused), StatusCode::SERVICE_UNAVAILABLE);
        // Not transient: another session would dial the same server.
        assert!(!refused.is_transient());
        let tls = ReachError::Prepare("no CAData".into());
        assert_eq!(reach_status(&tls), StatusCode::BAD_GATEWAY);
    }
}
