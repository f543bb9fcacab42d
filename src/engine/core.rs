//! Shared engine state and the frame-level operations used by the read,
//! write and writeback paths.
//!
//! Deadlock freedom: stripe locks are never nested. A request that must wait
//! for a frame first completes any fetch it has claimed frames for, so every
//! `Filling` frame is owned by a thread that will finish it without waiting.
//! Requests that hold claims while waiting (uncached writes) take them in
//! ascending block order.

use super::durable::StickyFlush;
use super::frames::{
    Entry, FrameState, FrameTable, StripeState, BLOCK_MASK, CDIRTY, QUEUED, SRCPEND,
};
use super::meta::Layout;
use super::mode::WriteMode;
use super::policy::Policy;
use super::stats::Stats;
use super::store::StoreQueue;
use super::{EngineError, WritebackConfig};
use crate::device::{AlignedBuf, BlockDevice};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a set can give up for a new block.
pub(crate) enum Victim {
    /// A free frame (it was invalid, or its clean block was dropped).
    Free(u64),
    /// Only a dirty frame is evictable; it must be written back first.
    Dirty(u64),
    /// Clean or free frames exist but the committed metadata still maps them
    /// dirty: a commit makes them reusable.
    NeedsCommit,
    /// Clean frames are held until the source is flushed after their
    /// writeback (`SRCPEND`): a source flush and a commit make them reusable.
    NeedsSourceFlush,
    /// Every frame is busy.
    None,
}

/// Signals to the background writeback thread.
#[derive(Default)]
pub(crate) struct WritebackSignal {
    pub kicked: bool,
    pub stop: bool,
}

/// Aligned so that the reference counts of the `Arc<Core>` (bumped by
/// every direct request, from every queue thread) sit in a cache line of
/// their own, not in one with fields each request reads.
#[repr(align(128))]
pub(crate) struct Core {
    pub source: Arc<dyn BlockDevice>,
    pub cache: Arc<dyn BlockDevice>,
    pub layout: Layout,
    pub bs: u64,
    pub source_size: u64,
    pub frames: FrameTable,
    pub policy: Box<dyn Policy>,
    pub mode: AtomicU8,
    pub stats: Stats,
    pub valid: AtomicU64,
    pub dirty: AtomicU64,
    /// The cache device has writes not yet flushed.
    pub cache_written: AtomicBool,
    /// The source has writes not yet flushed.
    pub source_written: AtomicBool,
    /// Every flush of the cache device goes through this: once one failed,
    /// all later ones fail (see `durable`).
    pub cache_flush: StickyFlush,
    /// The same for the source.
    pub source_flush: StickyFlush,
    /// Foreground requests in progress (read by writeback throttling).
    pub inflight: super::shard::ShardedCount,
    /// Writes in progress that started in writeback mode (a mode switch waits
    /// for them before cleaning).
    pub wb_writers: AtomicU64,
    pub closed: AtomicBool,
    pub wb: WritebackConfig,
    pub wb_signal: Mutex<WritebackSignal>,
    pub wb_cond: Condvar,
    /// Run buffers reused by writeback passes.
    pub wb_bufs: super::writeback::RunBuffers,
    /// Writer threads reused by writeback passes.
    pub wb_pool: super::writeback::WriterPool,
    /// Held by a writeback pass from the start of its source flush until it
    /// has settled the frames that flush covered, and while a pass marks
    /// frames `SRCPEND`. Passes can run at the same time (background and
    /// `flush_all`): without it a pass could clear the `SRCPEND` another pass
    /// set for a write its flush did not cover.
    pub wb_settle: Mutex<()>,
    pub store: StoreQueue,
    /// Sequential readahead on read misses (see `readahead`).
    pub readahead: super::readahead::ReadAhead,
    /// Idle one-block fetch buffers reused by read misses.
    pub fetch_bufs: super::bufpool::BufPool,
    /// Frames whose committed state may be out of date (see `commit`).
    pub commit_queue: Mutex<Vec<u64>>,
    /// Group commit state and its condvar.
    pub group: Mutex<super::commit::GroupCommit>,
    pub group_cond: Condvar,
    /// Set after a failed commit: the next one records every frame.
    pub rerecord: AtomicBool,
    /// The journal writer; its mutex also serialises commits.
    pub journal: Mutex<super::commit::JournalState>,
}

impl Core {
    /// Flushes the cache device (see `durable`).
    pub fn flush_cache(&self) -> Result<(), EngineError> {
        let r = self.cache_flush.flush(&*self.cache, EngineError::Cache);
        if r.is_err() {
            self.drop_crash_state();
        }
        r
    }

    /// After a failed flush of the cache device: the crash state could map
    /// frames to data the device lost, so it must not be recovered from.
    pub fn drop_crash_state(&self) {
        if let Some(f) = self.frames.crash_file() {
            if f.path().exists() {
                log::warn!(
                    "dropping the crash state {}: a flush of the cache device failed",
                    f.path().display()
                );
            }
            f.remove();
        }
    }

    /// Flushes the source (see `durable`).
    pub fn flush_source(&self) -> Result<(), EngineError> {
        self.source_flush.flush(&*self.source, EngineError::Source)
    }

    pub fn mode(&self) -> WriteMode {
        WriteMode::from_u8(self.mode.load(SeqCst)).unwrap_or(WriteMode::Writethrough)
    }

    #[inline]
    pub fn set_of(&self, block: u64) -> u64 {
        self.layout.geometry.set_of(block)
    }

    #[inline]
    pub fn first_frame(&self, set: u64) -> u64 {
        set * u64::from(self.layout.geometry.assoc)
    }

    /// Looks `block` up in its set; the caller holds the set's stripe lock.
    #[inline]
    pub fn lookup(&self, set: u64, block: u64) -> Option<u64> {
        self.frames
            .lookup(self.first_frame(set), self.layout.geometry.assoc, block)
    }

    pub fn lock(&self, set: u64) -> MutexGuard<'_, StripeState> {
        self.frames.lock(set)
    }

    /// Bytes of the source that lie in `block` (the last block may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        self.source_size
            .saturating_sub(block * self.bs)
            .min(self.bs)
    }

    /// Picks a frame of `set` for a new block: a free frame, else the policy's
    /// choice among clean quiet frames (dropped here), else among dirty ones.
    pub fn claim_victim(&self, set: u64, g: &mut StripeState) -> Victim {
        let first = self.first_frame(set);
        let n = self.layout.geometry.assoc;
        for f in first..first + u64::from(n) {
            if self.frames.get(f).reusable() {
                return Victim::Free(f);
            }
        }
        let clean = |f: u64| {
            let e = self.frames.get(f);
            e.valid() && !e.dirty() && e.quiet() && !e.cdirty()
        };
        if let Some(f) = self.policy.victim(first, n, g.clock, &mut |f| clean(f)) {
            self.free_frame(f);
            self.stats.here().demotions.fetch_add(1, Relaxed);
            return Victim::Free(f);
        }
        let dirty = |f: u64| {
            let e = self.frames.get(f);
            e.valid() && e.dirty() && e.quiet()
        };
        // Clean or free frames that a commit would make reusable. Frames
        // written back to an unflushed source are not among them: they wait
        // for the writeback's source flush, which wakes the set.
        let waiting_commit = (first..first + u64::from(n)).any(|f| {
            let e = self.frames.get(f);
            e.cdirty() && !e.dirty() && e.quiet() && !e.srcpend()
        });
        if waiting_commit {
            return Victim::NeedsCommit;
        }
        let held = (first..first + u64::from(n)).any(|f| {
            let e = self.frames.get(f);
            e.srcpend() && e.quiet()
        });
        if held {
            return Victim::NeedsSourceFlush;
        }
        match self.policy.victim(first, n, g.clock, &mut |f| dirty(f)) {
            Some(f) => Victim::Dirty(f),
            None => Victim::None,
        }
    }

    /// Installs `entry` in the free frame `f` (stripe lock held).
    pub fn install(&self, f: u64, entry: Entry, g: &mut StripeState) {
        let old = self.frames.get(f);
        self.frames.set(f, Entry(entry.0 | (old.0 & QUEUED)));
        self.valid.fetch_add(1, Relaxed);
        if entry.dirty() {
            self.dirty.fetch_add(1, Relaxed);
        }
        self.policy.on_insert(f, &mut g.clock);
        self.note(f);
    }

    /// Queues frame `f` for the next commit when what it wants committed
    /// differs from what is committed (stripe lock held).
    pub fn note(&self, f: u64) {
        let e = self.frames.get(f);
        if e.wanted() != e.committed() && !e.queued() {
            self.frames.set(f, e.with_flag(QUEUED, true));
            self.commit_queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(f);
        }
    }

    /// Empties frame `f` (stripe lock held), keeping the counters right.
    ///
    /// A frame written back to a source not flushed since will be recorded
    /// free, so the commit that records it must flush the source first.
    pub fn free_frame(&self, f: u64) {
        let e = self.frames.get(f);
        if e.srcpend() {
            self.source_written.store(true, SeqCst);
        }
        if e.valid() {
            self.valid.fetch_sub(1, Relaxed);
            if e.dirty() {
                self.dirty.fetch_sub(1, Relaxed);
            }
            self.policy.on_remove(f);
        }
        // Keep the commit flags and the block number (see `frames`).
        self.frames
            .set(f, Entry(e.0 & (CDIRTY | QUEUED | BLOCK_MASK)));
        self.note(f);
    }

    /// Marks a valid frame clean or dirty (stripe lock held). Dirty data
    /// ends a pending source flush's hold on the frame (`SRCPEND`).
    pub fn set_dirty(&self, f: u64, dirty: bool) {
        let e = self.frames.get(f);
        if e.dirty() != dirty {
            if dirty {
                self.dirty.fetch_add(1, Relaxed);
            } else {
                self.dirty.fetch_sub(1, Relaxed);
            }
            self.frames.set(
                f,
                e.with_dirty(dirty)
                    .with_flag(SRCPEND, e.srcpend() && !dirty),
            );
            self.note(f);
        }
    }

    /// Ends the hold of a source flush on frames written back before it:
    /// `written` lists (block, frame) of runs whose source writes returned
    /// before the flush started. If the flush succeeded (`durable`), frames
    /// still clean and holding their block may now be committed clean; if
    /// not, they become dirty again and will be written back once more.
    pub fn settle_written_back(&self, written: &[(u64, u64)], durable: bool) {
        for &(block, f) in written {
            let set = self.set_of(block);
            let g = self.lock(set);
            let e = self.frames.get(f);
            if !(e.srcpend() && e.valid() && e.block() == block) {
                continue;
            }
            if durable {
                self.frames.set(f, e.with_flag(SRCPEND, false));
                self.note(f);
            } else {
                self.set_dirty(f, true);
            }
            self.frames.notify(set, &g);
        }
    }

    /// The one way writeback flushes the source: under `wb_settle`, counted,
    /// then `settle(flush succeeded)` still under the lock. Holding the lock
    /// from before the flush until the settling is done is what makes every
    /// `SRCPEND` seen while settling one set before the flush started (see
    /// that lock).
    pub fn writeback_flush(&self, settle: impl FnOnce(bool)) -> Result<(), EngineError> {
        let _settle = self.wb_settle.lock().unwrap_or_else(|p| p.into_inner());
        self.stats
            .here()
            .writeback_source_flushes
            .fetch_add(1, Relaxed);
        let r = self.flush_source();
        settle(r.is_ok());
        r
    }

    /// Flushes the source for a request that needs a frame of `set` held by
    /// a writeback pass that has not flushed yet, and releases the set's
    /// held frames for the next commit. If the flush fails they stay held
    /// (the pass settles them).
    pub fn settle_set(&self, set: u64) -> Result<(), EngineError> {
        self.writeback_flush(|durable| {
            if !durable {
                return;
            }
            let first = self.first_frame(set);
            let g = self.lock(set);
            for f in first..first + u64::from(self.layout.geometry.assoc) {
                let e = self.frames.get(f);
                if e.srcpend() {
                    self.frames.set(f, e.with_flag(SRCPEND, false));
                    self.note(f);
                }
            }
            self.frames.notify(set, &g);
        })
    }

    /// Sets frame `f` of `set` to `state` and wakes waiters.
    pub fn finish(&self, set: u64, f: u64, state: FrameState) {
        let g = self.lock(set);
        self.frames.set(f, self.frames.get(f).with_state(state));
        self.frames.notify(set, &g);
    }

    /// Drops a pin on frame `f` of `set` and wakes waiters.
    pub fn unpin(&self, set: u64, f: u64) {
        let g = self.lock(set);
        self.frames.set(f, self.frames.get(f).unpinned());
        self.frames.notify(set, &g);
    }

    /// Frees frame `f` of `set` if it still holds `block` clean and nobody
    /// uses it (after its data could not be read). A frame in use stays: a
    /// later failed read drops it.
    pub fn drop_clean(&self, set: u64, f: u64, block: u64) {
        let g = self.lock(set);
        let e = self.frames.get(f);
        if e.valid() && e.block() == block && !e.dirty() && e.quiet() {
            self.free_frame(f);
            self.frames.notify(set, &g);
        }
    }

    /// Frees frame `f` of `set` after a failed fill and wakes waiters.
    pub fn abandon(&self, set: u64, f: u64) {
        let g = self.lock(set);
        self.free_frame(f);
        self.frames.notify(set, &g);
    }

    /// Reads frame `f` whole.
    pub fn read_frame(&self, f: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        self.cache
            .read_at(buf, self.layout.frame_offset(f))
            .map_err(EngineError::Cache)
    }

    /// Writes `data` into frame `f` at `off` within the block.
    pub fn write_frame(&self, f: u64, off: u64, data: &[u8]) -> Result<(), EngineError> {
        let r = self
            .cache
            .write_at(data, self.layout.frame_offset(f) + off)
            .map_err(EngineError::Cache);
        self.cache_written.store(true, SeqCst);
        r
    }

    /// Source byte offset of block `first`, and how many of `len` bytes
    /// from there lie inside the source (the last block may be short).
    pub fn source_span(&self, first: u64, len: usize) -> (u64, usize) {
        let start = first.saturating_mul(self.bs);
        let inside = (len as u64).min(self.source_size.saturating_sub(start));
        (start, inside as usize)
    }

    /// Writes the source bytes of blocks `first..` from `data` (whole blocks,
    /// clipped at the end of the source).
    pub fn write_source_blocks(&self, first: u64, data: &[u8]) -> Result<(), EngineError> {
        let (start, len) = self.source_span(first, data.len());
        let r = self
            .source
            .write_at(&data[..len], start)
            .map_err(EngineError::Source);
        self.source_written.store(true, SeqCst);
        r
    }

    /// Reads blocks `first..` from the source into `data` (zero past the end).
    pub fn read_source_blocks(&self, first: u64, data: &mut [u8]) -> Result<(), EngineError> {
        let (start, len) = self.source_span(first, data.len());
        data[len..].fill(0);
        self.source
            .read_at(&mut data[..len], start)
            .map_err(EngineError::Source)
    }

    /// Writes back the dirty frame `f` of `set` holding `block` so it can be
    /// evicted. The frame must be dirty and quiet; it is marked `WritingBack`
    /// here and left clean and idle.
    pub fn evict_dirty(&self, set: u64, f: u64) -> Result<(), EngineError> {
        let block = {
            let g = self.lock(set);
            let e = self.frames.get(f);
            if !(e.valid() && e.dirty() && e.quiet()) {
                // Someone else got to it first; the caller retries.
                drop(g);
                return Ok(());
            }
            self.frames.set(f, e.with_state(FrameState::WritingBack));
            e.block()
        };
        let mut data = AlignedBuf::new(self.bs as usize);
        let r = self
            .read_frame(f, &mut data)
            .and_then(|_| self.write_source_blocks(block, &data));
        let g = self.lock(set);
        let e = self.frames.get(f).with_state(FrameState::Idle);
        self.frames.set(f, e);
        if r.is_ok() {
            self.set_dirty(f, false);
            let s = self.stats.here();
            s.dirty_evictions.fetch_add(1, Relaxed);
            s.writebacks.fetch_add(1, Relaxed);
            s.writeback_runs.fetch_add(1, Relaxed);
        } else {
            self.stats.here().errors.fetch_add(1, Relaxed);
        }
        self.frames.notify(set, &g);
        r
    }

    /// True while dirty blocks are above the high watermark: background
    /// writeback is at work, and a miss whose set offers only dirty frames
    /// goes to the source around the cache instead of writing one back
    /// itself (a synchronous eviction costs a cache read, a source write and
    /// a commit with a source flush before the miss can even start).
    pub fn under_write_pressure(&self) -> bool {
        let high = self.layout.geometry.cache_blocks * u64::from(self.wb.high_watermark_pct) / 100;
        self.dirty.load(Relaxed) > high
    }

    /// True once the background writeback thread is told to stop.
    pub fn wb_stopping(&self) -> bool {
        self.wb_signal.lock().map(|s| s.stop).unwrap_or(true)
    }

    /// Wakes the writeback thread when dirty blocks pass the high watermark.
    pub fn maybe_kick_writeback(&self) {
        if self.under_write_pressure() {
            let mut s = self.wb_signal.lock().unwrap_or_else(|p| p.into_inner());
            if !s.kicked {
                s.kicked = true;
                self.wb_cond.notify_all();
            }
        }
    }

    /// Registers `block` as having an uncached source write in flight.
    pub fn register_uncached(g: &mut StripeState, block: u64) {
        g.uncached.push(block);
    }

    /// Removes one registration of `block` and wakes fills waiting for it.
    pub fn unregister_uncached(&self, block: u64) {
        let set = self.set_of(block);
        let mut g = self.lock(set);
        if let Some(i) = g.uncached.iter().position(|&b| b == block) {
            g.uncached.swap_remove(i);
        }
        self.frames.notify(set, &g);
    }
}

/// One piece of a request that falls inside one cache block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk {
    pub block: u64,
    /// Offset inside the block.
    pub off: u64,
    pub len: u64,
    /// Offset inside the request buffer.
    pub pos: usize,
}

/// Splits `[offset, offset+len)` into per-block chunks, in ascending order.
pub(crate) fn chunks(offset: u64, len: u64, bs: u64) -> impl Iterator<Item = Chunk> {
    let mut pos = 0u64;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let abs = offset + pos;
        let block = abs / bs;
        let off = abs % bs;
        let n = (bs - off).min(len - pos);
        let c = Chunk {
            block,
            off,
            len: n,
            pos: pos as usize,
        };
        pos += n;
        Some(c)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_covers_the_range_once() {
        let v: Vec<Chunk> = chunks(4000, 10000, 4096).collect();
        assert_eq!(v.len(), 4);
        assert_eq!((v[0].block, v[0].off, v[0].len, v[0].pos), (0, 4000, 96, 0));
        assert_eq!((v[1].block, v[1].off, v[1].len, v[1].pos), (1, 0, 4096, 96));
        assert_eq!((v[3].block, v[3].off, v[3].len), (3, 0, 14000 - 3 * 4096));
        assert_eq!(v.iter().map(|c| c.len).sum::<u64>(), 10000);
        assert_eq!(chunks(0, 0, 4096).count(), 0);
    }
}
