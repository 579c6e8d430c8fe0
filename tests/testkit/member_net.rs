//! A member cluster with no inbound network (issue #14 part 1): the
//! member's kube-apiserver, its kubelet stand-in and the agent run in a
//! network namespace of their own, joined to the test's side by a veth pair
//! with a route out, and a packet filter (nftables) in it that drops every
//! new connection coming in. The agent's outbound connection to the proxy
//! is the only way in, as for a cluster behind NAT.
//!
//! It lives inside the test's own namespace ([`crate::in_own_netns`]): the
//! "host side" of the veth is an address of a namespace the test made, so
//! nothing of the machine's network is touched. One per test namespace (the
//! veth's names are fixed); the named namespace is deleted on drop.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! if !e2e::in_own_netns("my_test").await? {
//!     return Ok(());
//! }
//! let net = e2e::MemberNet::create().await?;
//! // a process inside: ip netns exec <name> <program>
//! let agent = net.command(e2e::bin("agent"));
//! # drop(agent);
//! # Ok(()) }
//! ```

use std::ffi::OsStr;
use std::process::Stdio;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::netns::ip;

/// The test's side of the veth (where the proxy listens for agents).
pub const MEMBER_GATEWAY: &str = "10.214.0.1";
/// The member namespace's address.
pub const MEMBER_ADDR: &str = "10.214.0.2";

/// The member's packet filter: what comes in is loopback or belongs to a
/// connection the member opened; everything else is dropped, silently (as
/// a NAT or a firewall does, so a client sees a timeout, not a refusal).
const FILTER: &str = "table inet tower_member {
  chain input {
    type filter hook input priority filter; policy drop;
    iif \"lo\" accept
    ct state established,related accept
  }
}
";

/// A named network namespace (`ip netns`), removed on drop.
pub struct MemberNet {
    name: String,
}

impl MemberNet {
    /// The namespace, its veth and route, and the packet filter closed.
    pub async fn create() -> Result<MemberNet> {
        let net = Self::create_open().await?;
        net.close_inbound().await?;
        Ok(net)
    }

    /// Like [`MemberNet::create`] without the packet filter: for a test that
    /// shows what the filter changes.
    pub async fn create_open() -> Result<MemberNet> {
        ensure!(
            crate::netns::is_inner_run(),
            "MemberNet needs the test's own network namespace: call e2e::in_own_netns first"
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let name = format!("tower-member-{}-{nanos}", std::process::id());
        ip(&["netns", "add", &name]).await?;
        // From here on, drop removes the namespace (and the veth with it).
        let net = MemberNet { name };
        let name = net.name.as_str();
        ip(&[
            "link",
            "add",
            "tm-host",
            "type",
            "veth",
            "peer",
            "name",
            "tm-member",
            "netns",
            name,
        ])
        .await?;
        ip(&[
            "addr",
            "add",
            &format!("{MEMBER_GATEWAY}/30"),
            "dev",
            "tm-host",
        ])
        .await?;
        ip(&["link", "set", "tm-host", "up"]).await?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", name];
            all.extend_from_slice(args);
            all.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        for args in [
            inside(&["link", "set", "lo", "up"]),
            inside(&[
                "addr",
                "add",
                &format!("{MEMBER_ADDR}/30"),
                "dev",
                "tm-member",
            ]),
            inside(&["link", "set", "tm-member", "up"]),
            inside(&["route", "add", "default", "via", MEMBER_GATEWAY]),
        ] {
            ip(&args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        }
        Ok(net)
    }

    /// Installs the packet filter: no new connection gets in any more.
    pub async fn close_inbound(&self) -> Result<()> {
        self.nft(FILTER).await
    }

    /// `rules` fed to `nft -f -` inside the namespace.
    pub async fn nft(&self, rules: &str) -> Result<()> {
        let mut nft = self.command("nft");
        nft.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = nft
            .spawn()
            .context("running nft (Debian package nftables; .ci/run installs it)")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(rules.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        ensure!(
            out.status.success(),
            "nft refused {rules:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace (`ip netns exec`, which execs it:
    /// the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A blocking [`std::process::Command`] version of [`MemberNet::command`].
    pub fn std_command(&self, program: impl AsRef<OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A TCP listener inside the namespace, on `addr` of the namespace: the
    /// socket is made on a thread that entered the namespace, and belongs to
    /// it wherever it is used from.
    pub fn bind(&self, addr: &str) -> Result<tokio::net::TcpListener> {
        let listener = in_namespace(&self.name, || {
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
        })?;
        listener.set_nonblocking(true)?;
        Ok(tokio::net::TcpListener::from_std(listener)?)
    }

    /// A TCP connection made from inside the namespace to `addr` (a
    /// process of the member connecting to its loopback, say), made like
    /// [`MemberNet::bind`]'s listener.
    pub fn connect(&self, addr: &str) -> Result<tokio::net::TcpStream> {
        connect_in(&self.name, addr)
    }
}

/// [`MemberNet::connect`] for the namespace named `name`, for a task that
/// does not hold the [`MemberNet`].
pub fn connect_in(name: &str, addr: &str) -> Result<tokio::net::TcpStream> {
    let stream = in_namespace(name, || {
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))
    })?;
    stream.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(stream)?)
}

/// `make` run on a thread that entered the network namespace `name`: a
/// socket it makes belongs to that namespace wherever it is used from.
fn in_namespace<T: Send>(name: &str, make: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{name}");
    let made = std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the member's network namespace")?;
            make()
        })
        .join()
    });
    match made {
        Ok(made) => made,
        Err(_) => bail!("the thread in the member's namespace {name} panicked"),
    }
}

impl Drop for MemberNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
