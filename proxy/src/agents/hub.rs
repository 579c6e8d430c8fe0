//! Pull mode, the proxy's side: `--hub-service NAME=HOST:PORT` publishes a
//! service on the hub's side under a name; a cluster opts in with the
//! annotation [`ANNOTATION`] on its Cluster (or `hubServices` in
//! `--clusters-file`), re-read for every channel. An agent's hub channel names
//! a service; the proxy dials the published address, never one the agent
//! sends. [`decide`] is the pure rule; [`HubServices::open`] dials and counts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tunnel::hub::{HubRefusal, HubUpstream};

use crate::ops::audit::{Audit, Caller, Record};
use crate::ops::metrics::Metrics;

/// The Cluster annotation listing the hub services its agent may reach,
/// comma-separated. Absent: none.
pub const ANNOTATION: &str = "tower.kubesphere.io/hub-services";

/// How long connecting to a published service may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Parse one `--hub-service` value: `NAME=HOST:PORT`.
pub fn parse_flag(value: &str) -> Result<(String, String), String> {
    let (name, addr) = value.split_once('=').ok_or_else(|| {
        format!("{value:?} is not NAME=HOST:PORT, e.g. hub-api=kubernetes.default.svc:443")
    })?;
    tunnel::hub::check_service_name(name)?;
    match tunnel::addr::split_host_port(addr) {
        Some((host, Some(_))) if !host.is_empty() => Ok((name.to_string(), addr.to_string())),
        _ => Err(format!(
            "{addr:?} is not HOST:PORT ([fd00::1]:443 for IPv6), e.g. hub-api=kubernetes.default.svc:443"
        )),
    }
}

/// The names in an opt-in list (`a, b,c`): trimmed, empty entries dropped.
pub fn parse_opt_in(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Why a hub channel was refused: the metric's `reason` and the agent's text.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: &'static str,
    pub text: String,
}

/// May `cluster`, whose opt-in list is `opted` (`None`: no annotation), reach
/// `service`? Yes: its published address.
pub fn decide<'a>(
    published: &'a BTreeMap<String, String>,
    cluster: &str,
    opted: Option<&[String]>,
    service: &str,
) -> Result<&'a str, Refused> {
    let Some(addr) = published.get(service) else {
        return Err(Refused {
            reason: "not_published",
            text: format!("hub service {service:?} is not published"),
        });
    };
    match opted {
        None => Err(Refused {
            reason: "not_opted_in",
            text: format!(
                "cluster {cluster} does not opt in to hub services (annotation {ANNOTATION})"
            ),
        }),
        Some(names) if !names.iter().any(|n| n == service) => Err(Refused {
            reason: "not_opted_in",
            text: format!(
                "cluster {cluster} does not opt in to hub service {service:?} (annotation {ANNOTATION}: {})",
                names.join(",")
            ),
        }),
        Some(_) => Ok(addr),
    }
}

/// The published services, and the dialing, counting and auditing of hub
/// streams.
pub struct HubServices {
    published: BTreeMap<String, String>,
    metrics: Arc<Metrics>,
    audit: Audit,
}

impl HubServices {
    pub fn new(published: BTreeMap<String, String>, metrics: Arc<Metrics>, audit: Audit) -> Self {
        Self {
            published,
            metrics,
            audit,
        }
    }

    /// Connect `cluster`'s agent to `service`, or say why not.
    pub async fn open(
        &self,
        cluster: &str,
        opted: Option<Vec<String>>,
        service: &str,
    ) -> Result<HubUpstream, HubRefusal> {
        let mut audit = self.audit.begin(|| {
            let mut record = Record::new(
                "hub",
                cluster,
                Caller::named(format!("agent of {cluster}")),
                "hub",
            );
            record.target = Some(service.to_string());
            record
        });
        let mut refuse = |reason: &str, status: u16, text: &str| {
            self.metrics
                .hub_refusals
                .get_or_create(&Metrics::hub_refusal(cluster, reason))
                .inc();
            if let Some(record) = audit.record() {
                record.status = status;
                record.reason = Some(text.to_string());
            }
        };
        let addr = match decide(&self.published, cluster, opted.as_deref(), service) {
            Ok(addr) => addr,
            Err(refused) => {
                refuse(refused.reason, 403, &refused.text);
                return Err(HubRefusal::prohibited(refused.text));
            }
        };
        let stream = match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let text = format!("hub service {service:?} is unreachable from the proxy");
                refuse("dial_failed", 502, &text);
                tracing::warn!(%cluster, %service, %addr, error = %e, "cannot reach hub service");
                return Err(HubRefusal::unreachable(text));
            }
            Err(_) => {
                let text =
                    format!("hub service {service:?} did not answer within {DIAL_TIMEOUT:?}");
                refuse("dial_failed", 504, &text);
                tracing::warn!(%cluster, %service, %addr, "connecting to hub service timed out");
                return Err(HubRefusal::unreachable(text));
            }
        };
        let _ = stream.set_nodelay(true);
        self.metrics
            .hub_streams
            .get_or_create(&Metrics::hub_service(cluster, service))
            .inc();
        tracing::debug!(%cluster, %service, "hub stream opened");
        let (metrics, cluster, service) = (
            self.metrics.clone(),
            cluster.to_string(),
            service.to_string(),
        );
        Ok(HubUpstream {
            stream,
            on_end: Box::new(move |to_hub, from_hub| {
                metrics.count_hub_bytes(&cluster, &service, to_hub, from_hub);
                if let Some(record) = audit.record() {
                    record.status = 200;
                    record.bytes_in = to_hub;
                    record.bytes_out = from_hub;
                }
                drop(audit);
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values() {
        assert_eq!(
            parse_flag("hub-api=10.0.0.1:6443"),
            Ok(("hub-api".into(), "10.0.0.1:6443".into()))
        );
        assert!(parse_flag("hub-api=[fd00::1]:443").is_ok());
        assert!(
            parse_flag("hub-api")
                .unwrap_err()
                .contains("NAME=HOST:PORT")
        );
        assert!(
            parse_flag("hub-api=host")
                .unwrap_err()
                .contains("HOST:PORT")
        );
        assert!(parse_flag("Hub=h:1").unwrap_err().contains("DNS label"));
    }

    #[test]
    fn opt_in_lists() {
        assert_eq!(parse_opt_in(" a, b,,c "), ["a", "b", "c"]);
        assert!(parse_opt_in(" , ").is_empty());
    }

    #[test]
    fn only_published_names_of_opted_in_clusters() {
        let published = BTreeMap::from([("hub-api".to_string(), "10.0.0.1:6443".to_string())]);
        let opted = vec!["hub-api".to_string()];
        assert_eq!(
            decide(&published, "alpha", Some(&opted), "hub-api"),
            Ok("10.0.0.1:6443")
        );
        let err = decide(&published, "alpha", Some(&opted), "10.0.0.1:6443").unwrap_err();
        assert_eq!(err.reason, "not_published");
        assert_eq!(err.text, "hub service \"10.0.0.1:6443\" is not published");
        let err = decide(&published, "alpha", None, "hub-api").unwrap_err();
        assert_eq!(err.reason, "not_opted_in");
        assert_eq!(
            err.text,
            "cluster alpha does not opt in to hub services (annotation tower.kubesphere.io/hub-services)"
        );
        let other = vec!["other".to_string()];
        let err = decide(&published, "alpha", Some(&other), "hub-api").unwrap_err();
        assert_eq!(err.reason, "not_opted_in");
        assert!(err.text.contains("hub service \"hub-api\""), "{}", err.text);
    }
}
