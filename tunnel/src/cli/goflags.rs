//! Go's flag syntax (spf13/pflag) with clap, so Go Tower's command lines work
//! unchanged.
//!
//! Most of pflag's syntax is clap's too: `--name=alpha`, `--name alpha`,
//! `-v=4`, `-v 4`, `-v4`. Two differences. A flag given twice is an error in
//! clap but last-wins in pflag: put `#[command(args_override_self = true)]` on
//! the binary's flags. And booleans. pflag takes a boolean
//! bare (`--leader-elect`) or with `=` (`--leader-elect=true`,
//! `--leader-elect=false`), never as `--leader-elect true` with a space, and
//! clap's plain `bool` flags take no value at all. The recipe for a Go boolean:
//!
//! ```
//! use clap::Parser;
//! use tunnel::cli::go_bool;
//!
//! #[derive(Parser)]
//! struct Flags {
//!     /// Elect a leader among the replicas.
//!     #[arg(
//!         long,
//!         num_args = 0..=1,           // bare or with a value...
//!         require_equals = true,      // ...but the value only after `=`, as pflag
//!         default_missing_value = "true",
//!         default_value = "false",
//!         action = clap::ArgAction::Set,
//!         value_parser = go_bool,
//!         value_name = "BOOL",
//!     )]
//!     leader_elect: bool,
//! }
//!
//! let parse = |args: &[&str]| Flags::try_parse_from(args).map(|f| f.leader_elect);
//! assert_eq!(parse(&["proxy"]).unwrap(), false);
//! assert_eq!(parse(&["proxy", "--leader-elect"]).unwrap(), true);
//! assert_eq!(parse(&["proxy", "--leader-elect=true"]).unwrap(), true);
//! assert_eq!(parse(&["proxy", "--leader-elect=false"]).unwrap(), false);
//! assert!(parse(&["proxy", "--leader-elect=maybe"]).is_err());
//! ```
//!
//! Use `Option<bool>` and leave out `default_value` to know whether the flag
//! was given at all (what [`KlogFlags`](super::KlogFlags) does).

/// Parse a boolean as Go's `strconv.ParseBool` does (pflag uses it):
/// `1 t T TRUE true True` and `0 f F FALSE false False`, nothing else.
pub fn go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean: give true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(args_override_self = true)]
    struct Flags {
        #[arg(
            long,
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "true",
            default_value = "false",
            action = clap::ArgAction::Set,
            value_parser = go_bool,
        )]
        leader_elect: bool,

        #[arg(
            long,
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "true",
            action = clap::ArgAction::Set,
            value_parser = go_bool,
        )]
        given: Option<bool>,
    }

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        Flags::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))
    }

    #[test]
    fn go_booleans_parse_like_pflag() {
        assert!(!parse(&[]).unwrap().leader_elect);
        assert!(parse(&["--leader-elect"]).unwrap().leader_elect);
        assert!(parse(&["--leader-elect=true"]).unwrap().leader_elect);
        assert!(!parse(&["--leader-elect=false"]).unwrap().leader_elect);
        assert!(parse(&["--leader-elect=1"]).unwrap().leader_elect);
        assert!(!parse(&["--leader-elect=F"]).unwrap().leader_elect);
        // Given twice: the last one wins, as in pflag.
        assert!(
            !parse(&["--leader-elect", "--leader-elect=false"])
                .unwrap()
                .leader_elect
        );
    }

    #[test]
    fn a_space_does_not_give_a_boolean_its_value() {
        // pflag reads `--leader-elect false` as the flag plus an argument.
        let e = parse(&["--leader-elect", "false"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument, "{e}");
    }

    #[test]
    fn bad_booleans_name_the_flag() {
        let e = parse(&["--leader-elect=yes"]).unwrap_err().to_string();
        assert!(e.contains("--leader-elect"), "{e}");
        assert!(e.contains("give true or false"), "{e}");
    }

    #[test]
    fn option_tells_whether_it_was_given() {
        assert_eq!(parse(&[]).unwrap().given, None);
        assert_eq!(parse(&["--given"]).unwrap().given, Some(true));
        assert_eq!(parse(&["--given=false"]).unwrap().given, Some(false));
    }

    #[test]
    fn go_bool_is_strconv_parse_bool() {
        for t in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(go_bool(t), Ok(true), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(go_bool(f), Ok(false), "{f}");
        }
        for bad in ["", "yes", "tRUE", "on", " true"] {
            assert!(go_bool(bad).is_err(), "{bad:?}");
        }
    }
}
