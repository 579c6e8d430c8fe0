//! Where clients' TLS handshakes run: on threads of their own, at a lower CPU
//! priority than the threads that forward traffic.
//!
//! A TLS handshake is the most CPU a client can make the proxy spend without
//! holding a credential that opens anything: key agreement, a signature and
//! the client certificate's verification, about as much CPU as forwarding a
//! few hundred KiB. On the runtime that forwards, a burst of them (thousands
//! of connections opened at once, idle TLS at a cluster port) queues behind
//! and in front of requests in flight, and their latency is what suffers.
//! Here they run on a small runtime of their own (one thread per four cores,
//! at least one) whose threads are 10 nice levels below the proxy's: when
//! the CPU is short, forwarding goes first and handshakes wait; when it is
//! not, they cost a hop between threads and nothing else. The caps on how
//! many may be pending ([`super::pending`]) bound the queue.
//!
//! The connection stays registered with the main runtime's I/O driver: only
//! the polling (where rustls computes) moves here, and the finished stream
//! goes back to the door that accepted it.

use std::future::Future;
use std::io;

use tokio::runtime::{Handle, Runtime};
use tokio_util::task::AbortOnDropHandle;

/// How many nice levels below the rest of the proxy handshakes run.
pub const NICE_BELOW: i32 = 10;
/// The handshake threads' name, as /proc and `top -H` show it.
pub const THREAD_NAME: &str = "tls-handshake";

/// The handshake runtime. Owned by `main`, outside every async context (a
/// runtime cannot be dropped inside one); the doors get a [`Runner`].
pub struct Handshakes {
    runtime: Runtime,
}

impl Handshakes {
    /// Start the handshake threads.
    pub fn start() -> io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads((cores / 4).max(1))
            .thread_name(THREAD_NAME)
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(Self { runtime })
    }

    /// What the doors run their handshakes with.
    pub fn runner(&self) -> Runner {
        Runner(Some(self.runtime.handle().clone()))
    }
}

/// Runs a handshake on the handshake threads, or in place (unit tests, and
/// wherever no [`Handshakes`] was started).
#[derive(Clone, Default)]
pub struct Runner(Option<Handle>);

impl Runner {
    /// Run `handshake` and hand back its output; `None` if it panicked. The
    /// handshake is aborted when the caller stops waiting (shutdown), so it
    /// never outlives its door.
    pub async fn run<F>(&self, handshake: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            None => Some(handshake.await),
            Some(handle) => AbortOnDropHandle::new(handle.spawn(handshake)).await.ok(),
        }
    }
}

/// Lower the calling thread's priority by [`NICE_BELOW`] (Linux: the nice
/// value is per thread). Failing leaves it as it was: handshakes still run
/// apart from forwarding, only not behind it.
fn lower_priority() {
    // SAFETY: nice(2) changes only the calling thread's scheduling priority.
    // It may return -1 as a valid nice value, so success is judged by errno.
    let failed = unsafe {
        *libc::__errno_location() = 0;
        libc::nice(NICE_BELOW) == -1 && *libc::__errno_location() != 0
    };
    if failed {
        tracing::debug!(error = %io::Error::last_os_error(),
            "cannot lower the TLS handshake threads' priority; they run at the proxy's");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_run_on_their_own_lower_priority_threads() {
        let (_handshakes, runner, main) = runtimes();
        let own = current_nice();
        let (name, nice) = main
            .block_on(runner.run(async {
                let name = std::thread::current().name().map(str::to_owned);
                (name, current_nice())
            }))
            .expect("not panicked");
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
        assert_eq!(nice, (own + NICE_BELOW).min(19));
    }

    #[test]
    fn a_handshake_stops_when_its_door_stops_waiting() {
        let (_handshakes, runner, main) = runtimes();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        main.block_on(async {
            // The task holds `tx` until it is aborted; the abort drops it.
            let waiting = runner.run(async move {
                let _tx = tx;
                std::future::pending::<()>().await
            });
            tokio::select! {
                biased;
                _ = waiting => panic!("a pending handshake finished"),
                () = tokio::task::yield_now() => {}
            }
            assert!(
                rx.await.is_err(),
                "the aborted handshake let go of what it held"
            );
        });
    }

    #[test]
    fn in_place_without_a_runtime_of_its_own() {
        let main = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let here = std::thread::current().id();
        let there = main.block_on(Runner::default().run(async { std::thread::current().id() }));
        assert_eq!(there, Some(here));
    }

    /// The handshake runtime, its runner and a runtime for the doors.
    fn runtimes() -> (Handshakes, Runner, Runtime) {
        let handshakes = Handshakes::start().expect("handshake runtime");
        let runner = handshakes.runner();
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        (handshakes, runner, main)
    }

    fn current_nice() -> i32 {
        // SAFETY: reads the calling thread's nice value.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }
}
