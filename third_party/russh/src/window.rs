//! Receive windows that grow with the bandwidth-delay product. Patched
//! (PATCHES.md 13): russh advertised one fixed window per channel, so a single
//! channel moved at most one window per round trip (2 MiB over 50 ms is
//! 40 MiB/s, whatever the link).
//!
//! Like HTTP/2 and QUIC stacks (quic-go's flow controller), a channel starts at
//! [`WindowLimits::initial`] and, when its reader drains the window fast
//! compared with the round trip, the next CHANNEL_WINDOW_ADJUST also grants
//! the growth: the window grows [`GROWTH`]-fold, up to [`WindowLimits::max`] per channel and
//! as long as the windows of all channels of the session stay within
//! [`WindowLimits::session_budget`]. A reader that stops never drains fast, so
//! its window never grows past where it was, and never past the cap.
//!
//! The round trip is measured on the channels themselves: when we send an
//! adjust, we note how many bytes the peer could send before it; the first
//! byte past that mark can only have been sent after the adjust arrived, so
//! the time until it arrives is at least one round trip (exactly one when the
//! peer was waiting for window, which is when growth matters). The session
//! keeps the smallest sample. The window is only what we advertise: the wire
//! format is unchanged, and Go's x/crypto accepts windows up to 2^32-1.

use std::time::Duration;

use russh_util::time::Instant;

/// How far channel receive windows may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// The window every channel starts with (in CHANNEL_OPEN and its
    /// confirmation).
    pub initial: u32,
    /// The largest window one channel may reach; at most this much data can
    /// wait unread on one channel. `max <= initial` turns growth off.
    pub max: u32,
    /// Growth stops when the windows of all channels of one session would
    /// add up to more than this. Channels always get `initial`.
    pub session_budget: u64,
}

impl WindowLimits {
    /// Fixed windows of `initial` bytes (russh's behaviour).
    pub fn fixed(initial: u32) -> Self {
        Self {
            initial,
            max: initial,
            session_budget: 0,
        }
    }
}

/// What one channel's reader did since its window was last judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    /// The channel's window now.
    pub window: u32,
    /// Bytes the reader consumed during the epoch.
    pub consumed: u64,
    /// How long the epoch lasted.
    pub elapsed: Duration,
    /// The session's round trip, once measured.
    pub rtt: Option<Duration>,
    /// The sum of the windows of every channel of the session, this one
    /// included.
    pub session_windows: u64,
}

/// How many times larger a window gets each time it grows. Patched
/// (PATCHES.md 38): 4, not 2. A window-limited sender shows only that the
/// window limits it, never by how much, so growth is a probe; at 2 a fresh
/// channel on a 50 ms link took four round trips to reach 32 MiB, and a
/// 64 MiB download on a new session moved at ~160 MiB/s where later ones,
/// starting from the learnt window (PATCHES.md 14), moved at ~230. Growing
/// faster changes no bound: the cap and the session budget stay, and a reader
/// that stops never grows its window.
pub const GROWTH: u64 = 4;

/// The window a channel should have after `epoch`: [`GROWTH`] times larger
/// (up to the cap and the session budget) when its reader drained it fast
/// compared with the round trip, unchanged otherwise. A sender limited by the
/// window delivers one window per round trip, so a reader that takes a window
/// in less than two round trips is being held back by the window; growth stops
/// once the window is past about twice the bandwidth-delay product (the last
/// step may overshoot it [`GROWTH`]-fold, within the cap). Judged only once
/// half a window was consumed, so a slow or stalled reader never grows its
/// window.
pub fn next_window(limits: &WindowLimits, epoch: &Epoch) -> u32 {
    let window = epoch.window;
    let Some(rtt) = epoch.rtt else {
        return window;
    };
    if window >= limits.max || rtt.is_zero() || window == 0 {
        return window;
    }
    if epoch.consumed.saturating_mul(2) < u64::from(window) {
        return window;
    }
    // elapsed < 2 * rtt * consumed / window, without division.
    let drained_fast = epoch.elapsed.as_nanos() * u128::from(window)
        < 2 * rtt.as_nanos() * u128::from(epoch.consumed);
    if !drained_fast {
        return window;
    }
    let room = limits.session_budget.saturating_sub(epoch.session_windows);
    let wanted = (u64::from(window) * GROWTH).min(u64::from(limits.max));
    let grown = wanted.min(u64::from(window).saturating_add(room));
    u32::try_from(grown).unwrap_or(window).max(window)
}

/// How far a channel's first growth goes once the session has learnt
/// (`learnt`, the largest window a channel of this session grew to) that the
/// link needs more: straight to `learnt` rather than one growth per round
/// trip, as gRPC's BDP estimator sizes new HTTP/2 streams from what the
/// connection measured. Still capped by [`WindowLimits::max`] and by the
/// session budget (`session_windows`, the sum of all channels' windows, this
/// one included); never below `grown`, the window [`next_window`] granted.
/// Only a channel that earned growth (its reader drained half a window fast)
/// gets it, so a reader that stops early holds what it held before.
/// Patched (PATCHES.md 14).
pub fn learnt_window(limits: &WindowLimits, grown: u32, learnt: u32, session_windows: u64) -> u32 {
    if learnt <= grown || limits.max <= grown {
        return grown;
    }
    let others = session_windows.saturating_sub(u64::from(grown));
    let room = limits.session_budget.saturating_sub(others);
    let wanted = u64::from(learnt.min(limits.max)).min(room);
    u32::try_from(wanted).unwrap_or(grown).max(grown)
}

/// Whether a channel's reader has consumed enough (`unacked`, consumed and
/// not yet given back) for a CHANNEL_WINDOW_ADJUST: an eighth of `window`.
/// A quarter left the sender idle for part of each round trip on a long link
/// once the window reached its cap (PATCHES.md 32); an adjust is a 9-byte
/// payload, so an eighth costs nothing measurable.
pub fn credit_due(unacked: u32, window: u32) -> bool {
    unacked > 0 && unacked >= window / 8
}

/// Patched (PATCHES.md 34): how many consumed bytes a channel's reader keeps
/// before reporting them to the session loop: the smallest credit
/// [`credit_due`] asks for (a window never shrinks below `initial`), so no
/// credit waits for a report, and what is unreported stays under an eighth
/// of any window: the peer always has window left.
pub fn report_every(initial: u32) -> u32 {
    initial / 8
}

/// Growth is judged once half of `window` was consumed in the epoch, below
/// the cap; one rule for [`ChannelWindow::consumed`] and its caller.
fn judges_growth(window: u32, epoch_consumed: u64, limits: &WindowLimits) -> bool {
    window < limits.max && epoch_consumed.saturating_mul(2) >= u64::from(window)
}

/// A channel's window bookkeeping (receive side).
#[derive(Debug, Default)]
pub(crate) struct ChannelWindow {
    /// The channel's current window; 0 until first used (then `initial`).
    window: u32,
    epoch_start: Option<Instant>,
    epoch_consumed: u64,
    /// Bytes granted by adjusts so far (the initial window excluded).
    granted: u64,
    /// Bytes received so far.
    received: u64,
    /// A round-trip probe: (bytes the peer could send before our adjust,
    /// when we sent it).
    probe: Option<(u64, Instant)>,
}

impl ChannelWindow {
    pub(crate) fn window(&self, limits: &WindowLimits) -> u32 {
        if self.window == 0 {
            limits.initial
        } else {
            self.window
        }
    }

    /// `len` bytes arrived; returns a round-trip sample when they are the
    /// first the peer sent on the credit of a probed adjust.
    pub(crate) fn received(&mut self, len: u64) -> Option<Duration> {
        self.received = self.received.saturating_add(len);
        let (mark, sent) = self.probe?;
        if self.received > mark {
            self.probe = None;
            return Some(Instant::now().duration_since(sent));
        }
        None
    }

    /// The reader consumed `len` bytes. When a credit is due ([`credit_due`]:
    /// an eighth of the window consumed and not yet given back, in
    /// `unacked`), returns how
    /// much to grant in the next adjust: the consumed bytes plus any growth.
    /// `room` is how much more the peer may be granted without exceeding the
    /// current window; `session_windows` is called only when growth is judged.
    /// The first growth goes straight to [`learnt_window`] for `learnt`.
    pub(crate) fn consumed(
        &mut self,
        len: u32,
        unacked: u32,
        limits: &WindowLimits,
        rtt: Option<Duration>,
        learnt: u32,
        session_windows: impl FnOnce() -> u64,
    ) -> Option<u32> {
        let now = Instant::now();
        if self.window == 0 {
            self.window = limits.initial;
        }
        if self.epoch_start.is_none() {
            self.epoch_start = Some(now);
        }
        self.epoch_consumed = self.epoch_consumed.saturating_add(u64::from(len));
        if !credit_due(unacked, self.window) {
            return None;
        }
        let mut growth = 0;
        if judges_growth(self.window, self.epoch_consumed, limits) {
            let start = self.epoch_start.unwrap_or(now);
            let windows = session_windows();
            let mut grown = next_window(
                limits,
                &Epoch {
                    window: self.window,
                    consumed: self.epoch_consumed,
                    elapsed: now.duration_since(start),
                    rtt,
                    session_windows: windows,
                },
            );
            if grown > self.window {
                // next_window counted this channel at its old size.
                let windows = windows.saturating_add(u64::from(grown - self.window));
                grown = learnt_window(limits, grown, learnt, windows);
            }
            growth = grown - self.window;
            self.window = grown;
            self.epoch_start = Some(now);
            self.epoch_consumed = 0;
        }
        Some(unacked.saturating_add(growth))
    }

    /// Whether [`Self::consumed`] of `len` more bytes would judge growth
    /// (when a credit is due), i.e. call its `session_windows`: the caller
    /// sums the session's windows only then (PATCHES.md 33).
    pub(crate) fn would_judge_growth(&self, len: u32, limits: &WindowLimits) -> bool {
        let consumed = self.epoch_consumed.saturating_add(u64::from(len));
        judges_growth(self.window(limits), consumed, limits)
    }

    /// The window this channel reached by growth (0 while it has not grown).
    pub(crate) fn grown(&self, limits: &WindowLimits) -> u32 {
        if self.window > limits.initial {
            self.window
        } else {
            0
        }
    }

    /// An adjust of `credit` bytes is being sent: probe the round trip with it
    /// unless a probe is already out.
    pub(crate) fn granted(&mut self, credit: u32, limits: &WindowLimits) {
        if self.probe.is_none() {
            let mark = u64::from(limits.initial).saturating_add(self.granted);
            self.probe = Some((mark, Instant::now()));
        }
        self.granted = self.granted.saturating_add(u64::from(credit));
    }
}
