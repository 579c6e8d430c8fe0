//! `agent`: the member-cluster side of KubeSphere's Tower tunnel.
//!
//! It dials the Tower proxy on the host cluster (websocket, then SSH), proves
//! who it is with the cluster's token, hands over the credentials the proxy
//! needs to reach this cluster's kube-apiserver, and then serves the channels
//! the proxy opens to the kube-apiserver and the ks-apiserver, reconnecting for
//! as long as it runs.
//!
//! Modules, in the order a connection uses them:
//! - [`options`]: flags, checked at start (syntax, durations, klog's flags and
//!   the logging set-up come from `tunnel::cli`);
//! - [`credentials`]: the token and member credentials, re-read when they change;
//! - [`handed`]: tokens the proxy hands over the tunnel, kept (`--token-secret`);
//! - [`register`]: who this member is (its cluster ID), for `--bootstrap-token`;
//! - [`endpoint`]: `--proxy-server` as a websocket URL;
//! - [`proxy_env`]: HTTP(S)_PROXY / NO_PROXY, chosen for that endpoint;
//! - [`dial`]: TCP, CONNECT, TLS, websocket upgrade;
//! - [`run`]: the reconnect loop, with [`backoff`] and [`killable`], running
//!   the [`hooks`] around each connection;
//! - [`hub`]: `--hub-listen`, pull mode's listeners, over the live tunnel.
//!
//! Imports have no cycles: `dial` uses `proxy_env` and `endpoint`, `proxy_env`
//! uses `endpoint`, and `endpoint` uses neither (only `tunnel::addr`).
//!
//! Signals: SIGHUP re-reads the credentials and retries at once; SIGTERM and
//! SIGINT close the tunnel and exit 0. Exit 1: `--max-retry` exhausted or the
//! proxy's host key does not match the pinned one; exit 2: invalid flags.

mod backoff;
mod credentials;
mod dial;
mod endpoint;
mod handed;
mod hooks;
mod hub;
mod killable;
mod options;
mod proxy_env;
mod register;
mod run;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::credentials::{CredentialSource, Loader};
use crate::options::Flags;
use crate::run::{Controls, Exit};

fn main() -> ExitCode {
    // First: it may execute this binary again (tunnel::glibc).
    let copies = tunnel::glibc::fast_copies();
    let flags = Flags::parse();
    let notes = match tunnel::cli::init_logging(flags.log_format, &flags.klog) {
        Ok(notes) => notes,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for note in notes {
        info!("{note}");
    }
    tunnel::limits::raise_open_files_logged();
    tunnel::heap::keep_freed_memory();
    copies.log();
    let env = |name: &str| std::env::var(name).ok();
    let config = match flags.check(&env) {
        Ok(config) => config,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent(config)) {
        Ok(Exit::Terminated) => ExitCode::SUCCESS,
        Ok(Exit::GaveUp | Exit::HostKeyMismatch) => ExitCode::FAILURE,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn agent(mut config: options::Config) -> anyhow::Result<Exit> {
    let handed = handed::Handed::default();
    let loader = Loader {
        token: config.token.clone(),
        source: config.credentials.clone(),
        handed: handed.clone(),
    };
    let load = || {
        let loader = loader.clone();
        tokio::task::spawn_blocking(move || loader.load())
    };
    let mut initial = load().await.context("reading credentials")??;
    // The member's address and credentials, for the agent's own reads there.
    let member = tunnel::wire::AgentConfig {
        kubernetes_svc_host: run::kubernetes_address(
            config.kubernetes_service.as_deref(),
            &initial.credentials,
        ),
        ca_data: initial.credentials.ca_data.clone(),
        cert_data: initial.credentials.cert_data.clone(),
        key_data: initial.credentials.key_data.clone(),
        bearer_token: initial.credentials.bearer_token.clone(),
        ..Default::default()
    };
    if let Some(secret) = &config.token_secret {
        // A token the proxy handed over earlier is newer than the deployment's.
        match handed::read(secret, &member).await {
            Ok(Some(token)) => {
                info!(%secret, "using the token stored in the member cluster");
                handed.set(token);
                initial = load().await.context("reading credentials")??;
            }
            Ok(None) => info!(%secret, "no stored token yet: using the configured one"),
            Err(e) => warn!(error = %e, "cannot read the stored token: using the configured one"),
        }
    }
    if config.bootstrap_token.is_some() {
        // Registration (docs/registration.md) needs to know who this cluster is.
        let id = register::cluster_id_retrying(&member, config.max_retry_interval).await;
        if config.name.is_empty() {
            config.name = register::derived_name(&id);
        }
        match initial.token.is_empty() {
            true => info!(cluster_id = %id, name = %config.name,
                "no cluster token: registering with the bootstrap token"),
            false => {
                info!(cluster_id = %id, "a cluster token is at hand: the bootstrap token is not used")
            }
        }
        config.cluster_id = id;
    }

    info!(
        version = run::VERSION,
        name = %config.name,
        proxy = %config.dialer.endpoint().url(),
        via = %config.dialer.via().map_or("direct".to_string(), ToString::to_string),
        credentials = %config.credentials,
        kinds = initial.credentials.kinds(),
        "starting agent"
    );
    match &config.credentials {
        CredentialSource::None => warn!(
            "no credentials for the kube-apiserver: not in a pod and no --kubeconfig; \
             the proxy will reach it anonymously"
        ),
        _ if initial.credentials.ca_data.is_empty() => {
            warn!("no CA for the kube-apiserver: the proxy cannot verify its certificate")
        }
        _ => {}
    }

    let controls = Controls::default();
    for (service, listener) in hub::bind(&config.hub_listen).await? {
        tokio::spawn(hub::serve(
            service,
            listener,
            controls.hub.clone(),
            controls.shutdown.clone(),
        ));
    }
    let refresh = Arc::new(Notify::new());
    let tokens = handed::Keeper {
        secret: config.token_secret.clone(),
        handed,
        reread: refresh.clone(),
    };
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn({
        let controls = controls.clone();
        let refresh = refresh.clone();
        async move {
            loop {
                tokio::select! {
                    _ = hangup.recv() => {
                        info!("SIGHUP: re-reading credentials");
                        refresh.notify_one();
                        controls.retry_now.notify_one();
                    }
                    _ = terminate.recv() => {
                        info!("SIGTERM: shutting down");
                        controls.shutdown.cancel();
                    }
                    _ = interrupt.recv() => {
                        info!("SIGINT: shutting down");
                        controls.shutdown.cancel();
                    }
                }
            }
        }
    });

    let material = credentials::watch(
        loader,
        initial,
        config.credentials_refresh_interval,
        refresh,
    );
    let exit = run::run(config, material, controls, Some(tokens)).await;
    if exit == Exit::Terminated {
        info!("stopped");
    }
    Ok(exit)
}
