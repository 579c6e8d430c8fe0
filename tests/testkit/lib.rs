//! # testkit: support for the end-to-end tests of the Tower tunnel
//!
//! Every integration test in `tests/*.rs` (crate `e2e`) builds on this
//! library. It gives you real processes and real Kubernetes API servers,
//! and the means to wait for them without fixed sleeps.
//!
//! | need                               | use                                        |
//! |------------------------------------|--------------------------------------------|
//! | a built binary (`bin/proxy`, ...)  | [`bin`]`("proxy")`                         |
//! | run a process, read its logs       | [`Proc::spawn`], [`Proc::wait_for_line`]   |
//! | a real kube-apiserver              | [`KubeCluster::start`], [`KubeCluster::start_many`] |
//! | talk to it                         | [`KubeCluster::client`] (kube-rs), [`KubeCluster::kubectl_ok`] (real kubectl) |
//! | wait for a condition               | [`wait_until`], [`wait_for_ok`]            |
//! | a local TCP target for the tunnel  | [`EchoServer::start`], [`free_port`]       |
//! | a proxy's `--cluster-ports` no other test shares | [`pick_ports`] |
//! | checked bytes through the tunnel   | [`echo_transfer`] (GiBs, every byte verified) |
//! | pods to exec/port-forward/log into | [`KubeCluster::start_with_args`]`(n, &["--kubelet"])`, [`KubeCluster::run_pod`] |
//! | host + member + proxy + agent, config_alpha | [`Tower::start`], [`Tower::kubectl`] |
//! | a member joined from a manifest | [`KubeCluster::apply_manifest`], [`run_agent_like_a_kubelet`], [`KubeCluster::prove_joined`] |
//! | a non-loopback address (Endpoints, aggregated APIs) | [`in_own_netns`], [`NETNS_ADDR`] |
//! | a long link with loss that TCP itself sees | [`lossy::TunLink`] (inside [`in_own_netns`]) |
//! | a member with no inbound network, and its processes' connections | [`TowerOptions`]`{ isolated_member: true, .. }`, [`MemberNet::command`], [`MemberNet::connect`], [`connect_in`] |
//!
//! ## Writing a test
//!
//! Add a file `tests/my_feature.rs` and declare it in `tests/Cargo.toml`:
//!
//! ```toml
//! [[test]]
//! name = "my_feature"
//! path = "my_feature.rs"
//! ```
//!
//! Then write async tests with `#[tokio::test]` returning `anyhow::Result<()>`:
//!
//! ```no_run
//! use std::time::Duration;
//! use e2e::{bin, wait_until, EchoServer, KubeCluster, Proc};
//!
//! #[tokio::test]
//! async fn agent_connects() -> anyhow::Result<()> {
//!     // Two real API servers, started in parallel (seconds, not minutes).
//!     let [host, member]: [KubeCluster; 2] = KubeCluster::start_many(&["host", "member"])
//!         .await?
//!         .try_into()
//!         .expect("two clusters");
//!     let target = EchoServer::start().await?;
//!
//!     // A process whose stdout/stderr lines are collected, and echoed to the
//!     // test's stderr so a failing test shows them. (Flags illustrative.)
//!     let mut cmd = tokio::process::Command::new(bin("proxy"));
//!     cmd.arg("--kubeconfig").arg(host.kubeconfig());
//!     let proxy = Proc::spawn("proxy", cmd)?;
//!     proxy.wait_for_line(|l| l.contains("listening"), Duration::from_secs(10)).await?;
//!
//!     // Wait for a condition by polling it with a deadline, never with a
//!     // fixed sleep.
//!     wait_until(Duration::from_secs(30), || async {
//!         member.kubectl(&["get", "ns", "kube-system"]).status.success()
//!     })
//!     .await?;
//!     assert_eq!(target.connections(), 0);
//!     Ok(())
//!     // Dropping `proxy`, `host` and `member` stops the processes (SIGTERM,
//!     // then SIGKILL) and removes the clusters' temporary directories, also
//!     // when the test panics.
//! }
//! # fn main() {}
//! ```
//!
//! ## Rules of thumb
//!
//! * Binaries come from `<repo>/bin/`: `make build` (proxy, agent),
//!   `make harness` (kube-harness), `make go-peers` (go-agent, go-proxy).
//!   [`bin`] panics with that hint when one is missing.
//! * Wait with deadlines: [`Proc::wait_for_line`] wakes on each new line;
//!   [`wait_until`] polls with short intervals. No `sleep(5s)` in tests.
//! * Tests run with `--test-threads=2` on a 2-core machine: a test should
//!   start at most the clusters it needs (each API server takes ~300 MB).
//! * `TESTKIT_ECHO=0` stops echoing process output to stderr (lines are
//!   still collected and shown in errors); `KUBECTL=/path` picks the
//!   kubectl binary.

mod audit;
mod cluster;
mod env;
mod join;
mod kubelet;
pub mod lossy;
mod member;
mod member_net;
mod metrics;
mod net;
mod netns;
mod paths;
mod ports;
mod proc;
mod stream;
mod tower;
mod usage;
mod wait;

pub use audit::audit_records;
pub use cluster::{KubeCluster, STOP_GRACE};
pub use env::clean_env;
pub use join::{Joined, cluster_condition, proxy_cluster};
pub use kubelet::{HARNESS_NODE, POD_CONTAINER};
pub use member::run_agent_like_a_kubelet;
pub use member_net::{MEMBER_ADDR, MEMBER_GATEWAY, MemberNet, connect_in};
pub use metrics::{apiserver_writes, metric_sample, scrape_metrics, writes_between};
pub use net::{EchoServer, free_addr, free_port};
pub use netns::{NETNS_ADDR, in_own_netns};
pub use paths::{bin, kubectl_binary, workspace_root};
pub use ports::{PortBlock, pick_ports};
pub use proc::{Proc, Stream, log_field};
pub use stream::{PATTERN_BLOCK, echo_transfer, fill_pattern, verify_pattern};
pub use tower::{CLUSTER, HOST_SERVER, Tower, TowerOptions, fingerprint_in};
pub use usage::Usage;
pub use wait::{wait_for_ok, wait_until};

// Re-exported so tests use the exact versions the testkit was built with.
pub use k8s_openapi;
pub use kube;
