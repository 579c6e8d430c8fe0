//! RFC 6455 framing, byte by byte: frame headers read and written, masks
//! applied, and how much of a write fits in one frame ([`MAX_FRAME`]).
//!
//! Pure functions over buffers, no I/O: [`super::WsStream`] decides what to
//! read and write, these say how it looks on the wire. A header is at most
//! [`MAX_HEADER`] bytes: 2, then 2 or 8 of length when it does not fit in 7
//! bits, then the mask a client's frames carry.

use std::io;

use super::MAX_FRAME;

/// Largest header: 2 bytes, 8 bytes of length, 4 bytes of mask.
pub(super) const MAX_HEADER: usize = 14;

pub(super) const OP_CONTINUATION: u8 = 0x0;
pub(super) const OP_TEXT: u8 = 0x1;
pub(super) const OP_BINARY: u8 = 0x2;
pub(super) const OP_CLOSE: u8 = 0x8;
pub(super) const OP_PING: u8 = 0x9;
pub(super) const OP_PONG: u8 = 0xa;

pub(super) fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A frame header as read.
pub(super) struct Header {
    pub(super) fin: bool,
    pub(super) opcode: u8,
    pub(super) len: u64,
    pub(super) mask: Option<[u8; 4]>,
    /// Its length in bytes.
    pub(super) size: usize,
}

/// Parse a frame header at the start of `b`; `None` if incomplete.
pub(super) fn parse_header(b: &[u8]) -> io::Result<Option<Header>> {
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
pub(super) fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
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
pub(super) fn frame_parts<'a>(bufs: &'a [io::IoSlice<'a>]) -> Vec<&'a [u8]> {
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
pub(super) fn push_masked(out: &mut Vec<u8>, data: &[u8], mask: Option<[u8; 4]>, offset: usize) {
    let start = out.len();
    out.extend_from_slice(data);
    if let Some(mask) = mask {
        #[allow(clippy::indexing_slicing)] // start <= out.len()
        apply_mask(&mut out[start..], mask, offset);
    }
}

/// Append a frame header for `len` payload bytes to `out`.
pub(super) fn put_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
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
