//! Request bodies per client per second (`--request-body-rate-per-source`,
//! `--request-body-burst-per-source`).
//!
//! Why: a client that uploads without pause (bodies that never end, each
//! cut by the member at its 3 MB limit and begun again) keeps the member's
//! kube-apiserver, the agent and the proxy busy with its bytes, and every
//! other user of the cluster waits behind them. On a 2-core machine 50 such
//! bodies at a time took the p99 of another client's GETs from 1.7 ms to
//! 109 ms (the same uploads sent straight to the member's apiserver: 57 ms);
//! paced at 8 or 20 MB/s in all they cost 1.2x and 1.35x. So each client
//! gets a rate: a burst at once (a `kubectl apply` of large objects never
//! waits), then `rate` bytes a second. A body over it is not refused: its
//! next piece waits its turn, so the client's TCP slows and the request
//! goes on.
//!
//! A client is a [`Flow`]: the address it connects from and the user it is
//! (on the aggregated door every user comes from the host's apiserver).
//! The bucket is a GCRA over bytes, as [`super::rate`] is over handshakes:
//! per flow only when its bucket is full again, forgotten once that is past.
//! Only request bodies are paced: responses, upgraded streams (exec, `cp`,
//! port-forward) and the CONNECT door's streams are not.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Frame;
use tokio::time::Sleep;

/// `--request-body-rate-per-source`'s default: 8 MiB a second.
pub const DEFAULT_RATE: u64 = 8 << 20;
/// `--request-body-burst-per-source`'s default: 32 MiB (ten objects at the
/// kube-apiserver's 3 MB limit) at once.
pub const DEFAULT_BURST: u64 = 32 << 20;

/// `--request-body-rate-per-source` and `--request-body-burst-per-source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes a second; 0: not paced.
    pub rate: u64,
    pub burst: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

/// The address of the client a request came from, put in the request's
/// extensions by the door that accepted it.
#[derive(Clone, Copy, Debug)]
pub struct Source(pub IpAddr);

/// Whose bytes share a bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub source: IpAddr,
    pub user: Arc<str>,
}

/// The request-body rate of every flow.
pub struct Pacer {
    /// Bytes a second.
    rate: u64,
    /// The burst, as the time the rate takes to send it.
    burst: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per flow: when its bucket is full again (GCRA's theoretical arrival
    /// time); absent or past: full.
    due: HashMap<Flow, Instant>,
    pruned_at: Option<Instant>,
}

impl Pacer {
    /// The pacer of `limits`; `None` when its rate is 0 (no pacing).
    pub fn of(limits: Limits) -> Option<Arc<Self>> {
        Self::new(limits.rate, limits.burst)
    }

    /// `rate` bytes a second after `burst` bytes at once; `None` when `rate`
    /// is 0 (no pacing).
    pub fn new(rate: u64, burst: u64) -> Option<Arc<Self>> {
        (rate > 0).then(|| {
            Arc::new(Self {
                rate,
                burst: Self::time_of(rate, burst),
                state: Mutex::default(),
            })
        })
    }

    /// The time `rate` takes to send `bytes`; a burst too large to say is
    /// `Duration::MAX` (never waited for), not a panic at start.
    fn time_of(rate: u64, bytes: u64) -> Duration {
        Duration::try_from_secs_f64(bytes as f64 / rate as f64).unwrap_or(Duration::MAX)
    }

    /// When `bytes` of `flow`'s body arriving at `now` may go on (`now` or
    /// later), taking their turn.
    pub fn turn(&self, flow: &Flow, bytes: u64, now: Instant) -> Instant {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.prune(now);
        let cost = Self::time_of(self.rate, bytes);
        // A known flow is updated in place: no clone of its key per piece.
        let due = match state.due.get_mut(flow) {
            Some(due) => {
                *due = (*due).max(now) + cost;
                *due
            }
            None => {
                state.due.insert(flow.clone(), now + cost);
                now + cost
            }
        };
        due.checked_sub(self.burst).map_or(now, |s| s.max(now))
    }

    /// Flows remembered now.
    #[cfg(test)]
    fn flows(&self) -> usize {
        self.state.lock().map_or(0, |s| s.due.len())
    }
}

impl State {
    fn prune(&mut self, now: Instant) {
        super::rate::forget_full(&mut self.due, &mut self.pruned_at, now);
    }
}

/// Where a [`Paced`] body reports the time its pieces waited.
pub trait Waited: Unpin {
    fn waited(&mut self, time: Duration);
}

impl<W: Waited> Waited for Option<W> {
    fn waited(&mut self, time: Duration) {
        if let Some(w) = self {
            w.waited(time);
        }
    }
}

/// A request body whose data frames wait for their flow's turn.
pub struct Paced<B, W> {
    inner: B,
    turns: Option<(Arc<Pacer>, Flow)>,
    /// A frame read and waiting for its turn.
    held: Option<(Frame<Bytes>, Pin<Box<Sleep>>)>,
    waited: W,
}

impl<B, W> Paced<B, W> {
    /// `inner` paced as `flow` by `pacer` (`None`: not paced).
    pub fn new(inner: B, pacer: Option<(Arc<Pacer>, Flow)>, waited: W) -> Self {
        Self {
            inner,
            turns: pacer,
            held: None,
            waited,
        }
    }
}

impl<B, W> hyper::body::Body for Paced<B, W>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    W: Waited,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some((_, sleep)) = &mut this.held {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let frame = this.held.take().map(|(frame, _)| frame);
            return Poll::Ready(frame.map(Ok));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Poll::Ready(Some(Ok(frame))) = polled else {
            return polled;
        };
        let Some((pacer, flow)) = &this.turns else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let bytes = frame.data_ref().map_or(0, |d| d.len() as u64);
        if bytes == 0 {
            return Poll::Ready(Some(Ok(frame)));
        }
        // Tokio's clock: the same as the system's, but paused in tests.
        let now = tokio::time::Instant::now().into_std();
        let at = pacer.turn(flow, bytes, now);
        if at <= now {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.waited.waited(at - now);
        let mut sleep = Box::pin(tokio::time::sleep_until(at.into()));
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(frame)));
        }
        this.held = Some((frame, sleep));
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(held) = self.held.as_ref().and_then(|(f, _)| f.data_ref()) {
            let held = held.len() as u64;
            hint.set_lower(hint.lower().saturating_add(held));
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(held));
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn flow(last: u8, user: &str) -> Flow {
        Flow {
            source: IpAddr::from([127, 0, 0, last]),
            user: user.into(),
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_burst_at_once_then_the_rate() {
        let pacer = Pacer::new(MIB, 4 * MIB).expect("a rate");
        let t0 = Instant::now();
        let attacker = flow(11, "alpha");
        for _ in 0..4 {
            assert_eq!(pacer.turn(&attacker, MIB, t0), t0);
        }
        // Past the burst: a second per MiB, queued behind each other.
        assert_eq!(pacer.turn(&attacker, MIB, t0), t0 + Duration::from_secs(1));
        assert_eq!(
            pacer.turn(&attacker, MIB / 2, t0),
            t0 + Duration::from_millis(1500)
        );
        // Another source, or another user from the same source, has its own.
        assert_eq!(pacer.turn(&flow(1, "alpha"), MIB, t0), t0);
        assert_eq!(pacer.turn(&flow(11, "bob"), MIB, t0), t0);
    }

    #[test]
    fn a_piece_larger_than_the_burst_waits_for_its_excess() {
        let pacer = Pacer::new(MIB, MIB).expect("a rate");
        let t0 = Instant::now();
        assert_eq!(
            pacer.turn(&flow(9, "u"), 3 * MIB, t0),
            t0 + Duration::from_secs(2)
        );
    }

    #[test]
    fn a_quiet_flow_gets_its_burst_back_and_is_forgotten() {
        let pacer = Pacer::new(MIB, 2 * MIB).expect("a rate");
        let t0 = Instant::now();
        for _ in 0..3 {
            pacer.turn(&flow(9, "u"), MIB, t0);
        }
        assert_eq!(pacer.flows(), 1);
        // Full again 3 s after t0; at 5 s another flow's turn prunes it.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(pacer.turn(&flow(1, "u"), MIB, later), later);
        assert_eq!(pacer.flows(), 1, "flow 9 forgotten, flow 1 remembered");
        assert_eq!(pacer.turn(&flow(9, "u"), 2 * MIB, later), later);
    }

    #[test]
    fn a_burst_too_large_to_time_is_no_wait_not_a_panic() {
        let pacer = Pacer::new(1, u64::MAX).expect("a rate");
        let t0 = Instant::now();
        assert_eq!(pacer.turn(&flow(9, "u"), MIB, t0), t0);
    }

    #[test]
    fn zero_means_no_pacing() {
        assert!(Pacer::new(0, MIB).is_none());
    }

    impl Waited for Arc<Mutex<Duration>> {
        fn waited(&mut self, time: Duration) {
            if let Ok(mut total) = self.lock() {
                *total += time;
            }
        }
    }

    type Frames = futures_util::stream::Iter<
        std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
    >;

    /// A body of `n` frames of `size` bytes.
    fn body(n: usize, size: usize) -> StreamBody<Frames> {
        let frames = (0..n)
            .map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; size]))))
            .collect::<Vec<_>>();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_its_burst_goes_at_the_rate_and_says_how_long_it_waited() {
        let pacer = Pacer::new(1000, 2000).expect("a rate");
        let waited = Arc::new(Mutex::new(Duration::ZERO));
        let started = tokio::time::Instant::now();
        let paced = Paced::new(body(5, 1000), Some((pacer, flow(11, "u"))), waited.clone());
        let all = paced.collect().await.expect("no error").to_bytes();
        assert_eq!(all.len(), 5000, "every byte arrives");
        // 2,000 bytes at once, 3,000 more at 1,000 a second.
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        // The third, fourth and fifth pieces waited a second each.
        assert_eq!(*waited.lock().expect("lock"), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unpaced_body_never_waits() {
        let waited = Arc::new(Mutex::new(Duration::ZERO));
        let started = tokio::time::Instant::now();
        let paced = Paced::new(body(5, 1000), None, waited.clone());
        let all = paced.collect().await.expect("no error").to_bytes();
        assert_eq!(all.len(), 5000);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(*waited.lock().expect("lock"), Duration::ZERO);
    }
}
