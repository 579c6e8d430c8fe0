//! Go Tower's command lines, run unchanged against `bin/proxy` and `bin/agent`.
//!
//! Our binaries replace Go Tower's in KubeSphere's manifests, so the exact
//! argument lists those manifests carry must start them: pflag syntax
//! (`--keepalive=10s`), klog's flags (`--v=0`). These tests start the real
//! processes with such lines and check the outcome from outside: the proxy's
//! `/metrics` counts the agent's session, and a bad value is a usage error
//! (exit 2) whose message names the flag.
//!
//! The agent's tests need no Kubernetes: the proxy takes its clusters from
//! `--clusters-file`. The proxy's literal line runs against a real
//! kube-apiserver (it elects a leader and runs the Cluster workflow).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{
    KubeCluster, Proc, bin, clean_env, free_port, log_field, metric_sample, scrape_metrics,
    wait_for_ok, wait_until, workspace_root,
};
use tokio::process::Command;

const CLUSTER: &str = "alpha";
const TOKEN: &str = "e2e-cli-0d6f2b8a4c1e9f7352a0b4c6d8e1f3a5";
/// Upper bound for anything that takes seconds on an idle machine.
const SOON: Duration = Duration::from_secs(60);

/// `bin/proxy` with cluster alpha from `--clusters-file`; its agents' address.
async fn start_proxy(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let clusters = dir.join("clusters.json");
    std::fs::write(&clusters, format!(r#"{{"{CLUSTER}": "{TOKEN}"}}"#))?;
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(["--host", "127.0.0.1", "--port", "0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--clusters-file")
        .arg(&clusters);
    clean_env(&mut cmd);
    let proxy = Proc::spawn("proxy", cmd)?;
    let line = proxy
        .wait_for_line(|l| l.contains("listening for agents"), SOON)
        .await?;
    let addr = log_field(&line, "addr")
        .context("no addr= in the listening line")?
        .parse()?;
    Ok((proxy, addr))
}

/// KubeSphere's agent arguments (its Deployment's `args`), word for word.
fn kubesphere_agent_args(proxy: SocketAddr) -> Vec<String> {
    [
        "--name=alpha".to_string(),
        format!("--token={TOKEN}"),
        format!("--proxy-server=http://{proxy}"),
        "--keepalive=10s".to_string(),
        "--kubesphere-service=ks-apiserver.kubesphere-system.svc:80".to_string(),
        "--kubernetes-service=kubernetes.default.svc:443".to_string(),
        "--v=0".to_string(),
    ]
    .into()
}

/// Waits until the proxy's /metrics shows `n` sessions of alpha.
async fn wait_sessions(proxy: &Proc, addr: SocketAddr, n: f64) -> Result<()> {
    let prefix = format!("tower_agent_sessions{{cluster=\"{CLUSTER}\"}} ");
    wait_until(SOON, || async {
        scrape_metrics("127.0.0.1", addr.port())
            .await
            .is_ok_and(|m| metric_sample(&m, &prefix) == n)
    })
    .await
    .with_context(|| {
        format!(
            "/metrics never showed {n} session(s) of {CLUSTER}; last proxy lines:\n{}",
            proxy.tail(30)
        )
    })
}

#[tokio::test]
async fn kubesphere_agent_command_line_connects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (proxy, addr) = start_proxy(dir.path()).await?;

    let mut cmd = Command::new(bin("agent"));
    cmd.args(kubesphere_agent_args(addr));
    clean_env(&mut cmd);
    let agent = Proc::spawn("agent", cmd)?;
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    wait_sessions(&proxy, addr, 1.0).await?;
    // --v=0 is info: no debug lines, and no note about ignored flags.
    let lines = agent.lines();
    ensure!(
        !lines
            .iter()
            .any(|l| l.contains("DEBUG") || l.contains("ignoring")),
        "unexpected lines at --v=0:\n{}",
        agent.tail(40)
    );
    Ok(())
}

/// Whether this machine is one where glibc's `rep movsb` copies are slow
/// (`tunnel/src/glibc.rs`): an AMD CPU with FSRM, glibc before 2.39. Read
/// from /proc/cpuinfo, not with the code under test.
fn slow_rep_movsb_here() -> Result<bool> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let amd = cpuinfo
        .lines()
        .any(|l| l.starts_with("vendor_id") && l.contains("AuthenticAMD"));
    let fsrm = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "fsrm"));
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let version = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) }.to_str()?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    Ok(cfg!(target_arch = "x86_64") && amd && fsrm && (major, minor) < (2, 39))
}

/// `GLIBC_TUNABLES` in the environment a running process has now.
fn tunables_of(proc: &Proc) -> Result<Option<String>> {
    let environ = std::fs::read(format!("/proc/{}/environ", proc.pid()))?;
    Ok(environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"GLIBC_TUNABLES="))
        .map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// On a CPU whose `rep movsb` is slow for some alignments, with a glibc that
/// uses it for the tunnel's copies, both binaries start themselves again
/// with glibc's threshold for it raised (`tunnel/src/glibc.rs`); elsewhere,
/// and when the user set that threshold, their environment is as given.
#[tokio::test]
async fn where_rep_movsb_is_slow_both_binaries_start_again_without_it() -> Result<()> {
    const OURS: &str = "glibc.cpu.x86_rep_movsb_threshold=2097152";
    let slow = slow_rep_movsb_here()?;
    let dir = tempfile::tempdir()?;
    let (proxy, addr) = start_proxy(dir.path()).await?;
    let agent = |tunables: Option<&str>| -> Result<Proc> {
        let mut cmd = Command::new(bin("agent"));
        cmd.args(kubesphere_agent_args(addr));
        clean_env(&mut cmd);
        if let Some(t) = tunables {
            cmd.env("GLIBC_TUNABLES", t);
        }
        Proc::spawn("agent", cmd)
    };
    let plain = agent(None)?;
    plain
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    for (name, p) in [("proxy", &proxy), ("agent", &plain)] {
        let expected = slow.then(|| OURS.to_string());
        ensure!(
            tunables_of(p)? == expected,
            "{name}'s GLIBC_TUNABLES is {:?}, expected {expected:?} (slow rep movsb here: {slow})",
            tunables_of(p)?
        );
        ensure!(
            p.lines()
                .iter()
                .any(|l| l.contains("started again with this GLIBC_TUNABLES entry"))
                == slow,
            "{name} should say it started again only where rep movsb is slow:\n{}",
            p.tail(10)
        );
    }
    drop(plain);
    // The user's own threshold wins, and their other tunables stay.
    let theirs = "glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=4096";
    let own = agent(Some(theirs))?;
    own.wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    // (glibc cuts its own copy of the variable at the first colon, so the
    // process's environment shows the first entry only.)
    let shown = tunables_of(&own)?.unwrap_or_default();
    ensure!(
        theirs.starts_with(&shown) && !shown.is_empty(),
        "the user's GLIBC_TUNABLES became {shown:?}"
    );
    ensure!(
        !own.lines()
            .iter()
            .any(|l| l.contains("started again with this GLIBC_TUNABLES entry")),
        "the agent started again though the user set the threshold:\n{}",
        own.tail(10)
    );
    Ok(())
}

#[tokio::test]
async fn every_klog_flag_is_accepted_and_log_file_is_used() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (proxy, addr) = start_proxy(dir.path()).await?;

    let log_file = dir.path().join("agent.log");
    let mut cmd = Command::new(bin("agent"));
    cmd.args(kubesphere_agent_args(addr))
        .args([
            "-v",
            "2",
            "--vmodule=run=4",
            "--logtostderr=false",
            "--alsologtostderr",
            "--log-dir",
            "/var/log/tower",
        ])
        .arg(format!("--log-file={}", log_file.display()))
        .args([
            "--log-file-max-size=1800",
            "--skip-headers",
            "--skip-log-headers=true",
            "--stderrthreshold=ERROR",
            "--add-dir-header=false",
            "--log-backtrace-at=agent.go:1",
            "--one-output",
        ]);
    clean_env(&mut cmd);
    let agent = Proc::spawn("agent", cmd)?;
    // --alsologtostderr: the lines reach stderr as well as the file.
    agent
        .wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    wait_sessions(&proxy, addr, 1.0).await?;
    let text = wait_for_ok(SOON, || async {
        let text = std::fs::read_to_string(&log_file)?;
        ensure!(text.contains("connected to proxy"), "not in the file yet");
        Ok(text)
    })
    .await?;
    // The flags with no effect are named once, in the start-up log.
    let notes: Vec<&str> = text.lines().filter(|l| l.contains("ignoring")).collect();
    ensure!(notes.len() == 1, "expected one note, got:\n{text}");
    for flag in ["--vmodule", "--log-dir", "--skip-headers", "--one-output"] {
        ensure!(notes[0].contains(flag), "{flag} not named: {}", notes[0]);
    }
    Ok(())
}

/// Runs `bin/agent` with `args` to completion; (exit code, stderr).
async fn agent_fails(args: &[&str]) -> Result<(Option<i32>, String)> {
    let mut cmd = Command::new(bin("agent"));
    cmd.args(args).kill_on_drop(true);
    clean_env(&mut cmd);
    let out = tokio::time::timeout(SOON, cmd.output())
        .await
        .context("the agent did not exit")??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn bad_values_exit_2_naming_the_flag() -> Result<()> {
    let base = [
        "--name=alpha",
        "--token=abc",
        "--proxy-server=http://127.0.0.1:9",
    ];

    let (code, stderr) = agent_fails(&[&base[..], &["--keepalive=soon"]].concat()).await?;
    ensure!(code == Some(2), "exit {code:?}, stderr:\n{stderr}");
    ensure!(stderr.contains("--keepalive"), "{stderr}");
    ensure!(stderr.contains("not a duration"), "{stderr}");

    let (code, stderr) = agent_fails(&[&base[..], &["--logtostderr=maybe"]].concat()).await?;
    ensure!(code == Some(2), "exit {code:?}, stderr:\n{stderr}");
    ensure!(stderr.contains("--logtostderr"), "{stderr}");

    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("no-such-dir").join("agent.log");
    let log_file = format!("--log-file={}", missing.display());
    let (code, stderr) =
        agent_fails(&[&base[..], &["--logtostderr=false", &log_file]].concat()).await?;
    ensure!(code == Some(2), "exit {code:?}, stderr:\n{stderr}");
    ensure!(stderr.contains("--log-file"), "{stderr}");
    Ok(())
}

/// KubeSphere's proxy arguments (its Deployment's `args`), word for word.
fn kubesphere_proxy_args(ca_dir: &Path) -> Vec<String> {
    vec![
        format!("--ca-cert={}", ca_dir.join("ca.crt").display()),
        format!("--ca-key={}", ca_dir.join("ca.key").display()),
        "--v=4".to_string(),
        "--leader-elect=true".to_string(),
    ]
}

#[tokio::test]
async fn kubesphere_proxy_command_line_leads_and_serves_clusters() -> Result<()> {
    const NS: &str = "kubesphere-system";
    let host = KubeCluster::start("host").await?;
    let dir = tempfile::tempdir()?;
    // The CA as an operator makes it for --ca-cert/--ca-key.
    let ca_dir = dir.path().join("ca");
    let made = std::process::Command::new(workspace_root().join("certs/gen-ca.sh"))
        .arg(&ca_dir)
        .output()?;
    ensure!(made.status.success(), "certs/gen-ca.sh: {made:?}");
    host.install_crd()?;
    host.kubectl_ok(&["create", "ns", NS]);

    // The literal line, plus what a pod has and a process on this machine
    // lacks: the host cluster's kubeconfig, the downward-API names, and
    // ports of its own.
    let mut cmd = Command::new(bin("proxy"));
    cmd.args(kubesphere_proxy_args(&ca_dir))
        .arg(format!("--kubeconfig={}", host.kubeconfig().display()))
        .args(["--host", "127.0.0.1", "--port", &free_port().to_string()])
        .args(["--peer-port", &free_port().to_string()])
        .args(["--advertise-address", "127.0.0.1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("POD_NAME", "tower-0")
        .env("POD_NAMESPACE", NS);
    let first = 21000 + (std::process::id() % 1900) as u16;
    cmd.args(["--cluster-ports", &format!("{first}-{}", first + 9)]);
    clean_env(&mut cmd);
    let proxy = Proc::spawn("proxy", cmd)?;
    proxy
        .wait_for_line(|l| l.contains("listening for agents"), SOON)
        .await?;
    // --leader-elect=true: this replica takes Tower's Lease under its pod name.
    let get = |args: &[&str]| String::from_utf8_lossy(&host.kubectl(args).stdout).into_owned();
    wait_until(SOON, || async {
        get(&[
            "get",
            "lease",
            "-n",
            NS,
            "tower",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]) == "tower-0"
    })
    .await
    .context("the proxy never took the leader Lease")?;
    // ...and leads: a new Cluster gets a token and its ports.
    let cluster_file = dir.path().join("alpha.json");
    std::fs::write(
        &cluster_file,
        r#"{"apiVersion":"cluster.kubesphere.io/v1alpha1","kind":"Cluster","metadata":{"name":"alpha"},"spec":{"joinFederation":true,"connection":{"type":"proxy"}}}"#,
    )?;
    host.kubectl_ok(&["create", "-f", &cluster_file.to_string_lossy()]);
    wait_until(SOON, || async {
        let port = get(&[
            "get",
            "cluster",
            "alpha",
            "-o",
            "jsonpath={.spec.connection.kubernetesAPIServerPort}",
        ]);
        port == first.to_string()
    })
    .await
    .context("the Cluster got no port")?;
    // --v=4 is debug; the CA came from the files, not from a generated one.
    ensure!(
        proxy.lines().iter().any(|l| l.contains("DEBUG")),
        "no debug lines at --v=4:\n{}",
        proxy.tail(20)
    );
    let secret = get(&[
        "get",
        "secret",
        "-n",
        NS,
        "tower-proxy",
        "-o",
        "jsonpath={.data}",
    ]);
    ensure!(
        !secret.contains("ca.crt"),
        "a CA was generated despite --ca-cert: {secret}"
    );
    Ok(())
}

#[tokio::test]
async fn proxy_bad_flags_exit_2_before_any_network_io() -> Result<()> {
    // A host cluster where nothing listens: a check that ran only after
    // connecting would fail with a connection error, or retry; these fail at
    // once, exit 2, naming the flag.
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:9'}\n\
         contexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\n\
         users:\n- name: u\n  user: {token: t}\n",
    )?;
    for (args, flag) in [
        (&["--service-selector=app"][..], "--service-selector"),
        (&["--host=localhost"][..], "--host"),
        (&["--leader-elect=maybe"][..], "--leader-elect"),
        (
            &[
                "--ca-cert=/nonexistent/ca.crt",
                "--ca-key=/nonexistent/ca.key",
            ][..],
            "--ca-cert",
        ),
        (&["--shutdown-grace=soon"][..], "--shutdown-grace"),
        (
            &["--max-handshakes-per-source-per-second=-1"][..],
            "--max-handshakes-per-source-per-second",
        ),
        (&["--v=x"][..], "--v"),
        (&["--audit-log="][..], "--audit-log"),
        (
            &["--audit-log=/nonexistent/dir/audit.log"][..],
            "--audit-log",
        ),
        (
            &[
                "--aggregated-api-port=9443",
                "--aggregated-api-service=tower-api",
            ][..],
            "--aggregated-api-service",
        ),
        (
            &["--aggregated-api-service=kubesphere-system/tower-api"][..],
            "--aggregated-api-service",
        ),
    ] {
        let mut cmd = Command::new(bin("proxy"));
        cmd.args(args)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .kill_on_drop(true);
        clean_env(&mut cmd);
        let out = tokio::time::timeout(SOON, cmd.output())
            .await
            .context("the proxy did not exit")??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2),
            "{args:?}: exit {:?}\n{stderr}",
            out.status
        );
        ensure!(
            stderr.contains(flag),
            "{args:?}: {flag} not named:\n{stderr}"
        );
    }
    Ok(())
}
