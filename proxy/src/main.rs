//! `proxy`: runs in the host cluster. Agents dial in over websocket + SSH; the
//! proxy authenticates each by its cluster's token and opens `kubesphere`
//! channels back through the tunnel to reach the member's API servers.
//!
//! # Layout
//!
//! One folder per concern, in dependency order (each uses only those above
//! it; `docs/architecture.md` follows one kubectl request through them):
//!
//! - [`ops`]: what everything uses to run and be watched: the metrics handle,
//!   the audit log, the in-flight count a draining replica waits for, the one accept loop,
//!   the caps on pending handshakes and the threads clients' TLS handshakes
//!   run on ([`ops::handshakes`]), signals.
//! - [`identity`]: the proxy's CA, the Secret with its SSH host key, the
//!   names it marks its Kubernetes objects with, which cluster a client
//!   certificate opens ([`identity::scope`]), what the CSR signer signs.
//! - [`agents`]: the agents' port ([`agents::endpoint`]), who may join
//!   ([`agents::admission`] with a [`agents::store::ClusterStore`]), who is
//!   connected ([`agents::registry`]), letting them go ([`agents::drain`]),
//!   which hub services their agents reach ([`agents::hub`], pull mode).
//! - [`member`]: the one seam to a member, [`member::MemberDialer`]: session
//!   picked, channel opened, TLS verified, credentials to present.
//! - [`serve`]: the client-facing ports: the per-cluster HTTPS/HTTP
//!   listeners ([`serve::listener`]), opened for the controller by
//!   [`serve::ports`], every cluster's path form on `--access-port`
//!   ([`serve::access`]), the check both HTTPS doors make of a client
//!   ([`serve::admit`]), the raw `--forward` port, the HTTP CONNECT doors
//!   ([`serve::connect`]), the aggregated API behind the host kube-apiserver
//!   ([`serve::aggregated`]: front-proxy trust, the caller from its headers,
//!   discovery, the host's SubjectAccessReview, the APIService, the caller
//!   impersonated on the member), and the per-cluster handlers of the doors
//!   without per-cluster ports ([`serve::proxies`]).
//! - [`ha`]: several replicas: leader election, who holds which cluster, the
//!   peer port that relays clients.
//! - [`clusters`]: the Cluster workflow: decisions ([`clusters::decide`],
//!   pure) apart from their I/O ([`clusters::reconcile`]), the Service, the
//!   kubeconfig, the status read through the tunnel.
//! - [`registration`]: members that join by themselves with a bootstrap
//!   token: the token's check ([`registration::bootstrap`]), the
//!   ClusterRegistrationRequest, decisions ([`registration::decide`], pure),
//!   the door's side ([`registration::admit`]), the leader's controller that
//!   makes the Cluster, the token handed over the tunnel
//!   ([`registration::deliver`]).
//! - [`people`]: access for people: the CSR signer ([`people::csr`]) that
//!   turns an approved CertificateSigningRequest into a personal
//!   certificate for one cluster (what it accepts: [`identity::signer`];
//!   what it opens: [`identity::scope`]).
//! - [`config`]: flags, checked into a config before any network I/O.
//! - [`start`]: the parts built in order, served, drained.
//! - [`join`]: `proxy join-command`, the manifest a member applies to join
//!   (the `config/agent` bases, filled in from the host cluster; with
//!   `--register`, a new bootstrap token and the agent that registers with it).
//!
//! The SSH and websocket details live in the shared `tunnel` crate.
//!
//! Two modes: with `--clusters-file` the proxy needs no Kubernetes (tokens come
//! from the file; for tests and debugging); otherwise it watches Cluster
//! resources through `--kubeconfig` or its in-cluster service account.
//!
//! Threads: one tokio runtime forwards and runs everything else; clients' TLS
//! handshakes run on a small one of their own at a lower CPU priority
//! ([`ops::handshakes`]), both owned here.
//!
//! Exit codes: 0 after SIGTERM/SIGINT and the drain; 2 for a bad flag; 1 when
//! it cannot run (a port taken, the host cluster unreachable...).

mod agents;
mod clusters;
mod config;
mod ha;
mod identity;
mod join;
mod member;
mod ops;
mod people;
mod registration;
mod serve;
mod start;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // First: it may execute this binary again (tunnel::glibc).
    let copies = tunnel::glibc::fast_copies();
    // A subcommand only by its first argument, so that Go Tower's command
    // lines (flags only) parse exactly as before.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == join::COMMAND)
    {
        return join::main(std::env::args_os().skip(1));
    }
    let flags = config::Flags::parse();
    let notes = match tunnel::cli::init_logging(flags.log_format, &flags.klog) {
        Ok(notes) => notes,
        Err(e) => {
            eprintln!("proxy: {e}");
            return ExitCode::from(2);
        }
    };
    for note in notes {
        tracing::info!("{note}");
    }
    tunnel::limits::raise_open_files_logged();
    tunnel::heap::keep_freed_memory();
    copies.log();
    let ignored = flags.without_effect();
    if !ignored.is_empty() {
        tracing::info!(flags = ?ignored, "accepted for Go Tower's command lines; no effect here");
    }
    let hostname = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    // POD_IP, else the pod's own address from /etc/hosts (KubeSphere's
    // Deployment sets no POD_IP; see config::pod_ip).
    let env = |name: &str| {
        std::env::var(name).ok().or_else(|| {
            if name != "POD_IP" {
                return None;
            }
            let hosts = std::fs::read_to_string("/etc/hosts").ok()?;
            config::pod_ip::from_hosts(&hosts, &hostname()?).map(|ip| ip.to_string())
        })
    };
    let config = match flags.check(&env, &hostname) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Clients' TLS handshakes run apart, below forwarding (ops::handshakes).
    let handshakes = match ops::handshakes::Handshakes::start() {
        Ok(handshakes) => handshakes,
        Err(e) => {
            tracing::error!("cannot start the TLS handshake threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start::run(config, handshakes.runner())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
