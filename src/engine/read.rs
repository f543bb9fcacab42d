//! The read path.
//!
//! Hits are read from the cache frame while it is pinned. Consecutive misses
//! are claimed (frames set `Filling`) and fetched from the source with one
//! read; the caller's bytes are copied out at once and the blocks are stored
//! into the cache in the background. A read that missed may queue the
//! blocks after it for readahead (see `readahead`).

use super::core::{chunks, Chunk, Core, Victim};
use super::frames::{Entry, FrameState};
use super::mode::WriteMode;
use super::store::StoreJob;
use super::EngineError;
use std::sync::atomic::Ordering::Relaxed;

/// Claimed consecutive missing blocks waiting for one source read.
struct MissRun {
    first_block: u64,
    frames: Vec<u64>,
    /// Where the run's part of the request starts in the caller's buffer.
    pos: usize,
    /// Offset of the request inside the first block.
    skip: u64,
    /// Request bytes covered by the run.
    len: u64,
}

/// Largest fetch issued for one run of misses (and for one readahead job).
pub(super) const MAX_RUN_BYTES: u64 = 4 << 20;

impl Core {
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        if self.mode() == WriteMode::Passthrough {
            self.stats.here().bypassed.fetch_add(1, Relaxed);
            return self
                .source
                .read_at(buf, offset)
                .map_err(EngineError::Source);
        }
        self.readahead_reached(offset, buf.len() as u64);
        let mut run: Option<MissRun> = None;
        let mut first_miss = None;
        let result = self.read_chunks(offset, buf, &mut run, &mut first_miss);
        // Always settle claimed frames, even after an error.
        let tail = match run.take() {
            Some(r) => self.fetch_run(r, buf),
            None => Ok(()),
        };
        let result = result.and(tail);
        if let (Ok(()), Some(miss)) = (&result, first_miss) {
            let last = (offset + buf.len().saturating_sub(1) as u64) / self.bs;
            self.readahead_after(miss, last);
        }
        result
    }

    fn read_chunks(
        &self,
        offset: u64,
        buf: &mut [u8],
        run: &mut Option<MissRun>,
        first_miss: &mut Option<u64>,
    ) -> Result<(), EngineError> {
        for c in chunks(offset, buf.len() as u64, self.bs) {
            self.read_chunk(c, buf, run, first_miss)?;
        }
        Ok(())
    }

    fn read_chunk(
        &self,
        c: Chunk,
        buf: &mut [u8],
        run: &mut Option<MissRun>,
        first_miss: &mut Option<u64>,
    ) -> Result<(), EngineError> {
        let set = self.set_of(c.block);
        let out = c.pos..c.pos + c.len as usize;
        let mut waited = false;
        loop {
            let mut g = self.lock(set);
            let must_wait = match self.lookup(set, c.block) {
                Some(f) => {
                    let e = self.frames.get(f);
                    if e.state() != FrameState::Filling && e.can_pin() {
                        self.frames.set(f, e.pinned());
                        self.policy.on_hit(f, &mut g.clock);
                        drop(g);
                        self.stats.here().read_hits.fetch_add(1, Relaxed);
                        let mut r = self
                            .cache
                            .read_at(&mut buf[out.clone()], self.layout.frame_offset(f) + c.off)
                            .map_err(EngineError::Cache);
                        if let (Err(err), false) = (&r, e.dirty()) {
                            // A clean block is also on the source; the pin
                            // keeps uncached writes (which claim the frame)
                            // from changing it meanwhile.
                            self.stats.here().errors.fetch_add(1, Relaxed);
                            log::warn!(
                                "reading cached block {} failed, read it from the source and \
                                 dropped it from the cache: {err}",
                                c.block
                            );
                            r = self
                                .source
                                .read_at(&mut buf[out.clone()], c.block * self.bs + c.off)
                                .map_err(EngineError::Source);
                            self.unpin(set, f);
                            self.drop_clean(set, f, c.block);
                            return r;
                        }
                        self.unpin(set, f);
                        return r;
                    }
                    true
                }
                None if g.uncached.contains(&c.block) => true,
                None => match self.claim_victim(set, &mut g) {
                    Victim::Free(f) => {
                        self.install(f, Entry::new(c.block, false, FrameState::Filling), &mut g);
                        drop(g);
                        let s = self.stats.here();
                        s.read_misses.fetch_add(1, Relaxed);
                        s.promotions.fetch_add(1, Relaxed);
                        first_miss.get_or_insert(c.block);
                        return self.extend_run(run, c, f, buf);
                    }
                    Victim::Dirty(_) if self.under_write_pressure() => {
                        // Around the cache (see `under_write_pressure`): the
                        // block is neither cached nor being written around
                        // (checked above, under the set's lock), so the
                        // source holds its data.
                        drop(g);
                        self.settle(run, buf)?;
                        let s = self.stats.here();
                        s.read_misses.fetch_add(1, Relaxed);
                        s.bypassed.fetch_add(1, Relaxed);
                        self.maybe_kick_writeback();
                        let r = self
                            .source
                            .read_at(&mut buf[out], c.block * self.bs + c.off)
                            .map_err(EngineError::Source);
                        if r.is_err() {
                            s.errors.fetch_add(1, Relaxed);
                        }
                        return r;
                    }
                    Victim::Dirty(f) => {
                        drop(g);
                        self.settle(run, buf)?;
                        self.evict_dirty(set, f)?;
                        continue;
                    }
                    Victim::NeedsCommit => {
                        drop(g);
                        self.settle(run, buf)?;
                        self.commit()?;
                        continue;
                    }
                    Victim::NeedsSourceFlush => {
                        drop(g);
                        self.settle(run, buf)?;
                        self.settle_set(set)?;
                        self.commit()?;
                        continue;
                    }
                    // Every frame of the set is busy for a moment (being
                    // fetched, stored, read or written back): wait for one.
                    Victim::None => true,
                },
            };
            if must_wait {
                if run.is_some() {
                    drop(g);
                    self.settle(run, buf)?;
                    continue;
                }
                if !waited {
                    self.stats.here().waits.fetch_add(1, Relaxed);
                    waited = true;
                }
                drop(self.frames.wait(set, g));
            }
        }
    }

    /// Adds a claimed block to the pending run, fetching the run first when
    /// the block does not extend it.
    fn extend_run(
        &self,
        run: &mut Option<MissRun>,
        c: Chunk,
        f: u64,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        if let Some(r) = run.as_mut() {
            let contiguous = r.first_block + r.frames.len() as u64 == c.block;
            let fits = (r.frames.len() as u64 + 1) * self.bs <= MAX_RUN_BYTES;
            if contiguous && fits {
                r.frames.push(f);
                r.len += c.len;
                return Ok(());
            }
        }
        let pending = run.replace(MissRun {
            first_block: c.block,
            frames: vec![f],
            pos: c.pos,
            skip: c.off,
            len: c.len,
        });
        match pending {
            Some(r) => self.fetch_run(r, buf),
            None => Ok(()),
        }
    }

    fn settle(&self, run: &mut Option<MissRun>, buf: &mut [u8]) -> Result<(), EngineError> {
        match run.take() {
            Some(r) => self.fetch_run(r, buf),
            None => Ok(()),
        }
    }

    /// Frees the claimed frames of blocks `first..` after a failed or
    /// abandoned fetch, waking their waiters.
    pub(super) fn abandon_run(&self, first: u64, frames: &[u64]) {
        for (i, &f) in frames.iter().enumerate() {
            self.abandon(self.set_of(first + i as u64), f);
        }
    }

    /// Reads the run from the source, copies the request's bytes out and
    /// queues the blocks for storing. On error the claimed frames are freed.
    fn fetch_run(&self, r: MissRun, buf: &mut [u8]) -> Result<(), EngineError> {
        let span = r.frames.len() * self.bs as usize;
        // A pooled buffer has stale bytes; read_source_blocks overwrites all.
        let mut data = self.fetch_bufs.take(span);
        if let Err(e) = self.read_source_blocks(r.first_block, &mut data) {
            self.fetch_bufs.give(data);
            self.stats.here().errors.fetch_add(1, Relaxed);
            self.abandon_run(r.first_block, &r.frames);
            return Err(e);
        }
        let skip = r.skip as usize;
        buf[r.pos..r.pos + r.len as usize].copy_from_slice(&data[skip..skip + r.len as usize]);
        self.submit_store(StoreJob {
            first_block: r.first_block,
            frames: r.frames,
            data,
        });
        Ok(())
    }
}
