//! Flags as users write them, Go Tower's command lines first.

use std::path::Path;

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn host() -> Option<String> {
    Some("tower-0".into())
}

fn parse(args: &[&str]) -> Flags {
    Flags::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn check(args: &[&str]) -> anyhow::Result<Config> {
    parse(args).check(&no_env, &host)
}

fn err(args: &[&str]) -> String {
    match check(args) {
        Ok(_) => panic!("{args:?} was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

/// A CA written to `dir` as ca.crt and ca.key.
fn ca_files(dir: &Path) -> (String, String) {
    let ca = Ca::generate().unwrap();
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    std::fs::write(&cert, ca.cert_pem()).unwrap();
    std::fs::write(&key, ca.key_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

/// A one-cluster `--clusters-file` in `dir`: the file and its flag.
fn clusters_file(dir: &Path) -> (std::path::PathBuf, String) {
    let file = dir.join("clusters.json");
    std::fs::write(&file, r#"{"alpha": "t"}"#).unwrap();
    let flag = format!("--clusters-file={}", file.display());
    (file, flag)
}

#[test]
fn kubespheres_proxy_command_line_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca_files(dir.path());
    let (cert, key) = (format!("--ca-cert={cert}"), format!("--ca-key={key}"));
    // As KubeSphere's manifests start Go Tower.
    let flags = parse(&[&cert, &key, "--v=4", "--leader-elect=true"]);
    assert_eq!(flags.klog.v, Some(4));
    let config = flags
        .check(&|n| (n == "POD_IP").then(|| "10.0.0.5".into()), &host)
        .unwrap();
    assert!(config.ca.is_some());
    let ha = config.ha.unwrap();
    assert_eq!(ha.replica, "tower-0");
    assert_eq!(ha.peer_address, "10.0.0.5:8443");
}

#[test]
fn go_booleans() {
    for (args, want) in [
        (&[][..], false),
        (&["--leader-elect"][..], true),
        (&["--leader-elect=true"][..], true),
        (&["--leader-elect=false"][..], false),
        (&["--leader-elect=1"][..], true),
    ] {
        assert_eq!(parse(args).leader_elect, want, "{args:?}");
    }
    let e = Flags::try_parse_from(["proxy", "--leader-elect=maybe"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--leader-elect"), "{e}");
}

#[test]
fn every_klog_flag_of_go_tower_is_accepted() {
    let flags = parse(&[
        "-v",
        "2",
        "--vmodule=proxy=4",
        "--logtostderr=true",
        "--alsologtostderr",
        "--log-dir=/tmp",
        "--log-file-max-size=1800",
        "--skip-headers=false",
        "--skip-log-headers",
        "--stderrthreshold=ERROR",
        "--add-dir-header=false",
        "--log-backtrace-at=proxy.go:10",
        "--one-output=true",
        "--leader-elect-renew-deadline=15s",
        "--leader-elect-retry-period=5s",
    ]);
    assert_eq!(flags.klog.v, Some(2));
    assert_eq!(
        flags.without_effect(),
        [
            "--leader-elect-renew-deadline",
            "--leader-elect-retry-period"
        ]
    );
    check(&["-v=5", "--logtostderr"]).unwrap();
}

#[test]
fn go_durations() {
    let config = check(&[
        "--keepalive=1h30m",
        "--shutdown-grace=90s",
        "--leader-elect-lease-duration=1m",
    ])
    .unwrap();
    assert_eq!(config.keepalive, Duration::from_secs(5400));
    assert_eq!(config.shutdown_grace, Duration::from_secs(90));
    assert!(err(&["--keepalive=0s"]).contains("--keepalive must be longer than 0s"));
    assert_eq!(
        check(&[]).unwrap().clusters.status_update_frequency,
        crate::clusters::status::DEFAULT_FREQUENCY
    );
    let config = check(&["--cluster-status-update-frequency=2s"]).unwrap();
    assert_eq!(
        config.clusters.status_update_frequency,
        Duration::from_secs(2)
    );
    assert!(
        err(&["--cluster-status-update-frequency=0"])
            .contains("--cluster-status-update-frequency must be longer than 0s")
    );
    let e = Flags::try_parse_from(["proxy", "--keepalive=soon"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--keepalive") && e.contains("not a duration"),
        "{e}"
    );
}

#[test]
fn bad_flags_are_refused_before_any_network_io_naming_the_flag() {
    assert!(err(&["--host=localhost"]).contains("--host \"localhost\" must be an IP"));
    assert!(err(&["--service-selector=app"]).contains("--service-selector"));
    assert!(err(&["--service-selector=app=,x=y"]).contains("KEY=VALUE"));
    assert!(err(&["--ca-cert=/nonexistent.crt"]).contains("--ca-cert and --ca-key go together"));
    let e = err(&["--ca-cert=/nonexistent.crt", "--ca-key=/nonexistent.key"]);
    assert!(
        e.contains("--ca-cert /nonexistent.crt: cannot read it"),
        "{e}"
    );
    assert!(err(&["--kubeconfig=/nonexistent"]).contains("--kubeconfig /nonexistent"));
    assert!(err(&["--clusters-file=/nonexistent"]).contains("--clusters-file /nonexistent"));
    assert!(err(&["--publish-service-address=http://"]).contains("--publish-service-address"));
    let e = err(&["--leader-elect", "--replica-id=r1", "--peer-address=nohost"]);
    assert!(e.contains("--peer-address \"nohost\""), "{e}");
    // No name anywhere: the replica id is asked for.
    let e = parse(&["--leader-elect"])
        .check(&no_env, &|| None)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("--replica-id"), "{e:#}");
}

#[test]
fn a_garbage_ca_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("ca.crt");
    std::fs::write(&cert, "not a certificate").unwrap();
    let arg = format!("--ca-cert={}", cert.display());
    let key = format!("--ca-key={}", cert.display());
    assert!(err(&[&arg, &key]).contains("not a usable CA certificate and key"));
}

#[test]
fn the_publish_service_address_is_what_agents_dial() {
    let url = |a: &str| {
        check(&[&format!("--publish-service-address={a}")])
            .unwrap()
            .publish_url
    };
    assert_eq!(
        url("tower.example.com").as_deref(),
        Some("http://tower.example.com:8080")
    );
    assert_eq!(
        url("10.0.0.1:30080").as_deref(),
        Some("http://10.0.0.1:30080")
    );
    assert_eq!(url("fd00::1").as_deref(), Some("http://[fd00::1]:8080"));
    assert_eq!(
        url("https://tower.example.com/").as_deref(),
        Some("https://tower.example.com")
    );
    assert_eq!(check(&[]).unwrap().publish_url, None);
}

#[test]
fn forwards_and_port_ranges() {
    assert_eq!(
        parse_forward("alpha=127.0.0.1:7443"),
        Ok(("alpha".to_string(), "127.0.0.1:7443".parse().unwrap()))
    );
    assert!(parse_forward("alpha").unwrap_err().contains("NAME=ADDR"));
    assert!(
        parse_forward("alpha=nohost")
            .unwrap_err()
            .contains("IP:PORT")
    );
    assert_eq!(parse_port_range("16000-16999"), Ok(16000..17000));
    assert!(
        parse_port_range("16000-60000")
            .unwrap_err()
            .contains("55535")
    );
}

#[test]
fn a_clusters_file_runs_without_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let (file, arg) = clusters_file(dir.path());
    assert!(matches!(check(&[&arg]).unwrap().mode, Mode::File(_)));
    assert!(err(&[&arg, "--leader-elect"]).contains("--leader-elect needs Kubernetes"));
    std::fs::write(&file, "[]").unwrap();
    assert!(err(&[&arg]).contains("JSON object"));
}

#[test]
fn the_connect_port_needs_a_ca_without_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let (file, arg) = clusters_file(dir.path());
    assert!(err(&[&arg, "--connect-port=0"]).contains("--connect-port needs the proxy CA"));
    let (cert, key) = ca_files(dir.path());
    let (cert, key) = (format!("--ca-cert={cert}"), format!("--ca-key={key}"));
    let config = check(&[&arg, &cert, &key, "--connect-port=0"]).unwrap();
    assert_eq!(config.connect_port, Some(0));
    // With Kubernetes the CA comes from the Secret.
    assert!(check(&["--connect-port=9443"]).is_ok());
    let e = err(&[&format!("--connect-socket-dir={}", file.display())]);
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn hub_services() {
    let config = check(&[
        "--hub-service=hub-api=10.0.0.1:6443",
        "--hub-service",
        "other=[fd00::1]:443",
    ])
    .unwrap();
    assert_eq!(config.hub_services["hub-api"], "10.0.0.1:6443");
    assert_eq!(config.hub_services["other"], "[fd00::1]:443");
    assert!(check(&[]).unwrap().hub_services.is_empty());
    let e = err(&["--hub-service=a=h:1", "--hub-service=a=h:2"]);
    assert!(e.contains("--hub-service a") && e.contains("twice"), "{e}");
    // Bad values are clap's errors, which name the flag.
    for (value, says) in [
        ("hub-api", "NAME=HOST:PORT"),
        ("hub-api=host", "HOST:PORT"),
        ("Hub=h:1", "DNS label"),
    ] {
        let e = Flags::try_parse_from(["proxy", "--hub-service", value])
            .err()
            .unwrap_or_else(|| panic!("{value} was accepted"))
            .to_string();
        assert!(e.contains("--hub-service") && e.contains(says), "{e}");
    }
}

#[test]
fn audit_log_file_stdout_or_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let flag = format!("--audit-log={}", path.display());
    assert!(matches!(
        check(&[&flag]).unwrap().audit_log,
        Some(crate::ops::audit::Output::File(_))
    ));
    assert!(path.exists(), "opened while checking the flags");
    assert!(matches!(
        check(&["--audit-log", "-"]).unwrap().audit_log,
        Some(crate::ops::audit::Output::Stdout)
    ));
    assert!(check(&[]).unwrap().audit_log.is_none());
    let e = err(&["--audit-log=/nonexistent/dir/audit.log"]);
    assert!(
        e.starts_with("--audit-log /nonexistent/dir/audit.log: cannot open"),
        "{e}"
    );
    let e = Flags::try_parse_from(["proxy", "--audit-log="])
        .unwrap_err()
        .to_string();
    assert!(e.contains("--audit-log"), "{e}");
}

#[test]
fn cluster_ports_are_a_range_by_default_or_none_with_the_access_port() {
    // The default: per-cluster ports, no path form, no access port.
    let config = check(&[]).unwrap();
    assert_eq!(config.clusters.ports, 16000..17000);
    assert_eq!(config.clusters.path_form, None);
    assert_eq!(config.access, None);

    // The access port alone adds the path form; kubeconfigs keep the ports.
    let config = check(&[
        "--access-port",
        "9443",
        "--advertise-address",
        "tower.example",
    ])
    .unwrap();
    assert_eq!(config.clusters.path_form, None);
    assert_eq!(
        config.access,
        Some(crate::serve::access::Options {
            port: 9443,
            names: vec!["tower.example".into()],
        })
    );

    // `none`: kubeconfigs point at the path form, at --advertise-address...
    let none = ["--cluster-ports", "none", "--access-port", "9443"];
    let config = check(&[&none[..], &["--advertise-address", "10.0.0.7"]].concat()).unwrap();
    let path = config.clusters.path_form.unwrap();
    assert_eq!(path.server("alpha"), "https://10.0.0.7:9443/clusters/alpha");
    assert!(config.clusters.ports.is_empty());
    // ...else at the host agents dial (--publish-service-address), which
    // the access port's certificate then names too.
    let config = check(
        &[
            &none[..],
            &["--publish-service-address", "https://[fd00::7]:8080/"],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(
        config.clusters.path_form.unwrap().server("beta"),
        "https://[fd00::7]:9443/clusters/beta"
    );
    assert_eq!(config.access.unwrap().names, ["fd00::7"]);
    let config = check(&[&none[..], &["--publish-service-address", "tower.example"]].concat());
    assert_eq!(
        config.unwrap().clusters.path_form.unwrap().address,
        "tower.example"
    );
}

#[test]
fn cluster_ports_none_says_what_it_needs() {
    let e = err(&["--cluster-ports", "none", "--advertise-address", "10.0.0.7"]);
    assert!(
        e.contains("--cluster-ports none needs --access-port"),
        "{e}"
    );
    let e = err(&["--cluster-ports", "none", "--access-port", "9443"]);
    assert!(
        e.contains("--cluster-ports none") && e.contains("--advertise-address"),
        "{e}"
    );
    let e = err(&[
        "--cluster-ports=none",
        "--access-port=0",
        "--advertise-address=10.0.0.7",
    ]);
    assert!(e.contains("fixed --access-port"), "{e}");
    for bad in ["None", "nothing", "16000", ""] {
        let e = Flags::try_parse_from(["proxy", "--cluster-ports", bad])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cluster-ports"), "{bad}: {e}");
    }
    // Without Kubernetes the CA must come from the flags.
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = clusters_file(dir.path());
    let e = err(&[&file, "--access-port=9443"]);
    assert!(e.contains("--access-port needs the proxy CA"), "{e}");
    let (cert, key) = ca_files(dir.path());
    let (cert, key) = (format!("--ca-cert={cert}"), format!("--ca-key={key}"));
    assert!(check(&[&file, "--access-port=9443", &cert, &key]).is_ok());
}

#[test]
fn request_bodies_are_paced_per_client_by_default_and_the_rate_takes_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (_, arg) = clusters_file(dir.path());
    assert_eq!(
        check(&[&arg]).unwrap().uploads,
        crate::ops::uploads::Limits::default()
    );
    let set = check(&[
        &arg,
        "--request-body-rate-per-source=512Ki",
        "--request-body-burst-per-source=4M",
    ])
    .unwrap();
    assert_eq!(set.uploads.rate, 512 << 10);
    assert_eq!(set.uploads.burst, 4_000_000);
    let off = check(&[&arg, "--request-body-rate-per-source=0"]).unwrap();
    assert!(crate::ops::uploads::Pacer::of(off.uploads).is_none());
    let e = Flags::try_parse_from(["proxy", "--request-body-rate-per-source=8MB"])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--request-body-rate-per-source") && e.contains("not a byte count"),
        "{e}"
    );
}
