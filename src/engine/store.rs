//! Background stores of fetched blocks into the cache (the original target's
//! kcached): a read miss completes as soon as the source data is in RAM, and
//! the copy into the cache frame happens here.
//!
//! A [`StoreQueue`] is the handle; worker threads run [`run_store_worker`].
//! The queue is bounded: when it is full the submitting thread stores the
//! block itself, which throttles misses to the speed of the cache device.

use super::core::Core;
use super::frames::FrameState;
use crate::device::AlignedBuf;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Fetched blocks `first_block..first_block + frames.len()` waiting to be
/// written into `frames`, which are `Filling` and owned by this job.
pub(crate) struct StoreJob {
    pub first_block: u64,
    pub frames: Vec<u64>,
    pub data: AlignedBuf,
}

/// Jobs and counters behind the queue's one mutex.
struct QueueState {
    jobs: VecDeque<StoreJob>,
    /// Jobs submitted and not yet stored (queued, running or inline).
    outstanding: u64,
    /// Workers blocked waiting for a job.
    sleeping: usize,
    closed: bool,
}

/// Handle of the store workers.
///
/// One mutex and a condvar woken with `notify_one`, and only when a worker
/// sleeps: a hand-off wakes at most one thread. (A shared `mpsc::Receiver`
/// behind a mutex woke two per job: the receiving worker, and the next one
/// queued on the mutex when the first let go of it.)
pub(crate) struct StoreQueue {
    depth: usize,
    state: Mutex<QueueState>,
    work: Condvar,
    idle: Condvar,
}

impl StoreQueue {
    /// A queue of at most `depth` waiting jobs.
    pub fn new(depth: usize) -> StoreQueue {
        StoreQueue {
            depth: depth.max(1),
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                outstanding: 0,
                sleeping: 0,
                closed: false,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`, or gives it back when the queue is full or closed (the
    /// caller then stores it itself). Counts it as outstanding either way.
    fn push(&self, job: StoreJob) -> Option<StoreJob> {
        let mut st = self.lock();
        st.outstanding += 1;
        if st.closed || st.jobs.len() >= self.depth {
            return Some(job);
        }
        st.jobs.push_back(job);
        if st.sleeping > 0 {
            self.work.notify_one();
        }
        None
    }

    /// The next job for a worker; `None` once closed and drained.
    fn pop(&self) -> Option<StoreJob> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.sleeping += 1;
            st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
            st.sleeping -= 1;
        }
    }

    /// Marks one job stored.
    fn done(&self) {
        let mut st = self.lock();
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until every submitted job has been stored.
    pub fn wait_idle(&self) {
        let mut st = self.lock();
        while st.outstanding > 0 {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops accepting jobs; workers exit once the queue is drained.
    pub fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }
}

impl Core {
    /// Hands a fetched run to the store workers, or stores it inline when the
    /// queue is full or closed.
    pub(crate) fn submit_store(&self, job: StoreJob) {
        if let Some(job) = self.store.push(job) {
            self.store_job(job);
        }
    }

    /// Writes each fetched block into its frame and makes the frame idle; a
    /// frame whose write fails is freed, so nobody reads a half-written frame.
    pub(crate) fn store_job(&self, job: StoreJob) {
        let bs = self.bs as usize;
        for (i, &f) in job.frames.iter().enumerate() {
            let block = job.first_block + i as u64;
            let set = self.set_of(block);
            let data = &job.data[i * bs..(i + 1) * bs];
            match self.write_frame(f, 0, data) {
                Ok(()) => self.finish(set, f, FrameState::Idle),
                Err(e) => {
                    log::warn!("storing block {block} into cache frame {f} failed: {e}");
                    self.stats.here().errors.fetch_add(1, Relaxed);
                    self.abandon(set, f);
                }
            }
        }
        self.fetch_bufs.give(job.data);
        self.store.done();
    }
}

/// The loop of one store worker.
pub(crate) fn run_store_worker(core: Arc<Core>) {
    while let Some(job) = core.store.pop() {
        core.store_job(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(block: u64) -> StoreJob {
        StoreJob {
            first_block: block,
            frames: vec![block],
            data: AlignedBuf::new(512),
        }
    }

    #[test]
    fn queue_is_bounded_fifo_and_drains_after_close() {
        let q = StoreQueue::new(2);
        assert!(q.push(job(1)).is_none());
        assert!(q.push(job(2)).is_none());
        let back = q.push(job(3)).map(|j| j.first_block);
        assert_eq!(back, Some(3), "a full queue gives the job back");
        assert_eq!(q.pop().map(|j| j.first_block), Some(1));
        q.close();
        let closed = q.push(job(4)).map(|j| j.first_block);
        assert_eq!(closed, Some(4), "a closed queue gives the job back");
        assert_eq!(q.pop().map(|j| j.first_block), Some(2), "queued jobs drain");
        assert!(q.pop().is_none(), "then workers are told to exit");
        assert_eq!(q.lock().outstanding, 4, "given-back jobs count too");
    }

    #[test]
    fn a_sleeping_worker_is_woken_and_wait_idle_waits_for_done() {
        let q = Arc::new(StoreQueue::new(8));
        let worker = {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(j) = q.pop() {
                    got.push(j.first_block);
                    q.done();
                }
                got
            })
        };
        // Let the worker go to sleep on the empty queue first.
        while q.lock().sleeping == 0 {
            std::thread::yield_now();
        }
        for b in 0..5 {
            assert!(q.push(job(b)).is_none());
        }
        q.wait_idle();
        assert_eq!(q.lock().outstanding, 0);
        q.close();
        assert_eq!(worker.join().unwrap(), vec![0, 1, 2, 3, 4]);
    }
}
