//! The source-writing half of the writeback pipeline, and the run buffers it
//! passes back and forth.
//!
//! A pass's own thread claims a run and copies it from the cache into a run
//! buffer; the [`Writer`] writes it to the source on a writer thread and
//! hands the buffer back. Writer threads outlive passes ([`WriterPool`]).
//! Up to `WritebackConfig::max_inflight_runs` runs (and about
//! [`MAX_INFLIGHT_BYTES`]) are with the writer threads at a time, each
//! written by its own thread, so a source that serves requests in parallel
//! (a remote store, an array) is not written one run per round trip; the
//! pass reads the next run while they are written.

use crate::device::{AlignedBuf, DeviceError, IoOp};
use crate::engine::core::Core;
use crate::engine::EngineError;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, SendError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Buffers kept between passes (a pass circulates one per run in flight).
const KEEP: usize = 16;

/// Run buffers reused from pass to pass.
///
/// Why keep them: a fresh multi-MiB buffer costs a page fault per 4 KiB page
/// when it is first touched (its zeroing), which on this kind of machine is as
/// slow as the source write itself. At most [`KEEP`] buffers stay allocated;
/// a new buffer is sized to the next power of two of its run, so short runs
/// (random dirty blocks) do not pin 4 MiB each, and a pass's bytes in flight
/// are bounded ([`MAX_INFLIGHT_BYTES`]). Passes running at the same time
/// (background writeback and `flush_all`) allocate extra ones that are
/// dropped when returned to a full pool.
#[derive(Default)]
pub(crate) struct RunBuffers {
    free: Mutex<Vec<AlignedBuf>>,
}

impl RunBuffers {
    /// A buffer of at least `len` bytes (contents unspecified): the
    /// smallest kept one that is large enough, else a new one.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => free.swap_remove(i),
            None => {
                drop(free);
                AlignedBuf::new(len.checked_next_power_of_two().unwrap_or(len))
            }
        }
    }

    /// Returns a buffer for later passes. When enough are kept the
    /// smallest of them and `buf` is dropped.
    pub fn give(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.push(buf);
        if free.len() > KEEP {
            if let Some((i, _)) = free.iter().enumerate().min_by_key(|(_, b)| b.len()) {
                free.swap_remove(i);
            }
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

/// Most bytes of runs with the writer threads at a time (a single run may
/// be larger): it bounds the run buffers a pass holds when runs are long,
/// while short runs (random dirty blocks) can still fill the run limit.
pub(crate) const MAX_INFLIGHT_BYTES: usize = 32 << 20;

/// Idle writer threads kept for later passes.
const KEEP_THREADS: usize = 16;

/// A writer thread and the two ends of its channels.
///
/// The thread holds only the source device, not the engine, so a kept thread
/// never keeps the engine's state alive; it ends when its job sender is
/// dropped, after finishing the jobs it holds.
struct WriterThread {
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    handle: JoinHandle<()>,
}

/// Jobs a writer thread's channel holds without blocking the pass (a pass
/// never gives one thread more than its run limit).
const THREAD_QUEUE: usize = 64;

impl WriterThread {
    fn spawn(core: &Core) -> std::io::Result<WriterThread> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(THREAD_QUEUE);
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
/// idle threads (or starts them) as it needs them and gives them back when
/// it has collected every run it submitted, so a kept thread never holds a
/// job. Passes running at the same time (background writeback and
/// `flush_all`) each get their own threads.
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
    /// started later starts new ones.
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

/// A writer thread used by one pass, and how many of its runs are not yet
/// waited for.
struct Slot {
    thread: WriterThread,
    load: usize,
    /// Its job channel is closed (the thread died): given no more jobs.
    dead: bool,
}

/// Where a submitted run is being written.
#[derive(Clone, Copy)]
enum At {
    Thread(usize),
    Inline,
}

/// Writes runs to the source, several at a time, on writer threads taken
/// from the engine's [`WriterPool`] for one pass; their results are handed
/// back in submission order. A run goes to an idle thread of the pass, or to
/// a new one while the pass has fewer threads than runs in flight. If no
/// thread can be had the write happens inline on submit (the pass is then
/// serial, as before the pipeline).
pub(crate) struct Writer {
    slots: Vec<Slot>,
    /// Results of inline writes, oldest first.
    ready: VecDeque<Done>,
    /// Each run submitted and not yet waited for, oldest first: source
    /// offset, length, and where it is written.
    pending: VecDeque<(u64, usize, At)>,
    /// A thread could not be started: do not try again in this pass.
    no_more_threads: bool,
}

impl Writer {
    /// A writer with no thread yet (threads are taken on submit).
    pub fn start() -> Writer {
        Writer {
            slots: Vec::new(),
            ready: VecDeque::new(),
            pending: VecDeque::new(),
            no_more_threads: false,
        }
    }

    /// Gives the threads back to `core`'s pool for the next pass. Call only
    /// once every submitted run was waited for.
    pub fn finish(mut self, core: &Core) {
        for s in self.slots.drain(..) {
            if s.load == 0 && !s.dead {
                core.wb_pool.give(s.thread);
            } else {
                // Cannot happen for a live thread (a pass drains first); a
                // thread still holding jobs is not reused.
                s.thread.stop();
            }
        }
    }

    /// Runs submitted and not yet waited for.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// A live thread of the pass with nothing to do, else a new one (kept or
    /// started), else the live one with the fewest runs; `None` if the pass
    /// has no live thread and none can be had.
    fn pick(&mut self, core: &Core) -> Option<usize> {
        let live = || self.slots.iter().enumerate().filter(|(_, s)| !s.dead);
        if let Some((i, _)) = live().find(|(_, s)| s.load == 0) {
            return Some(i);
        }
        if !self.no_more_threads {
            let t = match core.wb_pool.take() {
                Some(t) => Some(t),
                None => match WriterThread::spawn(core) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        log::warn!("writeback: cannot start a writer thread ({e})");
                        self.no_more_threads = true;
                        None
                    }
                },
            };
            if let Some(thread) = t {
                self.slots.push(Slot {
                    thread,
                    load: 0,
                    dead: false,
                });
                return Some(self.slots.len() - 1);
            }
        }
        live().min_by_key(|(_, s)| s.load).map(|(i, _)| i)
    }

    /// Hands the run of blocks `first..` held in `buf[..len]` to a writer
    /// thread. The length is clipped at the end of the source.
    pub fn submit(&mut self, core: &Core, first: u64, len: usize, buf: AlignedBuf) {
        let (offset, len) = core.source_span(first, len);
        let mut job = Job { offset, len, buf };
        while let Some(i) = self.pick(core) {
            let slot = &mut self.slots[i];
            match slot.thread.jobs.send(job) {
                Ok(()) => {
                    slot.load += 1;
                    self.pending.push_back((offset, len, At::Thread(i)));
                    return;
                }
                Err(SendError(j)) => {
                    // The thread is gone: try another one.
                    slot.dead = true;
                    job = j;
                }
            }
        }
        // No writer thread (any more): write here.
        let result = core.write_source_blocks(first, &job.buf[..len]);
        self.ready.push_back(Done {
            buf: Some(job.buf),
            result,
        });
        self.pending.push_back((offset, len, At::Inline));
    }

    /// Waits for the oldest submitted run; `None` if there is none.
    pub fn wait(&mut self, core: &Core) -> Option<Done> {
        let (offset, len, at) = self.pending.pop_front()?;
        let done = match at {
            At::Inline => self.ready.pop_front(),
            At::Thread(i) => self.slots.get_mut(i).and_then(|s| {
                s.load = s.load.saturating_sub(1);
                // A thread writes its runs in the order it got them, and
                // runs are waited for in submission order, so its next
                // result is this run's. The source is not marked written:
                // the pass flushes it itself before commits may record the
                // run clean (`SRCPEND`).
                let r = s.thread.done.recv().ok();
                if r.is_none() {
                    s.dead = true;
                }
                r
            }),
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
        pool.give(b);
        for _ in 0..KEEP + 2 {
            pool.give(AlignedBuf::new(4096));
        }
        assert_eq!(pool.kept(), KEEP);
        // The large one stays (the smallest go first) and serves 8K again.
        assert_eq!(pool.take(8192).as_ptr(), a_ptr);
        // New buffers are rounded up to a power of two.
        assert_eq!(pool.take(3 * 4096).len(), 4 * 4096);
        // Too small a kept buffer is not handed out.
        let small = RunBuffers::default();
        small.give(AlignedBuf::new(4096));
        assert_eq!(small.take(8192).len(), 8192);
    }
}
