//! The source-writing half of the writeback pipeline, and the run buffers it
//! passes back and forth.
//!
//! A pass's own thread claims a run and copies it from the cache into a run
//! buffer; the [`Writer`] writes it to the source on a helper thread and
//! hands the buffer back. At most two runs are with the writer at a time (one
//! being written, the next queued behind it, so the source never waits for
//! the pass's thread to wake up), and the pass reads a third only after the
//! oldest is done: a pass uses two buffers.

use crate::device::{AlignedBuf, DeviceError, IoOp};
use crate::engine::core::Core;
use crate::engine::EngineError;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, SendError, SyncSender};
use std::sync::Mutex;
use std::thread::Scope;

/// Buffers kept between passes: the two a pass circulates.
const KEEP: usize = 2;

/// Run buffers reused from pass to pass.
///
/// Why keep them: a fresh multi-MiB buffer costs a page fault per 4 KiB page
/// when it is first touched (its zeroing), which on this kind of machine is as
/// slow as the source write itself. At most [`KEEP`] buffers of the largest
/// run size stay allocated (8 MiB with the default 4 MiB runs); passes running
/// at the same time (background writeback and `flush_all`) allocate extra ones
/// that are dropped when returned to a full pool.
#[derive(Default)]
pub(crate) struct RunBuffers {
    free: Mutex<Vec<AlignedBuf>>,
}

impl RunBuffers {
    /// A buffer of at least `len` bytes (contents unspecified).
    pub fn take(&self, len: usize) -> AlignedBuf {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(b) if b.len() >= len => b,
            _ => AlignedBuf::new(len),
        }
    }

    /// Returns a buffer for later passes (dropped if enough are kept).
    pub fn give(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < KEEP {
            free.push(buf);
        }
    }

    /// Buffers kept right now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A run for the source: its first block, its length in bytes (whole
/// blocks) and the buffer whose first `len` bytes hold its data.
pub(crate) struct Job {
    pub first: u64,
    pub len: usize,
    pub buf: AlignedBuf,
}

/// The outcome of a [`Job`]: its buffer back (lost only if the helper thread
/// died) and the source write's result.
pub(crate) struct Done {
    pub buf: Option<AlignedBuf>,
    pub result: Result<(), EngineError>,
}

/// Most runs submitted and not yet waited for.
pub(crate) const DEPTH: usize = 2;

/// Writes runs to the source in submission order, on a helper thread scoped
/// to the pass. If the thread cannot be started (or has died) the writes
/// happen inline on submit: the pass is then serial, as before the pipeline.
pub(crate) struct Writer {
    /// Job queue of the helper thread, while it runs.
    jobs: Option<SyncSender<Job>>,
    /// Results from the helper thread.
    done: Option<Receiver<Done>>,
    /// Results of inline writes, oldest first.
    ready: VecDeque<Done>,
    /// Each run submitted and not yet waited for, oldest first: first block,
    /// length, and whether it was written inline.
    pending: VecDeque<(u64, usize, bool)>,
}

impl Writer {
    /// Starts the helper thread in `scope`. Dropping the writer ends it.
    pub fn start<'scope, 'env>(scope: &'scope Scope<'scope, 'env>, core: &'env Core) -> Writer {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(DEPTH);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let spawned = std::thread::Builder::new()
            .name("vbc-wb-writer".into())
            .spawn_scoped(scope, move || {
                for job in job_rx {
                    let result = core.write_source_blocks(job.first, &job.buf[..job.len]);
                    let done = Done {
                        buf: Some(job.buf),
                        result,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            });
        let (jobs, done) = match spawned {
            Ok(_) => (Some(jobs), Some(done_rx)),
            Err(e) => {
                log::warn!("writeback: cannot start the writer thread ({e}); writing inline");
                (None, None)
            }
        };
        Writer {
            jobs,
            done,
            ready: VecDeque::with_capacity(DEPTH),
            pending: VecDeque::with_capacity(DEPTH),
        }
    }

    /// Runs submitted and not yet waited for.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Hands `job` to the writer; at most [`DEPTH`] may be outstanding.
    pub fn submit(&mut self, core: &Core, job: Job) {
        debug_assert!(self.pending.len() < DEPTH, "too many runs submitted");
        let (first, len) = (job.first, job.len);
        let job = match &self.jobs {
            Some(jobs) => match jobs.send(job) {
                Ok(()) => {
                    self.pending.push_back((first, len, false));
                    return;
                }
                Err(SendError(job)) => job,
            },
            None => job,
        };
        // No helper thread (any more): write here.
        self.jobs = None;
        let result = core.write_source_blocks(first, &job.buf[..len]);
        self.ready.push_back(Done {
            buf: Some(job.buf),
            result,
        });
        self.pending.push_back((first, len, true));
    }

    /// Waits for the oldest submitted run; `None` if there is none.
    pub fn wait(&mut self, core: &Core) -> Option<Done> {
        let (first, len, inline) = self.pending.pop_front()?;
        let done = if inline {
            self.ready.pop_front()
        } else {
            self.done.as_ref().and_then(|d| d.recv().ok())
        };
        Some(done.unwrap_or_else(|| {
            // The helper thread died before answering (it can only panic,
            // which the scope re-raises): report the run as not written.
            Done {
                buf: None,
                result: Err(EngineError::Source(DeviceError::Io {
                    op: IoOp::Write,
                    offset: first.saturating_mul(core.bs),
                    len: len as u64,
                    name: String::from("writeback writer thread"),
                    source: std::io::Error::other("the writer thread stopped"),
                })),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_bounds_buffers() {
        let pool = RunBuffers::default();
        let a = pool.take(8192);
        let a_ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(4096);
        assert_eq!(b.as_ptr(), a_ptr, "a kept buffer is reused");
        assert!(b.len() >= 4096);
        let c = pool.take(8192);
        let d = pool.take(8192);
        pool.give(b);
        pool.give(c);
        pool.give(d);
        assert_eq!(pool.kept(), KEEP);
        // Too small a kept buffer is not handed out.
        let small = RunBuffers::default();
        small.give(AlignedBuf::new(4096));
        assert_eq!(small.take(8192).len(), 8192);
    }
}
