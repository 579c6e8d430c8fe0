//! Another build of ours side by side (`BENCH_B_*`), and the `--forward`
//! pair it and the long-link scenario run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use e2e::{Proc, bin};
use tokio::process::Command;

use super::procs::{log_message_is, spawn_command, started_proxy};
use super::tower::agent_args;
use super::{Env, FORWARD};
use crate::relay::{Link, Relay};

/// Our proxy in `--clusters-file` mode with a `--forward` port and one agent
/// whose websocket goes to the proxy, or through a [`Relay`] that delays it.
/// Used for `BENCH_B_*` (another build) and for the long-link scenario.
pub struct ForwardPair {
    pub agent: Proc,
    /// Kept alive for the connection's sake.
    pub _relay: Option<Relay>,
    pub proxy: Proc,
    pub forward: SocketAddr,
}

/// Another build of our proxy and agent to measure side by side with this one:
/// `BENCH_B_BIN` (a directory with `proxy` and `agent`) and/or `BENCH_B_ENV`
/// (`K=V ...` for both processes).
#[derive(Clone, Debug)]
pub struct Variant {
    pub dir: Option<PathBuf>,
    pub vars: Vec<(String, String)>,
    pub label: String,
}

impl Variant {
    /// This build (`bin/`), no extra environment.
    pub fn current() -> Variant {
        Variant {
            dir: None,
            vars: Vec::new(),
            label: FORWARD.into(),
        }
    }

    /// `BENCH_B_BIN` / `BENCH_B_ENV`, if either is set.
    pub fn b_from_env() -> Option<Variant> {
        let dir = std::env::var_os("BENCH_B_BIN").map(PathBuf::from);
        let vars: Vec<(String, String)> = std::env::var("BENCH_B_ENV")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        if dir.is_none() && vars.is_empty() {
            return None;
        }
        let mut label = format!(
            "B: {}",
            dir.as_ref()
                .map_or_else(|| "bin/".to_string(), |d| format!("{}/", d.display()))
        );
        for (k, v) in &vars {
            label.push_str(&format!(" {k}={v}"));
        }
        Some(Variant { dir, vars, label })
    }

    /// The label of its https path: the forward path's, and " https".
    pub fn https_label(&self) -> String {
        format!("{} https", self.label)
    }

    /// "" for this build, "-b" for the other: in process and file names.
    pub(super) fn tag(&self) -> String {
        match self.dir.is_some() || !self.vars.is_empty() {
            true => "-b".into(),
            false => String::new(),
        }
    }

    /// `program` (`proxy`, `agent`) of this variant, as [`super::spawn`] does.
    pub(super) fn spawn(&self, name: &str, program: &str, args: Vec<String>) -> Result<Proc> {
        spawn_command(name, self.command(program, args))
    }

    fn command(&self, name: &str, args: Vec<String>) -> Command {
        let program = self
            .dir
            .as_ref()
            .map_or_else(|| bin(name), |d| d.join(name));
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }
}

impl ForwardPair {
    /// `name`: the cluster's name (and the processes' log prefix).
    pub async fn start(
        env: &Env,
        name: &str,
        variant: &Variant,
        link: Option<Link>,
    ) -> Result<ForwardPair> {
        let token = format!("bench-{name}-token-0123456789abcdef");
        let clusters = env.work.join(format!("clusters-{name}.json"));
        std::fs::write(&clusters, format!("{{\"{name}\": \"{token}\"}}"))?;
        let token_file = env.work.join(format!("{name}.token"));
        std::fs::write(&token_file, &token)?;
        let proxy = variant.spawn(
            &format!("proxy-{name}"),
            "proxy",
            vec![
                "--host=127.0.0.1".into(),
                "--port=0".into(),
                format!(
                    "--data-dir={}",
                    env.work.join(format!("proxy-{name}")).display()
                ),
                format!("--clusters-file={}", clusters.display()),
                format!("--forward={name}=127.0.0.1:0"),
                "--log-format=json".into(),
            ],
        )?;
        let (agents, forward, fingerprint) = started_proxy(&proxy).await?;
        let relay = match &link {
            Some(l) => Some(Relay::start(agents, l).await?),
            None => None,
        };
        let dial = relay.as_ref().map_or(agents, |r| r.addr);
        let kubeconfig = env.work.join("upstream.kubeconfig");
        let agent = variant.spawn(
            &format!("agent-{name}"),
            "agent",
            agent_args(name, &token_file, dial, &fingerprint, &kubeconfig),
        )?;
        agent
            .wait_for_line(
                |l| log_message_is(l, "connected to proxy"),
                Duration::from_secs(30),
            )
            .await?;
        Ok(ForwardPair {
            agent,
            _relay: relay,
            proxy,
            forward,
        })
    }

    pub fn procs(&self) -> Vec<u32> {
        vec![self.proxy.pid(), self.agent.pid()]
    }
}
