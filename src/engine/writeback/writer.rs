//! The source-writing half of the writeback pipeline, and the run buffers it
//! passes back and forth.
//!
//! A pass's own thread claims a run (and reads it from the cache if it is
//! short); the [`Writer`] writes it to the source on a writer thread, after
//! reading it from the cache into the run buffer if the pass did not, and
//! hands the buffer back. Writer threads outlive passes ([`WriterPool`]).
//! Up to `WritebackConfig::max_inflight_runs` runs (and about
//! [`MAX_INFLIGHT_BYTES`]) are with the writer threads at a time, each
//! written by its own thread, so a source that serves requests in parallel
//! (a remote store, an array) is not written one run per round trip, and the
//! cache copies of several long runs use several cores.

use crate::device::{AlignedBuf, BlockDevice, DeviceError, IoOp};
use crate::engine::core::Core;
use crate::engine::EngineError;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, SendError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// One cache read of a run: `len` bytes at byte `offset` of the cache
/// device, copied to `buf[at..at + len]` of the run's buffer.
pub(crate) struct Segment {
    pub offset: u64,
    pub at: usize,
    pub len: usize,
}

/// A run for the source: the pass's id for it, the cache reads that fill
/// its buffer, its byte offset on the source, its length in bytes there
/// (clipped at the end of the source), the buffer, and where to send the
/// result (the pass's channel).
///
/// Invariant: every segment lies inside `buf`. Once they are read (or at
/// once if there are none: the pass read the run), `buf` holds the run,
/// of which the source gets the first `len` bytes.
struct Job {
    id: u64,
    reads: Vec<Segment>,
    offset: u64,
    len: usize,
    buf: AlignedBuf,
    done: Sender<Done>,
}

/// Reads `segs` from `cache` into `buf` (each segment must lie inside it).
pub(crate) fn read_segments(
    cache: &dyn BlockDevice,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), EngineError> {
    for s in segs {
        cache
            .read_at(&mut buf[s.at..s.at + s.len], s.offset)
            .map_err(EngineError::Cache)?;
    }
    Ok(())
}

impl Job {
    /// Copies the run from `cache` into the buffer (the reads it still
    /// has), then writes it to `source`. A failed cache read writes nothing.
    fn copy(
        &mut self,
        cache: &dyn BlockDevice,
        source: &dyn BlockDevice,
    ) -> Result<(), EngineError> {
        read_segments(cache, &self.reads, &mut self.buf)?;
        source
            .write_at(&self.buf[..self.len], self.offset)
            .map_err(EngineError::Source)
    }
}

/// The outcome of a submitted run: the id [`Writer::submit`] gave it, its
/// buffer back (lost only if the writer thread died) and the result of its
/// cache reads and source write.
pub(crate) struct Done {
    pub id: u64,
    pub buf: Option<AlignedBuf>,
    pub result: Result<(), EngineError>,
}

/// Most bytes of runs with the writer threads at a time (a single run may
/// be larger): it bounds the run buffers a pass holds when runs are long,
/// while short runs (random dirty blocks) can still fill the run limit.
pub(crate) const MAX_INFLIGHT_BYTES: usize = 32 << 20;

/// Idle writer threads kept for later passes.
const KEEP_THREADS: usize = 16;

/// How often a pass waiting for results checks whether a writer thread
/// holding its runs has died (it can only panic).
const DEAD_CHECK: Duration = Duration::from_millis(200);

/// A writer thread and its job channel.
///
/// The thread holds only the two devices, not the engine, so a kept thread
/// never keeps the engine's state alive; it ends when its job sender is
/// dropped, after finishing the jobs it holds. Results go to the channel
/// named in each job, so one pass's results never reach another pass.
struct WriterThread {
    jobs: SyncSender<Job>,
    handle: JoinHandle<()>,
}

/// Jobs a writer thread's channel holds without blocking the pass (a pass
/// never gives one thread more than its run limit).
const THREAD_QUEUE: usize = 64;

impl WriterThread {
    fn spawn(core: &Core) -> std::io::Result<WriterThread> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(THREAD_QUEUE);
        let source = Arc::clone(&core.source);
        let cache = Arc::clone(&core.cache);
        let handle = std::thread::Builder::new()
            .name("vbc-wb-writer".into())
            .spawn(move || {
                for mut job in job_rx {
                    let result = job.copy(&*cache, &*source);
                    // A pass that is gone no longer wants the result.
                    let _ = job.done.send(Done {
                        id: job.id,
                        buf: Some(job.buf),
                        result,
                    });
                }
            })?;
        Ok(WriterThread { jobs, handle })
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
    /// Its job channel is closed or the thread has ended: given no more
    /// jobs.
    dead: bool,
}

/// Where a submitted run is being written.
#[derive(Clone, Copy, PartialEq)]
enum At {
    Thread(usize),
    Inline,
}

/// A run submitted and not yet waited for.
struct Pending {
    id: u64,
    offset: u64,
    len: usize,
    at: At,
}

/// Writes runs to the source, several at a time, on writer threads taken
/// from the engine's [`WriterPool`] for one pass. A run goes to an idle
/// thread of the pass, or to a new one while the pass has fewer threads than
/// runs in flight. If no thread can be had the write happens inline on
/// submit (the pass is then serial, as before the pipeline).
///
/// Results come back in the order the writes finish, not the order of
/// submission: one slow write does not keep the frames of the runs written
/// after it busy (a request waiting for one of those frames goes on as soon
/// as its run is done).
pub(crate) struct Writer {
    slots: Vec<Slot>,
    /// Results of inline writes, oldest first.
    ready: VecDeque<Done>,
    /// Each run submitted and not yet waited for, oldest first.
    pending: VecDeque<Pending>,
    next_id: u64,
    /// The pass's result channel (a sender goes with each job).
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// A thread could not be started: do not try again in this pass.
    no_more_threads: bool,
}

impl Writer {
    /// A writer with no thread yet (threads are taken on submit).
    pub fn start() -> Writer {
        let (done_tx, done_rx) = mpsc::channel();
        Writer {
            slots: Vec::new(),
            ready: VecDeque::new(),
            pending: VecDeque::new(),
            next_id: 0,
            done_tx,
            done_rx,
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

    /// Hands the run of blocks `first..`, `len` bytes in `buf` once `reads`
    /// (none if the pass read it already) are copied from the cache, to a
    /// writer thread and returns the id its [`Done`] will carry. The source
    /// write is clipped at the end of the source.
    pub fn submit(
        &mut self,
        core: &Core,
        first: u64,
        len: usize,
        reads: Vec<Segment>,
        buf: AlignedBuf,
    ) -> u64 {
        let (offset, len) = core.source_span(first, len);
        let id = self.next_id;
        self.next_id += 1;
        let mut job = Job {
            id,
            reads,
            offset,
            len,
            buf,
            done: self.done_tx.clone(),
        };
        while let Some(i) = self.pick(core) {
            let slot = &mut self.slots[i];
            match slot.thread.jobs.send(job) {
                Ok(()) => {
                    slot.load += 1;
                    self.pending.push_back(Pending {
                        id,
                        offset,
                        len,
                        at: At::Thread(i),
                    });
                    return id;
                }
                Err(SendError(j)) => {
                    // The thread is gone: try another one.
                    slot.dead = true;
                    job = j;
                }
            }
        }
        // No writer thread (any more): copy here.
        let result = job.copy(&*core.cache, &*core.source);
        self.ready.push_back(Done {
            id,
            buf: Some(job.buf),
            result,
        });
        self.pending.push_back(Pending {
            id,
            offset,
            len,
            at: At::Inline,
        });
        id
    }

    /// Waits for any submitted run to be done (an inline one first) and
    /// returns its result; `None` if none is outstanding.
    ///
    /// The source is not marked written: the pass flushes it itself before
    /// commits may record the run clean (`SRCPEND`).
    pub fn wait(&mut self, core: &Core) -> Option<Done> {
        if self.pending.is_empty() {
            return None;
        }
        if let Some(done) = self.ready.pop_front() {
            self.take_pending(done.id);
            return Some(done);
        }
        loop {
            let done = match self.done_rx.recv_timeout(DEAD_CHECK) {
                Ok(done) => done,
                Err(_) => match self.reap_dead(core) {
                    Some(done) => return Some(done),
                    None => continue,
                },
            };
            if self.take_pending(done.id) {
                return Some(done);
            }
            // Not a run of this pass (cannot happen: ids are the pass's
            // own): ignore it.
        }
    }

    /// Removes run `id` from the pending list and from its thread's load;
    /// false if it was not pending.
    fn take_pending(&mut self, id: u64) -> bool {
        let Some(i) = self.pending.iter().position(|p| p.id == id) else {
            return false;
        };
        if let Some(Pending {
            at: At::Thread(t), ..
        }) = self.pending.remove(i)
        {
            if let Some(s) = self.slots.get_mut(t) {
                s.load = s.load.saturating_sub(1);
            }
        }
        true
    }

    /// After a wait with no result: if a thread holding runs of this pass
    /// has ended (it can only panic), a result that reached the channel
    /// meanwhile, else one of the dead thread's runs reported as not written.
    fn reap_dead(&mut self, core: &Core) -> Option<Done> {
        let i = self
            .slots
            .iter()
            .position(|s| s.load > 0 && s.thread.handle.is_finished())?;
        self.slots[i].dead = true;
        // It may have answered before it ended.
        if let Ok(done) = self.done_rx.try_recv() {
            self.take_pending(done.id);
            return Some(done);
        }
        let p = self.pending.iter().find(|p| p.at == At::Thread(i))?;
        let (id, offset, len) = (p.id, p.offset, p.len);
        self.take_pending(id);
        Some(Done {
            id,
            buf: None,
            result: Err(EngineError::Source(DeviceError::Io {
                op: IoOp::Write,
                offset,
                len: len as u64,
                name: core.source.name(),
                source: std::io::Error::other(
                    "the writeback writer thread stopped (reading the run from the cache or \
                     writing it)",
                ),
            })),
        })
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
