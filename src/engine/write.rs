//! The write, discard and write-zeroes paths.
//!
//! Writeback writes go to the cache frame only (a miss takes a frame; a
//! partial-block miss first fills the frame from the source). The other modes
//! write the source with one request after claiming every cached block the
//! write touches: in writethrough (or for a block that is still dirty) the
//! frame is updated after the source, exclusively, so cache and source never
//! disagree (a clean frame whose update or source write failed is dropped);
//! otherwise the frame is invalidated. Blocks not cached are
//! registered as "uncached write in flight" so no fill can cache old data.

use super::core::{chunks, Chunk, Core, Victim};
use super::frames::{Entry, FrameState};
use super::mode::WriteMode;
use super::EngineError;
use crate::device::AlignedBuf;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

/// Blocks claimed or registered by an uncached write.
#[derive(Default)]
struct Claims {
    /// (block, frame) of cached blocks to update after the source write.
    update: Vec<(u64, u64)>,
    /// Blocks registered as uncached.
    registered: Vec<u64>,
}

impl Core {
    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        if self.mode() == WriteMode::Writeback {
            self.wb_writers.fetch_add(1, SeqCst);
            // Re-check: a mode switch may have started in between.
            let r = if self.mode() == WriteMode::Writeback {
                self.write_back(offset, buf)
            } else {
                self.write_uncached(offset, buf, true)
            };
            self.wb_writers.fetch_sub(1, SeqCst);
            self.maybe_kick_writeback();
            r
        } else {
            let update = self.mode() == WriteMode::Writethrough;
            self.write_uncached(offset, buf, update)
        }
    }

    fn write_back(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        for c in chunks(offset, buf.len() as u64, self.bs) {
            let data = &buf[c.pos..c.pos + c.len as usize];
            self.write_back_chunk(c, data)?;
        }
        Ok(())
    }

    fn write_back_chunk(&self, c: Chunk, data: &[u8]) -> Result<(), EngineError> {
        let set = self.set_of(c.block);
        let mut waited = false;
        loop {
            let mut g = self.lock(set);
            match self.lookup(set, c.block) {
                Some(f) => {
                    let e = self.frames.get(f);
                    if e.state() == FrameState::Idle && e.can_pin() {
                        self.frames.set(f, e.pinned());
                        self.set_dirty(f, true);
                        self.policy.on_hit(f, &mut g.clock);
                        drop(g);
                        self.stats.here().write_hits.fetch_add(1, Relaxed);
                        let r = self.write_frame(f, c.off, data);
                        self.unpin(set, f);
                        if r.is_err() {
                            self.stats.here().errors.fetch_add(1, Relaxed);
                        }
                        return r;
                    }
                }
                None if g.uncached.contains(&c.block) => {}
                // Under write pressure a partial-block miss goes around the
                // cache too: caching it would cost a source read of the
                // rest of the block now and a whole-block source write
                // later, against one source write of the request's bytes.
                None if self.under_write_pressure() && !self.covers_block(c) => {
                    drop(g);
                    return self.write_around(c, data);
                }
                None => match self.claim_victim(set, &mut g) {
                    Victim::Free(f) => {
                        self.install(f, Entry::new(c.block, true, FrameState::Filling), &mut g);
                        drop(g);
                        let s = self.stats.here();
                        s.write_misses.fetch_add(1, Relaxed);
                        s.promotions.fetch_add(1, Relaxed);
                        return self.fill_for_write(set, f, c, data);
                    }
                    Victim::Dirty(_) if self.under_write_pressure() => {
                        // Around the cache (see `under_write_pressure`). A
                        // frame of the set freed by writeback takes a later
                        // miss.
                        drop(g);
                        return self.write_around(c, data);
                    }
                    Victim::Dirty(f) => {
                        drop(g);
                        self.evict_dirty(set, f)?;
                        continue;
                    }
                    Victim::NeedsCommit => {
                        drop(g);
                        self.commit()?;
                        continue;
                    }
                    Victim::NeedsSourceFlush => {
                        drop(g);
                        self.settle_set(set)?;
                        self.commit()?;
                        continue;
                    }
                    // All frames busy for a moment: wait for one.
                    Victim::None => {}
                },
            }
            if !waited {
                self.stats.here().waits.fetch_add(1, Relaxed);
                waited = true;
            }
            drop(self.frames.wait(set, g));
        }
    }

    /// True if chunk `c` covers all of its block's source bytes.
    fn covers_block(&self, c: Chunk) -> bool {
        c.off == 0 && c.len >= self.block_len(c.block)
    }

    /// A writeback-mode miss sent to the source around the cache under
    /// write pressure: one source write, as in writearound (the block is
    /// registered as uncached meanwhile, and a frame that took it since is
    /// updated after the source).
    fn write_around(&self, c: Chunk, data: &[u8]) -> Result<(), EngineError> {
        // `write_uncached` counts the miss (or the hit, if a fill took the
        // block meanwhile).
        self.stats.here().bypassed.fetch_add(1, Relaxed);
        self.maybe_kick_writeback();
        self.write_uncached(c.block * self.bs + c.off, data, true)
    }

    /// Writes a new dirty block into the claimed frame `f`. A write that does
    /// not cover the block's source bytes first reads the block from the
    /// source, so the rest of the frame is never garbage.
    fn fill_for_write(&self, set: u64, f: u64, c: Chunk, data: &[u8]) -> Result<(), EngineError> {
        let r = if self.covers_block(c) {
            self.write_frame(f, 0, data)
        } else {
            self.stats.here().partial_fills.fetch_add(1, Relaxed);
            let mut block = AlignedBuf::new(self.bs as usize);
            self.read_source_blocks(c.block, &mut block).and_then(|_| {
                block[c.off as usize..(c.off + c.len) as usize].copy_from_slice(data);
                self.write_frame(f, 0, &block)
            })
        };
        match r {
            Ok(()) => {
                self.finish(set, f, FrameState::Idle);
                Ok(())
            }
            Err(e) => {
                self.stats.here().errors.fetch_add(1, Relaxed);
                self.abandon(set, f);
                Err(e)
            }
        }
    }

    /// Writes to the source with one request. With `update`, cached blocks are
    /// rewritten after the source; without, clean cached blocks are dropped
    /// (dirty ones are always updated, never dropped).
    pub(crate) fn write_uncached(
        &self,
        offset: u64,
        buf: &[u8],
        update: bool,
    ) -> Result<(), EngineError> {
        let mut claims = Claims::default();
        for c in chunks(offset, buf.len() as u64, self.bs) {
            self.claim_for_uncached(c.block, update, &mut claims);
        }
        let mut result = self
            .source
            .write_at(buf, offset)
            .map_err(EngineError::Source);
        self.source_written.store(true, SeqCst);
        let source_ok = result.is_ok();
        for &(block, f) in &claims.update {
            let set = self.set_of(block);
            // A failed source write may still have changed part of the range
            // (a short write), so a clean frame's old data could disagree
            // with the source: drop it. A dirty frame keeps its data, which
            // writeback will put over whatever the source holds.
            if !source_ok && !self.frames.get(f).dirty() {
                self.abandon(set, f);
                continue;
            }
            if source_ok {
                let start = (block * self.bs).max(offset);
                let end = ((block + 1) * self.bs).min(offset + buf.len() as u64);
                let data = &buf[(start - offset) as usize..(end - offset) as usize];
                if let Err(e) = self.write_frame(f, start - block * self.bs, data) {
                    self.stats.here().errors.fetch_add(1, Relaxed);
                    // The source holds the new data: a clean frame is dropped
                    // rather than left stale. A dirty frame cannot be dropped
                    // (it holds other unwritten data) and the error is returned.
                    if !self.frames.get(f).dirty() {
                        log::warn!("updating cached block {block} failed, dropped it: {e}");
                        self.abandon(set, f);
                        continue;
                    }
                    result = Err(e);
                }
            }
            self.finish(set, f, FrameState::Idle);
        }
        for &b in &claims.registered {
            self.unregister_uncached(b);
        }
        if !source_ok {
            self.stats.here().errors.fetch_add(1, Relaxed);
        }
        result
    }

    /// Claims (for update), invalidates or registers `block` for an uncached
    /// write, waiting for exclusive use of a cached frame.
    fn claim_for_uncached(&self, block: u64, update: bool, claims: &mut Claims) {
        let set = self.set_of(block);
        let mut g = self.lock(set);
        loop {
            match self.lookup(set, block) {
                Some(f) => {
                    let e = self.frames.get(f);
                    if e.quiet() {
                        if update || e.dirty() {
                            self.frames.set(f, e.with_state(FrameState::Filling));
                            self.policy.on_hit(f, &mut g.clock);
                            self.stats.here().write_hits.fetch_add(1, Relaxed);
                            claims.update.push((block, f));
                        } else {
                            self.free_frame(f);
                            self.stats.here().invalidations.fetch_add(1, Relaxed);
                            Core::register_uncached(&mut g, block);
                            claims.registered.push(block);
                        }
                        return;
                    }
                }
                None => {
                    self.stats.here().write_misses.fetch_add(1, Relaxed);
                    Core::register_uncached(&mut g, block);
                    claims.registered.push(block);
                    return;
                }
            }
            self.stats.here().waits.fetch_add(1, Relaxed);
            g = self.frames.wait(set, g);
        }
    }

    /// Discard (`unmap`) or write-zeroes of a range: whole blocks are dropped
    /// from the cache (dirty or not) and zeroed on the source; partial blocks
    /// at the edges are written with zeros through the normal write path.
    ///
    /// A dirty frame is dropped only once the source holds the zeros: until
    /// then it stays, claimed, so that a crash (or a failed source
    /// operation) leaves the block's last data, never the older data the
    /// source had before it was written back.
    pub(crate) fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> Result<(), EngineError> {
        let end = offset + len;
        let first_full = offset.div_ceil(self.bs);
        let end_full = if end == self.source_size {
            end.div_ceil(self.bs)
        } else {
            end / self.bs
        };
        if first_full >= end_full {
            return self.write_zero_bytes(offset, len);
        }
        let full_start = first_full * self.bs;
        let full_end = (end_full * self.bs).min(self.source_size);
        if offset < full_start {
            self.write_zero_bytes(offset, full_start - offset)?;
        }
        if full_end < end {
            self.write_zero_bytes(full_end, end - full_end)?;
        }
        let mut registered = Vec::new();
        let mut held = Vec::new();
        for block in first_full..end_full {
            self.drop_for_zero(block, &mut registered, &mut held);
        }
        let r = if unmap {
            self.source.discard(full_start, full_end - full_start)
        } else {
            self.source.write_zeroes(full_start, full_end - full_start)
        }
        .map_err(EngineError::Source);
        // Before the held frames are freed: a commit that records them
        // free must flush the source's zeros first.
        self.source_written.store(true, SeqCst);
        for (block, f) in held {
            if r.is_ok() {
                self.abandon(self.set_of(block), f);
            } else {
                self.finish(self.set_of(block), f, FrameState::Idle);
            }
        }
        for b in registered {
            self.unregister_uncached(b);
        }
        r
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let zeros = AlignedBuf::new(len as usize);
        self.write(offset, &zeros)
    }

    /// Drops `block` from the cache for a zeroing of the source: a clean
    /// frame is freed now, a dirty one is claimed (`Filling`) and listed in
    /// `held` for the caller to free once the source is zeroed. Registers
    /// the block as uncached either way.
    fn drop_for_zero(&self, block: u64, registered: &mut Vec<u64>, held: &mut Vec<(u64, u64)>) {
        let set = self.set_of(block);
        let mut g = self.lock(set);
        loop {
            match self.lookup(set, block) {
                Some(f) if self.frames.get(f).quiet() => {
                    let e = self.frames.get(f);
                    if e.dirty() {
                        self.frames.set(f, e.with_state(FrameState::Filling));
                        held.push((block, f));
                    } else {
                        self.free_frame(f);
                    }
                    self.stats.here().invalidations.fetch_add(1, Relaxed);
                    break;
                }
                Some(_) => {
                    self.stats.here().waits.fetch_add(1, Relaxed);
                    g = self.frames.wait(set, g);
                }
                None => break,
            }
        }
        Core::register_uncached(&mut g, block);
        registered.push(block);
    }
}
