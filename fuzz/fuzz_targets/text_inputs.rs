//! The small text parsers that see flags, files and channel requests: a
//! channel target, `host:port`, `--allow-dial` rules, Go durations, byte counts and SSH
//! host keys. Each must answer (Ok or a reason) for any input, never panic,
//! and what it accepts must survive a round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(target) = tunnel::wire::parse_target(data) {
        // A target is taken whole, or refused: never a part of the request.
        assert_eq!(target.as_bytes(), data);
        assert!(!target.contains(char::is_control), "{target:?}");
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((host, Some(port))) = tunnel::addr::split_host_port(text) {
        let joined = tunnel::addr::join_host_port(&host, port);
        assert_eq!(
            tunnel::addr::split_host_port(&joined),
            Some((host, Some(port))),
            "{text:?} does not survive join_host_port"
        );
    }
    let _ = tunnel::allow::Rule::parse(text);
    let _ = tunnel::cli::parse_go_duration(text);
    let _ = tunnel::cli::parse_bytes(text);
    let _ = tunnel::ssh::parse_host_key(text, "fuzz");
});
