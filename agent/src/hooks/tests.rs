use std::time::Duration;

use super::*;
use crate::credentials::Credentials;

fn hook(cmd: &str, timeout: Duration) -> Hook {
    Hook {
        cmd: cmd.into(),
        timeout,
    }
}

fn ctx() -> Context {
    Context {
        cluster: "alpha".into(),
        proxy: "ws://127.0.0.1:1/".into(),
        attempt: 3,
    }
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn json_credentials_replace_the_agents() {
    let out = hook(
        r#"echo '{"bearerToken": "scoped", "caData": "Q0E="}'"#,
        LONG,
    )
    .run(Event::PreStart, &ctx())
    .await
    .unwrap();
    let overrides = Overrides::parse(&out).unwrap();
    assert_eq!(overrides.fields(), "bearerToken,caData");
    let own = Credentials {
        server: Some("10.0.0.1:6443".into()),
        ca_data: b"own ca".to_vec(),
        cert_data: b"cert".to_vec(),
        key_data: b"key".to_vec(),
        bearer_token: Vec::new(),
    };
    let used = overrides.apply(own);
    assert_eq!(used.bearer_token, b"scoped");
    assert_eq!(used.ca_data, b"CA");
    // The token replaces the identity: no client certificate besides it.
    assert!(used.cert_data.is_empty() && used.key_data.is_empty());
    assert_eq!(used.server.as_deref(), Some("10.0.0.1:6443"));
    assert!(!format!("{overrides:?}").contains("scoped"));
}

#[tokio::test]
async fn the_environment_names_the_connection() {
    let out = hook(
        r#"echo "$TOWER_CLUSTER $TOWER_PROXY $TOWER_EVENT $TOWER_ATTEMPT""#,
        LONG,
    )
    .run(Event::PostStart, &ctx())
    .await
    .unwrap();
    assert_eq!(out, b"alpha ws://127.0.0.1:1/ post-start 3\n");
}

#[tokio::test]
async fn empty_output_keeps_the_agents_credentials() {
    let out = hook("true", LONG)
        .run(Event::PreStart, &ctx())
        .await
        .unwrap();
    let overrides = Overrides::parse(&out).unwrap();
    assert!(overrides.is_empty());
    assert_eq!(overrides.fields(), "none");
    assert!(Overrides::parse(b" \n\t").unwrap().is_empty());
}

#[tokio::test]
async fn a_non_zero_exit_is_an_error() {
    let e = hook("echo oops >&2; exit 3", LONG)
        .run(Event::PreStart, &ctx())
        .await
        .unwrap_err();
    assert!(
        matches!(e, HookError::Failed(s) if s.code() == Some(3)),
        "{e}"
    );
}

#[tokio::test]
async fn a_hanging_hook_and_its_children_are_killed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // A grandchild (sleep) and the shell waiting for it.
    let cmd = format!("sleep 1000 & echo $! > {}; wait", pids.display());
    let e = hook(&cmd, Duration::from_millis(500))
        .run(Event::PreStart, &ctx())
        .await
        .unwrap_err();
    assert!(matches!(e, HookError::TimedOut(_)), "{e}");
    let pid: i32 = std::fs::read_to_string(&pids)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Killed: gone, or a zombie until its new parent reaps it.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit_once(") ")?.1.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    };
    let deadline = std::time::Instant::now() + LONG;
    while running() {
        assert!(std::time::Instant::now() < deadline, "sleep {pid} survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_background_child_does_not_hold_the_hook() {
    // The shell exits at once; its background sleep is killed with the group.
    let out = hook("sleep 1000 & echo done", LONG)
        .run(Event::PostStart, &ctx())
        .await
        .unwrap();
    assert_eq!(out, b"done\n");
}

#[tokio::test]
async fn too_much_output_is_refused() {
    let e = hook("head -c 2000000 /dev/zero", LONG)
        .run(Event::PreStart, &ctx())
        .await
        .unwrap_err();
    assert!(matches!(e, HookError::TooMuchOutput), "{e}");
}

#[test]
fn malformed_output_is_refused_without_its_content() {
    for (out, expected) in [
        (&br#"{"bearerToken": "sekrit-value"#[..], "not JSON"),
        (br#"["sekrit-value"]"#, "JSON object"),
        (
            br#"{"bearer_token": "sekrit-value"}"#,
            "unknown field \"bearer_token\"",
        ),
        (br#"{"bearerToken": 12345678}"#, "not a string"),
        (br#"{"caData": "sekrit-value!"}"#, "not base64"),
        (br#"{"certData": "Q0E="}"#, "go together"),
        (br#"{"bearerToken": " "}"#, "empty"),
        (b"\xff", "UTF-8"),
    ] {
        let e = Overrides::parse(out).unwrap_err().to_string();
        assert!(e.contains(expected), "{e}");
        assert!(!e.contains("sekrit") && !e.contains("12345678"), "{e}");
    }
}

#[test]
fn stdout_values_are_redacted_from_stderr() {
    let secrets = output::secrets(br#"{"bearerToken": "eyJhbGciOi.sekrit", "caData": "Q0E="}"#);
    assert!(secrets.contains(&"eyJhbGciOi.sekrit".to_string()));
    // Too short to redact without mangling ordinary text.
    assert!(!secrets.contains(&"Q0E=".to_string()));
}
