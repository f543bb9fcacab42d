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
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};

/// Fetched blocks `first_block..first_block + frames.len()` waiting to be
/// written into `frames`, which are `Filling` and owned by this job.
pub(crate) struct StoreJob {
    pub first_block: u64,
    pub frames: Vec<u64>,
    pub data: AlignedBuf,
}

/// Handle of the store workers.
pub(crate) struct StoreQueue {
    tx: Mutex<Option<SyncSender<StoreJob>>>,
    outstanding: Mutex<u64>,
    idle: Condvar,
}

impl StoreQueue {
    /// A queue of `depth` jobs and its receiving end for the workers.
    pub fn new(depth: usize) -> (StoreQueue, Receiver<StoreJob>) {
        let (tx, rx) = sync_channel(depth.max(1));
        (
            StoreQueue {
                tx: Mutex::new(Some(tx)),
                outstanding: Mutex::new(0),
                idle: Condvar::new(),
            },
            rx,
        )
    }

    fn adjust(&self, up: bool) {
        let mut n = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.idle.notify_all();
            }
        }
    }

    /// Waits until every submitted job has been stored.
    pub fn wait_idle(&self) {
        let mut n = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Stops accepting jobs; workers exit once the queue is drained.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Core {
    /// Hands a fetched run to the store workers, or stores it inline when the
    /// queue is full or closed.
    pub(crate) fn submit_store(&self, job: StoreJob) {
        self.store.adjust(true);
        let sender = self
            .store
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let job = match sender {
            Some(tx) => match tx.try_send(job) {
                Ok(()) => return,
                Err(TrySendError::Full(j)) | Err(TrySendError::Disconnected(j)) => j,
            },
            None => job,
        };
        self.store_job(job);
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
                    self.stats.errors.fetch_add(1, Relaxed);
                    self.abandon(set, f);
                }
            }
        }
        self.fetch_bufs.give(job.data);
        self.store.adjust(false);
    }
}

/// The loop of one store worker.
pub(crate) fn run_store_worker(core: Arc<Core>, rx: Arc<Mutex<Receiver<StoreJob>>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        match job {
            Ok(job) => core.store_job(job),
            Err(_) => return,
        }
    }
}
