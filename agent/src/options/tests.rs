use super::*;

fn flags(args: &[&str]) -> Flags {
    let mut argv = vec!["agent", "--name", "member", "--token", "t0k"];
    argv.extend_from_slice(args);
    Flags::try_parse_from(argv).unwrap()
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn check(args: &[&str]) -> anyhow::Result<Config> {
    flags(args).check(&no_env)
}

fn err(args: &[&str]) -> String {
    format!("{:#}", check(args).unwrap_err())
}

#[test]
fn defaults_are_towers() {
    let config = check(&[]).unwrap();
    assert_eq!(config.name, "member");
    assert_eq!(config.keepalive, Duration::from_secs(30));
    assert_eq!(config.max_retry, None);
    assert_eq!(config.max_retry_interval, Duration::from_secs(120));
    assert_eq!(config.kubernetes_service, None);
    assert_eq!(config.kubesphere_service, DEFAULT_KUBESPHERE_SERVICE);
    assert_eq!(config.dialer.endpoint().url(), "ws://127.0.0.1:8080/");
}

#[test]
fn service_with_a_scheme_is_a_clear_error() {
    let e = err(&["--kubesphere-service", "http://ks-apiserver:80"]);
    assert!(e.contains("--kubesphere-service"), "{e}");
    assert!(e.contains("scheme"), "{e}");
    assert!(e.contains("HOST:PORT"), "{e}");
}

#[test]
fn service_without_a_port_is_a_clear_error() {
    let e = err(&["--kubesphere-service", "ks-apiserver.kubesphere-system.svc"]);
    assert!(
        e.contains("--kubesphere-service") && e.contains("no port"),
        "{e}"
    );
    let e = err(&["--kubernetes-service", "10.0.0.1:https"]);
    assert!(
        e.contains("--kubernetes-service") && e.contains("not a port"),
        "{e}"
    );
    let e = err(&["--kubernetes-service", "10.0.0.1:0"]);
    assert!(e.contains("not a port"), "{e}");
}

#[test]
fn ipv6_services_need_brackets() {
    let config = check(&[
        "--kubernetes-service",
        "[::1]:6443",
        "--kubesphere-service",
        "[fd00::1]:80",
    ])
    .unwrap();
    assert_eq!(config.kubernetes_service.as_deref(), Some("[::1]:6443"));
    assert_eq!(config.kubesphere_service, "[fd00::1]:80");
    let e = err(&["--kubernetes-service", "::1:6443"]);
    assert!(e.contains("brackets"), "{e}");
    let e = err(&["--kubernetes-service", "[::1]"]);
    assert!(e.contains("no port"), "{e}");
    let e = err(&["--kubernetes-service", "[nothost]:1"]);
    assert!(e.contains("not an IPv6"), "{e}");
}

#[test]
fn hub_listen() {
    let config = check(&["--hub-listen", "hub-api=127.0.0.1:6443"]).unwrap();
    assert_eq!(config.hub_listen[0].service, "hub-api");
    assert_eq!(config.hub_listen[0].addr.port(), 6443);
    let e = err(&["--hub-listen=a=127.0.0.1:1", "--hub-listen=a=127.0.0.1:2"]);
    assert!(e.contains("--hub-listen a") && e.contains("twice"), "{e}");
    for (value, says) in [("hub-api", "NAME=ADDR"), ("hub-api=h:1", "IP:PORT")] {
        let e = Flags::try_parse_from(["agent", "--name", "a", "--hub-listen", value])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--hub-listen") && e.contains(says), "{e}");
    }
}

#[test]
fn bootstrap_token_replaces_token_and_name() {
    let config = Flags::try_parse_from(["agent", "--bootstrap-token", "abcdef.0123456789abcdef"])
        .unwrap()
        .check(&|_| None)
        .unwrap();
    assert_eq!(config.name, "");
    assert_eq!(
        config.bootstrap_token.as_deref(),
        Some("abcdef.0123456789abcdef")
    );
    assert_eq!(config.token.read().unwrap(), "");
    for bad in [
        "abcdef",
        "ABCDEF.0123456789abcdef",
        "abcdef.0123456789abcde",
    ] {
        let e = Flags::try_parse_from(["agent", "--name=a", "--bootstrap-token", bad])
            .unwrap()
            .check(&|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[a-z0-9]{6}.[a-z0-9]{16}"), "{bad}: {e}");
    }
    let e = Flags::try_parse_from(["agent", "--token=t"])
        .unwrap()
        .check(&|_| None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--name is required"), "{e}");
}

#[test]
fn token_once() {
    let e = Flags::try_parse_from(["agent", "--name", "a"])
        .unwrap()
        .check(&no_env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token is required"), "{e}");
    let e = err(&["--token-file", "/nonexistent"]);
    assert!(e.contains("not both"), "{e}");
}

#[test]
fn fingerprints_are_checked() {
    let good = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";
    let config = check(&["--proxy-host-key-fingerprint", good]).unwrap();
    assert_eq!(config.host_key_fingerprints, [good]);
    let padded = format!("{good}=");
    let config = check(&["--proxy-host-key-fingerprint", &padded]).unwrap();
    assert_eq!(config.host_key_fingerprints, [good]);
    // Repeatable: a set, duplicates folded.
    let next = "SHA256:ypeBEsobvcr6wjGzmiPcTaeG7/gUfE5yuYB3ha/uSLs";
    let config = check(&[
        "--proxy-host-key-fingerprint",
        good,
        "--proxy-host-key-fingerprint",
        next,
        "--proxy-host-key-fingerprint",
        &padded,
    ])
    .unwrap();
    assert_eq!(config.host_key_fingerprints, [good, next]);
    let e = err(&["--proxy-host-key-fingerprint", "MD5:aa:bb"]);
    assert!(e.contains("SHA256:"), "{e}");
    let e = err(&["--proxy-host-key-fingerprint", "SHA256:short"]);
    assert!(e.contains("not a SHA-256"), "{e}");
}

#[test]
fn proxy_server_errors_name_the_flag() {
    let e = err(&["--proxy-server", "ftp://x"]);
    assert!(e.contains("--proxy-server"), "{e}");
}

/// KubeSphere's agent Deployment, word for word.
const KUBESPHERE_AGENT_LINE: [&str; 8] = [
    "agent",
    "--name=alpha",
    "--token=abc",
    "--proxy-server=http://127.0.0.1:8080",
    "--keepalive=10s",
    "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80",
    "--kubernetes-service=kubernetes.default.svc:443",
    "--v=0",
];

#[test]
fn kubesphere_agent_command_line_is_accepted() {
    let flags = Flags::try_parse_from(KUBESPHERE_AGENT_LINE).unwrap();
    assert_eq!(flags.klog.v, Some(0));
    let config = flags.check(&no_env).unwrap();
    assert_eq!(config.name, "alpha");
    assert_eq!(config.dialer.endpoint().url(), "ws://127.0.0.1:8080/");
    assert_eq!(config.keepalive, Duration::from_secs(10));
    assert_eq!(
        config.kubernetes_service.as_deref(),
        Some("kubernetes.default.svc:443")
    );
    assert_eq!(
        config.kubesphere_service,
        "ks-apiserver.kubesphere-system.svc:80"
    );
}

#[test]
fn every_go_tower_agent_flag_in_pflag_syntax() {
    let flags = Flags::try_parse_from([
        "agent",
        "--name=alpha",
        "--token=abc",
        "--proxy-server=https://tower.example:8443",
        "--keepalive=1m30s",
        "--max-retry=5",
        "--max-retry-interval=1.5m",
        "--kubernetes-service=[fd00::1]:6443",
        "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80",
        "--kubeconfig=/etc/member/kubeconfig",
        "--v=4",
        "--vmodule=proxy=2",
        "--logtostderr=true",
        "--alsologtostderr=false",
        "--log-dir=/var/log",
        "--log-file=/var/log/agent.log",
        "--log-file-max-size=1800",
        "--skip-headers",
        "--skip-log-headers=false",
        "--stderrthreshold=2",
        "--add-dir-header",
        "--log-backtrace-at=agent.go:42",
        "--one-output=true",
    ])
    .unwrap();
    assert_eq!(flags.klog.v, Some(4));
    assert_eq!(flags.klog.logtostderr, Some(true));
    assert_eq!(flags.klog.without_effect().len(), 8);
    let config = flags.check(&no_env).unwrap();
    assert_eq!(config.keepalive, Duration::from_secs(90));
    assert_eq!(config.max_retry, Some(5));
    assert_eq!(config.max_retry_interval, Duration::from_secs(90));
    assert_eq!(config.kubernetes_service.as_deref(), Some("[fd00::1]:6443"));
    assert!(matches!(
        config.credentials,
        CredentialSource::Kubeconfig { .. }
    ));
    assert_eq!(config.dialer.endpoint().url(), "wss://tower.example:8443/");
}

#[test]
fn klog_short_forms_and_version_coexist() {
    for v in [&["-v", "4"][..], &["-v4"], &["-v=4"], &["--v", "4"]] {
        let mut argv = vec!["agent", "--name=a", "--token=t"];
        argv.extend_from_slice(v);
        assert_eq!(
            Flags::try_parse_from(argv).unwrap().klog.v,
            Some(4),
            "{v:?}"
        );
    }
    let e = Flags::try_parse_from(["agent", "-V"]).unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
}

#[test]
fn a_bad_duration_names_the_flag() {
    let e =
        Flags::try_parse_from(["agent", "--name=a", "--token=t", "--keepalive=soon"]).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let e = e.to_string();
    assert!(e.contains("--keepalive"), "{e}");
    assert!(e.contains("is not a duration like 30s"), "{e}");
}

#[test]
fn zero_durations_are_refused() {
    assert!(err(&["--keepalive", "0"]).contains("--keepalive"));
    assert!(err(&["--max-retry-interval", "0s"]).contains("--max-retry-interval"));
    assert!(err(&["--hook-timeout", "0s"]).contains("--hook-timeout"));
}

#[test]
fn hooks_share_the_timeout() {
    let config = check(&[]).unwrap();
    assert!(config.pre_start_hook.is_none() && config.post_start_hook.is_none());
    let config = check(&[
        "--pre-start-hook=cat /run/creds.json",
        "--post-start-hook",
        "logger joined",
        "--hook-timeout=2s",
    ])
    .unwrap();
    let pre = config.pre_start_hook.unwrap();
    assert_eq!(pre.cmd, "cat /run/creds.json");
    assert_eq!(pre.timeout, Duration::from_secs(2));
    let post = config.post_start_hook.unwrap();
    assert_eq!(
        (post.cmd.as_str(), post.timeout),
        ("logger joined", pre.timeout)
    );
    assert!(err(&["--pre-start-hook", " "]).contains("--pre-start-hook is empty"));
    let config = check(&["--post-start-hook=true"]).unwrap();
    assert_eq!(
        config.post_start_hook.unwrap().timeout,
        Duration::from_secs(30)
    );
}
