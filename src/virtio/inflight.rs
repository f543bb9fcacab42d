//! Per-queue accounting of requests popped from a virtqueue and not yet
//! completed: the bound on how much work one queue may have outstanding, and
//! what `stop_vring` and the drain wait for.

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often `wait_unserved` looks whether the workers have left.
const UNSERVED_POLL: Duration = Duration::from_micros(100);

/// Requests of one queue that have been popped but not completed, and the
/// workers currently inside the queue.
#[derive(Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
    /// Threads waiting on `idle` (read and written under `count`): a
    /// notification is a system call, made only when someone waits.
    waiters: AtomicUsize,
    serving: AtomicUsize,
}

/// A worker inside a queue (see [`InFlight::enter`]); leaves on drop.
pub(crate) struct Serving<'a>(&'a AtomicUsize);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl InFlight {
    /// Marks a worker as inside the queue until the guard drops.
    ///
    /// Protocol (with `wait_unserved`): the worker enters, then checks that
    /// the queue is live (ready and enabled) and touches the ring only if
    /// so; the stopper first makes the queue not live, then waits until no
    /// worker is inside. The SeqCst fences order each side's store before
    /// its load, so either the stopper sees the worker inside and waits, or
    /// the worker sees the queue stopped and leaves it alone.
    pub(crate) fn enter(&self) -> Serving<'_> {
        self.serving.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Serving(&self.serving)
    }

    /// Waits until no worker is inside the queue; false on timeout.
    /// Call after the queue was made not live.
    pub(crate) fn wait_unserved(&self, timeout: Duration) -> bool {
        fence(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while self.serving.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(UNSERVED_POLL);
        }
        true
    }

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
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.idle.notify_all();
        }
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
            self.waiters.fetch_add(1, Ordering::Relaxed);
            c = match self.idle.wait_timeout(c, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            self.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        true
    }

    /// Waits until nothing is in flight; false on timeout.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_below(1, timeout)
    }
}
