//! Per-thread shards for counters that every request bumps.
//!
//! Queue threads on different cores that bump one atomic (or anything in its
//! cache line) pass the line back and forth on every request. A sharded
//! counter gives each thread its own line; readers sum the shards.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};

/// Shards per counter: more than the threads that bump counters on a busy
/// daemon (queue threads, fetch pool, writeback), so threads rarely share one.
pub const SHARDS: usize = 16;

/// The shard of the calling thread, in `0..SHARDS`: threads take shards
/// round robin in the order they first ask, and keep them.
#[inline]
pub fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        if i.get() == usize::MAX {
            i.set(NEXT.fetch_add(1, Relaxed) % SHARDS);
        }
        i.get()
    })
}

#[derive(Default, Debug)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// A count of things in progress, sharded by thread, with sequentially
/// consistent operations.
///
/// A thing may end on another thread than it began, so one shard can go
/// "below zero" (it wraps); the total is exact once nothing is changing.
/// The start-then-check-a-flag protocol still holds: if a thread adds one
/// and then finds a flag unset, and another sets the flag and then reads
/// [`ShardedCount::total`], the total counts that thing (all operations are
/// SeqCst, and the add precedes the read of its own shard).
#[derive(Debug)]
pub struct ShardedCount {
    shards: Box<[Padded]>,
}

impl Default for ShardedCount {
    fn default() -> Self {
        ShardedCount {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
        }
    }
}

impl ShardedCount {
    #[inline]
    fn here(&self) -> &AtomicU64 {
        &self.shards[shard_index() % self.shards.len()].0
    }

    /// One more in progress.
    #[inline]
    pub fn inc(&self) {
        self.here().fetch_add(1, SeqCst);
    }

    /// One fewer in progress.
    #[inline]
    pub fn dec(&self) {
        self.here().fetch_sub(1, SeqCst);
    }

    /// The number in progress (read shard by shard).
    pub fn total(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |t, s| t.wrapping_add(s.0.load(SeqCst)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_across_threads_that_begin_and_end_apart() {
        let c = Arc::new(ShardedCount::default());
        // Begin 1000 on one thread, end them on another.
        let c1 = Arc::clone(&c);
        std::thread::spawn(move || (0..1000).for_each(|_| c1.inc()))
            .join()
            .unwrap();
        assert_eq!(c.total(), 1000);
        let c2 = Arc::clone(&c);
        std::thread::spawn(move || (0..999).for_each(|_| c2.dec()))
            .join()
            .unwrap();
        assert_eq!(c.total(), 1);
        c.dec();
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn a_thread_keeps_its_shard() {
        let (a, b) = std::thread::spawn(|| (shard_index(), shard_index()))
            .join()
            .unwrap();
        assert_eq!(a, b);
        assert!(a < SHARDS);
    }
}
