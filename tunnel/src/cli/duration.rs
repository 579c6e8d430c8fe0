//! Go durations on the command line (`--keepalive=10s`, `--max-retry-interval=2m`).
//!
//! Tower's manifests write durations the way Go's `time.ParseDuration` reads
//! them: one or more decimal numbers, each with a unit, run together:
//!
//! | text      | means               |
//! |-----------|---------------------|
//! | `90s`     | 90 seconds          |
//! | `1h30m`   | 5400 seconds        |
//! | `1.5h`    | 90 minutes          |
//! | `2m3.5s`  | 123.5 seconds       |
//! | `500ms`   | half a second       |
//! | `10us`, `10µs`, `10ns` | micro- and nanoseconds |
//! | `0`       | zero (the only number allowed without a unit) |
//!
//! Unlike Go, a negative duration is refused: no flag of ours means anything
//! with one. Zero is accepted here; a flag for which zero makes no sense says
//! so in its own check, naming the flag.
//!
//! Use it as a clap value parser, so that a bad value is a usage error (exit 2)
//! naming the flag:
//!
//! ```
//! use std::time::Duration;
//! use clap::Parser;
//!
//! #[derive(Debug, Parser)]
//! struct Flags {
//!     #[arg(long, default_value = "30s", value_parser = tunnel::cli::parse_go_duration)]
//!     keepalive: Duration,
//! }
//!
//! let flags = Flags::try_parse_from(["x", "--keepalive=1m30s"]).unwrap();
//! assert_eq!(flags.keepalive, Duration::from_secs(90));
//! let e = Flags::try_parse_from(["x", "--keepalive=soon"]).unwrap_err().to_string();
//! assert!(e.contains("--keepalive") && e.contains("not a duration"), "{e}");
//! ```

use std::time::Duration;

/// Go's limit: a duration is an `int64` count of nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

/// Parse a duration in Go's `time.ParseDuration` syntax; negative durations
/// are refused. The error is a sentence for the user, e.g. `"soon" is not a
/// duration like 30s, 2m, 1h30m or 500ms`.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration like 30s, 2m, 1h30m or 500ms");
    let mut rest = text.trim();
    if rest.starts_with('-') {
        return Err(format!(
            "{text:?} is negative; give a duration like 30s, 2m, 1h30m or 500ms"
        ));
    }
    rest = rest.strip_prefix('+').unwrap_or(rest);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let (whole, after) = split_digits(rest);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => split_digits(after),
            None => ("", after),
        };
        // Go wants a digit on at least one side of the point: `.5s` and `5.s` are fine.
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit: u128 = match &after[..unit_len] {
            "ns" => 1,
            // U+00B5 micro sign and U+03BC Greek mu: Go takes both.
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        rest = &after[unit_len..];
        nanos = nanos
            .checked_add(scaled(whole, fraction, unit).ok_or_else(bad)?)
            .filter(|n| *n <= MAX_NANOS)
            .ok_or_else(|| format!("{text:?} is too long a duration (at most about 292 years)"))?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| bad())?;
    // The remainder is below 10^9, so it fits.
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// The leading ASCII digits of `text`, and what follows them.
fn split_digits(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(end)
}

/// `whole.fraction` times `unit` nanoseconds, exact; fraction digits beyond
/// what a nanosecond can hold are dropped, as Go does. `None` on overflow.
fn scaled(whole: &str, fraction: &str, unit: u128) -> Option<u128> {
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut total = whole.checked_mul(unit)?;
    let mut scale = unit;
    for digit in fraction.bytes() {
        scale /= 10;
        if scale == 0 {
            break;
        }
        total = total.checked_add(u128::from(digit - b'0') * scale)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Duration {
        parse_go_duration(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn go_durations() {
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("90s"), Duration::from_secs(90));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("2m3.5s"), Duration::from_millis(123_500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("10us"), Duration::from_micros(10));
        assert_eq!(ok("10µs"), Duration::from_micros(10));
        assert_eq!(ok("10μs"), Duration::from_micros(10));
        assert_eq!(ok("7ns"), Duration::from_nanos(7));
        assert_eq!(ok("1h1m1s1ms1us1ns"), Duration::new(3661, 1_001_001));
        assert_eq!(ok(".5s"), Duration::from_millis(500));
        assert_eq!(ok("5.s"), Duration::from_secs(5));
        assert_eq!(ok("+10s"), Duration::from_secs(10));
        assert_eq!(ok(" 10s "), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("0.1ns"), Duration::ZERO);
        // Exact, unlike floating point.
        assert_eq!(ok("0.3s"), Duration::from_millis(300));
        assert_eq!(ok("1.000000001s"), Duration::new(1, 1));
    }

    #[test]
    fn garbage_is_refused_with_an_example() {
        for bad in [
            "", "soon", "30", "s", "5x", "1h30", "1.2.3s", ".s", "10 s", "1d", "ms5",
        ] {
            let e = parse_go_duration(bad).unwrap_err();
            assert!(
                e.contains("is not a duration like 30s, 2m, 1h30m or 500ms"),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(
            parse_go_duration("soon").unwrap_err(),
            r#""soon" is not a duration like 30s, 2m, 1h30m or 500ms"#
        );
    }

    #[test]
    fn negatives_and_overflow_are_refused() {
        let e = parse_go_duration("-5s").unwrap_err();
        assert!(e.contains("negative"), "{e}");
        assert!(parse_go_duration("-0").is_err());
        assert_eq!(ok("2562047h"), Duration::from_secs(2_562_047 * 3600));
        let e = parse_go_duration("2562048h").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(parse_go_duration("99999999999999999999999999999999999999999h").is_err());
    }
}
