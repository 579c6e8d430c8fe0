//! The HTTP CONNECT doors (issue #11, parts 1-3) with real processes:
//! `bin/proxy --connect-port --connect-socket-dir` and `bin/agent
//! --allow-dial`, curl as the CONNECT client where users run it, a real
//! kube-apiserver as the member.
//!
//! - excalibur case 1: curl through the mutual-TLS port reaches a
//!   `python3 -m http.server` on the agent's side once `--allow-dial` allows
//!   it; another port gets a 403 naming `--allow-dial`.
//! - cases 2 and 3: `CONNECT alpha:443` through the TLS port and through
//!   `alpha.sock` reaches the member's kube-apiserver; a client verifying the
//!   member's certificate with its own credentials lists its pods.
//! - bad input gets an answer with a reason; the socket follows the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use e2e::{
    KubeCluster, Proc, bin, clean_env, free_port, log_field, metric_sample, scrape_metrics,
    wait_until, workspace_root,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::Command;
use tokio_rustls::TlsConnector;

const SOON: Duration = Duration::from_secs(60);
const TOKEN: &str = "e2e-connect-5b7c9d1e3f5a7b9c1d3e5f7a9b1c3d5e";

/// The soft open-files limit the proxy and the agents start with here: the
/// usual default (1024) or lower, so the 1,000-stream test proves that they
/// raise it themselves.
const START_FD_LIMIT: u64 = 512;

/// Start `cmd` with [`START_FD_LIMIT`] as its soft open-files limit.
fn low_fd_limit(cmd: &mut Command) {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
            setrlimit(Resource::RLIMIT_NOFILE, START_FD_LIMIT.min(hard), hard)?;
            Ok(())
        });
    }
}

fn run(cmd: &mut std::process::Command) -> Result<std::process::Output> {
    let out = cmd.output()?;
    ensure!(out.status.success(), "{cmd:?}: {out:?}");
    Ok(out)
}

/// A client certificate from the proxy CA in `ca_dir`, CN `cn`.
fn client_cert(dir: &Path, ca_dir: &Path, cn: &str) -> Result<(PathBuf, PathBuf)> {
    let name = cn.replace(':', "-");
    let (key, csr, crt, ext) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.crt")),
        dir.join("client.ext"),
    );
    std::fs::write(&ext, "extendedKeyUsage=clientAuth\n")?;
    run(std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .args(["-subj", &format!("/CN={cn}")])
        .arg("-out")
        .arg(&csr))?;
    run(std::process::Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(ca_dir.join("ca.crt"))
        .arg("-CAkey")
        .arg(ca_dir.join("ca.key"))
        .arg("-out")
        .arg(&crt)
        .arg("-extfile")
        .arg(&ext))?;
    Ok((crt, key))
}

/// The proxy (clusters alpha and beta from a file, both doors) and an agent
/// of alpha; the member kube-apiserver when asked for.
struct Setup {
    dir: tempfile::TempDir,
    proxy: Proc,
    agent: Option<Proc>,
    agents_addr: std::net::SocketAddr,
    connect_addr: std::net::SocketAddr,
    member: Option<KubeCluster>,
    agent_args: Vec<String>,
}

impl Setup {
    async fn start(member: bool, allow_dial: &[String]) -> Result<Setup> {
        Self::start_with(member, allow_dial, &[]).await
    }

    /// The same with `proxy_args` added to the proxy's command line.
    async fn start_with(member: bool, allow_dial: &[String], proxy_args: &[&str]) -> Result<Setup> {
        let member = match member {
            true => Some(KubeCluster::start("member").await?),
            false => None,
        };
        let dir = tempfile::Builder::new()
            .prefix("tower-connect-")
            .tempdir()?;
        let ca = dir.path().join("ca");
        run(std::process::Command::new(workspace_root().join("certs/gen-ca.sh")).arg(&ca))?;
        let clusters = dir.path().join("clusters.json");
        std::fs::write(
            &clusters,
            format!(r#"{{"alpha": "{TOKEN}", "beta": "{TOKEN}-b"}}"#),
        )?;
        let mut cmd = Command::new(bin("proxy"));
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--connect-port", "0"])
            .arg("--clusters-file")
            .arg(&clusters)
            .arg("--ca-cert")
            .arg(ca.join("ca.crt"))
            .arg("--ca-key")
            .arg(ca.join("ca.key"))
            .arg("--connect-socket-dir")
            .arg(dir.path().join("sockets"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(proxy_args);
        clean_env(&mut cmd);
        low_fd_limit(&mut cmd);
        let proxy = Proc::spawn("proxy", cmd)?;
        let addr_in = |line: String| -> Result<std::net::SocketAddr> {
            Ok(log_field(&line, "addr")
                .context("no addr= in the line")?
                .parse()?)
        };
        let connect_addr = addr_in(
            proxy
                .wait_for_line(|l| l.contains("CONNECT port listening"), SOON)
                .await?,
        )?;
        let agents_addr = addr_in(
            proxy
                .wait_for_line(|l| l.contains("listening for agents"), SOON)
                .await?,
        )?;
        let mut agent_args = vec![
            "--name=alpha".to_string(),
            format!("--token={TOKEN}"),
            format!("--proxy-server=http://{agents_addr}"),
            "--kubesphere-service=127.0.0.1:9".to_string(),
            "--max-retry-interval=1s".to_string(),
        ];
        match &member {
            Some(m) => agent_args.push(format!("--kubeconfig={}", m.kubeconfig().display())),
            None => agent_args.push("--kubernetes-service=127.0.0.1:9".to_string()),
        }
        agent_args.extend(allow_dial.iter().map(|r| format!("--allow-dial={r}")));
        let mut setup = Setup {
            dir,
            proxy,
            agent: None,
            agents_addr,
            connect_addr,
            member,
            agent_args,
        };
        setup.start_agent().await?;
        Ok(setup)
    }

    async fn start_agent(&mut self) -> Result<()> {
        let mut cmd = Command::new(bin("agent"));
        cmd.args(&self.agent_args);
        clean_env(&mut cmd);
        low_fd_limit(&mut cmd);
        let agent = Proc::spawn("agent", cmd)?;
        agent
            .wait_for_line(|l| l.contains("connected to proxy"), SOON)
            .await?;
        self.agent = Some(agent);
        wait_until(SOON, || async { self.socket("alpha").exists() }).await
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn socket(&self, cluster: &str) -> PathBuf {
        self.dir
            .path()
            .join("sockets")
            .join(format!("{cluster}.sock"))
    }

    fn client_cert(&self, cn: &str) -> Result<(PathBuf, PathBuf)> {
        client_cert(self.dir.path(), &self.ca(), cn)
    }

    /// curl through the TLS door with the certificate of `cn`.
    async fn curl(&self, cn: &str, url: &str) -> Result<std::process::Output> {
        let (crt, key) = self.client_cert(cn)?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-v", "--max-time", "30", "-p", "--proxy"])
            .arg(format!("https://{}", self.connect_addr))
            .arg("--proxy-cacert")
            .arg(self.ca().join("ca.crt"))
            .arg("--proxy-cert")
            .arg(&crt)
            .arg("--proxy-key")
            .arg(&key)
            .arg(url)
            .kill_on_drop(true);
        clean_env(&mut cmd);
        Ok(cmd.output().await?)
    }

    /// A TLS connection to the door with the certificate of `cn`.
    async fn door(&self, cn: &str) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.connect_addr).await?;
        door_over(self.tls_client(cn)?, tcp).await
    }

    /// A TLS client with the certificate of `cn`, trusting the proxy's CA.
    fn tls_client(&self, cn: &str) -> Result<TlsConnector> {
        let (crt, key) = self.client_cert(cn)?;
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(self.ca().join("ca.crt"))?)?;
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(crt)?],
                PrivateKeyDer::from_pem_file(key)?,
            )?;
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// A TCP connection to the TLS door from `source` (127.0.0.x).
    async fn tcp_from(&self, source: std::net::Ipv4Addr) -> Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        Ok(socket.connect(self.connect_addr).await?)
    }

    async fn metric(&self, name: &str, labels: &str) -> Result<f64> {
        let text = scrape_metrics("127.0.0.1", self.agents_addr.port()).await?;
        Ok(metric_sample(&text, &format!("{name}{{{labels}}}")))
    }
}

/// The TLS handshake of `client` with the door over `tcp`.
async fn door_over(
    client: TlsConnector,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from("127.0.0.1")?;
    Ok(client.connect(name, tcp).await?)
}

/// Send `head` and read the answer: status line, body (up to EOF) or, for a
/// 200, nothing more.
async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    head: &[u8],
) -> Result<(u16, String)> {
    io.write_all(head).await?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(SOON, io.read(&mut byte)).await??;
        ensure!(
            n == 1,
            "the door closed without an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    if status == 200 {
        return Ok((status, text));
    }
    let mut body = String::new();
    tokio::time::timeout(SOON, io.read_to_string(&mut body)).await??;
    Ok((status, body))
}

/// Like kubectl: TLS to the member verified with its kubeconfig's CA and
/// client certificate, `GET path`; the answer's status line and body.
async fn member_get<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    kubeconfig: &Path,
    path: &str,
) -> Result<String> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cluster = config.clusters[0].cluster.as_ref().context("no cluster")?;
    let user = config.auth_infos[0].auth_info.as_ref().context("no user")?;
    let pem =
        |b64: Option<&String>| -> Result<Vec<u8>> { Ok(B64.decode(b64.context("missing data")?)?) };
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&pem(cluster
        .certificate_authority_data
        .as_ref())?)?)?;
    let key = user
        .client_key_data
        .as_ref()
        .map(|k| B64.decode(secrecy::ExposeSecret::expose_secret(k)))
        .transpose()?;
    let tls = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(&pem(user
                .client_certificate_data
                .as_ref())?)?],
            PrivateKeyDer::from_pem_slice(&key.context("no client key")?)?,
        )?;
    let server = cluster.server.as_deref().context("no server")?;
    let host = server
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map_or(server, |(h, _)| h)
        .to_string();
    let mut tls = TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from(host.clone())?, io)
        .await
        .context("TLS with the member kube-apiserver")?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, tls.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// `python3 -m http.server` on loopback, serving a file only it has.
async fn http_server(dir: &Path) -> Result<(Proc, u16)> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("hello-from-member.txt"), "hi\n")?;
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(&www);
    let server = Proc::spawn("http.server", cmd)?;
    wait_until(SOON, || async {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await?;
    Ok((server, port))
}

#[tokio::test]
async fn excalibur_case_1_an_allowed_address_through_curl() -> Result<()> {
    let scratch = tempfile::tempdir()?;
    let (_server, port) = http_server(scratch.path()).await?;
    let setup = Setup::start(false, &[format!("127.0.0.1:{port}")]).await?;

    let out = setup
        .curl("tower:alpha", &format!("http://127.0.0.1:{port}/"))
        .await?;
    let body = String::from_utf8_lossy(&out.stdout);
    ensure!(
        body.contains("hello-from-member.txt"),
        "no listing: {body}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A port the agent was not told to allow: refused by the agent, with the reason.
    let blocked = free_port();
    let out = setup
        .curl("tower:alpha", &format!("http://127.0.0.1:{blocked}/"))
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "curl went through to a blocked port");
    ensure!(stderr.contains("< HTTP/1.1 403"), "{stderr}");
    let mut door = setup.door("tower:alpha").await?;
    let (status, reason) = connect(
        &mut door,
        format!("CONNECT 127.0.0.1:{blocked} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await?;
    ensure!(
        status == 403 && reason.contains("--allow-dial"),
        "{status} {reason}"
    );

    ensure!(
        setup
            .metric(
                "tower_connect_streams_total",
                r#"door="tls",cluster="alpha""#
            )
            .await?
            >= 1.0
    );
    ensure!(
        setup
            .metric(
                "tower_connect_refusals_total",
                r#"door="tls",cluster="alpha",reason="not_allowed""#
            )
            .await?
            >= 2.0
    );
    Ok(())
}

#[tokio::test]
async fn excalibur_cases_2_and_3_the_members_pods_through_the_port_and_the_socket() -> Result<()> {
    let setup = Setup::start(true, &[]).await?;
    let kubeconfig = setup
        .member
        .as_ref()
        .context("member")?
        .kubeconfig()
        .to_path_buf();
    let path = "/api/v1/namespaces/kube-system/pods";

    // Case 2: the TLS port, the certificate the proxy would issue for alpha.
    let mut door = setup.door("tower:alpha").await?;
    let (status, _) = connect(
        &mut door,
        b"CONNECT alpha:443 HTTP/1.1\r\nHost: alpha:443\r\n\r\n",
    )
    .await?;
    ensure!(status == 200, "CONNECT alpha:443 -> {status}");
    let answer = member_get(door, &kubeconfig, path).await?;
    ensure!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("\"PodList\""),
        "{answer}"
    );

    // A certificate of the CA bound to no cluster names it in a header.
    let mut door = setup.door("ops-admin").await?;
    let (status, _) = connect(
        &mut door,
        b"CONNECT alpha:6443 HTTP/1.1\r\nTower-Cluster: alpha\r\n\r\n",
    )
    .await?;
    ensure!(
        status == 200,
        "unbound certificate with the header -> {status}"
    );
    let answer = member_get(door, &kubeconfig, path).await?;
    ensure!(answer.contains("\"PodList\""), "{answer}");

    // Case 3: the same over the cluster's Unix socket.
    let mut socket = UnixStream::connect(setup.socket("alpha")).await?;
    let (status, _) = connect(&mut socket, b"CONNECT alpha:443 HTTP/1.1\r\n\r\n").await?;
    ensure!(
        status == 200,
        "CONNECT alpha:443 over the socket -> {status}"
    );
    let answer = member_get(socket, &kubeconfig, path).await?;
    ensure!(answer.contains("\"PodList\""), "{answer}");
    ensure!(
        setup
            .metric(
                "tower_connect_streams_total",
                r#"door="unix",cluster="alpha""#
            )
            .await?
            >= 1.0
    );

    // The same as users write it: a client-go program with a dialer that
    // goes through the door (tests/kube-harness/cmd/connect-client).
    let member = setup.member.as_ref().context("member")?;
    // (No controller-manager here to create the namespace's ServiceAccount.)
    member.kubectl_ok(&["create", "serviceaccount", "default"]);
    member.kubectl_ok(&[
        "run",
        "box",
        "--image=registry.k8s.io/pause:3.10",
        "--restart=Never",
        "--overrides",
        r#"{"spec":{"automountServiceAccountToken":false}}"#,
    ]);
    let (crt, key) = setup.client_cert("tower:alpha")?;
    let go_client = |door: Vec<std::ffi::OsString>, authority: &str| {
        let mut cmd = Command::new(bin("connect-client"));
        cmd.arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg(format!("--authority={authority}"))
            .args(door)
            .kill_on_drop(true);
        clean_env(&mut cmd);
        cmd.output()
    };
    let through_port = || -> Vec<std::ffi::OsString> {
        vec![
            format!("--proxy={}", setup.connect_addr).into(),
            "--proxy-ca".into(),
            setup.ca().join("ca.crt").into(),
            "--proxy-cert".into(),
            crt.clone().into(),
            "--proxy-key".into(),
            key.clone().into(),
        ]
    };
    let through_socket = vec!["--proxy-socket".into(), setup.socket("alpha").into()];
    for (door, name) in [(through_port(), "port"), (through_socket, "socket")] {
        let out = go_client(door, "alpha:443").await?;
        ensure!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| l == "box"),
            "client-go through the {name}: {out:?}"
        );
    }
    // A target the agent does not allow: client-go's error carries the reason.
    let out = go_client(through_port(), "127.0.0.1:22").await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("403") && stderr.contains("--allow-dial"),
        "{out:?}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_a_reason_and_the_socket_follows_the_agent() -> Result<()> {
    let mut setup = Setup::start(false, &[]).await?;
    let alpha_sock = setup.socket("alpha");
    let ask = |head: Vec<u8>| {
        let socket = alpha_sock.clone();
        async move {
            let mut io = UnixStream::connect(socket).await?;
            connect(&mut io, &head).await
        }
    };
    for (head, want, words) in [
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), 405, "CONNECT host:port"),
        (
            b"CONNECT nohost HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "host:port",
        ),
        (
            format!("CONNECT a:1 HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(100_000)).into_bytes(),
            431,
            "larger than",
        ),
        (
            b"CONNECT a:1 HTTP/1.1\r\nTower-Cluster: beta\r\n\r\n".to_vec(),
            403,
            "\"alpha\" only",
        ),
        (
            b"CONNECT alpha:443 HTTP/1.1\r\n\r\n".to_vec(),
            502,
            "kube-apiserver",
        ),
    ] {
        let (status, body) = ask(head).await?;
        ensure!(
            status == want && body.contains(words),
            "want {want} with {words:?}: {status} {body}"
        );
    }
    // A client that half-closes before its head is complete still hears why.
    let mut io = UnixStream::connect(setup.socket("alpha")).await?;
    io.write_all(b"CONNECT a:1 HTTP/1.1\r\n").await?;
    io.shutdown().await?;
    let mut answer = String::new();
    tokio::time::timeout(SOON, io.read_to_string(&mut answer)).await??;
    ensure!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Through the TLS port: a certificate for alpha opens only alpha, an
    // unbound one must name a cluster the proxy serves.
    let mut door = setup.door("tower:alpha").await?;
    let (status, body) = connect(
        &mut door,
        b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nTower-Cluster: beta\r\n\r\n",
    )
    .await?;
    ensure!(status == 403, "{status} {body}");
    let mut door = setup.door("ops-admin").await?;
    let (status, body) = connect(&mut door, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n").await?;
    ensure!(
        status == 400 && body.contains("Tower-Cluster"),
        "{status} {body}"
    );
    let mut door = setup.door("ops-admin").await?;
    let (status, body) = connect(
        &mut door,
        b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nTower-Cluster: nope\r\n\r\n",
    )
    .await?;
    ensure!(status == 404, "{status} {body}");
    // beta is served but has no agent.
    let mut door = setup.door("tower:beta").await?;
    let (status, body) = connect(&mut door, b"CONNECT beta:443 HTTP/1.1\r\n\r\n").await?;
    ensure!(
        status == 503 && body.contains("no agent"),
        "{status} {body}"
    );
    ensure!(
        !setup.socket("beta").exists(),
        "beta has no agent, so no socket"
    );

    // The socket goes with the agent and comes back with it.
    let Some(mut agent) = setup.agent.take() else {
        bail!("no agent")
    };
    agent.terminate(Duration::from_secs(10)).await?;
    wait_until(SOON, || async { !setup.socket("alpha").exists() })
        .await
        .context("alpha.sock stayed after its agent left")?;
    setup.start_agent().await?;
    let (status, body) = ask(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await?;
    ensure!(status == 405, "{status} {body}");
    ensure!(setup.proxy.is_running(), "the proxy died");
    Ok(())
}

#[tokio::test]
async fn a_kube_apiservers_egress_selector_reaches_its_kubelet_through_the_socket() -> Result<()> {
    // The agent may dial the kubelet stand-in (loopback, any port).
    let mut setup = Setup::start(false, &["127.0.0.1/32:1-65535".to_string()]).await?;
    let egress = setup.dir.path().join("egress.yaml");
    std::fs::write(
        &egress,
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\n\
             egressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: HTTPConnect\n\
             \x20   transport:\n      uds:\n        udsName: {}\n",
            setup.socket("alpha").display()
        ),
    )?;
    let egress_arg = egress.display().to_string();
    let control_plane = KubeCluster::start_with_args(
        "egress",
        &["--kubelet", "--egress-selector-config-file", &egress_arg],
    )
    .await?;
    control_plane.run_pod("default", "box").await?;

    // logs and exec go from the kube-apiserver to the kubelet: only through
    // alpha.sock, the proxy and alpha's agent.
    // The container writes a log line every 100 ms from its start: the
    // first may not be there yet when the pod is marked Running.
    wait_until(SOON, || async {
        let out = control_plane.kubectl(&["logs", "box"]);
        out.status.success() && !out.stdout.is_empty()
    })
    .await
    .with_context(|| {
        let out = control_plane.kubectl(&["logs", "box"]);
        format!(
            "no logs through the socket: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let out = control_plane.kubectl_ok(&["exec", "box", "--", "sh", "-c", "echo via-the-tunnel"]);
    ensure!(out == "via-the-tunnel\n", "{out:?}");
    ensure!(
        setup
            .metric(
                "tower_connect_streams_total",
                r#"door="unix",cluster="alpha""#
            )
            .await?
            >= 2.0
    );

    // Without the agent there is no socket and no way to the kubelet.
    let Some(mut agent) = setup.agent.take() else {
        bail!("no agent")
    };
    agent.terminate(Duration::from_secs(10)).await?;
    wait_until(SOON, || async { !setup.socket("alpha").exists() }).await?;
    let failed = control_plane.kubectl(&["logs", "box"]);
    ensure!(
        !failed.status.success(),
        "logs without the tunnel: {failed:?}"
    );
    Ok(())
}

/// Refused targets of a Cluster become Warning Events on it, at most one
/// per minute per cluster (the next says how many it stands for), so a
/// client retrying in a loop cannot flood the host kube-apiserver.
#[tokio::test]
async fn refused_targets_are_events_on_the_cluster_and_rate_limited() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("tower-connect-events-")
        .tempdir()?;
    let sockets = dir.path().join("sockets");
    // (Tower's agent allows its two API servers; 127.0.0.1:9 is its
    // ks-apiserver, so ask for another port.)
    let tower = e2e::Tower::start_with(e2e::TowerOptions {
        kubelet: false,
        proxy_args: vec![format!("--connect-socket-dir={}", sockets.display())],
        ..Default::default()
    })
    .await?;
    let socket = sockets.join(format!("{}.sock", e2e::CLUSTER));
    wait_until(SOON, || async { socket.exists() }).await?;
    const TRIES: usize = 20;
    for _ in 0..TRIES {
        let mut io = UnixStream::connect(&socket).await?;
        let (status, body) = connect(&mut io, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n").await?;
        ensure!(
            status == 403 && body.contains("--allow-dial"),
            "{status} {body}"
        );
    }
    let refused = || -> Result<Vec<String>> {
        let text = tower.host().kubectl_ok(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!(
                "involvedObject.kind=Cluster,involvedObject.name={},reason=ConnectRefused",
                e2e::CLUSTER
            ),
            "-o",
            "json",
        ]);
        let list: e2e::k8s_openapi::serde_json::Value =
            e2e::k8s_openapi::serde_json::from_str(&text)?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["type"] == "Warning")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect())
    };
    e2e::wait_for_ok(SOON, || async {
        let seen = refused()?;
        ensure!(!seen.is_empty(), "no ConnectRefused event yet");
        Ok(())
    })
    .await?;
    let seen = refused()?;
    ensure!(
        seen[0].contains("127.0.0.1:22") && seen[0].contains("not_allowed"),
        "the event names the target and the reason: {seen:?}"
    );
    ensure!(
        seen.len() < TRIES,
        "{TRIES} refusals wrote {} events: not rate-limited",
        seen.len()
    );
    let text = scrape_metrics("127.0.0.1", tower.proxy_port()).await?;
    let refusals = metric_sample(
        &text,
        &format!(
            "tower_connect_refusals_total{{door=\"unix\",cluster=\"{}\",reason=\"not_allowed\"}}",
            e2e::CLUSTER
        ),
    );
    ensure!(
        refusals >= TRIES as f64,
        "metrics count every refusal: {refusals}"
    );
    Ok(())
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// One stream through alpha's socket to the echo server, proven by an echo.
async fn echo_stream(socket: &Path, target: &str, tag: usize) -> Result<UnixStream> {
    let mut io = UnixStream::connect(socket).await?;
    let (status, body) = connect(
        &mut io,
        format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await?;
    ensure!(status == 200, "stream {tag}: {status} {body}");
    let ping = format!("ping {tag:06}\n");
    io.write_all(ping.as_bytes()).await?;
    let mut back = vec![0u8; ping.len()];
    tokio::time::timeout(SOON, io.read_exact(&mut back)).await??;
    ensure!(back == ping.as_bytes(), "stream {tag}: echo mismatch");
    Ok(io)
}

/// 1,000 streams open at once through one cluster's socket: every one gets
/// its answer, another cluster is served meanwhile, and once they close
/// the proxy's and the agent's descriptors are back to where they were.
#[tokio::test]
async fn a_thousand_concurrent_streams_leak_nothing_and_slow_no_other_cluster() -> Result<()> {
    const STREAMS: usize = 1000;
    // The test itself holds two descriptors per stream (client and echo).
    tunnel::limits::raise_open_files()?;
    let echo = e2e::EchoServer::start().await?;
    let target = echo.addr().to_string();
    let setup = Setup::start(false, std::slice::from_ref(&target)).await?;
    let mut beta_args: Vec<String> = setup
        .agent_args
        .iter()
        .filter(|a| !a.starts_with("--name=") && !a.starts_with("--token="))
        .cloned()
        .collect();
    beta_args.extend(["--name=beta".to_string(), format!("--token={TOKEN}-b")]);
    let mut cmd = Command::new(bin("agent"));
    cmd.args(&beta_args);
    clean_env(&mut cmd);
    low_fd_limit(&mut cmd);
    let beta = Proc::spawn("agent-beta", cmd)?;
    beta.wait_for_line(|l| l.contains("connected to proxy"), SOON)
        .await?;
    wait_until(SOON, || async { setup.socket("beta").exists() }).await?;

    let alpha = setup.socket("alpha");
    let agent_pid = setup.agent.as_ref().context("agent")?.pid();
    let settled = |pid: u32, want: usize| async move {
        wait_until(SOON, || async { open_fds(pid).is_ok_and(|n| n <= want) }).await
    };
    // The baseline; one stream opened and closed leaves nothing behind.
    let proxy_base = open_fds(setup.proxy.pid())?;
    let agent_base = open_fds(agent_pid)?;
    drop(echo_stream(&alpha, &target, 0).await?);
    settled(setup.proxy.pid(), proxy_base).await?;
    settled(agent_pid, agent_base).await?;

    // Open them all; a few dozen handshakes in flight at a time so the
    // test's own connects do not overrun the socket's accept backlog.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut opening = tokio::task::JoinSet::new();
    for tag in 1..=STREAMS {
        let (alpha, target, gate) = (alpha.clone(), target.clone(), gate.clone());
        opening.spawn(async move {
            let _turn = gate.acquire_owned().await?;
            echo_stream(&alpha, &target, tag).await
        });
    }
    let mut open = Vec::with_capacity(STREAMS);
    while let Some(done) = opening.join_next().await {
        open.push(done??);
    }
    ensure!(open.len() == STREAMS);
    let (proxy_open, agent_open) = (open_fds(setup.proxy.pid())?, open_fds(agent_pid)?);
    ensure!(
        proxy_open >= proxy_base + STREAMS && agent_open >= agent_base + STREAMS,
        "the streams are open at the same time: proxy {proxy_base} -> {proxy_open} fds, \
         agent {agent_base} -> {agent_open}"
    );
    // Every one of them still answers, and beta is served meanwhile.
    let beta_stream = echo_stream(&setup.socket("beta"), &target, 0).await?;
    drop(beta_stream);
    for (tag, io) in open.iter_mut().enumerate().step_by(97) {
        let ping = format!("again {tag:06}\n");
        io.write_all(ping.as_bytes()).await?;
        let mut back = vec![0u8; ping.len()];
        tokio::time::timeout(SOON, io.read_exact(&mut back)).await??;
        ensure!(back == ping.as_bytes());
    }
    let streams = setup
        .metric(
            "tower_connect_streams_total",
            r#"door="unix",cluster="alpha""#,
        )
        .await?;
    ensure!(
        streams >= (STREAMS + 1) as f64,
        "streams counted: {streams}"
    );

    drop(open);
    settled(setup.proxy.pid(), proxy_base)
        .await
        .with_context(|| {
            format!(
                "proxy fds: {:?} > {proxy_base}",
                open_fds(setup.proxy.pid())
            )
        })?;
    settled(agent_pid, agent_base)
        .await
        .with_context(|| format!("agent fds: {:?} > {agent_base}", open_fds(agent_pid)))?;
    let mut setup = setup;
    ensure!(setup.proxy.is_running(), "the proxy died");
    Ok(())
}

/// `--max-handshakes-per-source-per-second` at the TLS door: one source's
/// handshakes past its burst wait their turn (none cut), a source whose
/// turn would be more than 5 s away is closed at once (counted, and a
/// warn line names it and the flag), and other sources are not held back.
#[tokio::test]
async fn a_source_over_its_handshake_rate_waits_its_turn_and_past_that_is_closed() -> Result<()> {
    const RATE: usize = 2;
    let setup = Setup::start_with(
        false,
        &[],
        &[&format!("--max-handshakes-per-source-per-second={RATE}")],
    )
    .await?;
    let client = setup.tls_client("tower:alpha")?;

    // A burst of 2 at once, then one each 0.5 s: 12 fit within 5 s.
    let queued = 12;
    let from = std::net::Ipv4Addr::new(127, 0, 0, 9);
    let mut handshakes = tokio::task::JoinSet::new();
    for _ in 0..queued {
        let tcp = setup.tcp_from(from).await?;
        handshakes.spawn(door_over(client.clone(), tcp));
    }
    let mut done = 0;
    while let Some(handshake) = handshakes.join_next().await {
        handshake?.context("a handshake waiting its turn was cut")?;
        done += 1;
    }
    ensure!(done == queued, "{done} of {queued} handshakes done");

    // Another source at once, past its first 12: closed with the reason.
    let flood = 30;
    let from = std::net::Ipv4Addr::new(127, 0, 0, 10);
    let mut held = Vec::new();
    for _ in 0..flood {
        held.push(setup.tcp_from(from).await?);
    }
    let refused = || async {
        setup
            .metric(
                "tower_refused_connections_total",
                r#"door="connect",reason="handshake_rate""#,
            )
            .await
    };
    wait_until(SOON, || async { refused().await.is_ok_and(|n| n >= 12.0) })
        .await
        .context("the flood over the rate was not refused")?;
    setup
        .proxy
        .wait_for_line(
            |l| {
                l.contains("too many handshakes from one source per second")
                    && l.contains("127.0.0.10")
                    && l.contains("--max-handshakes-per-source-per-second")
            },
            SOON,
        )
        .await?;
    // Meanwhile a client from another address is let in and answered (the
    // agent finds nothing listening at the discard port).
    let mut door = setup.door("tower:alpha").await?;
    let (status, reason) = connect(&mut door, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n").await?;
    ensure!(
        status == 502 && reason.contains("alpha"),
        "{status} {reason}"
    );
    drop(held);
    Ok(())
}
