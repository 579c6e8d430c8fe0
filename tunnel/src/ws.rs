//! The websocket as a byte stream.
//!
//! Tower writes each chunk as one binary message and reads by concatenating
//! payloads, so message boundaries carry no meaning. [`WsStream`] does the same
//! with its own RFC 6455 framing instead of a message-oriented library: it
//! streams payloads straight through (no message assembly, no size limit on data
//! frames), reads large payloads directly into the caller's buffer, writes
//! data frames with one vectored write (header + caller's bytes, no copy: a
//! client's carry the zero masking key, see docs/protocol.md 3), and holds no
//! read buffer while idle (tungstenite kept a zero-filled 128 KiB
//! one per connection: most of an idle agent's memory on the proxy).
//!
//! Every `poll_write` is one binary frame written through at once: russh writes
//! its identification line without flushing and then waits for the peer's,
//! which would otherwise deadlock both sides silently. Reads accept binary and
//! text frames, fragmented or not; pings are answered, pongs skipped. A close
//! frame or the end of the TCP stream between frames reads as EOF.
//!
//! This file holds the stream; `ws/frame.rs` the bytes of a frame.

mod frame;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;

use frame::{
    Header, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
    apply_mask, frame_parts, invalid, parse_header, push_masked, put_header,
};

/// Largest frame we write; peers read frames as streams anyway.
pub const MAX_FRAME: usize = 256 * 1024;
/// Socket reads go into a buffer this large (headers, small payloads).
const READ_CHUNK: usize = 64 * 1024;
/// Payload reads at least this large skip our buffer and land in the caller's.
const DIRECT_READ: usize = 4096;
/// After a large frame, a header fill reads no more than this: the header
/// and the start of the payload (an SSH packet's length), so the rest of a
/// large payload is read straight into the caller's buffer instead of being
/// copied out of ours. Inside a large frame, small reads are read exactly,
/// for the same reason, until [`SMALL_RUN`] of them say it holds small
/// packets; then fills are whole again until the next frame.
const SMALL_FILL: usize = 64;
/// Reading one large packet makes at most two small reads in a row that
/// are not the end of a larger one (its length, the next packet's length);
/// small packets make more.
const SMALL_RUN: u8 = 3;
/// The masking key of a client's data frames: zero (docs/protocol.md 3).
const DATA_MASK: [u8; 4] = [0; 4];

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
    /// The last data frame's payload was at least [`DIRECT_READ`] and has
    /// not shown itself a batch of small packets: small reads inside it are
    /// read exactly, and fills are [`SMALL_FILL`].
    large: bool,
    /// The caller's small reads served in this data frame since its last one
    /// of at least [`DIRECT_READ`], not counting the ends of partly served ones.
    small_reads: u8,
    /// The last read was served in part: the next one is its end.
    partial: bool,
    /// Framed bytes accepted but not yet written (pongs, a close, partial writes).
    wbuf: Vec<u8>,
    wpos: usize,
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wrap `io`, on which the HTTP upgrade has already happened.
    pub async fn from_upgraded(io: S, role: Role) -> Self {
        Self {
            io,
            client: role == Role::Client,
            rbuf: BytesMut::new(),
            state: ReadState::Header,
            large: false,
            small_reads: 0,
            partial: false,
            wbuf: Vec::new(),
            wpos: 0,
            close_sent: false,
        }
    }

    /// The connection under the websocket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Bytes read from `io` before it was handed over (what the HTTP server
    /// read past the upgrade request) come first.
    pub fn read_ahead(mut self, bytes: &[u8]) -> Self {
        self.rbuf.extend_from_slice(bytes);
        self
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
        let poll = if self.large {
            let mut dst = (&mut self.rbuf).limit(SMALL_FILL);
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut dst)
        } else {
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
        };
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
                    if want < DIRECT_READ && this.small_reads >= SMALL_RUN {
                        // Small packets, not one large one: read them in bulk.
                        this.large = false;
                    }
                    let start = buf.filled().len();
                    let n = if !this.rbuf.is_empty() {
                        let n = want.min(this.rbuf.len());
                        buf.put_slice(&this.rbuf[..n]);
                        this.rbuf.advance(n);
                        n
                    } else if want >= DIRECT_READ || this.large {
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
                    this.small_reads = if want >= DIRECT_READ {
                        0
                    } else if this.partial {
                        this.small_reads
                    } else {
                        this.small_reads.saturating_add(1)
                    };
                    this.partial = n < want;
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
                            this.large = h.len >= DIRECT_READ as u64;
                            this.small_reads = 0;
                            this.state = ReadState::Data {
                                remaining: h.len,
                                // XOR with the zero key changes nothing.
                                mask: h.mask.filter(|m| *m != DATA_MASK),
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
        // A client's data frames carry the zero key (docs/protocol.md 3): the
        // payload is SSH ciphertext, which no one who could abuse a
        // predictable key chooses, and XOR with zero leaves it as it is.
        let mask = this.client.then_some(DATA_MASK);
        if !this.io.is_write_vectored() {
            put_header(&mut this.wbuf, OP_BINARY, len, mask);
            for part in &parts {
                this.wbuf.extend_from_slice(part);
            }
        } else {
            // Header and payload in one writev, no copy of the payload.
            let mut header = Vec::with_capacity(MAX_HEADER);
            put_header(&mut header, OP_BINARY, len, mask);
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
mod tests;
