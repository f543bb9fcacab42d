//! The source-writing half of the writeback pipeline, and the run buffers it
//! passes back and forth.
//!
//! A pass's own thread claims a run and copies it from the cache into a run
//! buffer; the [`Writer`] writes it to the source on a writer thread and
//! hands the buffer back. Writer threads outlive passes ([`WriterPool`]). At most two runs are with the writer at a time (one
//! being written, the next queued behind it, so the source never waits for
//! the pass's thread to wake up), and the pass reads a third only after the
//! oldest is done: a pass uses two buffers.

use crate::device::{AlignedBuf, DeviceError, IoOp};
use crate::engine::core::Core;
use crate::engine::EngineError;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, SendError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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

/// A run for the source: its byte offset on the source, its length in bytes
/// (clipped at the end of the source) and the buffer whose first `len` bytes
/// hold its data.
struct Job {
    offset: u64,
    len: usize,
    buf: AlignedBuf,
}

/// The outcome of a submitted run: its buffer back (lost only if the writer
/// thread died) and the source write's result.
pub(crate) struct Done {
    pub buf: Option<AlignedBuf>,
    pub result: Result<(), EngineError>,
}

/// Most runs submitted and not yet waited for.
pub(crate) const DEPTH: usize = 2;

/// Idle writer threads kept for later passes.
const KEEP_THREADS: usize = 2;

/// A writer thread and the two ends of its channels.
///
/// The thread holds only the source device, not the engine, so a kept thread
/// never keeps the engine's state alive; it ends when its job sender is
/// dropped, after finishing the job it holds.
struct WriterThread {
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    handle: JoinHandle<()>,
}

impl WriterThread {
    fn spawn(core: &Core) -> std::io::Result<WriterThread> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(DEPTH);
        let (done_tx, done) = mpsc::channel::<Done>();
        let source = Arc::clone(&core.source);
        let handle = std::thread::Builder::new()
            .name("vbc-wb-writer".into())
            .spawn(move || {
                for job in job_rx {
                    let result = source
                        .write_at(&job.buf[..job.len], job.offset)
                        .map_err(EngineError::Source);
                    let done = Done {
                        buf: Some(job.buf),
                        result,
                    };
                    if done_tx.send(done).is_err() {
                        break;
                    }
                }
            })?;
        Ok(WriterThread { jobs, done, handle })
    }

    /// Ends the thread and waits for it.
    fn stop(self) {
        drop(self.jobs);
        if self.handle.join().is_err() {
            log::warn!("writeback: a writer thread panicked");
        }
    }
}

/// Writer threads kept from pass to pass.
///
/// Why keep them: starting a thread, and its first wake-up, cost a
/// noticeable part of a millisecond on this kind of machine (a PVM guest),
/// paid once per pass when the thread was scoped to the pass. A pass takes
/// an idle thread (or starts one) and gives it back when it has collected
/// every run it submitted, so a kept thread never holds a job. Passes
/// running at the same time (background writeback and `flush_all`) each get
/// their own thread, so each sees its runs finish in submission order.
#[derive(Default)]
pub(crate) struct WriterPool {
    idle: Mutex<Vec<WriterThread>>,
}

impl WriterPool {
    fn take(&self) -> Option<WriterThread> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn give(&self, t: WriterThread) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < KEEP_THREADS {
            idle.push(t);
        } else {
            drop(idle);
            t.stop();
        }
    }

    /// Ends the idle threads and waits for them (engine shutdown). A pass
    /// started later starts a new one.
    pub fn stop(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        for t in idle {
            t.stop();
        }
    }

    /// Idle threads kept right now.
    #[cfg(test)]
    pub fn kept(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for WriterPool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes runs to the source in submission order, on a writer thread taken
/// from the engine's [`WriterPool`] for one pass. If no thread can be
/// started (or it has died) the writes happen inline on submit: the pass is
/// then serial, as before the pipeline.
pub(crate) struct Writer {
    /// The writer thread, while it works.
    thread: Option<WriterThread>,
    /// Results of inline writes, oldest first.
    ready: VecDeque<Done>,
    /// Each run submitted and not yet waited for, oldest first: source
    /// offset, length, and whether it was written inline.
    pending: VecDeque<(u64, usize, bool)>,
}

impl Writer {
    /// Takes a kept writer thread of `core`, or starts one.
    pub fn start(core: &Core) -> Writer {
        let thread = match core.wb_pool.take() {
            Some(t) => Some(t),
            None => match WriterThread::spawn(core) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("writeback: cannot start the writer thread ({e}); writing inline");
                    None
                }
            },
        };
        Writer {
            thread,
            ready: VecDeque::with_capacity(DEPTH),
            pending: VecDeque::with_capacity(DEPTH),
        }
    }

    /// Gives the thread back to `core`'s pool for the next pass. Call only
    /// once every submitted run was waited for.
    pub fn finish(mut self, core: &Core) {
        if let Some(t) = self.thread.take() {
            if self.pending.is_empty() {
                core.wb_pool.give(t);
            } else {
                // Cannot happen (a pass drains first); a thread still
                // holding jobs is not reused.
                t.stop();
            }
        }
    }

    /// Runs submitted and not yet waited for.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Hands the run of blocks `first..` held in `buf[..len]` to the writer;
    /// at most [`DEPTH`] may be outstanding. The length is clipped at the end
    /// of the source.
    pub fn submit(&mut self, core: &Core, first: u64, len: usize, buf: AlignedBuf) {
        debug_assert!(self.pending.len() < DEPTH, "too many runs submitted");
        let (offset, len) = core.source_span(first, len);
        let job = Job { offset, len, buf };
        let job = match &self.thread {
            Some(t) => match t.jobs.send(job) {
                Ok(()) => {
                    self.pending.push_back((offset, len, false));
                    return;
                }
                Err(SendError(job)) => job,
            },
            None => job,
        };
        // No writer thread (any more): write here.
        if let Some(t) = self.thread.take() {
            t.stop();
        }
        let result = core.write_source_blocks(first, &job.buf[..len]);
        self.ready.push_back(Done {
            buf: Some(job.buf),
            result,
        });
        self.pending.push_back((offset, len, true));
    }

    /// Waits for the oldest submitted run; `None` if there is none.
    pub fn wait(&mut self, core: &Core) -> Option<Done> {
        let (offset, len, inline) = self.pending.pop_front()?;
        let done = if inline {
            self.ready.pop_front()
        } else {
            // The source is not marked written: the pass flushes it itself
            // before commits may record the run clean (`SRCPEND`).
            self.thread.as_ref().and_then(|t| t.done.recv().ok())
        };
        Some(done.unwrap_or_else(|| {
            // The writer thread died before answering (it can only panic):
            // report the run as not written.
            Done {
                buf: None,
                result: Err(EngineError::Source(DeviceError::Io {
                    op: IoOp::Write,
                    offset,
                    len: len as u64,
                    name: core.source.name(),
                    source: std::io::Error::other("the writeback writer thread stopped"),
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
