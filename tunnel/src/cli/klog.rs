//! Go Tower's logging flags (klog/v2), accepted so its command lines keep working.
//!
//! Go Tower registers klog's flags on its command line, and KubeSphere's
//! manifests use them (`agent ... --v=0`, `proxy ... --v=4`). A binary that
//! refused them could not replace Go Tower in place, so both of ours flatten
//! [`KlogFlags`] into their flags:
//!
//! ```
//! use clap::Parser;
//! use tunnel::cli::KlogFlags;
//!
//! #[derive(Parser)]
//! #[command(args_override_self = true)] // pflag: a repeated flag's last value wins
//! struct Flags {
//!     #[command(flatten)]
//!     klog: KlogFlags,
//! }
//!
//! let flags = Flags::try_parse_from(["agent", "-v4", "--logtostderr=false", "--v=6"]).unwrap();
//! assert_eq!(flags.klog.v, Some(6));
//! assert_eq!(flags.klog.logtostderr, Some(false));
//! ```
//!
//! What they do here is decided in [`init_logging`](super::init_logging):
//! `--v` picks the log level, `--log-file` (with `--logtostderr=false`, as in
//! klog) the file logs go to, `--alsologtostderr` and `--stderrthreshold` what
//! is copied to stderr then; the rest is accepted and named once in the start-up log as having no
//! effect. Values are still checked as klog checks them, so a typo is an error
//! rather than silently different behaviour.
//!
//! Syntax is pflag's: `--v=4`, `--v 4`, `-v=4`, `-v 4`, `-v4`; booleans bare
//! (`--logtostderr`) or with `=` (`--logtostderr=false`), see
//! [`goflags`](super::goflags).

use std::path::PathBuf;

use clap::ArgAction;

use super::goflags::go_bool;

/// klog's flags, each `None` unless given. Field docs are the `--help` text.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
#[command(next_help_heading = "Go Tower's klog flags")]
pub struct KlogFlags {
    /// Log verbosity, klog style: 0-3 info, 4-5 debug, 6 and up trace
    /// (RUST_LOG, when set, wins).
    #[arg(
        short = 'v',
        long = "v",
        value_name = "LEVEL",
        allow_negative_numbers = true
    )]
    pub v: Option<i32>,

    /// Per-file verbosity (pattern=N,...). Accepted, no effect.
    #[arg(long, value_name = "PATTERN=N,...")]
    pub vmodule: Option<String>,

    /// Log to stderr instead of files (klog's default: true). With
    /// `--logtostderr=false`, `--log-file` is used.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = go_bool, value_name = "BOOL")]
    pub logtostderr: Option<bool>,

    /// With `--log-file`, log to stderr as well.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = go_bool, value_name = "BOOL")]
    pub alsologtostderr: Option<bool>,

    /// Directory for klog's per-severity log files. Accepted, no effect.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,

    /// Append logs to FILE (only with `--logtostderr=false`, as in klog).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Size in MB at which klog rotates the log file. Accepted, no effect (no
    /// rotation here: use logrotate with copytruncate, or stderr).
    #[arg(long, value_name = "MB")]
    pub log_file_max_size: Option<u64>,

    /// Omit klog's line headers. Accepted, no effect.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = go_bool, value_name = "BOOL")]
    pub skip_headers: Option<bool>,

    /// Omit klog's log file headers. Accepted, no effect.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = go_bool, value_name = "BOOL")]
    pub skip_log_headers: Option<bool>,

    /// With `--log-file`, the severity from which logs are copied to stderr
    /// too: INFO, WARNING, ERROR (klog's default) or FATAL, or 0-3.
    #[arg(long, value_name = "SEVERITY", value_parser = Severity::parse)]
    pub stderrthreshold: Option<Severity>,

    /// Add the file's directory to klog's line headers. Accepted, no effect.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = go_bool, value_name = "BOOL")]
    pub add_dir_header: Option<bool>,

    /// Emit a stack trace when logging at file:N. Accepted, no effect.
    #[arg(long, value_name = "FILE:N", value_parser = trace_location)]
    pub log_backtrace_at: Option<String>,

    /// Write each severity to its own file only. Accepted, no effect.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true",
          action = ArgAction::Set, value_parser = go_bool, value_name = "BOOL")]
    pub one_output: Option<bool>,
}

impl KlogFlags {
    /// The flags given that never change anything here, as `--name`s for a
    /// note. (`--alsologtostderr` and `--stderrthreshold` matter only with
    /// `--log-file`: [`init_logging`](super::init_logging) adds them.)
    pub fn without_effect(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        let mut note = |given: bool, name| {
            if given {
                names.push(name);
            }
        };
        note(self.vmodule.is_some(), "--vmodule");
        note(self.log_dir.is_some(), "--log-dir");
        note(self.log_file_max_size.is_some(), "--log-file-max-size");
        note(self.skip_headers.is_some(), "--skip-headers");
        note(self.skip_log_headers.is_some(), "--skip-log-headers");
        note(self.add_dir_header.is_some(), "--add-dir-header");
        note(self.log_backtrace_at.is_some(), "--log-backtrace-at");
        note(self.one_output.is_some(), "--one-output");
        names
    }
}

/// klog's severities, for `--stderrthreshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    Error,
    Fatal,
}

impl Severity {
    /// A name in any case, or its number (0-3), as klog takes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.to_ascii_uppercase().as_str() {
            "INFO" | "0" => Ok(Self::Info),
            "WARNING" | "1" => Ok(Self::Warning),
            "ERROR" | "2" => Ok(Self::Error),
            "FATAL" | "3" => Ok(Self::Fatal),
            _ => Err(format!(
                "{text:?} is not a klog severity: give INFO, WARNING, ERROR or FATAL"
            )),
        }
    }
}

/// klog's `file:N` (empty turns it off).
fn trace_location(text: &str) -> Result<String, String> {
    let valid = text.is_empty()
        || text
            .rsplit_once(':')
            .is_some_and(|(file, line)| !file.is_empty() && line.parse::<u32>().is_ok());
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not FILE:N, e.g. main.go:120"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Like the binaries: their own flags, klog's, and clap's -h/-V.
    #[derive(Parser, Debug)]
    #[command(version, args_override_self = true)]
    struct Flags {
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        klog: KlogFlags,
    }

    fn parse(args: &[&str]) -> Result<KlogFlags, clap::Error> {
        Flags::try_parse_from(std::iter::once("agent").chain(args.iter().copied())).map(|f| f.klog)
    }

    fn klog(args: &[&str]) -> KlogFlags {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn nothing_given_is_all_none() {
        assert_eq!(klog(&[]), KlogFlags::default());
        assert!(KlogFlags::default().without_effect().is_empty());
    }

    #[test]
    fn verbosity_in_every_pflag_form() {
        for args in [
            &["--v=4"][..],
            &["--v", "4"],
            &["-v=4"],
            &["-v", "4"],
            &["-v4"],
        ] {
            assert_eq!(klog(args).v, Some(4), "{args:?}");
        }
        assert_eq!(klog(&["--v=0"]).v, Some(0));
        assert_eq!(klog(&["--v=-1"]).v, Some(-1));
        assert_eq!(klog(&["--v=2", "--v=6"]).v, Some(6));
        let e = parse(&["--v=loud"]).unwrap_err().to_string();
        assert!(e.contains("--v"), "{e}");
    }

    #[test]
    fn version_and_help_do_not_clash_with_v() {
        let e = parse(&["-V"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        let e = parse(&["--version"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        let e = parse(&["-h"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = e.to_string();
        assert!(help.contains("-v, --v <LEVEL>"), "{help}");
        assert!(help.contains("--logtostderr[=<BOOL>]"), "{help}");
    }

    #[test]
    fn booleans_bare_or_with_equals() {
        type Field = fn(&KlogFlags) -> Option<bool>;
        let booleans: [(&str, Field); 6] = [
            ("logtostderr", |k| k.logtostderr),
            ("alsologtostderr", |k| k.alsologtostderr),
            ("skip-headers", |k| k.skip_headers),
            ("skip-log-headers", |k| k.skip_log_headers),
            ("add-dir-header", |k| k.add_dir_header),
            ("one-output", |k| k.one_output),
        ];
        for (name, field) in booleans {
            let flag = format!("--{name}");
            assert_eq!(field(&klog(&[&flag])), Some(true), "{flag}");
            assert_eq!(field(&klog(&[&format!("{flag}=true")])), Some(true));
            assert_eq!(field(&klog(&[&format!("{flag}=false")])), Some(false));
            assert_eq!(field(&klog(&[&format!("{flag}=0")])), Some(false));
            assert!(parse(&[&format!("{flag}=nope")]).is_err(), "{flag}");
            // A space does not give a boolean its value (pflag: a stray argument).
            assert!(parse(&[&flag, "false"]).is_err(), "{flag} false");
            // A bare boolean does not swallow the next flag.
            let k = klog(&[&flag, "--v=3"]);
            assert_eq!((field(&k), k.v), (Some(true), Some(3)), "{flag}");
        }
    }

    #[test]
    fn valued_flags_with_equals_or_space() {
        for (flag, value) in [
            ("--vmodule", "server=4,client*=2"),
            ("--log-dir", "/var/log/tower"),
            ("--log-file", "/var/log/tower.log"),
            ("--log-file-max-size", "1800"),
            ("--stderrthreshold", "ERROR"),
            ("--log-backtrace-at", "proxy.go:120"),
        ] {
            let joined = klog(&[&format!("{flag}={value}")]);
            let spaced = klog(&[flag, value]);
            assert_eq!(joined, spaced, "{flag}");
            assert_ne!(joined, KlogFlags::default(), "{flag}");
        }
        let k = klog(&["--vmodule=a=1", "--log-dir=/d", "--log-file=/f"]);
        assert_eq!(k.vmodule.as_deref(), Some("a=1"));
        assert_eq!(k.log_dir, Some(PathBuf::from("/d")));
        assert_eq!(k.log_file, Some(PathBuf::from("/f")));
        assert_eq!(klog(&["--log-file-max-size=0"]).log_file_max_size, Some(0));
        assert_eq!(
            klog(&["--log-backtrace-at="]).log_backtrace_at,
            Some(String::new())
        );
        for (text, severity) in [
            ("INFO", Severity::Info),
            ("warning", Severity::Warning),
            ("Error", Severity::Error),
            ("2", Severity::Error),
            ("FATAL", Severity::Fatal),
            ("3", Severity::Fatal),
        ] {
            let k = klog(&[&format!("--stderrthreshold={text}")]);
            assert_eq!(k.stderrthreshold, Some(severity), "{text}");
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        for (arg, flag) in [
            ("--log-file-max-size=big", "--log-file-max-size"),
            ("--log-file-max-size=-1", "--log-file-max-size"),
            ("--stderrthreshold=LOUD", "--stderrthreshold"),
            ("--log-backtrace-at=main.go", "--log-backtrace-at"),
            ("--logtostderr=yes", "--logtostderr"),
        ] {
            let e = parse(&[arg]).unwrap_err().to_string();
            assert!(e.contains(flag), "{arg}: {e}");
        }
    }

    #[test]
    fn every_flag_at_once() {
        let k = klog(&[
            "--v=2",
            "--vmodule=x=3",
            "--logtostderr=false",
            "--alsologtostderr",
            "--log-dir=/tmp",
            "--log-file=/tmp/tower.log",
            "--log-file-max-size=100",
            "--skip-headers",
            "--skip-log-headers=true",
            "--stderrthreshold=INFO",
            "--add-dir-header",
            "--log-backtrace-at=a.go:1",
            "--one-output=true",
        ]);
        assert_eq!(k.v, Some(2));
        assert_eq!(k.logtostderr, Some(false));
        assert_eq!(k.alsologtostderr, Some(true));
        assert_eq!(
            k.without_effect(),
            [
                "--vmodule",
                "--log-dir",
                "--log-file-max-size",
                "--skip-headers",
                "--skip-log-headers",
                "--add-dir-header",
                "--log-backtrace-at",
                "--one-output",
            ]
        );
    }
}
