//! The websocket as a byte stream.
//!
//! Tower writes each chunk as one binary message and reads by concatenating
//! payloads, so message boundaries carry no meaning. [`WsStream`] does the same
//! with its own RFC 6455 framing instead of a message-oriented library: it
//! streams payloads straight through (no message assembly, no size limit on data
//! frames), reads large payloads directly into the caller's buffer, writes a
//! server's frames with one vectored write (header + caller's bytes, no copy),
//! and holds no read buffer while idle (tungstenite kept a zero-filled 128 KiB
//! one per connection: most of an idle agent's memory on the proxy).
//!
//! Every `poll_write` is one binary frame written through at once: russh writes
//! its identification line without flushing and then waits for the peer's,
//! which would otherwise deadlock both sides silently. Reads accept binary and
//! text frames, fragmented or not; pings are answered, pongs skipped. A close
//! frame or the end of the TCP stream between frames reads as EOF.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;

/// Largest frame we write; peers read frames as streams anyway.
pub const MAX_FRAME: usize = 256 * 1024;
/// Socket reads go into a buffer this large (headers, small payloads).
const READ_CHUNK: usize = 64 * 1024;
/// Payload reads at least this large skip our buffer and land in the caller's.
const DIRECT_READ: usize = 4096;
/// Largest header: 2 bytes, 8 bytes of length, 4 bytes of mask.
const MAX_HEADER: usize = 14;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

#[derive(Clone, Copy)]
enum ReadState {
    /// Between frames.
    Header,
    /// Inside a data frame's payload.
    Data {
        remaining: u64,
        mask: Option<[u8; 4]>,
        offset: usize,
    },
    /// A close frame arrived, or the TCP stream ended.
    Eof,
}

/// A websocket carrying a byte stream; see the module docs.
pub struct WsStream<S> {
    io: S,
    /// Clients mask what they send (RFC 6455 5.3); servers require it.
    client: bool,
    rbuf: BytesMut,
    state: ReadState,
    /// Framed bytes accepted but not yet written (pongs, a close, partial writes).
    wbuf: Vec<u8>,
    wpos: usize,
    close_sent: bool,
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
    size: usize,
}

/// Parse a frame header at the start of `b`; `None` if incomplete.
fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
    let [b0, b1, ..] = *b else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(invalid("websocket frame with reserved bits set"));
    }
    let (len, mut size) = match b1 & 0x7f {
        126 => match b.get(2..4) {
            Some(x) => (u64::from(u16::from_be_bytes([x[0], x[1]])), 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10).and_then(|x| <[u8; 8]>::try_from(x).ok()) {
            Some(x) => (u64::from_be_bytes(x), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        match b
            .get(size..size + 4)
            .and_then(|x| <[u8; 4]>::try_from(x).ok())
        {
            Some(m) => {
                size += 4;
                Some(m)
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        len,
        mask,
        size,
    }))
}

/// XOR `data` with `mask`, `offset` bytes into the mask's cycle.
fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let m8 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ m8).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// The leading part of `bufs` that fits in one frame.
fn frame_parts<'a>(bufs: &'a [io::IoSlice<'a>]) -> Vec<&'a [u8]> {
    let mut room = MAX_FRAME;
    let mut parts = Vec::with_capacity(bufs.len());
    for b in bufs {
        if room == 0 {
            break;
        }
        let take = b.len().min(room);
        room -= take;
        #[allow(clippy::indexing_slicing)] // take <= b.len()
        parts.push(&b[..take]);
    }
    parts
}

/// Append `data` to `out`, masked when a mask is given, `offset` bytes into
/// the mask's cycle.
fn push_masked(out: &mut Vec<u8>, data: &[u8], mask: Option<[u8; 4]>, offset: usize) {
    let start = out.len();
    out.extend_from_slice(data);
    if let Some(mask) = mask {
        #[allow(clippy::indexing_slicing)] // start <= out.len()
        apply_mask(&mut out[start..], mask, offset);
    }
}

/// Append a frame header for `len` payload bytes to `out`.
fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    let m = if mask.is_some() { 0x80 } else { 0 };
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(m | len as u8);
    } else if let Ok(l) = u16::try_from(len) {
        out.push(m | 126);
        out.extend_from_slice(&l.to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(mask) = mask {
        out.extend_from_slice(&mask);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wrap `io`, on which the HTTP upgrade has already happened.
    pub async fn from_upgraded(io: S, role: Role) -> Self {
        Self {
            io,
            client: role == Role::Client,
            rbuf: BytesMut::new(),
            state: ReadState::Header,
            wbuf: Vec::new(),
            wpos: 0,
            close_sent: false,
        }
    }

    /// Queue a whole frame (control frames, or data when we must mask).
    fn queue_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = self.client.then(rand::random::<[u8; 4]>);
        put_header(&mut self.wbuf, opcode, payload.len(), mask);
        push_masked(&mut self.wbuf, payload, mask, 0);
    }

    /// Write out what `wbuf` holds.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > READ_CHUNK {
            // Keep idle connections small.
            self.wbuf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Read more bytes from the socket into `rbuf`; 0 at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < MAX_HEADER {
            self.rbuf.reserve(READ_CHUNK);
        }
        let poll = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf);
        if poll.is_pending() && self.rbuf.is_empty() {
            // Idle: give the buffer back.
            self.rbuf = BytesMut::new();
        }
        poll
    }

    /// Handle a control frame whose payload is complete in `rbuf`.
    fn control(&mut self, h: &Header, cx: &mut Context<'_>) -> io::Result<()> {
        let len = h.len as usize;
        let mut payload = self.rbuf.split_to(len);
        if let Some(mask) = h.mask {
            apply_mask(&mut payload, mask, 0);
        }
        match h.opcode {
            OP_PING if !self.close_sent => {
                self.queue_frame(OP_PONG, &payload);
                // Best effort now; the next write or flush finishes it.
                if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                    return Err(e);
                }
            }
            OP_CLOSE => {
                self.state = ReadState::Eof;
                if !self.close_sent {
                    // Echo the status code, as RFC 6455 5.5.1 asks.
                    let code = payload.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                    self.queue_frame(OP_CLOSE, &code);
                    self.close_sent = true;
                    let _ = self.poll_drain(cx);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.state {
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Data { remaining: 0, .. } => this.state = ReadState::Header,
                ReadState::Data {
                    remaining,
                    mask,
                    offset,
                } => {
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let want = remaining.min(buf.remaining() as u64) as usize;
                    let start = buf.filled().len();
                    let n = if !this.rbuf.is_empty() {
                        let n = want.min(this.rbuf.len());
                        buf.put_slice(&this.rbuf[..n]);
                        this.rbuf.advance(n);
                        n
                    } else if want >= DIRECT_READ {
                        // Straight into the caller's buffer, without zero-filling
                        // it first (russh hands us uninitialized capacity).
                        let mut dst = (&mut *buf).limit(want);
                        ready!(tokio_util::io::poll_read_buf(
                            Pin::new(&mut this.io),
                            cx,
                            &mut dst
                        ))?
                    } else {
                        if ready!(this.poll_fill(cx))? == 0 {
                            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                        }
                        continue;
                    };
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    if let Some(mask) = mask {
                        apply_mask(&mut buf.filled_mut()[start..start + n], mask, offset);
                    }
                    this.state = ReadState::Data {
                        remaining: remaining - n as u64,
                        mask,
                        offset: (offset + n) % 4,
                    };
                    return Poll::Ready(Ok(()));
                }
                ReadState::Header => {
                    let header = parse_header(&this.rbuf)?;
                    let Some(h) = header else {
                        if ready!(this.poll_fill(cx))? == 0 {
                            if this.rbuf.is_empty() {
                                this.state = ReadState::Eof;
                                continue;
                            }
                            return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                        }
                        continue;
                    };
                    if !this.client && h.mask.is_none() {
                        return Poll::Ready(Err(invalid("unmasked websocket frame from a client")));
                    }
                    match h.opcode {
                        OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                            this.rbuf.advance(h.size);
                            this.state = ReadState::Data {
                                remaining: h.len,
                                mask: h.mask,
                                offset: 0,
                            };
                        }
                        OP_CLOSE | OP_PING | OP_PONG => {
                            if !h.fin || h.len > 125 {
                                return Poll::Ready(Err(invalid(
                                    "malformed websocket control frame",
                                )));
                            }
                            if this.rbuf.len() < h.size + h.len as usize {
                                if ready!(this.poll_fill(cx))? == 0 {
                                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                                }
                                continue;
                            }
                            this.rbuf.advance(h.size);
                            this.control(&h, cx)?;
                        }
                        _ => return Poll::Ready(Err(invalid("unknown websocket opcode"))),
                    }
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    /// All of `bufs` (up to [`MAX_FRAME`]) as one binary frame: the write
    /// behind's batches go out without being copied together first.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let parts = frame_parts(bufs);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if this.client || !this.io.is_write_vectored() {
            // One pass: copied into the frame and masked on the way.
            let mask = this.client.then(rand::random::<[u8; 4]>);
            put_header(&mut this.wbuf, OP_BINARY, len, mask);
            let mut offset = 0;
            for part in &parts {
                push_masked(&mut this.wbuf, part, mask, offset);
                offset += part.len();
            }
        } else {
            // Header and payload in one writev, no copy of the payload.
            let mut header = Vec::with_capacity(MAX_HEADER);
            put_header(&mut header, OP_BINARY, len, None);
            let mut slices = Vec::with_capacity(parts.len() + 1);
            slices.push(io::IoSlice::new(&header));
            slices.extend(parts.iter().map(|p| io::IoSlice::new(p)));
            // Pending: nothing was taken, the caller comes back with the same bytes.
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            // Keep what the socket did not take; the frame must go out whole.
            let mut skip = n;
            for s in &slices {
                let take = skip.min(s.len());
                skip -= take;
                #[allow(clippy::indexing_slicing)] // take <= s.len()
                this.wbuf.extend_from_slice(&s[take..]);
            }
        }
        // Push it out now; if the socket is full, the next write or flush
        // finishes the job.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            this.queue_frame(OP_CLOSE, &1000u16.to_be_bytes());
        }
        let mut done = ready!(this.poll_drain(cx));
        if done.is_ok() {
            done = ready!(Pin::new(&mut this.io).poll_shutdown(cx));
        }
        match done {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
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
}
