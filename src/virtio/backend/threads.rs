//! Which worker thread serves which queue, and how many there are.

use super::BlkBackendConfig;

impl BlkBackendConfig {
    /// The number of queue worker threads actually used: `queue_threads`
    /// clamped to 1..=`num_queues` (0: [`default_queue_threads`]), and one
    /// per queue when polling (a poll session serves one queue and would
    /// starve the others of its thread).
    pub fn threads(&self) -> u16 {
        let queues = self.num_queues.max(1);
        let polling = !self.poll.is_zero();
        match self.queue_threads {
            0 => default_queue_threads(queues, polling, host_cpus()),
            _ if polling => queues,
            n => n.min(queues),
        }
    }
}

/// The CPUs this process may run on (1 if that cannot be read).
pub fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Queue threads when none are given (`--queue-threads`, or
/// [`BlkBackendConfig::queue_threads`] 0): one per queue, but at most half
/// of the CPUs the daemon may run on (at least one), so that the daemon
/// does not take every CPU from the guests and their VMMs; with polling,
/// one per queue (a poll session serves one queue and would starve the
/// others of its thread). On a 2-CPU host one thread serving 2 queues
/// measured 1.13x qsd against 1.07x for two threads, with 10 % less CPU
/// per request (BENCHMARKS.md, session 14).
pub fn default_queue_threads(queues: u16, polling: bool, cpus: usize) -> u16 {
    if polling {
        return queues;
    }
    let half = u16::try_from((cpus / 2).max(1)).unwrap_or(u16::MAX);
    queues.min(half)
}

/// The queue masks of the worker threads (vhost-user-backend's
/// `queues_per_thread`): thread `t` serves the queues `q` with
/// `q % threads == t`.
pub(super) fn thread_masks(queues: u16, threads: u16) -> Vec<u64> {
    let threads = threads.max(1);
    (0..threads)
        .map(|t| {
            (0..queues.min(64))
                .filter(|q| q % threads == t)
                .fold(0u64, |mask, q| mask | 1u64 << q)
        })
        .collect()
}

/// The epoll event id of the io_uring completion eventfd of the `local`-th
/// queue of a worker: above the ids 0..=`queues` that vhost-user-backend
/// reserves for kicks and its exit event.
pub(super) fn ring_event_id(queues: u16, local: usize) -> u64 {
    u64::from(queues) + 1 + local as u64
}

/// The queue index of the `local`-th queue of worker thread `thread`, when
/// queue `q` is served by thread `q % threads` (so a thread's queues, in
/// index order, are `thread`, `thread + threads`, ...).
pub(super) fn queue_of(thread: usize, local: usize, threads: u16) -> usize {
    local
        .saturating_mul(usize::from(threads.max(1)))
        .saturating_add(thread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::DeviceLimits;
    use std::time::Duration;

    /// `threads()` owns the default: 0 means `default_queue_threads` for this
    /// host, an explicit count is clamped to the queues, and polling always
    /// gets one thread per queue.
    #[test]
    fn default_queue_threads_use_at_most_half_the_cpus() {
        assert_eq!(default_queue_threads(2, false, 2), 1);
        assert_eq!(default_queue_threads(2, false, 1), 1);
        assert_eq!(default_queue_threads(4, false, 4), 2);
        assert_eq!(default_queue_threads(4, false, 64), 4);
        assert_eq!(default_queue_threads(1, false, 64), 1);
        // Polling needs a thread per queue whatever the CPUs.
        assert_eq!(default_queue_threads(4, true, 2), 4);
    }

    #[test]
    fn thread_count_default_clamp_and_polling() {
        let cfg = |queues, threads, poll_us| BlkBackendConfig {
            num_queues: queues,
            queue_size: 256,
            limits: DeviceLimits::new(1 << 20, 4096, false),
            serial: String::new(),
            io_uring: false,
            poll: Duration::from_micros(poll_us),
            queue_threads: threads,
            pin_guest_memory: false,
            bounce_min: None,
            unordered: false,
            drain_timeout: Duration::from_secs(60),
        };
        for queues in [1u16, 2, 3, 8] {
            let want = default_queue_threads(queues, false, host_cpus());
            assert_eq!(cfg(queues, 0, 0).threads(), want, "{queues} queues");
            assert!((1..=queues).contains(&want));
            assert_eq!(cfg(queues, 0, 5).threads(), queues);
            assert_eq!(cfg(queues, 1, 5).threads(), queues);
            assert_eq!(cfg(queues, 1, 0).threads(), 1);
            assert_eq!(cfg(queues, 100, 0).threads(), queues);
        }
    }

    /// For every queue count and thread count, the event a worker gets for
    /// each of its queues (numbered as vhost-user-backend numbers kicks: the
    /// queue's place among the thread's queues) maps back to that queue, each
    /// queue has exactly one worker, and the completion event ids of a
    /// worker are distinct, above the reserved ids and fit in a u16.
    #[test]
    fn every_queue_layout_maps_events_back_to_their_queue() {
        for queues in 1..=16u16 {
            for threads in 1..=queues {
                let masks = thread_masks(queues, threads);
                assert_eq!(masks.len(), usize::from(threads));
                let all = masks.iter().fold(0u64, |a, m| {
                    assert_eq!(a & m, 0, "a queue on two threads");
                    a | m
                });
                assert_eq!(
                    all,
                    (1u64 << queues) - 1,
                    "{queues} queues, {threads} threads"
                );
                for (t, &mask) in masks.iter().enumerate() {
                    let mut ids = Vec::new();
                    for q in (0..queues).filter(|q| mask >> q & 1 == 1) {
                        // vhost-user-backend's `evt_idx` for queue q.
                        let local = (mask.count_ones() - (mask >> q).count_ones()) as usize;
                        assert_eq!(queue_of(t, local, threads), usize::from(q));
                        let id = ring_event_id(queues, local);
                        assert!(id > u64::from(queues) && id <= u64::from(u16::MAX));
                        ids.push(id);
                    }
                    ids.dedup();
                    assert_eq!(ids.len(), mask.count_ones() as usize);
                }
            }
        }
    }
}
