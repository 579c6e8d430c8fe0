//! The one logging set-up of `proxy` and `agent`.
//!
//! ```no_run
//! # #[derive(clap::Parser)] struct Flags {
//! #     #[arg(long, value_enum, default_value_t = tunnel::cli::LogFormat::Text)]
//! #     log_format: tunnel::cli::LogFormat,
//! #     #[command(flatten)] klog: tunnel::cli::KlogFlags }
//! use clap::Parser as _;
//! let flags = Flags::parse();
//! let notes = match tunnel::cli::init_logging(flags.log_format, &flags.klog) {
//!     Ok(notes) => notes,
//!     Err(e) => {
//!         eprintln!("error: {e}");
//!         std::process::exit(2);
//!     }
//! };
//! // Only now is there a subscriber to log them to.
//! for note in notes {
//!     tracing::info!("{note}");
//! }
//! ```
//!
//! **Level.** `RUST_LOG`, when set, is the filter (tracing's `EnvFilter`
//! syntax). Otherwise klog's `--v` picks it, see [`verbosity_filter`]: Tower's
//! Go code logs details at V(4) and up, so 4 is where debug starts.
//!
//! **Where.** stderr, as text (colours only on a terminal) or JSON lines.
//! `--log-file FILE` appends to FILE instead, but only together with
//! `--logtostderr=false`: that is klog's rule (its `--logtostderr` defaults to
//! true and then wins), kept so that a Go Tower command line logs where it did.
//! While logging to a file, errors are copied to stderr as klog does
//! (`--stderrthreshold`, default ERROR), or everything with `--alsologtostderr`.
//! A file that cannot be opened is an error naming `--log-file`.
//!
//! **Notes.** klog flags with no meaning here are accepted and named once:
//! [`init_logging`] returns such notes for the caller to log after the
//! subscriber is installed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

use super::klog::{KlogFlags, Severity};

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error(
        "--log-file {}: cannot open it to append logs: {source}; give a file in a writable \
         directory, or leave out --log-file to log to stderr",
        path.display()
    )]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a logger was already installed: {0}")]
    AlreadyInstalled(String),
}

/// The filter for klog verbosity `v` (when `RUST_LOG` is not set):
///
/// | `--v`         | filter             |
/// |---------------|--------------------|
/// | 0-3 (or none) | `info,russh=warn`  |
/// | 4-5           | `debug,russh=info` |
/// | 6 and up      | `trace`            |
///
/// The SSH library's own info logs are per-packet noise until trace.
pub fn verbosity_filter(v: i32) -> &'static str {
    match v {
        ..=3 => "info,russh=warn",
        4..=5 => "debug,russh=info",
        _ => "trace",
    }
}

/// Install the global subscriber as `format` and `klog` say (see the module
/// docs), and return notes about flags that did not do what they might
/// suggest, for the caller to log.
pub fn init_logging(format: LogFormat, klog: &KlogFlags) -> Result<Vec<String>, LoggingError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let plan = Plan::new(klog, rust_log.as_deref())?;
    let notes = plan.notes.clone();
    plan.subscriber(format)
        .try_init()
        .map_err(|e| LoggingError::AlreadyInstalled(e.to_string()))?;
    Ok(notes)
}

/// Where logs go.
#[derive(Debug)]
enum Destination {
    Stderr,
    /// Appending to a file; events at `stderr_from` or more severe go to
    /// stderr as well.
    File {
        file: Arc<File>,
        stderr_from: Level,
    },
}

/// What [`init_logging`] installs, decided without touching globals.
#[derive(Debug)]
struct Plan {
    filter: String,
    destination: Destination,
    notes: Vec<String>,
}

impl Plan {
    fn new(klog: &KlogFlags, rust_log: Option<&str>) -> Result<Self, LoggingError> {
        let mut notes = Vec::new();
        let level = verbosity_filter(klog.v.unwrap_or(0)).to_string();
        let filter = match rust_log.map(str::trim).filter(|r| !r.is_empty()) {
            Some(env) => match EnvFilter::try_new(env) {
                Ok(_) => {
                    if let Some(v) = klog.v {
                        notes.push(format!(
                            "RUST_LOG is set, so it decides the log level, not --v={v}"
                        ));
                    }
                    env.to_string()
                }
                Err(e) => {
                    notes.push(format!(
                        "RUST_LOG={env:?} is not a valid filter ({e}); using {level:?}"
                    ));
                    level
                }
            },
            None => level,
        };

        let mut without_effect = klog.without_effect();
        let to_file = klog.logtostderr == Some(false);
        let destination = match (&klog.log_file, to_file) {
            (Some(path), true) => Destination::File {
                file: Arc::new(open_append(path)?),
                stderr_from: if klog.alsologtostderr == Some(true) {
                    Level::TRACE
                } else {
                    stderr_level(klog.stderrthreshold.unwrap_or(Severity::Error))
                },
            },
            (Some(path), false) => {
                notes.push(format!(
                    "logging to stderr, not --log-file {}: as in klog, --log-file is used only \
                     with --logtostderr=false",
                    path.display()
                ));
                Destination::Stderr
            }
            (None, true) => {
                notes.push(
                    "logging to stderr despite --logtostderr=false: give --log-file FILE to log \
                     to a file (klog's per-severity files in --log-dir are not written)"
                        .to_string(),
                );
                Destination::Stderr
            }
            (None, false) => Destination::Stderr,
        };
        if matches!(destination, Destination::Stderr) {
            if klog.alsologtostderr.is_some() {
                without_effect.push("--alsologtostderr");
            }
            if klog.stderrthreshold.is_some() {
                without_effect.push("--stderrthreshold");
            }
        }
        if !without_effect.is_empty() {
            notes.push(format!(
                "ignoring Go Tower's klog flags that have no meaning here: {}",
                without_effect.join(", ")
            ));
        }
        Ok(Self {
            filter,
            destination,
            notes,
        })
    }

    fn subscriber(self, format: LogFormat) -> Box<dyn tracing::Subscriber + Send + Sync> {
        use std::io::IsTerminal as _;
        let (writer, ansi) = match self.destination {
            Destination::Stderr => (
                BoxMakeWriter::new(std::io::stderr),
                std::io::stderr().is_terminal(),
            ),
            // No colour codes in a file, nor in the copy on stderr.
            Destination::File { file, stderr_from } => (
                BoxMakeWriter::new(file.and(std::io::stderr.with_max_level(stderr_from))),
                false,
            ),
        };
        // The filter was checked in `new` (or is one of ours); the fallback is
        // for the impossible case.
        let filter = EnvFilter::try_new(&self.filter)
            .unwrap_or_else(|_| EnvFilter::new(verbosity_filter(0)));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(ansi);
        match format {
            LogFormat::Text => Box::new(builder.finish()),
            LogFormat::Json => Box::new(builder.json().finish()),
        }
    }
}

fn open_append(path: &Path) -> Result<File, LoggingError> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LoggingError::LogFile {
            path: path.to_path_buf(),
            source,
        })
}

/// klog's severities as tracing levels (tracing has no fatal).
fn stderr_level(severity: Severity) -> Level {
    match severity {
        Severity::Info => Level::TRACE,
        Severity::Warning => Level::WARN,
        Severity::Error | Severity::Fatal => Level::ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        klog: KlogFlags,
    }

    fn klog(args: &[&str]) -> KlogFlags {
        Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .unwrap()
            .klog
    }

    fn plan(args: &[&str], rust_log: Option<&str>) -> Plan {
        Plan::new(&klog(args), rust_log).unwrap()
    }

    #[test]
    fn verbosity_maps_to_levels() {
        assert_eq!(verbosity_filter(-1), "info,russh=warn");
        assert_eq!(verbosity_filter(0), "info,russh=warn");
        assert_eq!(verbosity_filter(3), "info,russh=warn");
        assert_eq!(verbosity_filter(4), "debug,russh=info");
        assert_eq!(verbosity_filter(5), "debug,russh=info");
        assert_eq!(verbosity_filter(6), "trace");
        assert_eq!(verbosity_filter(10), "trace");
        for v in [0, 4, 6] {
            assert!(EnvFilter::try_new(verbosity_filter(v)).is_ok());
        }
    }

    #[test]
    fn rust_log_wins_over_v() {
        let p = plan(&[], None);
        assert_eq!(p.filter, "info,russh=warn");
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        assert_eq!(plan(&["--v=4"], None).filter, "debug,russh=info");
        assert_eq!(plan(&["--v=4"], Some("  ")).filter, "debug,russh=info");
        let p = plan(&["--v=4"], Some("warn,agent=debug"));
        assert_eq!(p.filter, "warn,agent=debug");
        assert!(p.notes[0].contains("not --v=4"), "{:?}", p.notes);
        assert!(plan(&[], Some("warn")).notes.is_empty());
        let p = plan(&["-v6"], Some("=[nonsense"));
        assert_eq!(p.filter, "trace");
        assert!(p.notes[0].contains("not a valid filter"), "{:?}", p.notes);
    }

    #[test]
    fn flags_without_effect_are_named_once() {
        let p = plan(
            &[
                "--v=0",
                "--vmodule=x=1",
                "--skip-headers",
                "--alsologtostderr",
                "--stderrthreshold=INFO",
                "--logtostderr",
            ],
            None,
        );
        assert_eq!(
            p.notes,
            [
                "ignoring Go Tower's klog flags that have no meaning here: --vmodule, \
              --skip-headers, --alsologtostderr, --stderrthreshold"
            ]
        );
        assert!(matches!(p.destination, Destination::Stderr));
    }

    #[test]
    fn log_file_needs_logtostderr_false_as_in_klog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tower.log");
        let file = format!("--log-file={}", path.display());
        let p = plan(&[&file], None);
        assert!(matches!(p.destination, Destination::Stderr));
        assert!(p.notes[0].contains("--logtostderr=false"), "{:?}", p.notes);
        assert!(!path.exists());
        let p = plan(&["--logtostderr=false"], None);
        assert!(matches!(p.destination, Destination::Stderr));
        assert!(p.notes[0].contains("--log-file"), "{:?}", p.notes);

        let p = plan(&[&file, "--logtostderr=false"], None);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        assert!(matches!(
            p.destination,
            Destination::File {
                stderr_from: Level::ERROR,
                ..
            }
        ));
        let p = plan(&[&file, "--logtostderr=false", "--alsologtostderr"], None);
        assert!(matches!(
            p.destination,
            Destination::File {
                stderr_from: Level::TRACE,
                ..
            }
        ));
        let p = plan(
            &[&file, "--logtostderr=false", "--stderrthreshold=WARNING"],
            None,
        );
        assert!(matches!(
            p.destination,
            Destination::File {
                stderr_from: Level::WARN,
                ..
            }
        ));
    }

    #[test]
    fn logs_are_appended_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tower.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let file = format!("--log-file={}", path.display());
        for format in [LogFormat::Text, LogFormat::Json] {
            let p = plan(&[&file, "--logtostderr=false", "--v=4"], None);
            tracing::subscriber::with_default(p.subscriber(format), || {
                tracing::debug!(cluster = "alpha", "into the file");
                tracing::trace!("filtered out");
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0], "earlier line");
        assert!(
            lines[1].contains("DEBUG") && lines[1].contains("into the file"),
            "{text}"
        );
        assert!(!lines[1].contains('\u{1b}'), "no colours in a file: {text}");
        assert!(
            lines[2].starts_with('{') && lines[2].contains("\"cluster\":\"alpha\""),
            "{text}"
        );
    }

    #[test]
    fn an_unwritable_log_file_names_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("tower.log");
        let file = format!("--log-file={}", path.display());
        let e = Plan::new(&klog(&[&file, "--logtostderr=false"]), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--log-file "), "{e}");
        assert!(e.contains("cannot open"), "{e}");
    }
}
