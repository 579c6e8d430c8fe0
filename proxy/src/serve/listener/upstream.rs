//! Reaching upstream from a listener: hyper's connection pool over the
//! [`MemberDialer`]. The pool keys connections by a host name made from the
//! session they run through ([`Routes::host_for`]), so a request and the
//! credentials it carries always belong to the same agent session.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tunnel::server::Session;

use crate::member::{MemberDialer, MemberStream, ReachError, Target};

/// Idle upstream connections kept per agent session.
pub const POOL_MAX_IDLE_PER_SESSION: usize = 32;
/// How long an idle upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The pool's host names and the sessions they stand for.
#[derive(Default)]
pub struct Routes(Mutex<HashMap<String, Session>>);

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool host of `session`; a new session also sweeps out ended ones.
    pub fn host_for(&self, session: Session) -> String {
        let host = format!("s{:016x}.tunnel", session.id());
        let mut routes = self.lock();
        if !routes.contains_key(&host) {
            // A new session: the time to forget the ended ones.
            routes.retain(|_, s| !s.is_closed());
            routes.insert(host.clone(), session);
        }
        host
    }

    fn get(&self, host: &str) -> Option<Session> {
        self.lock().get(host).cloned()
    }
}

/// Dials the session a pool host stands for, through the dialer.
#[derive(Clone)]
pub struct Connector {
    pub cluster: String,
    pub target: Target,
    pub dialer: MemberDialer,
    pub routes: Arc<Routes>,
}

/// The pooled HTTP/1.1 client of one port.
pub type Pool = Client<Connector, super::forward::Tallied>;

impl Connector {
    pub fn pool(self) -> Pool {
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_SESSION)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http1_max_buf_size(super::MAX_HTTP_BUFFER)
            .build(self)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<MemberStream>;
    type Error = ReachError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ReachError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ReachError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let session = uri.host().and_then(|host| self.routes.get(host));
        let this = self.clone();
        Box::pin(async move {
            let session = session.ok_or(ReachError::SessionGone)?;
            let reached = this
                .dialer
                .reach_via(&session, &this.cluster, this.target)
                .await?;
            Ok(TokioIo::new(reached.stream))
        })
    }
}

impl Connection for MemberStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}
