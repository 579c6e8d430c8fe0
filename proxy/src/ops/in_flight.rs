//! Requests (until their response body ends), upgraded streams and relayed
//! connections in progress on every port of this process. A draining replica
//! waits until there are none ([`crate::start`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The count, shared by every port. Cheap to clone; clones share it.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// How many are in progress.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Count one more until the returned guard is dropped.
    pub fn enter(&self) -> Entered {
        self.0.fetch_add(1, Ordering::Relaxed);
        Entered(self.0.clone())
    }
}

/// One unit of [`InFlight`], released on drop.
pub struct Entered(Arc<AtomicUsize>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_while_entered() {
        let in_flight = InFlight::default();
        let a = in_flight.enter();
        let b = in_flight.clone().enter();
        assert_eq!(in_flight.count(), 2);
        drop(a);
        assert_eq!(in_flight.count(), 1);
        drop(b);
        assert_eq!(in_flight.count(), 0);
    }
}
