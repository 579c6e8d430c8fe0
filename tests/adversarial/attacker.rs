//! Where attacks run: a tokio runtime of their own, on threads at Linux's
//! lowest CPU priority (SCHED_IDLE), apart from the runtime of the
//! legitimate users whose latency is measured. On a 2-core machine an
//! attacker on the measuring runtime takes CPU from the measurement, so an
//! attack that costs the attacker much would look like one that costs the
//! proxy; at SCHED_IDLE the attackers only get cores nothing else wants, and
//! what shows in the legitimate p99 is the proxy's cost of the attack.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

/// A running attack.
pub struct Attack {
    /// Its outcome (what the attacker saw), once it is over.
    pub outcome: oneshot::Receiver<Result<String>>,
    /// True until it is over (the latency blocks say which ran during it).
    pub running: Arc<AtomicBool>,
    /// Set once the legitimate users' measurement is over: an attack that
    /// repeats itself ([`spawn_until`]) stops then.
    pub stop: Arc<AtomicBool>,
}

/// Puts the calling thread at SCHED_IDLE; an error when the kernel refused.
fn idle_priority() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `attack` on a runtime of its own (two workers, every thread at
/// SCHED_IDLE). The attack's sockets and tasks must be made inside it, so
/// `attack` makes them (a login too): nothing of it runs on the caller's
/// runtime.
pub fn spawn<F>(attack: F) -> Attack
where
    F: Future<Output = Result<String>> + Send + 'static,
{
    spawn_until(|_| attack)
}

/// The same for an attack that repeats until it is told to stop: `attack`
/// gets the flag [`Attack::stop`] sets. A short attack (over within one
/// block of latency samples) repeated for the whole measurement is judged
/// by blocks that ran during it, not by the quiet after it.
pub fn spawn_until<A, F>(attack: A) -> Attack
where
    A: FnOnce(Arc<AtomicBool>) -> F,
    F: Future<Output = Result<String>> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let attack = attack(stop.clone());
    let (tx, rx) = oneshot::channel();
    let running = Arc::new(AtomicBool::new(true));
    let still = running.clone();
    let thread = std::thread::Builder::new()
        .name("attacker".into())
        .spawn(move || {
            let run = || -> Result<String> {
                idle_priority().context("SCHED_IDLE for the attacker's thread")?;
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("attacker")
                    .on_thread_start(|| {
                        if let Err(e) = idle_priority() {
                            eprintln!("attacker thread not at SCHED_IDLE: {e}");
                        }
                    })
                    .enable_all()
                    .build()
                    .context("the attacker's runtime")?;
                runtime.block_on(attack)
            };
            let outcome = run();
            still.store(false, Ordering::Relaxed);
            let _ = tx.send(outcome);
        });
    if let Err(e) = thread {
        // `tx` went with the closure: the receiver reads "dropped".
        eprintln!("cannot start the attacker's thread: {e}");
        running.store(false, Ordering::Relaxed);
    }
    Attack {
        outcome: rx,
        running,
        stop,
    }
}
