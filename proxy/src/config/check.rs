//! [`Flags::check`]: from flags as parsed to a [`Config`] in which every
//! value has been checked before the proxy touches the network: files read,
//! the CA parsed, selector and addresses parsed, and what only the flags
//! together can tell (`--cluster-ports none` needs `--access-port` and an
//! address for kubeconfigs; `--leader-elect` needs Kubernetes).
//!
//! Each refusal names the flag and the form it expects, so a bad flag stops
//! the proxy at once with what to change.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tunnel::addr::{join_host_port, split_host_port};

use super::{ClusterPorts, Config, Flags, HaConfig, Mode};
use crate::agents::store::StaticClusters;
use crate::clusters::{Options as ClusterOptions, PathForm};
use crate::identity::ca::Ca;

impl Flags {
    /// Validate every flag; `env` reads environment variables (POD_IP),
    /// `hostname` the machine's name (the default replica id), injectable for tests.
    pub fn check(
        self,
        env: &dyn Fn(&str) -> Option<String>,
        hostname: &dyn Fn() -> Option<String>,
    ) -> anyhow::Result<Config> {
        let bind: IpAddr = self.host.parse().map_err(|_| {
            anyhow::anyhow!(
                "--host {:?} must be an IP address to listen on, e.g. 0.0.0.0",
                self.host
            )
        })?;
        let ca = match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => {
                let read = |flag: &str, p: &PathBuf| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("{flag} {}: cannot read it", p.display()))
                };
                let ca = Ca::load(&read("--ca-cert", cert)?, &read("--ca-key", key)?)
                    .with_context(|| {
                        format!(
                            "--ca-cert {} / --ca-key {}: not a usable CA certificate and key",
                            cert.display(),
                            key.display()
                        )
                    })?;
                Some(ca)
            }
            (None, None) => None,
            _ => bail!("--ca-cert and --ca-key go together: give both or neither"),
        };
        let mode = match (&self.clusters_file, &self.kubeconfig) {
            (Some(_), Some(_)) => {
                bail!("--clusters-file runs without Kubernetes: leave out --kubeconfig, or it")
            }
            (Some(path), None) => {
                let json = std::fs::read_to_string(path).with_context(|| {
                    format!("--clusters-file {}: cannot read it", path.display())
                })?;
                let store = StaticClusters::from_json(&json)
                    .map_err(|e| anyhow::anyhow!("--clusters-file {}: {e}", path.display()))?;
                Mode::File(store)
            }
            (None, Some(path)) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path).with_context(|| {
                    format!("--kubeconfig {}: not a readable kubeconfig", path.display())
                })?;
                Mode::Kubernetes {
                    kubeconfig: Some((path.clone(), Box::new(kubeconfig))),
                }
            }
            (None, None) => Mode::Kubernetes { kubeconfig: None },
        };
        let publish_url = self
            .publish_service_address
            .as_deref()
            .map(|a| publish_url(a, self.port))
            .transpose()?;
        let status_update_frequency = self
            .cluster_status_update_frequency
            .unwrap_or(crate::clusters::status::DEFAULT_FREQUENCY);
        for (flag, value) in [
            ("--keepalive", self.keepalive),
            ("--cluster-status-update-frequency", status_update_frequency),
            ("--shutdown-grace", self.shutdown_grace),
            (
                "--leader-elect-lease-duration",
                self.leader_elect_lease_duration,
            ),
        ] {
            if value.is_zero() {
                bail!("{flag} must be longer than 0s");
            }
        }
        if self.leader_elect_lease_duration < Duration::from_secs(2) {
            bail!("--leader-elect-lease-duration must be at least 2s");
        }
        let selector = parse_selector(&self.service_selector)?;
        if let Some(address) = &self.advertise_address
            && (address.is_empty() || address.contains('/') || address.contains(' '))
        {
            bail!("--advertise-address {address:?}: expected a host name or IP address");
        }
        let replica_name = match self.replica_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => Some(id.to_string()),
            _ => hostname()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty()),
        };
        let ha = if self.leader_elect {
            if matches!(mode, Mode::File(_)) {
                bail!("--leader-elect needs Kubernetes: leave out --clusters-file");
            }
            let replica = replica_name
                .clone()
                .context("--leader-elect needs a replica name: set --replica-id or POD_NAME")?;
            let peer_address = match &self.peer_address {
                Some(a) => {
                    match split_host_port(a) {
                        Some((host, Some(_))) if !host.is_empty() => {}
                        _ => bail!("--peer-address {a:?}: expected HOST:PORT, e.g. 10.0.0.5:8443"),
                    }
                    a.clone()
                }
                None => {
                    let host = env("POD_IP")
                        .filter(|ip| !ip.is_empty())
                        .or_else(|| (!bind.is_unspecified()).then(|| bind.to_string()))
                        .context(
                            "--leader-elect needs --peer-address (or POD_IP, or a specific --host; \
                             in a pod, /etc/hosts names the pod's IP)",
                        )?;
                    join_host_port(&host, self.peer_port)
                }
            };
            Some(HaConfig {
                replica,
                lease_duration: self.leader_elect_lease_duration,
                peer_port: self.peer_port,
                peer_address,
            })
        } else {
            None
        };
        if self.connect_port.is_some() && ca.is_none() && matches!(mode, Mode::File(_)) {
            bail!(
                "--connect-port needs the proxy CA for its client certificates: give --ca-cert \
                 and --ca-key (without --clusters-file the CA comes from the proxy's Secret)"
            );
        }
        if let Some(dir) = &self.connect_socket_dir
            && dir.exists()
            && !dir.is_dir()
        {
            bail!("--connect-socket-dir {}: not a directory", dir.display());
        }
        let (ports, path_form, access) = self.path_form(publish_url.as_deref(), &mode, &ca)?;
        let mut hub_services = BTreeMap::new();
        for (name, addr) in self.hub_services {
            if hub_services.insert(name.clone(), addr).is_some() {
                bail!("--hub-service {name}: the name is published twice");
            }
        }
        let aggregated = match (self.aggregated_api_port, self.aggregated_api_service) {
            (None, Some(_)) => {
                bail!("--aggregated-api-service needs --aggregated-api-port")
            }
            (None, None) => None,
            (Some(_), _) if matches!(mode, Mode::File(_)) => {
                bail!("--aggregated-api-port needs Kubernetes: leave out --clusters-file")
            }
            (Some(port), service) => {
                let (namespace, service) =
                    service.unwrap_or_else(|| (self.namespace.clone(), "tower-api".to_string()));
                Some(crate::serve::aggregated::Options {
                    port,
                    namespace,
                    service,
                })
            }
        };
        let audit_log = self.audit_log.as_ref().map(|d| d.open()).transpose()?;
        let host_key_given = self.host_key.is_some();
        let host_key = self
            .host_key
            .unwrap_or_else(|| self.data_dir.join("ssh_host_ed25519_key"));
        Ok(Config {
            mode,
            bind,
            port: self.port,
            ca,
            publish_url,
            ha,
            replica: replica_name.unwrap_or_else(|| "proxy".to_string()),
            shutdown_grace: self.shutdown_grace,
            host_key,
            host_key_given,
            keepalive: self.keepalive,
            clusters: ClusterOptions {
                namespace: self.namespace,
                advertise_address: self.advertise_address,
                selector,
                ports,
                bind_host: self.host,
                path_form,
                status_update_frequency,
            },
            forwards: self.forwards,
            connect_port: self.connect_port,
            connect_socket_dir: self.connect_socket_dir,
            hub_services,
            audit_log,
            access,
            aggregated,
            pending: crate::ops::pending::Limits {
                total: self.max_pending_handshakes,
                per_source: self.max_pending_handshakes_per_source,
                rate_per_source: self.max_handshakes_per_source_per_second,
            },
            uploads: crate::ops::uploads::Limits {
                rate: self.request_body_rate_per_source,
                burst: self.request_body_burst_per_source,
            },
        })
    }

    /// `--cluster-ports` and `--access-port` together: the port range (empty
    /// with `none`), where the kubeconfigs point in the path form, the
    /// access port's options. The path form's address is
    /// `--advertise-address`, else the host of `--publish-service-address`.
    #[allow(clippy::type_complexity)]
    fn path_form(
        &self,
        publish_url: Option<&str>,
        mode: &Mode,
        ca: &Option<Ca>,
    ) -> anyhow::Result<(
        Range<u16>,
        Option<PathForm>,
        Option<crate::serve::access::Options>,
    )> {
        let publish_host = publish_url
            .and_then(|url| url.split_once("://"))
            .and_then(|(_, rest)| split_host_port(rest.split('/').next().unwrap_or_default()))
            .map(|(host, _)| host);
        let address = self.advertise_address.clone().or(publish_host.clone());
        let access = self.access_port.map(|port| crate::serve::access::Options {
            port,
            names: self
                .advertise_address
                .iter()
                .chain(publish_host.iter())
                .cloned()
                .collect(),
        });
        if access.is_some() && ca.is_none() && matches!(mode, Mode::File(_)) {
            bail!(
                "--access-port needs the proxy CA for its client certificates: give --ca-cert \
                 and --ca-key (without --clusters-file the CA comes from the proxy's Secret)"
            );
        }
        match &self.cluster_ports {
            ClusterPorts::Range(range) => Ok((range.clone(), None, access)),
            ClusterPorts::None => {
                let port = match self.access_port {
                    Some(0) => bail!(
                        "--cluster-ports none: --access-port 0 picks a port at random, and \
                         kubeconfigs must name it: give a fixed --access-port"
                    ),
                    Some(port) => port,
                    None => bail!(
                        "--cluster-ports none needs --access-port: without per-cluster ports \
                         clients reach every cluster at https://ADDRESS:PORT/clusters/<name>"
                    ),
                };
                let address = address.context(
                    "--cluster-ports none needs the address kubeconfigs point at: give \
                     --advertise-address (or --publish-service-address)",
                )?;
                Ok((0..0, Some(PathForm { address, port }), access))
            }
        }
    }
}

/// `--publish-service-address` as a websocket URL for agents: a bare host
/// gets `http://` and the agents' `--port`.
pub fn publish_url(address: &str, port: u16) -> anyhow::Result<String> {
    let bad = || {
        anyhow::anyhow!(
            "--publish-service-address {address:?}: expected HOST[:PORT] or http(s)://HOST[:PORT], \
             the address agents dial"
        )
    };
    if let Some(rest) = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
    {
        let host = rest.split('/').next().unwrap_or_default();
        split_host_port(host)
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(bad)?;
        return Ok(address.trim_end_matches('/').to_string());
    }
    match split_host_port(address) {
        Some((host, port_given)) if !host.is_empty() && !address.contains('/') => Ok(format!(
            "http://{}",
            join_host_port(&host, port_given.unwrap_or(port))
        )),
        _ => Err(bad()),
    }
}

fn parse_selector(s: &str) -> anyhow::Result<Vec<(String, String)>> {
    s.split(',')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("--service-selector {s:?}: expected KEY=VALUE[,KEY=VALUE]")
                })
        })
        .collect()
}
