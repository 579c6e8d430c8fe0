//! Tower's tunnel protocol, shared by `proxy` and `agent`.
//!
//! The stack, bottom up (see docs/protocol.md in the repository for the details):
//!
//! ```text
//! TCP -> HTTP/1.1 websocket upgrade (subprotocol `kubesphere-v1`)   [ws]
//!     -> the websocket used as a plain byte stream                  [ws::WsStream]
//!     -> SSH-2 with Tower's identification lines                    [ssh]
//!     -> `config` global request: the agent's credentials           [wire::AgentConfig]
//!     -> `kubesphere` channels opened by the proxy, one per stream  [server, client]
//!     -> `tower-hub@kubesphere.io` channels opened by the agent     [hub]
//! ```
//!
//! The agent dials out and is the SSH *client*; the proxy is the SSH *server* yet
//! the side that opens channels. [`server`] runs one agent connection on the proxy
//! side and hands out a [`server::Session`] that dials through it; [`client`] runs
//! the agent side and hands each accepted channel to a [`client::Dialer`].
//!
//! Beside the protocol, what both binaries need at their edges: [`cli`], Go
//! Tower's command-line syntax (durations, booleans, klog's flags) and the
//! logging set-up, [`addr`], `host:port` strings with IPv6 brackets,
//! [`limits`], the open-files limit raised at start, [`heap`], freed memory
//! kept mapped so bulk transfers do not re-fault it, [`glibc`], copies
//! without `rep movsb` where glibc's is slow (AMD Zen), and [`platform`],
//! the agent's `GOOS/GOARCH`.
//!
//! Under the session: [`write_behind`], the connection's write queue (the
//! session loop never waits on the socket), where channel writers take turns
//! ([`write_behind::Turn`]), and [`socket`], the TCP connection itself,
//! which keeps about a round trip of data unsent in the kernel, so one busy
//! channel does not queue in front of every other (docs/protocol.md 9.3.2). [`cut`]
//! wraps the connection so it can be cut from outside (a handshake given up on,
//! an agent's replaced tunnel).
//!
//! Over the session: [`copy`], a channel copied to a TCP connection and back,
//! in one task per connection; for a plain TCP connection the session's task
//! writes small received messages to it itself while that task is idle
//! (`copy/direct.rs`).
//!
//! russh is vendored with a small patch for this wire format and for head-of-line
//! blocking between channels: `third_party/russh/PATCHES.md`.

pub mod addr;
pub mod allow;
pub mod cli;
pub mod client;
pub mod copy;
pub mod cut;
pub mod glibc;
pub mod heap;
pub mod hub;
pub mod limits;
pub mod platform;
pub mod server;
pub mod socket;
pub mod ssh;
pub mod wire;
pub mod write_behind;
pub mod ws;

pub use wire::AgentConfig;
