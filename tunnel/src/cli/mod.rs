//! The command line both binaries share: Go-compatible flag syntax and values,
//! and the logging those flags set up.
//!
//! `proxy` and `agent` replace Go Tower in place, so they take its command
//! lines unchanged: pflag's syntax, Go durations, and the klog flags Go Tower
//! registers. The pieces:
//!
//! - [`duration`]: [`parse_go_duration`], Go's `time.ParseDuration` as a clap
//!   value parser (`--keepalive=10s`);
//! - [`goflags`]: [`go_bool`] and the clap recipe for a Go boolean flag
//!   (`--leader-elect`, `--leader-elect=false`);
//! - [`quantity`]: [`parse_bytes`], byte counts as Kubernetes writes them
//!   (`--request-body-rate-per-source=8Mi`);
//! - [`klog`]: [`KlogFlags`], klog's flags, to `#[command(flatten)]`;
//! - [`logging`]: [`init_logging`], the tracing subscriber from `--log-format`
//!   and the klog flags, with the `--v` to level mapping.
//!
//! A binary's flags then look like this:
//!
//! ```
//! use std::time::Duration;
//! use clap::Parser;
//! use tunnel::cli::{KlogFlags, LogFormat, parse_go_duration};
//!
//! #[derive(Parser)]
//! #[command(name = "agent", args_override_self = true)] // pflag: last one wins
//! struct Flags {
//!     #[arg(long, default_value = "30s", value_parser = parse_go_duration)]
//!     keepalive: Duration,
//!     #[arg(long, value_enum, default_value_t = LogFormat::Text)]
//!     log_format: LogFormat,
//!     #[command(flatten)]
//!     klog: KlogFlags,
//! }
//!
//! let flags = Flags::try_parse_from(["agent", "--keepalive=10s", "--v=0"]).unwrap();
//! assert_eq!(flags.keepalive, Duration::from_secs(10));
//! assert_eq!(flags.klog.v, Some(0));
//! ```

pub mod duration;
pub mod goflags;
pub mod klog;
pub mod logging;
pub mod quantity;

pub use duration::parse_go_duration;
pub use goflags::go_bool;
pub use klog::{KlogFlags, Severity};
pub use logging::{LogFormat, LoggingError, init_logging, verbosity_filter};
pub use quantity::parse_bytes;
