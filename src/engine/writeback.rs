//! Writeback of dirty blocks to the source (the original target's kcopyd
//! work): background cleaning above the high watermark, and the whole-cache
//! flush.
//!
//! Dirty frames are collected, sorted by source block and grouped into runs
//! of consecutive blocks, each written with one source request. Frames are
//! `WritingBack` while copied: readable, but no write can change them, so the
//! data marked clean is exactly the data the source received.

use super::core::Core;
use super::frames::FrameState;
use super::{EngineError, FlushProgress};
use crate::device::AlignedBuf;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// Pause between runs while foreground requests are in flight.
const THROTTLE_PAUSE: Duration = Duration::from_millis(2);
/// How often the background thread looks at the watermark without a kick.
const IDLE_CHECK: Duration = Duration::from_millis(500);

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

    /// Copies one run of claimed consecutive blocks to the source and marks
    /// them clean (or back to dirty idle on error).
    fn write_run(&self, run: &[(u64, u64)]) -> Result<(), EngineError> {
        let bs = self.bs as usize;
        let mut data = AlignedBuf::new(run.len() * bs);
        let mut r = Ok(());
        for (i, &(_, f)) in run.iter().enumerate() {
            r = self.read_frame(f, &mut data[i * bs..(i + 1) * bs]);
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = self.write_source_blocks(run[0].0, &data);
        }
        for &(block, f) in run {
            let set = self.set_of(block);
            let g = self.lock(set);
            let e = self.frames.get(f).with_state(FrameState::Idle);
            self.frames.set(f, e);
            if r.is_ok() {
                self.set_dirty(f, false);
            }
            self.frames.notify(set, &g);
        }
        match &r {
            Ok(()) => {
                self.stats.writebacks.fetch_add(run.len() as u64, Relaxed);
                self.stats.writeback_runs.fetch_add(1, Relaxed);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Relaxed);
                log::warn!(
                    "writeback of {} blocks from source block {} failed: {e}",
                    run.len(),
                    run[0].0
                );
            }
        }
        r
    }

    /// One pass over the dirty blocks, stopping once at most `target` remain.
    /// Returns the number of blocks written back.
    pub(crate) fn writeback_pass(
        &self,
        target: u64,
        throttle: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, EngineError> {
        let max_blocks = (self.wb.max_run_bytes / self.bs).max(1) as usize;
        let mut written = 0u64;
        let mut run: Vec<(u64, u64)> = Vec::new();
        let candidates = self.dirty_candidates();
        let mut i = 0;
        while i <= candidates.len() {
            let next = candidates.get(i).copied();
            let extends = match (run.last(), next) {
                (Some(&(last, _)), Some((b, _))) => b == last + 1 && run.len() < max_blocks,
                (None, Some(_)) => true,
                _ => false,
            };
            if !extends && !run.is_empty() {
                self.write_run(&run)?;
                written += run.len() as u64;
                progress(written);
                run.clear();
                if self.dirty.load(Relaxed) <= target {
                    break;
                }
                if throttle && self.inflight.load(Relaxed) > 0 {
                    std::thread::sleep(THROTTLE_PAUSE);
                }
                continue; // re-examine `next` against the empty run
            }
            if let Some((b, f)) = next {
                if self.claim_for_writeback(b, f) {
                    run.push((b, f));
                } else if !run.is_empty() {
                    // A gap: the run ends here.
                    self.write_run(&run)?;
                    written += run.len() as u64;
                    progress(written);
                    run.clear();
                }
            }
            i += 1;
        }
        Ok(written)
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
            let n = self.writeback_pass(0, false, &mut |w| {
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
        // Flush the source, then commit the clean states.
        self.commit()?;
        progress(FlushProgress {
            total: total.max(done),
            done,
        });
        Ok(())
    }
}

/// The background writeback loop: sleeps until kicked (or a periodic check
/// finds the high watermark passed) and cleans down to the low watermark.
pub(crate) fn run_writeback(core: Arc<Core>) {
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
        let frames = core.layout.cache_blocks;
        let high = frames * u64::from(core.wb.high_watermark_pct) / 100;
        let low = frames * u64::from(core.wb.low_watermark_pct) / 100;
        if core.dirty.load(Relaxed) <= high {
            continue;
        }
        while core.dirty.load(Relaxed) > low {
            if core.wb_signal.lock().map(|s| s.stop).unwrap_or(true) {
                return;
            }
            match core
                .writeback_pass(low, true, &mut |_| {})
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
