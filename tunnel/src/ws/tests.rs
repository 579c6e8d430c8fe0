use super::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn raw_config() -> WebSocketConfig {
    WebSocketConfig::default().write_buffer_size(0)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test]
async fn boundaries_do_not_matter_and_pings_are_answered() {
    let (a, b) = duplex(1 << 20);
    let mut raw = WebSocketStream::from_raw_socket(a, Role::Client, Some(raw_config())).await;
    let mut stream = WsStream::from_upgraded(b, Role::Server).await;
    raw.send(Message::Binary(Bytes::from_static(b"SSH-kubesphere-")))
        .await
        .unwrap();
    raw.send(Message::Ping(Bytes::from_static(b"p")))
        .await
        .unwrap();
    raw.send(Message::Text("v1-client\r\n".into()))
        .await
        .unwrap();
    raw.send(Message::Binary(Bytes::new())).await.unwrap();
    raw.close(None).await.unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"SSH-kubesphere-v1-client\r\n");
    // A client waits for the server to end the TCP connection after a close.
    drop(stream);
    let mut answers = Vec::new();
    while let Some(Ok(m)) = raw.next().await {
        answers.push(m);
    }
    assert!(answers.contains(&Message::Pong(Bytes::from_static(b"p"))));
}

#[tokio::test]
async fn each_write_is_one_binary_message() {
    let (a, b) = duplex(1 << 20);
    let mut raw = WebSocketStream::from_raw_socket(a, Role::Server, Some(raw_config())).await;
    let mut stream = WsStream::from_upgraded(b, Role::Client).await;
    stream.write_all(b"hello").await.unwrap();
    // No flush: the message must already be on its way.
    let msg = tokio::time::timeout(std::time::Duration::from_secs(5), raw.next())
        .await
        .expect("write was not sent without a flush")
        .unwrap()
        .unwrap();
    assert_eq!(msg, Message::Binary(Bytes::from_static(b"hello")));
}

#[tokio::test]
async fn a_vectored_write_is_one_message_in_either_role() {
    for role in [Role::Client, Role::Server] {
        let peer_role = if role == Role::Client {
            Role::Server
        } else {
            Role::Client
        };
        let (a, b) = duplex(1 << 20);
        let mut raw = WebSocketStream::from_raw_socket(a, peer_role, Some(raw_config())).await;
        let mut stream = WsStream::from_upgraded(b, role).await;
        let (x, y) = (pattern(70_001), pattern(300));
        let bufs = [io::IoSlice::new(&x), io::IoSlice::new(&y)];
        let n = stream.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, x.len() + y.len());
        let Message::Binary(got) = raw.next().await.unwrap().unwrap() else {
            panic!("not a binary message");
        };
        assert!(got[..x.len()] == x[..] && got[x.len()..] == y[..]);
    }
}

#[tokio::test]
async fn a_library_peer_reads_what_we_write_and_we_read_its_fragments() {
    let (a, b) = duplex(64 * 1024);
    let config = raw_config().max_message_size(None).max_frame_size(None);
    let mut raw = WebSocketStream::from_raw_socket(a, Role::Server, Some(config)).await;
    let mut stream = WsStream::from_upgraded(b, Role::Client).await;
    let data = pattern(3 << 20);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        // Odd sizes: every header length form and mask offset.
        for chunk in sent.chunks(70_001) {
            stream.write_all(chunk).await.unwrap();
        }
        stream.flush().await.unwrap();
        stream
    });
    let mut got = Vec::new();
    while got.len() < data.len() {
        match raw.next().await.unwrap().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == data, "payload corrupted on the way to the peer");
    let mut stream = writer.await.unwrap();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        back
    });
    // The other way: the peer's own framing (a large message and small ones).
    raw.send(Message::Binary(Bytes::from(data.clone())))
        .await
        .unwrap();
    raw.send(Message::Binary(Bytes::from_static(b"end")))
        .await
        .unwrap();
    raw.close(None).await.unwrap();
    let back = reader.await.unwrap();
    assert_eq!(back.len(), data.len() + 3);
    assert!(back[..data.len()] == data[..] && back.ends_with(b"end"));
}

#[tokio::test]
async fn both_roles_over_tcp_carry_large_streams_both_ways() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = WsStream::from_upgraded(tcp, Role::Server).await;
        // Echo everything back.
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).await.unwrap();
        }
        s.shutdown().await.unwrap();
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = WsStream::from_upgraded(tcp, Role::Client).await;
    let (mut r, mut w) = tokio::io::split(client);
    let data = pattern(8 << 20);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(33_333) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    server.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echo corrupted");
}

#[test]
fn masking_is_its_own_inverse_at_any_offset() {
    let data = pattern(1000);
    for offset in 0..4 {
        let mut x = data.clone();
        apply_mask(&mut x[..], [1, 2, 3, 4], offset);
        for (i, (a, b)) in x.iter().zip(&data).enumerate() {
            assert_eq!(*a, b ^ [1, 2, 3, 4][(offset + i) % 4]);
        }
        apply_mask(&mut x[..], [1, 2, 3, 4], offset);
        assert_eq!(x, data);
    }
}

#[tokio::test]
async fn unmasked_frames_from_a_client_are_refused() {
    let (mut a, b) = duplex(1024);
    let mut stream = WsStream::from_upgraded(b, Role::Server).await;
    a.write_all(&[0x82, 0x01, b'x']).await.unwrap();
    let mut buf = [0u8; 8];
    let err = stream.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn a_clients_data_frames_carry_the_zero_key_and_their_payload_as_written() {
    let (mut raw, b) = duplex(1 << 20);
    let mut stream = WsStream::from_upgraded(b, Role::Client).await;
    let (x, y) = (pattern(300), pattern(5));
    let n = stream
        .write_vectored(&[io::IoSlice::new(&x), io::IoSlice::new(&y)])
        .await
        .unwrap();
    assert_eq!(n, 305);
    // FIN + binary; masked, 16-bit length 305; key 0; then the bytes as written.
    let mut frame = vec![0u8; 8 + 305];
    raw.read_exact(&mut frame).await.unwrap();
    assert_eq!(frame[..8], [0x82, 0x80 | 126, 0x01, 0x31, 0, 0, 0, 0]);
    assert!(frame[8..308] == x[..] && frame[308..] == y[..]);
}

#[tokio::test]
async fn a_server_reads_frames_with_the_zero_key_and_with_random_keys() {
    let (mut raw, b) = duplex(1 << 20);
    let mut stream = WsStream::from_upgraded(b, Role::Server).await;
    // "ab" under the zero key, then "cd" under key 1 2 3 4.
    raw.write_all(&[0x82, 0x82, 0, 0, 0, 0, b'a', b'b'])
        .await
        .unwrap();
    raw.write_all(&[0x82, 0x82, 1, 2, 3, 4, b'c' ^ 1, b'd' ^ 2])
        .await
        .unwrap();
    raw.shutdown().await.unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"abcd");
}

#[tokio::test]
async fn after_a_large_frame_its_successors_payload_skips_our_buffer() {
    // Four frames of 32 KiB + 20, all written before the first read: a
    // reader that fills its buffer as far as it can would copy most of each
    // payload out of it.
    let (a, b) = duplex(1 << 20);
    let mut writer = WsStream::from_upgraded(a, Role::Client).await;
    let mut reader = WsStream::from_upgraded(b, Role::Server).await;
    let packets: Vec<Vec<u8>> = (0..4).map(|i| pattern(32 * 1024 + 20 + i)).collect();
    for p in &packets {
        writer.write_all(p).await.unwrap();
    }
    for (i, p) in packets.iter().enumerate() {
        // The way russh reads an SSH packet: its length, then the rest.
        let mut got = vec![0u8; p.len()];
        reader.read_exact(&mut got[..4]).await.unwrap();
        let held = reader.rbuf.len();
        reader.read_exact(&mut got[4..]).await.unwrap();
        assert!(got == *p, "packet {i} corrupted");
        // The first read, before any frame was seen, took the start of the
        // second frame too.
        if i >= 2 {
            assert!(
                held <= SMALL_FILL,
                "packet {i}: {held} bytes of its payload were read into our buffer, to be copied"
            );
        }
    }
}

/// Counts the reads that brought bytes from the socket.
struct CountReads<S> {
    io: S,
    reads: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads += 1;
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_large_frame_of_small_packets_is_read_in_bulk() {
    // A large packet, then one 12,000-byte frame holding 200 packets of 60
    // bytes (a batch of small SSH packets), read the way russh reads them.
    let (a, b) = duplex(1 << 20);
    let mut writer = WsStream::from_upgraded(a, Role::Client).await;
    let reader = CountReads { io: b, reads: 0 };
    let mut reader = WsStream::from_upgraded(reader, Role::Server).await;
    let large = pattern(32 * 1024);
    writer.write_all(&large).await.unwrap();
    let mut got = vec![0u8; large.len()];
    reader.read_exact(&mut got[..4]).await.unwrap();
    reader.read_exact(&mut got[4..]).await.unwrap();
    let frame = pattern(200 * 60);
    writer.write_all(&frame).await.unwrap();
    reader.io.reads = 0;
    let mut got = vec![0u8; frame.len()];
    for packet in got.chunks_mut(60) {
        reader.read_exact(&mut packet[..4]).await.unwrap();
        reader.read_exact(&mut packet[4..]).await.unwrap();
    }
    assert!(got == frame, "corrupted");
    let reads = reader.io.reads;
    assert!(
        reads <= 4,
        "{reads} socket reads for one frame of small packets"
    );
}

/// What the HTTP server read past the upgrade (here: the start of the first
/// frame) is parsed before what the socket still holds.
#[tokio::test]
async fn bytes_read_ahead_come_first() {
    let (a, mut b) = duplex(1 << 20);
    let mut raw = WebSocketStream::from_raw_socket(a, Role::Client, Some(raw_config())).await;
    raw.send(Message::Binary(Bytes::from_static(b"SSH-2.0-")))
        .await
        .unwrap();
    raw.send(Message::Binary(Bytes::from_static(b"tower\r\n")))
        .await
        .unwrap();
    raw.close(None).await.unwrap();
    let mut ahead = [0u8; 5];
    b.read_exact(&mut ahead).await.unwrap();
    let mut stream = WsStream::from_upgraded(b, Role::Server)
        .await
        .read_ahead(&ahead);
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"SSH-2.0-tower\r\n");
}
