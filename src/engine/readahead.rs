//! Sequential readahead on read misses.
//!
//! A guest reading its disk in order (a boot, a file copy, a database scan)
//! misses one block after the other, and with a slow source every miss costs
//! the source's latency. When a read's first missing block is the block
//! right after an earlier read that missed (a *stream*), the blocks after
//! this read are fetched in the background, so the reads that follow hit or
//! wait for a fetch already under way. The window doubles each time the
//! stream goes on, from [`MIN_WINDOW`] blocks up to the configured maximum
//! (`--readahead`), and the stream expects its next miss just past the
//! window.
//!
//! The first block claimed in the latest window is the stream's *trigger*
//! (blocks before it were being read already, with several requests in
//! flight): a read that reaches it (a hit, or a wait for its fetch) fetches
//! the next window at once, so a reader that keeps going never waits for a
//! miss at the end of a window (the kernel's asynchronous readahead marks a
//! page the same way). Hits pay one relaxed load of a 64-bit filter of the trigger blocks;
//! only a read whose blocks match it looks at the triggers themselves.
//!
//! Invariants:
//! - A block is fetched ahead only into a frame claimed exactly as a read
//!   miss claims one (not cached, not being written around, a free or clean
//!   victim frame, set `Filling` under the set's lock): the source holds its
//!   current data, and readers and writers of the block wait for the fill.
//! - The frames are claimed by the reader whose miss continued the stream,
//!   after its own data is in, so that its next request waits for the
//!   fetch under way instead of missing again; the fetch runs on a
//!   readahead worker. Jobs that find the bounded queue full or closed free
//!   their frames at once. So the request that triggers readahead is held
//!   only for the claims; a later request for one of the blocks waits for
//!   its fetch, which may first wait for a worker ([`WORKERS`] of them, at
//!   most [`QUEUE_DEPTH`] jobs queued).
//! - A trigger is armed only on a block claimed for its window, after the
//!   claims, so a window that claims nothing (all cached) leaves the stream
//!   unarmed: a reader going through cached data does not keep fetching
//!   nothing.
//! - No job starts after the queue is closed ([`Core::close_readahead`]
//!   frees the frames of those still queued); [`ReadAhead::wait_idle`]
//!   returns once the running ones have handed their blocks to the store
//!   queue (or freed them), so a shutdown that waits for it and then for
//!   the store queue leaves no frame `Filling`.

use super::core::{Core, Victim};
use super::frames::{Entry, FrameState};
use super::read::MAX_RUN_BYTES;
use super::store::StoreJob;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Streams followed at once (guests reading several files or disks'
/// regions in parallel); the least recently used one is replaced.
const STREAMS: usize = 16;
/// The first window of a stream, in blocks (at most the maximum).
const MIN_WINDOW: u64 = 4;
/// Jobs waiting for a worker; more are dropped (their frames freed).
const QUEUE_DEPTH: usize = 16;
/// Worker threads fetching ahead.
pub(crate) const WORKERS: usize = 8;

#[derive(Clone, Copy)]
struct Stream {
    /// The block whose miss continues this stream.
    next: u64,
    /// Blocks fetched ahead last time (0: not sequential yet).
    window: u64,
    /// When the stream was last seen, for replacement.
    tick: u64,
    /// The first block claimed in the last window fetched ahead, whose read
    /// fires the next window ([`NONE`]: not armed).
    trigger: u64,
    /// The first block of a window planned and not yet claimed, which
    /// [`ReadAhead::arm`] finds the stream by ([`NONE`]: none).
    pending: u64,
}

/// No block (an unused stream, a trigger not armed).
const NONE: u64 = u64::MAX;

/// The bit of `block` in [`ReadAhead::marks`].
fn mark_bit(block: u64) -> u64 {
    1 << (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58)
}

struct Streams {
    s: [Stream; STREAMS],
    tick: u64,
}

/// Blocks `first..first + count` a stream wants fetched ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub first: u64,
    pub count: u64,
}

/// Consecutive blocks from `first` whose frames in `frames` are claimed
/// (`Filling`) and owned by this job until it hands them to the store queue
/// or frees them.
pub(crate) struct Job {
    pub first: u64,
    pub frames: Vec<u64>,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// Jobs taken by a worker and not finished.
    running: usize,
    closed: bool,
}

/// Stream detection and the job queue of the readahead workers.
pub(crate) struct ReadAhead {
    /// Largest window in blocks; 0 turns readahead off.
    max_blocks: u64,
    streams: Mutex<Streams>,
    /// The streams' triggers, readable without the lock (written under it).
    triggers: [AtomicU64; STREAMS],
    /// [`mark_bit`] of every armed trigger (a filter: a set bit may be
    /// stale, a trigger armed under the lock has its bit set before the
    /// lock is released).
    marks: AtomicU64,
    queue: Mutex<Queue>,
    work: Condvar,
    idle: Condvar,
}

impl ReadAhead {
    /// Readahead of at most `max_blocks` blocks per window (0: off).
    pub fn new(max_blocks: u64) -> ReadAhead {
        let unused = Stream {
            next: NONE,
            window: 0,
            tick: 0,
            trigger: NONE,
            pending: NONE,
        };
        ReadAhead {
            max_blocks,
            streams: Mutex::new(Streams {
                s: [unused; STREAMS],
                tick: 0,
            }),
            triggers: std::array::from_fn(|_| AtomicU64::new(NONE)),
            marks: AtomicU64::new(0),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                running: 0,
                closed: false,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_blocks > 0
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a read whose first missing block is `first_miss` and whose last
    /// block is `last`. Returns the blocks to fetch ahead when the miss
    /// continues a stream; otherwise starts a stream expecting `last + 1`.
    pub fn plan(&self, first_miss: u64, last: u64) -> Option<Window> {
        if !self.enabled() {
            return None;
        }
        let mut st = self.streams();
        st.tick = st.tick.wrapping_add(1);
        let tick = st.tick;
        let next = last.checked_add(1)?;
        if let Some(i) = st.s.iter().position(|s| s.next == first_miss) {
            return Some(self.advance(&mut st, i, next));
        }
        if let Some(s) = st.s.iter_mut().min_by_key(|s| s.tick) {
            *s = Stream {
                next,
                window: 0,
                tick,
                trigger: NONE,
                pending: NONE,
            };
        }
        self.publish(&st);
        None
    }

    /// Goes on with stream `i` (just seen, at `st.tick`): its next window,
    /// twice the last one up to the maximum, starts at `first`; the stream
    /// then expects its miss past it and is unarmed until [`Self::arm`].
    fn advance(&self, st: &mut Streams, i: usize, first: u64) -> Window {
        let window = st.s[i]
            .window
            .saturating_mul(2)
            .max(MIN_WINDOW)
            .min(self.max_blocks);
        st.s[i] = Stream {
            next: first.saturating_add(window),
            window,
            tick: st.tick,
            trigger: NONE,
            pending: first,
        };
        self.publish(st);
        Window {
            first,
            count: window,
        }
    }

    /// Copies the triggers of `st` to the lock-free view, then the filter.
    fn publish(&self, st: &Streams) {
        let mut marks = 0;
        for (s, t) in st.s.iter().zip(&self.triggers) {
            t.store(s.trigger, Relaxed);
            if s.trigger != NONE {
                marks |= mark_bit(s.trigger);
            }
        }
        self.marks.store(marks, Release);
    }

    /// True if a read of blocks `first..=last` may reach a trigger. Cheap
    /// (one load) when none of its blocks matches the filter.
    fn may_trigger(&self, first: u64, last: u64) -> bool {
        let marks = self.marks.load(Acquire);
        if marks == 0 {
            return false;
        }
        // A read of 64 blocks or more sets every bit the hash could give.
        let filtered =
            last.saturating_sub(first) < 64 && (first..=last).all(|b| marks & mark_bit(b) == 0);
        !filtered
            && self
                .triggers
                .iter()
                .map(|t| t.load(Relaxed))
                .any(|t| (first..=last).contains(&t))
    }

    /// For a read of blocks `first..=last` (before it starts, or once its
    /// blocks are pinned as direct hits): the next window of the stream
    /// whose trigger it reaches, if any. That stream is unarmed until the
    /// window's claims are done ([`Self::arm`]).
    pub fn fire(&self, first: u64, last: u64) -> Option<Window> {
        if !self.enabled() || !self.may_trigger(first, last) || !self.has_room() {
            return None;
        }
        let mut st = self.streams();
        st.tick = st.tick.wrapping_add(1);
        let i =
            st.s.iter()
                .position(|s| s.trigger != NONE && (first..=last).contains(&s.trigger))?;
        let from = st.s[i].next;
        Some(self.advance(&mut st, i, from))
    }

    /// Arms the stream whose window starting at `first` was just claimed
    /// with the trigger `at`, the window's first claimed block (`None`: it
    /// claimed nothing, the stream stays unarmed).
    fn arm(&self, first: u64, at: Option<u64>) {
        let mut st = self.streams();
        if let Some(s) = st.s.iter_mut().find(|s| s.pending == first) {
            s.pending = NONE;
            s.trigger = at.unwrap_or(NONE);
        }
        self.publish(&st);
    }

    /// True if a job pushed now would be queued (racy: a hint to avoid
    /// claiming frames for nothing).
    fn has_room(&self) -> bool {
        let q = self.queue();
        !q.closed && q.jobs.len() < QUEUE_DEPTH
    }

    /// Queues `job` for a worker, or gives it back when the queue is full
    /// or closed.
    fn push(&self, job: Job) -> Option<Job> {
        let mut q = self.queue();
        if q.closed || q.jobs.len() >= QUEUE_DEPTH {
            return Some(job);
        }
        q.jobs.push_back(job);
        self.work.notify_one();
        None
    }

    /// The next job for a worker, counted running until [`Self::done`];
    /// `None` once closed.
    fn pop(&self) -> Option<Job> {
        let mut q = self.queue();
        loop {
            if q.closed {
                return None;
            }
            if let Some(job) = q.jobs.pop_front() {
                q.running += 1;
                return Some(job);
            }
            q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self) {
        let mut q = self.queue();
        q.running = q.running.saturating_sub(1);
        if q.running == 0 {
            self.idle.notify_all();
        }
    }

    /// Stops taking jobs and tells the workers to exit after the job they
    /// run; returns the queued jobs, whose frames the caller must free.
    fn close(&self) -> Vec<Job> {
        let mut q = self.queue();
        q.closed = true;
        self.work.notify_all();
        q.jobs.drain(..).collect()
    }

    /// Waits until no job is running.
    pub fn wait_idle(&self) {
        let mut q = self.queue();
        while q.running > 0 {
            q = self.idle.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Core {
    /// After a read that missed at `first_miss` and ended in block `last`:
    /// when the miss continues a stream, claims the frames of the blocks
    /// after it here (so that the reader's next request waits for their
    /// fetch instead of missing again) and queues their fetch.
    pub(crate) fn readahead_after(&self, first_miss: u64, last: u64) {
        if let Some(w) = self.readahead.plan(first_miss, last) {
            self.fetch_window(w);
        }
    }

    /// Before a read of `len` bytes at `offset` (or as its blocks are
    /// pinned as hits): when it reaches a stream's trigger, claims and
    /// queues the stream's next window. Claims without waiting, like a
    /// miss's readahead, so a queue thread may call it.
    pub(crate) fn readahead_reached(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.bs;
        let last = offset.saturating_add(len - 1) / self.bs;
        if let Some(w) = self.readahead.fire(first, last) {
            self.fetch_window(w);
        }
    }

    /// Claims the frames of window `w`, queues their fetch and arms the
    /// stream's trigger on the first block claimed.
    fn fetch_window(&self, w: Window) {
        if !self.readahead.has_room() {
            self.stats.here().readahead_dropped.fetch_add(1, Relaxed);
            self.readahead.arm(w.first, None);
            return;
        }
        let blocks = self.source_size.div_ceil(self.bs);
        let end = w.first.saturating_add(w.count).min(blocks);
        let max_run = (MAX_RUN_BYTES / self.bs).max(1) as usize;
        let mut first_claimed = None;
        // A job is a run of consecutive claimed blocks: a block that cannot
        // be claimed ends it, and so does the run's size limit.
        let mut run: Option<Job> = None;
        for block in w.first..end {
            let Some(f) = self.claim_ahead(block) else {
                if let Some(j) = run.take() {
                    self.queue_ahead(j);
                }
                continue;
            };
            first_claimed.get_or_insert(block);
            if let Some(j) = run.take_if(|j| j.frames.len() >= max_run) {
                self.queue_ahead(j);
            }
            run.get_or_insert_with(|| Job {
                first: block,
                frames: Vec::new(),
            })
            .frames
            .push(f);
        }
        if let Some(j) = run {
            self.queue_ahead(j);
        }
        self.readahead.arm(w.first, first_claimed);
    }

    /// Claims a frame for `block` as a read miss would, or `None` when it is
    /// cached, being written around, or its set has no free or clean frame.
    fn claim_ahead(&self, block: u64) -> Option<u64> {
        let set = self.set_of(block);
        let mut g = self.lock(set);
        if self.lookup(set, block).is_some() || g.uncached.contains(&block) {
            return None;
        }
        match self.claim_victim(set, &mut g) {
            Victim::Free(f) => {
                self.install(f, Entry::new(block, false, FrameState::Filling), &mut g);
                Some(f)
            }
            _ => None,
        }
    }

    fn queue_ahead(&self, job: Job) {
        if let Some(job) = self.readahead.push(job) {
            self.stats.here().readahead_dropped.fetch_add(1, Relaxed);
            self.abandon_run(job.first, &job.frames);
        }
    }

    /// Closes the readahead queue and frees the frames of the jobs that were
    /// waiting in it. Running jobs finish (see [`ReadAhead::wait_idle`]).
    pub(crate) fn close_readahead(&self) {
        for job in self.readahead.close() {
            self.abandon_run(job.first, &job.frames);
        }
    }

    /// Fetches a job's blocks with one source read and hands them to the
    /// store queue; frees the frames if the read fails.
    fn fetch_ahead(&self, job: Job) {
        let n = job.frames.len() as u64;
        let mut data = self.fetch_bufs.take(job.frames.len() * self.bs as usize);
        match self.read_source_blocks(job.first, &mut data) {
            Ok(()) => {
                let s = self.stats.here();
                s.promotions.fetch_add(n, Relaxed);
                s.readahead_blocks.fetch_add(n, Relaxed);
                self.submit_store(StoreJob {
                    first_block: job.first,
                    frames: job.frames,
                    data,
                });
            }
            Err(e) => {
                self.fetch_bufs.give(data);
                self.stats.here().errors.fetch_add(1, Relaxed);
                log::warn!(
                    "readahead of {n} block(s) from block {} failed: {e}",
                    job.first
                );
                self.abandon_run(job.first, &job.frames);
            }
        }
    }
}

/// The loop of one readahead worker.
pub(crate) fn run_readahead_worker(core: Arc<Core>) {
    while let Some(job) = core.readahead.pop() {
        core.fetch_ahead(job);
        core.readahead.done();
    }
}

#[cfg(test)]
#[path = "readahead_tests.rs"]
mod tests;
