//! Writeback of dirty blocks to the source (the original target's kcopyd
//! work): background cleaning above the high watermark, and the whole-cache
//! flush.
//!
//! Dirty frames are collected, sorted by source block and grouped into runs
//! of consecutive blocks, each written with one source request. Frames are
//! `WritingBack` while copied: readable, but no write can change them, so the
//! data marked clean is exactly the data the source received. A failed run
//! (cache read or source write) puts its frames back to dirty and idle, and
//! the pass goes on with the next runs, so one bad sector does not keep every
//! other dirty block from the source; the pass still returns the error. A
//! failed source flush ends the pass: no later write could be made durable.
//!
//! A pass is a pipeline so that neither the cache copy nor the source's
//! latency sets its pace: the pass's thread claims runs and hands each to a
//! writer thread ([`writer::Writer`], kept from pass to pass), which writes
//! it to the source, up to `WritebackConfig::max_inflight_runs` at a time
//! (and about [`writer::MAX_INFLIGHT_BYTES`]). With one run in flight, a
//! source with 5 ms of latency took 200 runs a second, which for random
//! dirty blocks (runs of one block) is 12.5 MiB/s of 64K blocks, whatever
//! the source could take in parallel. A long run is read from the cache by
//! its writer thread too: when the pass's own thread read every run, that
//! one thread's copy out of a cache on tmpfs was most of a `flush_all`'s
//! time (84 % of the daemon's samples in `perf record` of a 2 GiB flush,
//! session 20), while the disk took the writes faster than one thread could
//! copy them. Short runs the pass reads itself ([`PASS_READS_UP_TO`]). Run
//! buffers are kept from pass to pass ([`writer::RunBuffers`]) rather than
//! allocated per run. Runs are finished
//! in the order their source writes complete, so one slow write does not keep
//! the frames of later runs busy. Under throttling (background writeback
//! while foreground requests are in flight) the pipeline drains and pauses
//! between runs, as the serial writeback did.
//!
//! Background writeback also drains when the device is idle: after
//! `WritebackConfig::idle_drain_after` with no request, every dirty block is
//! written back ([`Pace::Idle`]); the first request stops the drain once its
//! runs in flight are done.

#[cfg(test)]
mod tests;
mod writer;

pub(crate) use writer::{RunBuffers, WriterPool};

use writer::Segment;

use super::core::Core;
use super::frames::{FrameState, SRCPEND};
use super::{EngineError, FlushProgress};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use writer::Writer;

/// Pause between runs while foreground requests are in flight.
const THROTTLE_PAUSE: Duration = Duration::from_millis(2);
/// How often the background thread looks at the watermark without a kick.
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// A background pass flushes the source after this many bytes written back
/// (and at its end). Frames written back wait for that flush before a
/// commit may record them clean and they can be evicted.
const FLUSH_EVERY_BYTES: u64 = 64 << 20;
/// The same for `flush_all`, which writes everything back while nothing
/// waits for the frames: fewer source flushes in the middle of the stream.
/// Each costs a device cache flush; with the one every 64 MiB, `flush_all`
/// of 1 GiB of contiguous dirty blocks took a median 0.36 s against 0.33 s
/// with this (8 runs each, `bench/writeback.sh 1024`, cache on /dev/shm,
/// session 19). It still bounds the pass's list of unflushed blocks.
const FULL_FLUSH_EVERY_BYTES: u64 = 1 << 30;

/// Runs up to this size are read from the cache by the pass's own thread,
/// longer ones by the writer thread that writes them.
///
/// Why both: a short run's copy takes little of the pass's time but, on a
/// writer thread, it would add the cache's latency to every run's time in
/// flight. With random dirty 64K blocks (runs of one block) on a source
/// with 5 ms of latency, the flush of 496 of them took 0.19–0.23 s with
/// every read on the writers against 0.17–0.18 s with the pass reading them
/// (`bench/sustain.sh`, cache file on disk, session 20). A long run's copy
/// is what one thread cannot keep up with (section "A pass is a pipeline").
const PASS_READS_UP_TO: usize = 512 << 10;

/// A claimed run: (source block, frame) of consecutive blocks.
type Run = Vec<(u64, u64)>;

/// How a writeback pass shares the source with foreground requests.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Pace {
    /// As fast as the source takes it (`flush_all`).
    Full,
    /// Background cleaning above the high watermark: while foreground
    /// requests are in flight, the runs in flight finish and the pass
    /// pauses before the next one.
    Throttled,
    /// The idle drain: claims no new run once a foreground request has
    /// come since [`Stats::requests`](super::stats::Stats::requests) was
    /// `since` (or one is in flight), and lets the runs in flight finish.
    Idle { since: u64 },
}

impl Core {
    /// Dirty, quiet frames as (block, frame), sorted by block.
    fn dirty_candidates(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = (0..self.frames.frames())
            .filter_map(|f| {
                let e = self.frames.get(f);
                (e.valid() && e.dirty() && e.quiet()).then(|| (e.block(), f))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Claims frame `f` for writeback if it still holds dirty `block` and is quiet.
    fn claim_for_writeback(&self, block: u64, f: u64) -> bool {
        let set = self.set_of(block);
        let _g = self.lock(set);
        let e = self.frames.get(f);
        if e.valid() && e.dirty() && e.quiet() && e.block() == block {
            self.frames.set(f, e.with_state(FrameState::WritingBack));
            true
        } else {
            false
        }
    }

    /// Claims the next run from `cands[*i..]` into `run`: consecutive blocks,
    /// at most `max` of them. A candidate that can no longer be claimed is
    /// skipped and ends a non-empty run. `run` is empty only when `*i`
    /// reached the end.
    fn claim_run(&self, cands: &[(u64, u64)], i: &mut usize, max: usize, run: &mut Run) {
        run.clear();
        while let Some(&(b, f)) = cands.get(*i) {
            if run.len() >= max || run.last().is_some_and(|&(last, _)| b != last + 1) {
                break;
            }
            *i += 1;
            if self.claim_for_writeback(b, f) {
                run.push((b, f));
            } else if !run.is_empty() {
                break;
            }
        }
    }

    /// Where the claimed `run` lies on the cache device: the reads that copy
    /// it into the front of a run buffer, in order.
    ///
    /// Frames that follow each other on the cache device are read with one
    /// request: a sequential write fills neighbouring blocks into one set
    /// (see `Geometry::set_of`), usually into neighbouring frames. One cache
    /// request per block (64 of 64K per 4 MiB run) made the cache read, not
    /// the source write, the pace of writeback on a real disk.
    fn run_segments(&self, run: &[(u64, u64)]) -> Vec<Segment> {
        let bs = self.bs as usize;
        let mut segs = Vec::new();
        let mut i = 0;
        while let Some(&(_, first)) = run.get(i) {
            let at = self.layout.frame_offset(first);
            let mut n = 1;
            while run
                .get(i + n)
                .is_some_and(|&(_, f)| self.layout.frame_offset(f) == at + n as u64 * self.bs)
            {
                n += 1;
            }
            segs.push(Segment {
                offset: at,
                at: i * bs,
                len: n * bs,
            });
            i += n;
        }
        segs
    }

    /// Ends the writeback of `run`: its frames become idle, and clean if
    /// `result` is Ok (the source has their data), else stay dirty. Clean
    /// frames keep `SRCPEND` until the pass flushes the source
    /// ([`Core::settle_written_back`]): until then commits still map them
    /// dirty, so a guest FLUSH never has to wait for the source's flush.
    fn finish_run(&self, run: &[(u64, u64)], result: &Result<(), EngineError>) {
        let _settle = self.wb_settle.lock().unwrap_or_else(|p| p.into_inner());
        for &(block, f) in run {
            let set = self.set_of(block);
            let g = self.lock(set);
            // A claimed frame was dirty, so it had no `SRCPEND` before.
            let e = self.frames.get(f).with_state(FrameState::Idle);
            self.frames.set(f, e.with_flag(SRCPEND, result.is_ok()));
            if result.is_ok() {
                self.set_dirty(f, false);
            }
            self.frames.notify(set, &g);
        }
        match result {
            Ok(()) => {
                let s = self.stats.here();
                s.writebacks.fetch_add(run.len() as u64, Relaxed);
                s.writeback_runs.fetch_add(1, Relaxed);
            }
            Err(e) => {
                self.stats.here().errors.fetch_add(1, Relaxed);
                log::warn!(
                    "writeback of {} blocks from source block {} failed: {e}",
                    run.len(),
                    run.first().map_or(0, |r| r.0)
                );
            }
        }
    }

    /// One pass over the dirty blocks, stopping once at most `target` remain.
    /// Returns the number of blocks written back, or the first error (after
    /// every claimed run has been finished).
    pub(crate) fn writeback_pass(
        &self,
        target: u64,
        pace: Pace,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, EngineError> {
        if self.source_flush.failed() {
            // Nothing written now could be made durable (`durable`).
            return Err(EngineError::EarlierFlushFailed {
                device: self.source.name(),
            });
        }
        let cands = self.dirty_candidates();
        if cands.is_empty() {
            return Ok(0);
        }
        let mut pass = Pass {
            core: self,
            writer: Writer::start(),
            flying: VecDeque::new(),
            flying_bytes: 0,
            written: 0,
            unflushed: Vec::new(),
            flush_every: if pace == Pace::Full {
                FULL_FLUSH_EVERY_BYTES
            } else {
                FLUSH_EVERY_BYTES
            },
            failed: None,
            progress,
        };
        pass.run(&cands, target, pace);
        pass.end()
    }

    /// Writes back every dirty block and flushes the source.
    pub(crate) fn flush_all(
        &self,
        progress: &mut dyn FnMut(FlushProgress),
    ) -> Result<(), EngineError> {
        let total = self.dirty.load(SeqCst);
        let mut done = 0u64;
        progress(FlushProgress { total, done });
        let mut idle_passes = 0;
        while self.dirty.load(SeqCst) > 0 {
            let base = done;
            let n = self.writeback_pass(0, Pace::Full, &mut |w| {
                progress(FlushProgress {
                    total: total.max(base + w),
                    done: base + w,
                })
            })?;
            done += n;
            if n == 0 {
                // Dirty frames exist but are busy (being written right now).
                idle_passes += 1;
                if idle_passes > 2000 {
                    return Err(EngineError::DirtyRemain {
                        dirty: self.dirty.load(SeqCst),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            } else {
                idle_passes = 0;
            }
        }
        // Each pass flushed the source for what it wrote: commit the clean
        // states (and flush the source for any other writes to it).
        self.commit()?;
        progress(FlushProgress {
            total: total.max(done),
            done,
        });
        Ok(())
    }
}

/// The background writeback loop: sleeps until kicked (or a periodic check
/// finds the high watermark passed) and cleans down to the low watermark;
/// after `idle_drain_after` with no request it cleans every dirty block
/// until a request comes.
pub(crate) fn run_writeback(core: Arc<Core>) {
    // The request count when it last changed, and when that was seen.
    let mut seen = (core.stats.requests(), Instant::now());
    loop {
        {
            let mut s = core.wb_signal.lock().unwrap_or_else(|p| p.into_inner());
            if !s.stop && !s.kicked {
                s = core
                    .wb_cond
                    .wait_timeout(s, IDLE_CHECK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            if s.stop {
                return;
            }
            s.kicked = false;
        }
        let frames = core.layout.geometry.cache_blocks;
        let high = frames * u64::from(core.wb.high_watermark_pct) / 100;
        let low = frames * u64::from(core.wb.low_watermark_pct) / 100;
        // After a failed flush nothing can be cleaned for good; the failure
        // was logged once (`durable`).
        if core.source_flush.failed() || core.cache_flush.failed() {
            continue;
        }
        let requests = core.stats.requests();
        if requests != seen.0 {
            seen = (requests, Instant::now());
        }
        if core.dirty.load(Relaxed) <= high {
            let idle = core
                .wb
                .idle_drain_after
                .is_some_and(|after| seen.1.elapsed() >= after);
            if idle
                && core.dirty.load(Relaxed) > 0
                && core.inflight.total() == 0
                && !idle_drain(&core, requests)
            {
                // Failed (logged): wait another idle period before retrying.
                seen.1 = Instant::now();
            }
            continue;
        }
        while core.dirty.load(Relaxed) > low {
            if core.wb_stopping() {
                return;
            }
            match core
                .writeback_pass(low, Pace::Throttled, &mut |_| {})
                .and_then(|n| core.commit().map(|_| n))
            {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    log::warn!("background writeback: {e}; retrying later");
                    // Back off, but wake at once on stop.
                    let s = core.wb_signal.lock().unwrap_or_else(|p| p.into_inner());
                    if !s.stop {
                        drop(core.wb_cond.wait_timeout(s, Duration::from_secs(1)));
                    }
                    break;
                }
            }
        }
    }
}

/// One idle drain: passes down to no dirty block, each committed, until a
/// request comes (`since` is the request count that started it) or a pass
/// cleans nothing. False if a pass failed.
fn idle_drain(core: &Core, since: u64) -> bool {
    while core.dirty.load(Relaxed) > 0 && core.stats.requests() == since {
        if core.wb_stopping() {
            break;
        }
        match core
            .writeback_pass(0, Pace::Idle { since }, &mut |_| {})
            .and_then(|n| core.commit().map(|_| n))
        {
            Ok(0) => break,
            Ok(n) => log::debug!("idle writeback: {n} blocks cleaned"),
            Err(e) => {
                log::warn!("idle writeback: {e}; retrying after the next idle period");
                return false;
            }
        }
    }
    true
}

/// The state of one pipelined writeback pass.
struct Pass<'a, 'p> {
    core: &'a Core,
    writer: Writer,
    /// The runs with the writer and their ids, oldest first (at most
    /// `max_inflight_runs`).
    flying: VecDeque<(u64, Run)>,
    /// Bytes of the runs in `flying`.
    flying_bytes: usize,
    written: u64,
    /// (block, frame) of the runs written since the last source flush.
    unflushed: Vec<(u64, u64)>,
    /// Bytes written back between the pass's own source flushes.
    flush_every: u64,
    failed: Option<EngineError>,
    progress: &'p mut dyn FnMut(u64),
}

impl Pass<'_, '_> {
    fn run(&mut self, cands: &[(u64, u64)], target: u64, pace: Pace) {
        let core = self.core;
        let bs = core.bs as usize;
        let max_blocks = (core.wb.max_run_bytes / core.bs).max(1) as usize;
        let depth = core.wb.max_inflight_runs.max(1);
        let mut i = 0;
        loop {
            if self.writer.outstanding() >= depth {
                // As many runs as allowed are with the writers: wait for the
                // oldest.
                self.collect_one();
            }
            // Blocks being written still count as dirty; stop claiming once
            // the target is reached when they are done.
            let pending: usize = self.flying.iter().map(|(_, r)| r.len()).sum();
            // A background pass ends early when the engine stops (its
            // shutdown does not wait for a whole drain); an idle drain also
            // at the first request.
            let interrupted = match pace {
                Pace::Full => false,
                Pace::Throttled => core.wb_stopping(),
                Pace::Idle { since } => {
                    core.stats.requests() != since
                        || core.inflight.total() > 0
                        || core.wb_stopping()
                }
            };
            let more = !core.source_flush.failed()
                && !interrupted
                && i < cands.len()
                && core.dirty.load(Relaxed).saturating_sub(pending as u64) > target;
            if more
                && pace == Pace::Throttled
                && !self.flying.is_empty()
                && core.inflight.total() > 0
            {
                // Foreground requests are in flight: let the source finish
                // alone, then pause before the next run.
                while self.collect_one() {}
                std::thread::sleep(THROTTLE_PAUSE);
                continue;
            }
            if more {
                let mut run = Vec::new();
                core.claim_run(cands, &mut i, max_blocks, &mut run);
                if !run.is_empty() {
                    let len = run.len() * bs;
                    // Bound the bytes in flight (a single run always goes).
                    while self.flying_bytes + len > writer::MAX_INFLIGHT_BYTES && self.collect_one()
                    {
                    }
                    let mut buf = core.wb_bufs.take(len);
                    let mut segs = core.run_segments(&run);
                    core.stats
                        .here()
                        .writeback_cache_reads
                        .fetch_add(segs.len() as u64, Relaxed);
                    let read = if len <= PASS_READS_UP_TO {
                        let r = writer::read_segments(&*core.cache, &segs, &mut buf[..len]);
                        segs.clear();
                        r
                    } else {
                        Ok(())
                    };
                    match read {
                        Ok(()) => {
                            let id = self.writer.submit(core, run[0].0, len, segs, buf);
                            self.flying_bytes += len;
                            self.flying.push_back((id, run));
                            continue;
                        }
                        Err(e) => {
                            let r = Err(e);
                            core.finish_run(&run, &r);
                            core.wb_bufs.give(buf);
                            self.failed = r.err();
                        }
                    }
                }
            }
            // Nothing new to write: drain.
            if !self.collect_one() {
                return;
            }
        }
    }

    /// Waits for a run with the writer to be done (whichever is first) and
    /// finishes it; false if there is none.
    fn collect_one(&mut self) -> bool {
        let Some(done) = self.writer.wait(self.core) else {
            return false;
        };
        let Some(i) = self.flying.iter().position(|(id, _)| *id == done.id) else {
            // Every submitted run is in `flying`: cannot happen.
            log::warn!("writeback: a result for an unknown run");
            return true;
        };
        let Some((_, run)) = self.flying.remove(i) else {
            return true;
        };
        self.core.finish_run(&run, &done.result);
        self.flying_bytes = self
            .flying_bytes
            .saturating_sub(run.len() * self.core.bs as usize);
        if let Some(buf) = done.buf {
            self.core.wb_bufs.give(buf);
        }
        match done.result {
            Ok(()) => {
                self.written += run.len() as u64;
                self.unflushed.extend_from_slice(&run);
                if self.unflushed.len() as u64 * self.core.bs >= self.flush_every {
                    self.flush_source();
                }
                (self.progress)(self.written);
            }
            Err(e) => {
                if self.failed.is_none() {
                    self.failed = Some(e);
                }
            }
        }
        true
    }

    /// Flushes the source for the runs written since the last flush, then
    /// lets commits record them clean (or, if the flush failed, makes them
    /// dirty again).
    fn flush_source(&mut self) {
        if self.unflushed.is_empty() {
            return;
        }
        let core = self.core;
        let written = &self.unflushed;
        let r = core.writeback_flush(|durable| core.settle_written_back(written, durable));
        if let Err(e) = r {
            self.core.stats.here().errors.fetch_add(1, Relaxed);
            log::warn!(
                "writeback: flushing the source failed, {} blocks stay dirty: {e}",
                self.unflushed.len()
            );
            if self.failed.is_none() {
                self.failed = Some(e);
            }
        }
        self.unflushed.clear();
    }

    /// Returns the buffers for later passes and the pass's result.
    fn end(mut self) -> Result<u64, EngineError> {
        // Nothing is with the writer any more (`run` returns only then).
        while self.collect_one() {}
        self.flush_source();
        self.writer.finish(self.core);
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.written),
        }
    }
}
