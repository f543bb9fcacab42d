//! Per-queue accounting of requests popped from a virtqueue and not yet
//! completed: the bound on how much work one queue may have outstanding, and
//! what `stop_vring` and the drain wait for.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Requests of one queue that have been popped but not completed.
#[derive(Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    pub(crate) fn begin(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    pub(crate) fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn end(&self, n: usize) {
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.saturating_sub(n);
        // Both waiters (drain and the in-flight bound) use this condvar.
        self.idle.notify_all();
    }

    /// Waits while `limit` or more requests are in flight; false on timeout.
    ///
    /// A driver may publish a head again while it is still in flight (the
    /// device cannot tell), so the ring size alone does not bound how many
    /// requests one queue has outstanding; this wait does.
    pub(crate) fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let limit = limit.max(1);
        let deadline = Instant::now() + timeout;
        let mut c = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *c >= limit {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = match self.idle.wait_timeout(c, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Waits until nothing is in flight; false on timeout.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_below(1, timeout)
    }
}
