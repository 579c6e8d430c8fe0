//! Channel writers' turns on the write queue (docs/protocol.md 9.3.2): every
//! channel of a session leaves through one connection, so what waits in the
//! queue waits in front of every channel. Channel data enters the queue only
//! under a bound (what the connection drains in [`TURN_TARGET`], measured),
//! and while writers wait, each gets one turn per round.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use super::QueueLevel;

/// How long a channel's next packet may wait behind other channels' data
/// queued for the connection: the queue's turn bound is what the connection
/// drains in this time (docs/protocol.md 9.3.2), like Linux's byte queue
/// limits or CoDel's target delay.
pub const TURN_TARGET: Duration = Duration::from_millis(10);
/// The turn bound on a slow link: a few packets from a few channels.
pub const TURN_MIN: usize = 256 * 1024;
/// The turn bound until the connection is measured, and on a fast one
/// (loopback, a LAN): deep enough that the connection never waits for the
/// next batch.
pub const TURN_MAX: usize = 8 * 1024 * 1024;

impl QueueLevel {
    /// What channels' turns are judged by: the larger of the queue and the
    /// channel data handed to the session and not written yet (the
    /// session's own queue lies between the two, unseen by [`Self::bytes`]).
    fn turn_level(&self) -> usize {
        self.bytes().max(self.debt.load(Ordering::Acquire))
    }

    /// The queued bytes under which channel data may be queued now (between
    /// [`TURN_MIN`] and [`TURN_MAX`]).
    pub fn turn_below(&self) -> usize {
        self.turn_below.load(Ordering::Relaxed)
    }

    /// The writer took `len` bytes off the queue: wake the writers waiting
    /// for their turn once under the bound.
    pub(super) fn written(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::AcqRel);
        self.sent_out(len);
    }

    /// `len` bytes went out to the connection, queued or not: channel data
    /// handed to the session is that much less; a new round once under the
    /// bound.
    pub(super) fn sent_out(&self, len: usize) {
        let _ = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                Some(d.saturating_sub(len))
            });
        if self.turn_level() < self.turn_below() {
            self.next_round();
        }
    }

    /// The writer found the queue empty and waits for more. Whatever channel
    /// data is still counted as handed over is either on its way through the
    /// session (a few packets) or was dropped there (its channel closed):
    /// forgotten, so a miscount cannot hold writers back while no batch is
    /// left to start a new round; and a new round, for the same reason.
    pub(super) fn idle(&self) {
        self.debt.store(0, Ordering::Release);
        self.next_round();
    }

    /// The writer stopped (the connection is gone or closing): no writer
    /// waits for a turn any more; their writes fail as the session's do.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.next_round();
    }

    /// Every waiting writer may take one more turn: woken.
    fn next_round(&self) {
        self.round.fetch_add(1, Ordering::AcqRel);
        let waiting = std::mem::take(&mut *self.turns.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in waiting {
            waker.wake();
        }
    }

    /// The connection took a batch of `len` bytes in `took`, having made the
    /// writer wait at least once: it is the bottleneck, and `len / took` its
    /// rate. The bound follows [`turn_bound`] of it, smoothed.
    pub(super) fn drained(&self, len: usize, took: Duration) {
        let Some(sample) = turn_bound(len, took) else {
            return;
        };
        let old = self.turn_below();
        // Three quarters the old bound, one quarter the new sample.
        let next = (old / 4).saturating_mul(3).saturating_add(sample / 4);
        self.turn_below
            .store(next.clamp(TURN_MIN, TURN_MAX), Ordering::Relaxed);
    }
}

/// One channel writer's place in its session's write queue
/// (docs/protocol.md 9.3.2). It may queue its next packet while fewer than
/// [`QueueLevel::turn_below`] bytes are queued, and, while other writers wait
/// for a turn, once per round: a writer that never pauses cannot take every
/// turn from one that just started. Waiting writers are woken together each
/// time the queue gets under its bound. So a channel that just started waits
/// behind about what the connection drains in [`TURN_TARGET`] and a packet
/// per busy channel, not behind another channel's whole window.
pub struct Turn {
    level: Arc<QueueLevel>,
    /// The round of this writer's last turn.
    round: u64,
    /// Counted in [`QueueLevel::wanting`].
    wanting: bool,
}

impl Turn {
    pub fn new(level: Arc<QueueLevel>) -> Self {
        let round = level.round.load(Ordering::Acquire);
        Self {
            level,
            round: round.wrapping_sub(1),
            wanting: false,
        }
    }

    /// Ready: queue one packet now, then say how much with [`Self::sent`].
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.may_go() {
            return self.go();
        }
        if !self.wanting {
            self.wanting = true;
            self.level.wanting.fetch_add(1, Ordering::AcqRel);
        }
        {
            let mut turns = self.level.turns.lock().unwrap_or_else(|p| p.into_inner());
            if !turns.iter().any(|w| w.will_wake(cx.waker())) {
                turns.push(cx.waker().clone());
            }
        }
        // The writer may have made room before the waker was in.
        if self.may_go() {
            return self.go();
        }
        Poll::Pending
    }

    /// The writer stopped; or room under the bound, and: nothing queued (no
    /// batch would start a new round), no one else waiting, or a new round
    /// since this writer's turn.
    fn may_go(&self) -> bool {
        let level = &self.level;
        if level.closed.load(Ordering::Acquire) {
            return true;
        }
        let queued = level.turn_level();
        if queued >= level.turn_below() {
            return false;
        }
        let others = level
            .wanting
            .load(Ordering::Acquire)
            .saturating_sub(usize::from(self.wanting));
        queued == 0 || others == 0 || self.round != level.round.load(Ordering::Acquire)
    }

    /// `n` bytes of channel data were handed to the session on this turn.
    pub fn sent(&self, n: usize) {
        self.level.debt.fetch_add(n, Ordering::AcqRel);
    }

    /// `write` (one packet) once it is this writer's turn; what it wrote
    /// is counted as [`Self::sent`].
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut Context<'_>) -> Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll(cx));
        let poll = write(cx);
        if let Poll::Ready(Ok(n)) = poll {
            self.sent(n);
        }
        poll
    }

    fn go(&mut self) -> Poll<()> {
        self.round = self.level.round.load(Ordering::Acquire);
        self.stop_wanting();
        Poll::Ready(())
    }

    fn stop_wanting(&mut self) {
        if self.wanting {
            self.wanting = false;
            self.level.wanting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.stop_wanting();
    }
}

/// The turn bound for a connection that took `len` bytes in `took`: what it
/// drains in [`TURN_TARGET`] at that rate, between [`TURN_MIN`] and
/// [`TURN_MAX`]; `None` for a sample too small to tell (a batch under 64 KiB
/// says more about the wake-up than the link).
pub fn turn_bound(len: usize, took: Duration) -> Option<usize> {
    if len < 64 * 1024 {
        return None;
    }
    let nanos = took.as_nanos().max(1);
    let bound = (len as u128).saturating_mul(TURN_TARGET.as_nanos()) / nanos;
    Some(
        usize::try_from(bound)
            .unwrap_or(usize::MAX)
            .clamp(TURN_MIN, TURN_MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// A queue `bytes` full, its bound at [`TURN_MIN`].
    fn level_at(bytes: usize) -> Arc<QueueLevel> {
        let level = Arc::new(QueueLevel::new(usize::MAX));
        level.turn_below.store(TURN_MIN, Ordering::Relaxed);
        level.bytes.store(bytes, Ordering::Relaxed);
        level
    }

    #[test]
    fn a_writer_that_never_pauses_leaves_a_turn_to_one_that_waits() {
        let mut cx = Context::from_waker(Waker::noop());
        let level = level_at(TURN_MIN);
        let (mut hot, mut late) = (Turn::new(level.clone()), Turn::new(level.clone()));
        // Full: both wait in line.
        assert!(hot.poll(&mut cx).is_pending());
        assert!(late.poll(&mut cx).is_pending());
        assert_eq!(level.wanting.load(Ordering::Relaxed), 2);
        // A batch went out: a new round, each may go once.
        level.written(64 * 1024);
        assert!(hot.poll(&mut cx).is_ready());
        hot.sent(32 * 1024);
        // Room is left, but `late` has not had its turn of this round.
        assert!(hot.poll(&mut cx).is_pending());
        assert!(late.poll(&mut cx).is_ready());
        late.sent(1024);
        // `hot` waits for its turn, so `late` waits for the next round too.
        assert!(late.poll(&mut cx).is_pending());
        level.written(32 * 1024);
        assert!(hot.poll(&mut cx).is_ready());
        assert!(late.poll(&mut cx).is_ready());
        assert_eq!(level.wanting.load(Ordering::Relaxed), 0);
        // Alone, a writer needs no rounds: it goes while there is room.
        assert!(late.poll(&mut cx).is_ready());
        assert!(late.poll(&mut cx).is_ready());
    }

    #[test]
    fn data_handed_to_the_session_counts_until_written_and_an_idle_writer_forgets_it() {
        let mut cx = Context::from_waker(Waker::noop());
        let level = level_at(0);
        let mut a = Turn::new(level.clone());
        // Nothing in the queue yet, but the session holds what was handed over.
        for _ in 0..TURN_MIN / (32 * 1024) {
            assert!(a.poll(&mut cx).is_ready());
            a.sent(32 * 1024);
        }
        assert!(a.poll(&mut cx).is_pending());
        // The writer found nothing to write (the data went with a closed
        // channel): writers are not held back by the count.
        level.idle();
        assert!(a.poll(&mut cx).is_ready());
        // A dropped writer no longer counts as waiting.
        level.bytes.store(TURN_MIN, Ordering::Relaxed);
        let mut b = Turn::new(level.clone());
        assert!(b.poll(&mut cx).is_pending());
        drop(b);
        assert_eq!(level.wanting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_turn_bound_is_what_the_connection_drains_in_the_target_time() {
        let ms = Duration::from_millis;
        // 20 MB/s: 200 KB in 10 ms, under the floor.
        assert_eq!(turn_bound(256 * 1024, ms(13)), Some(TURN_MIN));
        // 100 MB/s: about 1 MB.
        let b = turn_bound(1_000_000, ms(10)).unwrap();
        assert!((999_000..=1_001_000).contains(&b), "{b}");
        // Loopback: the ceiling; a small batch or no time says nothing wrong.
        assert_eq!(
            turn_bound(256 * 1024, Duration::from_micros(50)),
            Some(TURN_MAX)
        );
        assert_eq!(turn_bound(256 * 1024, Duration::ZERO), Some(TURN_MAX));
        assert_eq!(turn_bound(1024, ms(100)), None);
        // Smoothed: one slow sample moves the bound a quarter of the way.
        let level = level_at(0);
        level.drained(256 * 1024, ms(1000));
        assert_eq!(level.turn_below(), TURN_MIN);
        level.turn_below.store(TURN_MAX, Ordering::Relaxed);
        level.drained(256 * 1024, ms(1000));
        assert_eq!(level.turn_below(), TURN_MAX / 4 * 3 + TURN_MIN / 4);
    }
}
