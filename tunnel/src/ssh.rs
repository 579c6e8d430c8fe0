//! SSH settings both ends share: Tower's identification lines, algorithms Go
//! Tower v0.2.1 can speak (AES-GCM first), windows, and the proxy's host key.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use russh::keys::{Algorithm, HashAlg, PrivateKey, PublicKey};
use russh::{MethodKind, MethodSet, Preferred, SshId, cipher, kex, mac};

use crate::wire::{CLIENT_ID, SERVER_ID};

/// Per-channel receive window every channel starts with.
pub const WINDOW_SIZE: u32 = 2 * 1024 * 1024;
/// The most a channel's receive window grows to when its reader drains it
/// faster than the link's round trip (see docs/architecture.md, "Windows"). It
/// bounds what one stalled stream can buffer, and lets one stream carry
/// 32 MiB per round trip (640 MiB/s at 50 ms: the CPU, not the window, is
/// then the limit). At most half the session budget (checked below), so one
/// stalled stream leaves the others room to grow.
pub const WINDOW_MAX: u32 = 32 * 1024 * 1024;
/// Window growth stops when the windows of one session's channels would add
/// up to more than this: what one tunnel's readers can leave unread, beyond
/// the initial window of each channel.
pub const WINDOW_SESSION_BUDGET: u64 = 64 * 1024 * 1024;
// One channel stalled at its cap leaves the others half the budget to grow in.
const _: () = assert!(2 * WINDOW_MAX as u64 <= WINDOW_SESSION_BUDGET);

/// The window limits both ends use.
pub fn window_limits() -> russh::WindowLimits {
    russh::WindowLimits {
        initial: WINDOW_SIZE,
        max: WINDOW_MAX,
        session_budget: WINDOW_SESSION_BUDGET,
    }
}
/// Key exchanges an agent may start within a minute while sending less than
/// 64 MiB between them (real agents rekey after a gigabyte or an hour); one
/// more and the proxy closes the session saying so. Each costs the proxy a
/// key agreement (about 1 ms of CPU).
pub const MAX_AGENT_REKEYS_PER_MINUTE: u32 = 10;
/// Largest SSH data packet we accept (Go uses 32 KiB; more gains nothing).
pub const MAX_PACKET: u32 = 32 * 1024;

/// Key exchange: modern first, then what Go Tower v0.2.1 (x/crypto of 2020) has.
const KEX: &[kex::Name] = &[
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::ECDH_SHA2_NISTP256,
    kex::ECDH_SHA2_NISTP384,
    kex::ECDH_SHA2_NISTP521,
    kex::DH_G14_SHA256,
    kex::DH_G14_SHA1,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// AES-GCM is the cheapest on AES-NI CPUs, AES-128 (10 rounds) cheaper than
/// AES-256 (14); the client's order wins.
const CIPHERS: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

const MACS: &[mac::Name] = &[
    mac::HMAC_SHA256_ETM,
    mac::HMAC_SHA512_ETM,
    mac::HMAC_SHA256,
    mac::HMAC_SHA512,
];

const HOST_KEYS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP256,
    },
];

fn preferred() -> Preferred {
    Preferred {
        kex: Cow::Borrowed(KEX),
        key: Cow::Borrowed(HOST_KEYS),
        cipher: Cow::Borrowed(CIPHERS),
        mac: Cow::Borrowed(MACS),
        ..Preferred::default()
    }
}

/// The proxy's SSH server settings. `keepalive`: the proxy pings every period
/// and drops a session after 3 periods without a word from the agent.
pub fn server_config(host_key: PrivateKey, keepalive: Duration) -> russh::server::Config {
    russh::server::Config {
        server_id: SshId::Standard(Cow::Borrowed(SERVER_ID)),
        methods: MethodSet::from(&[MethodKind::Password][..]),
        // Go clients try "none" first; don't make them wait for the real attempt.
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: WINDOW_SIZE,
        window_size_max: WINDOW_MAX,
        window_session_budget: WINDOW_SESSION_BUDGET,
        maximum_packet_size: MAX_PACKET,
        preferred: preferred(),
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max: 2,
        max_peer_rekeys_per_minute: Some(MAX_AGENT_REKEYS_PER_MINUTE),
        nodelay: true,
        ..Default::default()
    }
}

/// The agent's SSH client settings. The agent's own `ping` loop detects dead
/// proxies (see [`crate::client`]), so russh's keepalive stays off.
pub fn client_config() -> russh::client::Config {
    russh::client::Config {
        client_id: SshId::Standard(Cow::Borrowed(CLIENT_ID)),
        window_size: WINDOW_SIZE,
        window_size_max: WINDOW_MAX,
        window_session_budget: WINDOW_SESSION_BUDGET,
        maximum_packet_size: MAX_PACKET,
        preferred: preferred(),
        inactivity_timeout: None,
        keepalive_interval: None,
        nodelay: true,
        ..Default::default()
    }
}

/// OpenSSH's host key announcement (PROTOCOL 2.5), sent by the proxy after
/// an agent is admitted.
pub const HOSTKEYS_REQUEST: &str = "hostkeys-00@openssh.com";

/// The request-specific data of [`HOSTKEYS_REQUEST`]: one SSH string (u32
/// length, bytes) per public key blob.
pub fn host_keys_announcement(keys: &[PublicKey]) -> Vec<u8> {
    let mut out = Vec::new();
    for key in keys {
        let Ok(blob) = key.to_bytes() else { continue };
        let Ok(len) = u32::try_from(blob.len()) else {
            continue;
        };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&blob);
    }
    out
}

/// `SHA256:...`, as `ssh-keygen -l` and Go's `ssh.FingerprintSHA256` print it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Errors loading or creating the proxy's host key.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read SSH host key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("SSH host key {path} is not an OpenSSH private key: {source}")]
    Parse {
        path: String,
        source: russh::keys::ssh_key::Error,
    },
    #[error("cannot write SSH host key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot generate an SSH host key: {0}")]
    Generate(russh::keys::ssh_key::Error),
}

/// A new Ed25519 host key.
pub fn generate_host_key() -> Result<PrivateKey, HostKeyError> {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(HostKeyError::Generate)
}

/// Parse an OpenSSH private key.
pub fn parse_host_key(pem: &str, origin: &str) -> Result<PrivateKey, HostKeyError> {
    PrivateKey::from_openssh(pem).map_err(|source| HostKeyError::Parse {
        path: origin.to_string(),
        source,
    })
}

/// OpenSSH encoding of a private key.
pub fn encode_host_key(key: &PrivateKey) -> Result<String, HostKeyError> {
    key.to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(HostKeyError::Generate)
}

/// Load the host key at `path`, or create it (mode 0600) the first time, so the
/// fingerprint agents pin stays the same across restarts.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let shown = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(pem) => parse_host_key(&pem, &shown),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_host_key()?;
            let pem = encode_host_key(&key)?;
            write_private(path, pem.as_bytes()).map_err(|source| HostKeyError::Write {
                path: shown,
                source,
            })?;
            Ok(key)
        }
        Err(source) => Err(HostKeyError::Read {
            path: shown,
            source,
        }),
    }
}

/// Write a secret file readable by its owner only, atomically.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_is_created_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("hostkey-{}", std::process::id()));
        let path = dir.join("ssh_host_key");
        let first = load_or_create_host_key(&path).unwrap();
        let second = load_or_create_host_key(&path).unwrap();
        assert_eq!(
            fingerprint(first.public_key()),
            fingerprint(second.public_key())
        );
        assert!(fingerprint(first.public_key()).starts_with("SHA256:"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "host key must not be readable by others");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn garbage_host_key_is_refused_with_its_path() {
        let err = parse_host_key("not a key", "/etc/tower/key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/tower/key"), "{err}");
    }

    // The window-growth decision with Tower's limits (russh::next_window).

    fn epoch(
        window: u32,
        consumed: u32,
        elapsed_ms: u64,
        rtt_ms: u64,
        session: u64,
    ) -> russh::Epoch {
        russh::Epoch {
            window,
            consumed: u64::from(consumed),
            elapsed: Duration::from_millis(elapsed_ms),
            rtt: Some(Duration::from_millis(rtt_ms)),
            session_windows: session,
        }
    }

    #[test]
    fn window_grows_fourfold_when_drained_within_a_round_trip() {
        let l = window_limits();
        let e = epoch(WINDOW_SIZE, WINDOW_SIZE, 30, 50, u64::from(WINDOW_SIZE));
        assert_eq!(russh::GROWTH, 4);
        assert_eq!(russh::next_window(&l, &e), 4 * WINDOW_SIZE);
        // Half a window in a quarter of the round trip: same rate, grows too.
        let e = epoch(WINDOW_SIZE, WINDOW_SIZE / 2, 12, 50, u64::from(WINDOW_SIZE));
        assert_eq!(russh::next_window(&l, &e), 4 * WINDOW_SIZE);
        // From 2 MiB to the 32 MiB cap in two growths, not four.
        let e = epoch(
            4 * WINDOW_SIZE,
            4 * WINDOW_SIZE,
            30,
            50,
            u64::from(4 * WINDOW_SIZE),
        );
        assert_eq!(russh::next_window(&l, &e), WINDOW_MAX);
    }

    #[test]
    fn window_stays_when_the_reader_is_slower_than_the_link() {
        let l = window_limits();
        let session = u64::from(WINDOW_SIZE);
        // One window per two round trips or slower: the reader paces the sender.
        for elapsed in [100, 150, 1000] {
            let e = epoch(WINDOW_SIZE, WINDOW_SIZE, elapsed, 50, session);
            assert_eq!(russh::next_window(&l, &e), WINDOW_SIZE, "{elapsed} ms");
        }
        // Less than half a window consumed (a stalled reader): never judged.
        let e = epoch(WINDOW_SIZE, WINDOW_SIZE / 2 - 1, 0, 50, session);
        assert_eq!(russh::next_window(&l, &e), WINDOW_SIZE);
        // No round trip measured yet.
        let mut e = epoch(WINDOW_SIZE, WINDOW_SIZE, 1, 50, session);
        e.rtt = None;
        assert_eq!(russh::next_window(&l, &e), WINDOW_SIZE);
    }

    #[test]
    fn window_never_grows_past_its_cap() {
        let l = window_limits();
        let mut window = WINDOW_SIZE;
        for _ in 0..10 {
            let e = epoch(window, window, 1, 50, u64::from(window));
            let next = russh::next_window(&l, &e);
            assert!(next >= window && next <= WINDOW_MAX, "{window} -> {next}");
            window = next;
        }
        assert_eq!(window, WINDOW_MAX);
        let e = epoch(WINDOW_MAX, WINDOW_MAX, 1, 50, u64::from(WINDOW_MAX));
        assert_eq!(russh::next_window(&l, &e), WINDOW_MAX);
    }

    #[test]
    fn window_growth_respects_the_session_budget() {
        let l = window_limits();
        // Other channels hold all but 1 MiB of the budget: grows by 1 MiB only.
        let session = WINDOW_SESSION_BUDGET - (1 << 20);
        let e = epoch(WINDOW_SIZE, WINDOW_SIZE, 1, 50, session);
        assert_eq!(russh::next_window(&l, &e), WINDOW_SIZE + (1 << 20));
        // Budget spent (or overspent by initial windows): no growth at all.
        for session in [WINDOW_SESSION_BUDGET, 2 * WINDOW_SESSION_BUDGET] {
            let e = epoch(WINDOW_SIZE, WINDOW_SIZE, 1, 50, session);
            assert_eq!(russh::next_window(&l, &e), WINDOW_SIZE);
        }
    }

    #[test]
    fn credit_goes_back_every_eighth_of_a_window() {
        // 256 KiB of the initial 2 MiB, 4 MiB of a window at its cap.
        for window in [WINDOW_SIZE, WINDOW_MAX] {
            assert!(!russh::credit_due(window / 8 - 1, window), "{window}");
            assert!(russh::credit_due(window / 8, window), "{window}");
            assert!(russh::credit_due(window, window), "{window}");
        }
        assert!(!russh::credit_due(0, WINDOW_SIZE));
        // Tiny windows (a peer's choice) still get credit for any byte.
        assert!(russh::credit_due(1, 7));
    }

    // Growth straight to the window the session learnt (russh::learnt_window,
    // PATCHES.md 14).

    #[test]
    fn growth_goes_to_the_learnt_window_within_cap_and_budget() {
        let l = window_limits();
        let grown = 2 * WINDOW_SIZE;
        let alone = u64::from(grown);
        // Nothing learnt beyond this growth: it stands.
        assert_eq!(russh::learnt_window(&l, grown, 0, alone), grown);
        assert_eq!(russh::learnt_window(&l, grown, grown, alone), grown);
        // Another channel grew to 16 MiB: straight there.
        let learnt = 8 * WINDOW_SIZE;
        assert_eq!(russh::learnt_window(&l, grown, learnt, alone), learnt);
        // Never past the per-channel cap.
        assert_eq!(russh::learnt_window(&l, grown, u32::MAX, alone), WINDOW_MAX);
        // Only what the session budget leaves: others hold all but 6 MiB.
        let others = WINDOW_SESSION_BUDGET - 6 * (1 << 20);
        assert_eq!(
            russh::learnt_window(&l, grown, WINDOW_MAX, others + alone),
            6 << 20
        );
        // Budget spent: the growth next_window granted stands.
        let spent = 2 * WINDOW_SESSION_BUDGET;
        assert_eq!(russh::learnt_window(&l, grown, WINDOW_MAX, spent), grown);
        // Fixed windows stay fixed.
        let fixed = russh::WindowLimits::fixed(WINDOW_SIZE);
        assert_eq!(
            russh::learnt_window(&fixed, WINDOW_SIZE, WINDOW_MAX, alone),
            WINDOW_SIZE
        );
    }
}
