//! A member with no inbound network (issue #14 part 1). The member's
//! kube-apiserver, its kubelet stand-in and the agent run in a network
//! namespace whose packet filter drops every new connection coming in
//! ([`e2e::MemberNet`]); the test, the host cluster and the proxy are on the
//! other side of a veth, in the test's own namespace. The proof that the
//! tunnel is the only way in: from the host side a direct connection to the
//! member fails, while the seed flow and the streams (exec, logs -f,
//! port-forward, cp, watch) work through the proxy. tests/ha.rs runs its
//! failover test with such a member too.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use e2e::{
    EchoServer, MEMBER_ADDR, MEMBER_GATEWAY, MemberNet, Tower, TowerOptions, in_own_netns,
    wait_for_ok,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(60);
/// How long a connection attempt into the member may take before it
/// counts as failed: the filter drops packets, so a client sees no answer.
const NO_ANSWER: Duration = Duration::from_secs(3);

/// Whether a TCP connection from here to `addr` is refused or unanswered.
async fn unreachable(addr: &str) -> bool {
    !matches!(
        tokio::time::timeout(NO_ANSWER, TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn the_member_filter_lets_nothing_in_and_everything_out() -> Result<()> {
    if !in_own_netns("the_member_filter_lets_nothing_in_and_everything_out").await? {
        return Ok(());
    }
    let net = MemberNet::create_open().await?;
    let inside = net.bind("0.0.0.0:0")?;
    let port = inside.local_addr()?.port();
    let target = format!("{MEMBER_ADDR}:{port}");
    // Before the filter: a listener in the member answers the host side.
    let _accepted = tokio::spawn(async move {
        while let Ok((mut conn, _)) = inside.accept().await {
            let _ = conn.write_all(b"member\n").await;
        }
    });
    let mut conn = tokio::time::timeout(NO_ANSWER, TcpStream::connect(&target))
        .await
        .context("no answer from the member before its filter")??;
    let mut hello = String::new();
    conn.read_to_string(&mut hello).await?;
    ensure!(hello == "member\n", "{hello:?}");

    net.close_inbound().await?;
    ensure!(
        unreachable(&target).await,
        "the host side still reaches a listener in the member"
    );

    // Out still works, replies included: a process in the member talks to
    // an echo server on the host side.
    let outside = EchoServer::serve(TcpListener::bind((MEMBER_GATEWAY, 0)).await?)?;
    let script = format!(
        "exec 3<>/dev/tcp/{MEMBER_GATEWAY}/{}; echo out-and-back >&3; read -r line <&3; echo \"$line\"",
        outside.addr().port()
    );
    let out = net
        .command("bash")
        .args(["-c", &script])
        .output()
        .await
        .context("running bash in the member")?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "out-and-back",
        "from the member out: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_flow_and_streams_reach_a_member_with_no_inbound_network() -> Result<()> {
    if !in_own_netns("the_seed_flow_and_streams_reach_a_member_with_no_inbound_network").await? {
        return Ok(());
    }
    let tower = Tower::start_with(TowerOptions {
        isolated_member: true,
        ..Default::default()
    })
    .await?;
    let Some(net) = tower.member_net() else {
        bail!("the Tower has no member namespace")
    };

    // No way in but the tunnel: the member's kube-apiserver is not
    // reachable from the host side, at the member's address or through the
    // member's own kubeconfig (127.0.0.1 here is the host side's).
    let member_port = tower
        .member()
        .server_addr()?
        .rsplit_once(':')
        .map(|(_, p)| p.to_string())
        .context("no port in the member's server address")?;
    ensure!(
        unreachable(&format!("{MEMBER_ADDR}:{member_port}")).await,
        "the member's apiserver answers the host side directly"
    );
    let direct = tower.host().kubectl(&[
        "--kubeconfig",
        &tower.member().kubeconfig().display().to_string(),
        "--request-timeout=3s",
        "get",
        "ns",
    ]);
    ensure!(
        !direct.status.success(),
        "kubectl reached the member without the tunnel"
    );

    // The seed flow: the kubeconfig in the Cluster reaches the member.
    let ns = tower
        .kubectl_ok(&["get", "ns", "kube-system", "-o", "name"])
        .await?;
    ensure!(ns.trim() == "namespace/kube-system", "{ns}");
    // A watch through the tunnel sees what happens in the member.
    let mut watch = tower.kubectl_command();
    watch
        .args(["get", "configmaps", "-n", "default", "-w", "-o", "name"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut watch = watch.spawn()?;
    let mut lines = BufReader::new(watch.stdout.take().context("watch stdout")?).lines();
    tower
        .kubectl_ok(&["create", "configmap", "through-the-tunnel", "-n", "default"])
        .await?;
    tower
        .member()
        .kubectl_ok(&["create", "configmap", "made-in-the-member", "-n", "default"]);
    let seen = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("made-in-the-member") {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await
    .context("the watch never saw the member's ConfigMap")??;
    ensure!(seen, "the watch ended before the member's ConfigMap");
    watch.kill().await?;

    // Streams: exec, logs -f, cp, port-forward, to a pod in the member.
    tower.member().run_pod("default", "box").await?;
    let hi = wait_for_ok(DEADLINE, || {
        tower.kubectl_ok(&["exec", "box", "--", "echo", "hi"])
    })
    .await?;
    ensure!(hi == "hi\n", "{hi:?}");
    let log = tower
        .member()
        .container_log("default", "box", e2e::POD_CONTAINER);
    let mut logs = tower.kubectl_command();
    logs.args(["logs", "-f", "--tail=1", "box"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut logs = logs.spawn()?;
    let mut log_lines = BufReader::new(logs.stdout.take().context("logs stdout")?).lines();
    let followed = tokio::time::timeout(DEADLINE, async {
        // The stand-in appends a line every 100 ms; two arrive while following.
        for _ in 0..2 {
            log_lines
                .next_line()
                .await?
                .context("logs -f ended early")?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    logs.kill().await?;
    followed.with_context(|| format!("logs -f followed nothing ({})", log.display()))??;
    let file = tower.dir().join("to-the-pod");
    std::fs::write(&file, b"copied through the tunnel\n")?;
    tower
        .kubectl_ok(&["cp", &file.display().to_string(), "box:copied"])
        .await?;
    let copied = std::fs::read_to_string(
        tower
            .member()
            .container_dir("default", "box", e2e::POD_CONTAINER)
            .join("copied"),
    )?;
    ensure!(copied == "copied through the tunnel\n", "{copied:?}");

    // port-forward: the stand-in dials 127.0.0.1:P inside the member, where
    // an echo server listens that nothing outside could reach.
    let echo = EchoServer::serve(net.bind("127.0.0.1:0")?)?;
    let local = e2e::free_port();
    let mut forward = tower.kubectl_command();
    forward
        .args([
            "port-forward",
            "box",
            &format!("{local}:{}", echo.addr().port()),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut forward = forward.spawn()?;
    let mut forward_out =
        BufReader::new(forward.stdout.take().context("port-forward stdout")?).lines();
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = forward_out.next_line().await? {
            if line.contains("Forwarding from") {
                return Ok(());
            }
        }
        bail!("port-forward ended before forwarding")
    })
    .await
    .context("port-forward never listened")??;
    let mut conn = TcpStream::connect(("127.0.0.1", local)).await?;
    conn.write_all(b"ping\n").await?;
    let mut back = [0u8; 5];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut back))
        .await
        .context("no echo through port-forward")??;
    ensure!(&back == b"ping\n", "{back:?}");
    forward.kill().await?;
    ensure!(
        echo.connections() == 1,
        "the echo server saw {}",
        echo.connections()
    );
    Ok(())
}
