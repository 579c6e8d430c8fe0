//! Asking a member's kube-apiserver about itself, through one of its agents,
//! with the agent's own credentials like any request on the cluster's port
//! ([`MemberDialer`]): one HTTP/1 connection for `/healthz`, `/readyz` and
//! `/livez` (the answers of Clusternet's heartbeat), then `/version` and a
//! LIST of nodes with `limit=1` (the item plus `metadata.remainingItemCount`).
//!
//! The health checks go first and never fail the probe: an answer other than
//! 200, or none, is the check's `false`. A member whose apiserver is stopped
//! still has its tunnel: the agent's dial is refused, and that too is all
//! three `false` ([`Health::DOWN`]), not "unknown".

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::health::Health;
use crate::member::{MemberDialer, ReachError, Target};

/// The answers are small; anything bigger is not what we asked for.
const MAX_BODY: usize = 1 << 20;

/// Why part of a member could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Reach(#[from] ReachError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("GET {path}: {detail}")]
    Answer { path: &'static str, detail: String },
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// What the member said about its version and size.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub git_version: String,
    pub nodes: i64,
}

/// Everything one probe learnt.
#[derive(Debug)]
pub struct Probed {
    pub health: Health,
    /// Version and nodes, or why they could not be read.
    pub member: Result<Member, ProbeError>,
}

/// One connection to the member's kube-apiserver, with the agent's
/// credentials on every request.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    host: String,
    authorization: Option<hyper::header::HeaderValue>,
}

impl Conn {
    /// GET `path`: its status and body (at most [`MAX_BODY`]).
    async fn get(&mut self, path: &'static str) -> Result<(StatusCode, Bytes), ProbeError> {
        let mut req = Request::get(path)
            .header(header::HOST, &self.host)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("tower-proxy/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = &self.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Answer {
                path,
                detail: e.to_string(),
            })?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ProbeError::Answer {
                path,
                detail: e.to_string(),
            })?
            .to_bytes();
        Ok((status, body))
    }

    /// True when `path` answers 200.
    async fn check(&mut self, path: &'static str) -> bool {
        matches!(self.get(path).await, Ok((StatusCode::OK, _)))
    }

    /// GET `path` as JSON; anything but a success is an error.
    async fn json(&mut self, path: &'static str) -> Result<Value, ProbeError> {
        let (status, body) = self.get(path).await?;
        if !status.is_success() {
            return Err(ProbeError::Answer {
                path,
                detail: format!("HTTP {status}"),
            });
        }
        serde_json::from_slice(&body).map_err(|e| ProbeError::Answer {
            path,
            detail: format!("not JSON: {e}"),
        })
    }
}

/// Ask the member's kube-apiserver, through one of its agents, how it is.
/// Err only when it cannot be reached at all (see [`Health::DOWN`]).
pub async fn probe(dialer: &MemberDialer, cluster: &str) -> Result<Probed, ProbeError> {
    let reached = dialer.reach(cluster, Target::KubeApiserver).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(reached.stream)).await?;
    let conn = tokio::spawn(conn);
    let mut c = Conn {
        sender,
        host: reached.access.address.clone(),
        authorization: reached.access.authorization.clone(),
    };
    let health = Health {
        healthz: c.check("/healthz").await,
        readyz: c.check("/readyz").await,
        livez: c.check("/livez").await,
    };
    let member = version_and_nodes(&mut c).await;
    conn.abort();
    Ok(Probed { health, member })
}

async fn version_and_nodes(c: &mut Conn) -> Result<Member, ProbeError> {
    let version = c.json("/version").await?;
    let nodes = c.json("/api/v1/nodes?limit=1").await?;
    let git_version = version["gitVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let listed = nodes["items"].as_array().map_or(0, Vec::len) as i64;
    let remaining = nodes["metadata"]["remainingItemCount"]
        .as_i64()
        .unwrap_or(0);
    Ok(Member {
        git_version,
        nodes: listed + remaining,
    })
}
