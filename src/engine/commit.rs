//! Commits: making the mapping of dirty blocks durable.
//!
//! The promise (see ARCHITECTURE.md): every write completed before a
//! completed FLUSH survives a crash. Only *dirty* mappings need to survive —
//! after an unclean shutdown clean entries are dropped, since the source holds
//! their data — so a commit records, for each frame whose dirty state changed,
//! its new committed value (`VALID|DIRTY|block` or 0).
//!
//! Order of a commit:
//! 1. take the queued frames and their wanted values (frames still `Filling`
//!    stay queued: their data is not complete);
//! 2. flush the cache device (the data of every recorded dirty frame was
//!    written before step 1) and, if anything wrote to it, the source. A
//!    writeback does not count: it flushes the source itself, and until then
//!    its frames (`SRCPEND`) are recorded dirty, so a guest FLUSH never waits
//!    for a slow source's flush;
//! 3. write the records as journal blocks and flush the cache device — or,
//!    when the journal is full, write the changed table pages, flush, and
//!    restart the journal through the superblock;
//! 4. only then update each frame's `CDIRTY`, which lets frames committed
//!    clean or free be reused.

use super::core::Core;
use super::frames::{CDIRTY, DIRTY, QUEUED};
use super::meta::{self, journal, Layout, Superblock};
use super::EngineError;
use crate::device::{AlignedBuf, BlockDevice};
use std::sync::atomic::Ordering::SeqCst;

/// The journal writer's position; its mutex serialises commits.
pub(crate) struct JournalState {
    /// Byte offset inside the journal area of the next commit.
    pub pos: u64,
    /// Sequence number of the next commit.
    pub seq: u64,
    /// The superblock and the slot it was last written to.
    pub sb: Superblock,
    pub slot: usize,
    /// Commits and checkpoints done (for statistics).
    pub commits: u64,
    pub checkpoints: u64,
}

impl Core {
    /// Makes completed writes durable: flushes the devices that were written
    /// and commits changed dirty mappings. Costs no metadata I/O when no
    /// dirty mapping changed.
    ///
    /// Group commit: a caller needs one commit that *starts* after it
    /// arrived (its writes completed before). Callers that arrive while a
    /// commit runs wait and share the next one, so N concurrent FLUSHes cost
    /// two commits, not N.
    pub(crate) fn commit(&self) -> Result<(), EngineError> {
        let mut g = self.group.lock().unwrap_or_else(|p| p.into_inner());
        let target = g.started + 1;
        loop {
            if g.finished >= target {
                return if g.last_ok {
                    Ok(())
                } else {
                    Err(EngineError::CommitFailed)
                };
            }
            if !g.running {
                g.running = true;
                g.started += 1;
                let mine = g.started;
                drop(g);
                let r = self.commit_one();
                g = self.group.lock().unwrap_or_else(|p| p.into_inner());
                g.running = false;
                g.finished = mine;
                g.last_ok = r.is_ok();
                self.group_cond.notify_all();
                if mine >= target {
                    return r;
                }
                continue;
            }
            g = self.group_cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn commit_one(&self) -> Result<(), EngineError> {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let records = self.take_records();
        let r = self.commit_locked(&mut j, &records);
        if r.is_err() {
            // Some records may or may not be durable now: the next commit
            // states every frame again.
            self.rerecord.store(true, SeqCst);
        }
        r
    }

    fn commit_locked(
        &self,
        j: &mut JournalState,
        records: &[(u64, u64)],
    ) -> Result<(), EngineError> {
        // A device whose flush failed once fails every commit from then on
        // (`durable`): a record written now could map a frame whose data
        // that flush lost.
        if self.cache_written.swap(false, SeqCst) || self.cache_flush.failed() {
            if let Err(e) = self.flush_cache() {
                self.cache_written.store(true, SeqCst);
                return Err(e);
            }
        }
        if self.source_written.swap(false, SeqCst) || self.source_flush.failed() {
            if let Err(e) = self.flush_source() {
                self.source_written.store(true, SeqCst);
                return Err(e);
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let bytes = journal::encode_commit(j.seq, records);
        let need = bytes.len() as u64;
        if j.pos + need > self.layout.journal_len {
            self.checkpoint(j, records)?;
        } else {
            let mut buf = AlignedBuf::new(bytes.len());
            buf.copy_from_slice(&bytes);
            let at = self.layout.journal_offset + j.pos;
            // A failed write leaves `pos` and `seq` where they were: the
            // retry overwrites whatever part of it reached the device.
            self.cache.write_at(&buf, at).map_err(EngineError::Cache)?;
            self.flush_cache()?;
            j.pos += need;
            j.seq += 1;
        }
        j.commits += 1;
        self.apply_committed(records);
        Ok(())
    }

    /// Drains the commit queue into records (frame, value to commit).
    ///
    /// A frame recorded dirty gets `CDIRTY` at once, before the record is
    /// durable: from here on the journal may map it dirty, so it must not be
    /// given to another block even if it is written back and evicted while
    /// this commit is in flight.
    fn take_records(&self) -> Vec<(u64, u64)> {
        let full = self.rerecord.swap(false, SeqCst);
        let mut queued =
            std::mem::take(&mut *self.commit_queue.lock().unwrap_or_else(|p| p.into_inner()));
        if full {
            queued = (0..self.layout.geometry.cache_blocks).collect();
        }
        let mut records = Vec::with_capacity(queued.len());
        let mut again = Vec::new();
        for f in queued {
            let set = self.layout.geometry.set_of_frame(f);
            let _g = self.lock(set);
            let e = self.frames.get(f);
            if e.state() == super::frames::FrameState::Filling {
                if !e.queued() {
                    self.frames.set(f, e.with_flag(QUEUED, true));
                }
                again.push(f);
                continue;
            }
            let want = e.wanted();
            let mut e = e.with_flag(QUEUED, false);
            if want != e.committed() || (full && (want != 0 || e.cdirty())) {
                records.push((f, want));
                if want != 0 {
                    e = e.with_flag(CDIRTY, true);
                }
            }
            self.frames.set(f, e);
        }
        if !again.is_empty() {
            self.commit_queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(again);
        }
        records
    }

    /// Writes `sb` into superblock slot `slot` (and flushes). If that
    /// fails, which superblock the device now holds is unknown, so no copy
    /// of the table and no journal position is safe to write next: metadata
    /// writes stop (`durable`).
    pub(crate) fn write_superblock(&self, sb: &Superblock, slot: usize) -> Result<(), EngineError> {
        meta::write_superblock(&*self.cache, sb, slot).map_err(|e| {
            self.cache_flush.fail(&*self.cache, &e);
            self.drop_crash_state();
            EngineError::Meta {
                device: self.cache.name(),
                source: e,
            }
        })
    }

    /// Sets each recorded frame's committed flag and wakes waiters.
    fn apply_committed(&self, records: &[(u64, u64)]) {
        for &(f, v) in records {
            let set = self.layout.geometry.set_of_frame(f);
            let g = self.lock(set);
            let e = self.frames.get(f).with_flag(CDIRTY, v & DIRTY != 0);
            self.frames.set(f, e);
            // It may differ again already (changed after the snapshot).
            self.note(f);
            self.frames.notify(set, &g);
        }
    }

    /// Writes the committed view (with `records` applied) of the whole
    /// table into the inactive table copy, then switches the superblock to it
    /// and restarts the journal. A crash before the switch leaves the old copy
    /// and journal in charge; after it, the new copy.
    fn checkpoint(&self, j: &mut JournalState, records: &[(u64, u64)]) -> Result<(), EngineError> {
        let overrides: std::collections::HashMap<u64, u64> = records.iter().copied().collect();
        let entries: Vec<u64> = (0..self.layout.geometry.cache_blocks)
            .map(|f| match overrides.get(&f) {
                Some(&v) => v,
                None => {
                    let _g = self.lock(self.layout.geometry.set_of_frame(f));
                    self.frames.get(f).committed()
                }
            })
            .collect();
        let copy = j.sb.table_copy ^ 1;
        let meta_err = |e| EngineError::Meta {
            device: self.cache.name(),
            source: e,
        };
        // The durable superblock points at the other copy: a failed or torn
        // write here is retried into the same inactive copy.
        meta::save_table(&*self.cache, &self.layout, copy, &entries).map_err(meta_err)?;
        self.flush_cache()?;
        let mut sb = j.sb.clone();
        sb.commit_seq = j.seq + 1;
        sb.journal_pos = 0;
        sb.table_copy = copy;
        sb.seq += 1;
        let slot = 1 - j.slot;
        self.write_superblock(&sb, slot)?;
        j.seq = sb.commit_seq;
        j.sb = sb;
        j.slot = slot;
        j.pos = 0;
        j.checkpoints += 1;
        Ok(())
    }
}

/// Group-commit bookkeeping (see `Core::commit`).
#[derive(Default)]
pub(crate) struct GroupCommit {
    /// Commits started so far.
    pub started: u64,
    /// Highest commit number finished.
    pub finished: u64,
    /// Whether that commit succeeded.
    pub last_ok: bool,
    pub running: bool,
}

/// What replaying the journal found.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Replay {
    pub commits: u64,
    pub records: u64,
    /// Sequence number after the last valid commit.
    pub next_seq: u64,
}

/// Replays the journal of an uncleanly shut down cache onto `entries`.
///
/// Replay starts at the superblock's position and sequence number and stops
/// at the first sector that is blank or stale where the next commit would
/// start; a commit cut short by the crash is ignored. Damage (see
/// `meta::journal`) is an error: committed metadata would be lost.
pub(crate) fn replay(
    dev: &dyn BlockDevice,
    l: &Layout,
    sb: &Superblock,
    entries: &mut [u64],
) -> Result<Replay, meta::MetaError> {
    let mut area = AlignedBuf::new(l.journal_len as usize);
    dev.read_at(&mut area, l.journal_offset)?;
    let scan = journal::scan(&area, sb.journal_pos, sb.commit_seq);
    if let journal::ScanEnd::Corrupt { offset, what } = &scan.end {
        return Err(meta::MetaError::JournalCorrupt {
            offset: l.journal_offset + offset,
            what: what.clone(),
        });
    }
    let mut out = Replay {
        next_seq: scan.next_seq,
        ..Replay::default()
    };
    for c in &scan.commits {
        for &(f, v) in &c.records {
            let slot = entries
                .get_mut(f as usize)
                .ok_or(meta::MetaError::JournalRecord {
                    frame: f,
                    frames: l.geometry.cache_blocks,
                })?;
            if !journal::valid_value(v) {
                return Err(meta::MetaError::JournalCorrupt {
                    offset: l.journal_offset + c.offset,
                    what: format!("record value {v:#x} has unknown bits"),
                });
            }
            *slot = v;
            out.records += 1;
        }
        out.commits += 1;
    }
    Ok(out)
}
