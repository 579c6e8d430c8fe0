//! Property tests of the parsers that read what the network or a flag sends
//! (issue #14, part 4): the websocket framing, the agent's `config` JSON,
//! the SSH identification and packets an agent sends first, channel
//! targets, `host:port` and `--allow-dial` rules, Go durations, SSH host
//! keys (the proxy's PEM, CSR and kubeconfig input: proxy/src/identity/properties.rs).
//! Each runs a few thousand generated cases; proptest shrinks a failure to a
//! minimal input and keeps it in `proptest-regressions/` to replay first.
//!
//! Two kinds of property: what is written reads back the same (round trips),
//! and any input at all gives a value or an error, never a panic or a hang.

use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::protocol::Role;
use tunnel::addr::{join_host_port, split_host_port};
use tunnel::allow::Rule;
use tunnel::cli::{parse_bytes, parse_go_duration};
use tunnel::wire::{AgentConfig, MAX_CONFIG_LEN, parse_target};
use tunnel::ws::WsStream;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Send `chunks` through a websocket from `from` to the other role, reading
/// with a buffer of `read_size` bytes; returns what was read.
async fn through_ws(chunks: &[Vec<u8>], from: Role, read_size: usize) -> std::io::Result<Vec<u8>> {
    let to = if from == Role::Client {
        Role::Server
    } else {
        Role::Client
    };
    let (a, b) = tokio::io::duplex(4096);
    let mut writer = WsStream::from_upgraded(a, from).await;
    let mut reader = WsStream::from_upgraded(b, to).await;
    let send = async {
        for chunk in chunks {
            writer.write_all(chunk).await?;
        }
        writer.shutdown().await
    };
    let receive = async {
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_size];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    received
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Client), Just(Role::Server)]
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Any writes, any read sizes, either direction: the bytes arrive whole
    /// and in order, and the close reads as the end of the stream.
    #[test]
    fn websocket_carries_any_bytes(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..8),
        from in role(),
        read_size in 1usize..2048,
    ) {
        let got = runtime().block_on(through_ws(&chunks, from, read_size))?;
        prop_assert_eq!(got, chunks.concat());
    }

    /// Whatever an agent sends after the upgrade, the proxy's reader gives
    /// data, an end or an error: no panic, no hang once the input ends.
    #[test]
    fn websocket_reader_survives_garbage(
        garbage in prop::collection::vec(any::<u8>(), 0..4096),
        role in role(),
    ) {
        runtime().block_on(async {
            let (mut a, b) = tokio::io::duplex(8192);
            let mut reader = WsStream::from_upgraded(b, role).await;
            a.write_all(&garbage).await?;
            drop(a);
            let mut buf = vec![0u8; 1024];
            let mut total = 0usize;
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
            // Payload can never be more than what was sent.
            assert!(total <= garbage.len());
            Ok::<_, std::io::Error>(())
        })?;
    }

    /// A config the agent writes is the config the proxy reads.
    #[test]
    fn config_json_round_trips(
        version in ".{0,20}",
        name in ".{1,40}",
        token in ".{0,80}",
        kube in ".{0,60}",
        ks in ".{0,60}",
        cert in prop::collection::vec(any::<u8>(), 0..300),
        key in prop::collection::vec(any::<u8>(), 0..300),
        ca in prop::collection::vec(any::<u8>(), 0..300),
        bearer in prop::collection::vec(any::<u8>(), 0..100),
    ) {
        // Fields added to the config later keep their defaults here.
        #[allow(clippy::needless_update)]
        let config = AgentConfig {
            version,
            name,
            token,
            kubernetes_svc_host: kube,
            kubesphere_svc_host: ks,
            cert_data: cert,
            key_data: key,
            ca_data: ca,
            bearer_token: bearer,
            ..Default::default()
        };
        let read = AgentConfig::from_json(&config.to_json());
        prop_assert!(read.is_ok(), "{:?}", read.err());
        prop_assert!(read.ok() == Some(config));
    }

    /// Any payload: a config or an error that names the problem.
    #[test]
    fn config_json_refuses_garbage_with_a_reason(payload in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Err(e) = AgentConfig::from_json(&payload) {
            prop_assert!(e.to_string().starts_with("config "), "{e}");
        }
    }

    /// Near-JSON: objects with the known keys and values of any JSON type.
    #[test]
    fn config_json_with_wrong_types_is_refused_not_panicking(
        key in prop::sample::select(vec!["Name", "Token", "CAData", "BearerToken", "Version", "Other"]),
        value in prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            "[a-zA-Z0-9+/=]{0,20}".prop_map(|s| format!("{s:?}")),
        ],
    ) {
        let payload = format!("{{\"Name\":\"alpha\",\"{key}\":{value}}}");
        let _ = AgentConfig::from_json(payload.as_bytes());
    }

    /// A `host:port` target is accepted exactly as it was sent.
    #[test]
    fn targets_round_trip(host in "[a-z0-9.-]{1,60}", port in any::<u16>()) {
        let text = format!("{host}:{port}");
        prop_assert_eq!(parse_target(text.as_bytes()), Ok(text.as_str()));
    }

    /// Any channel data: a target with a valid port, or a refusal.
    #[test]
    fn targets_from_any_bytes(data in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(target) = parse_target(&data) {
            let (host, port) = target.rsplit_once(':').expect("a colon");
            prop_assert!(!host.is_empty());
            prop_assert!(port.parse::<u16>().is_ok());
        }
    }

    /// `join_host_port` and `split_host_port` undo each other, IPv6 included.
    #[test]
    fn host_port_round_trips(
        host in prop_oneof![
            "[a-z][a-z0-9-]{0,20}(\\.[a-z][a-z0-9-]{0,20}){0,3}",
            any::<std::net::Ipv4Addr>().prop_map(|a| a.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
        ],
        port in 1u16..,
    ) {
        let joined = join_host_port(&host, port);
        prop_assert_eq!(split_host_port(&joined), Some((host, Some(port))));
    }

    #[test]
    fn host_port_from_any_text(text in ".{0,80}") {
        if let Some((host, port)) = split_host_port(&text) {
            prop_assert!(!host.is_empty());
            prop_assert!(port != Some(0));
        }
    }

    /// A rule that parses prints as it was given and allows what it names.
    #[test]
    fn dial_rules_parse_or_explain(text in ".{0,60}") {
        match Rule::parse(&text) {
            Ok(rule) => prop_assert_eq!(rule.to_string(), text),
            Err(e) => prop_assert!(e.contains("expected"), "{e}"),
        }
    }

    #[test]
    fn dial_rules_allow_their_own_range(
        net in any::<std::net::Ipv4Addr>(),
        low in 1u16..,
        span in 0u16..100,
    ) {
        let high = low.saturating_add(span);
        let rule = Rule::parse(&format!("{net}/32:{low}-{high}"));
        prop_assert!(rule.is_ok(), "{:?}", rule.err());
        let rule = rule.expect("checked");
        prop_assert!(rule.allows(&net.to_string(), low));
        prop_assert!(rule.allows(&net.to_string(), high));
        prop_assert!(low == 1 || !rule.allows(&net.to_string(), low - 1));
    }

    /// Go's syntax: integer parts with units, run together, add up.
    #[test]
    fn durations_add_up(parts in prop::collection::vec((0u64..100_000, 0usize..6), 1..5)) {
        const UNITS: [(&str, u64); 6] = [
            ("ns", 1),
            ("us", 1_000),
            ("ms", 1_000_000),
            ("s", 1_000_000_000),
            ("m", 60_000_000_000),
            ("h", 3_600_000_000_000),
        ];
        let text: String = parts.iter().map(|(n, u)| format!("{n}{}", UNITS[*u].0)).collect();
        let nanos: u64 = parts.iter().map(|(n, u)| n * UNITS[*u].1).sum();
        prop_assert_eq!(parse_go_duration(&text), Ok(Duration::from_nanos(nanos)));
    }

    /// Milliseconds as fractional seconds: `1.234s` is 1234 ms exactly.
    #[test]
    fn durations_with_fractions(secs in 0u64..100_000, millis in 0u64..1000) {
        let text = format!("{secs}.{millis:03}s");
        prop_assert_eq!(
            parse_go_duration(&text),
            Ok(Duration::from_secs(secs) + Duration::from_millis(millis))
        );
    }

    /// Any text: a duration or a sentence naming the text.
    #[test]
    fn durations_from_any_text(text in ".{0,30}") {
        if let Err(e) = parse_go_duration(&text) {
            prop_assert!(e.contains("not a duration") || e.contains("negative") || e.contains("too"), "{e}");
        }
    }

    /// Byte counts: a number and a suffix is the number times the unit.
    #[test]
    fn byte_counts_are_the_number_times_the_unit(n in 0u64..1_000_000, u in 0usize..9) {
        const UNITS: [(&str, u64); 9] = [
            ("", 1),
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
        ];
        let (suffix, unit) = UNITS[u];
        prop_assert_eq!(parse_bytes(&format!("{n}{suffix}")), Ok(n * unit));
    }

    /// Any text: a count or a sentence naming the text.
    #[test]
    fn byte_counts_from_any_text(text in ".{0,30}") {
        if let Err(e) = parse_bytes(&text) {
            prop_assert!(e.contains("not a byte count") || e.contains("too large"), "{e}");
            prop_assert!(e.contains(&format!("{text:?}")), "{e}");
        }
    }
}

struct NoOne;

impl tunnel::server::Admission for NoOne {
    type Guard = ();
    async fn admit(&self, _: tunnel::server::Session) -> Result<(), String> {
        Err("Unauthorized agent".into())
    }
}

/// What an agent might send first: a valid identification line or a broken
/// one, then anything.
fn agent_bytes() -> impl Strategy<Value = Vec<u8>> {
    let ident = prop_oneof![
        Just(b"SSH-kubesphere-v1-client\r\n".to_vec()),
        Just(b"SSH-2.0-Go\r\n".to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..300),
    ];
    (ident, prop::collection::vec(any::<u8>(), 0..3000)).prop_map(|(mut a, b)| {
        a.extend(b);
        a
    })
}

proptest! {
    #![proptest_config(cases(2000))]

    /// The proxy's SSH side, fed anything and then the end of the stream,
    /// ends the connection with an error: no panic, no admission, no hang.
    #[test]
    fn ssh_server_survives_any_agent_bytes(input in agent_bytes()) {
        let outcome = runtime().block_on(async {
            let key = tunnel::ssh::generate_host_key().expect("a host key");
            let config = std::sync::Arc::new(tunnel::ssh::server_config(key, Duration::from_secs(30)));
            let (mut agent, proxy) = tokio::io::duplex(1 << 20);
            let serving = tokio::spawn(tunnel::server::serve(
                proxy,
                config,
                std::sync::Arc::new(NoOne),
                "property".to_string(),
            ));
            agent.write_all(&input).await?;
            agent.shutdown().await?;
            // Nothing is read from the proxy: its writes go to the duplex buffer.
            tokio::time::timeout(Duration::from_secs(20), serving)
                .await
                .map_err(|_| std::io::Error::other("the proxy's SSH side hung after the input ended"))?
                .map_err(std::io::Error::other)
        })?;
        prop_assert!(outcome.is_err(), "a connection of random bytes ended without an error");
    }
}

/// The size limit is checked before parsing: a huge payload costs nothing.
#[test]
fn config_json_size_limit() {
    let big = vec![b' '; MAX_CONFIG_LEN + 1];
    let e = AgentConfig::from_json(&big).expect_err("too large");
    assert!(e.to_string().contains("more than"), "{e}");
}

proptest! {
    #![proptest_config(cases(2000))]

    /// `--host-key` files and the host key kept in Secret `tower-proxy`:
    /// any text is refused naming where it came from.
    #[test]
    fn host_keys_from_any_text_are_refused_naming_the_file(text in ".{0,400}") {
        let refused = tunnel::ssh::parse_host_key(&text, "/etc/tower/host-key");
        prop_assert!(refused.is_err());
        if let Err(e) = refused {
            prop_assert!(e.to_string().contains("/etc/tower/host-key"), "{e}");
        }
    }

    /// A real key with one byte changed or cut short: the same key or a
    /// refusal, never another key that agents would have to re-pin.
    #[test]
    fn a_damaged_host_key_loads_the_same_or_is_refused(
        at in any::<usize>(), with in any::<u8>(), cut in any::<bool>(),
    ) {
        let key = tunnel::ssh::generate_host_key().expect("a host key");
        let pem = tunnel::ssh::encode_host_key(&key).expect("encoding it");
        let damaged = if cut {
            pem.get(..at % pem.len()).unwrap_or_default().to_string()
        } else {
            let mut bytes = pem.clone().into_bytes();
            let i = at % bytes.len();
            bytes[i] = with;
            String::from_utf8_lossy(&bytes).into_owned()
        };
        if let Ok(loaded) = tunnel::ssh::parse_host_key(&damaged, "damaged") {
            prop_assert_eq!(
                loaded.public_key().fingerprint(Default::default()),
                key.public_key().fingerprint(Default::default())
            );
        }
    }
}
