//! Hits served by the caller's own I/O on the cache device.
//!
//! A caller with an asynchronous I/O engine (the daemon's io_uring) asks for a
//! [`DirectIo`]: if every block of the request is cached and usable right
//! now, the frames are pinned and the caller gets the cache device ranges to
//! read or write itself; otherwise it gets `None` and uses the blocking
//! [`Engine::read`]/[`Engine::write`], which handle misses. Nothing here
//! waits or does I/O, so a queue thread can call it.
//!
//! Invariants, the same as the blocking hit paths in `read.rs` and
//! `write.rs`:
//! - a pinned frame is never evicted, reused or claimed for writeback, so the
//!   extents keep pointing at this request's blocks until the `DirectIo` is
//!   dropped;
//! - a read hit needs a frame that is not being filled; a write hit needs an
//!   idle frame (not being filled, stored or written back) and happens only
//!   in writeback mode, counted in `wb_writers` so a mode switch waits for it;
//! - a write marks the frame dirty before its data is written, as the
//!   blocking path does: a FLUSH only covers writes already completed, and a
//!   frame recorded dirty early still holds this block's data (old or new);
//! - a write sets "cache written since the last flush" only when the caller
//!   reports it completed, so a FLUSH that arrives after the completion
//!   always flushes the cache device.
//!
//! If the caller's I/O fails it calls [`DirectIo::failed`] and retries the
//! request through the blocking path, which reports errors properly; a
//! failed direct write leaves its frames dirty, and the retry rewrites them.

use super::core::{chunks, Core};
use super::frames::FrameState;
use super::mode::WriteMode;
use super::Engine;
use crate::device::RawAccess;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;

/// One contiguous range of a request on the cache device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset on the cache device.
    pub dev_offset: u64,
    /// Byte offset inside the request.
    pub pos: u64,
    pub len: u64,
}

/// The vectors of a [`DirectIo`], handed back by [`DirectIo::completed`],
/// [`DirectIo::failed`] and [`DirectIo::declined`] (empty, capacity kept) so
/// that a caller serving many requests allocates nothing per request.
/// Invariant: empty whenever a caller holds one (its fields are private;
/// only `Default` and `DirectIo::into_bufs` make one).
#[derive(Debug, Default)]
pub struct DirectBufs {
    /// (set, frame) of every pinned frame.
    pins: Vec<(u64, u64)>,
    extents: Vec<Extent>,
}

impl DirectBufs {
    /// True if they hold no pins or extents (as handed back).
    pub fn is_empty(&self) -> bool {
        self.pins.is_empty() && self.extents.is_empty()
    }

    /// Pins and extents they can hold without allocating.
    pub fn capacity(&self) -> (usize, usize) {
        (self.pins.capacity(), self.extents.capacity())
    }
}

/// Pinned cache frames of one request being served directly. Dropping it
/// releases the pins (and, for a write, lets a mode switch proceed).
pub struct DirectIo {
    core: Arc<Core>,
    write: bool,
    bufs: DirectBufs,
    /// Request length in bytes.
    len: u64,
    /// Pins and counts already given back (by `completed`/`failed`).
    released: bool,
}

impl DirectIo {
    /// The cache device ranges, in request order; neighbouring ranges that
    /// are contiguous on the device are merged.
    pub fn extents(&self) -> &[Extent] {
        &self.bufs.extents
    }

    /// Unpins the frames and uncounts the request; once.
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        for &(set, f) in &self.bufs.pins {
            self.core.unpin(set, f);
        }
        self.core.inflight.dec();
        if self.write {
            self.core.wb_writers.fetch_sub(1, SeqCst);
            self.core.maybe_kick_writeback();
        }
    }

    /// Releases everything and returns the emptied vectors.
    fn into_bufs(mut self) -> DirectBufs {
        self.release();
        let mut b = std::mem::take(&mut self.bufs);
        b.pins.clear();
        b.extents.clear();
        b
    }

    /// As [`DirectIo::completed`], for a request whose data the caller
    /// moved through a staging buffer of its own (counted in
    /// `staged_requests` as well).
    pub fn completed_staged(self) -> DirectBufs {
        self.core.stats.here().staged_requests.fetch_add(1, Relaxed);
        self.completed()
    }

    /// Records that the caller's I/O completed; the request counts in the
    /// statistics like one served by the blocking path. (Dropping a
    /// `DirectIo` without calling this or [`DirectIo::failed`] counts
    /// nothing: the caller declined it.)
    pub fn completed(self) -> DirectBufs {
        let s = self.core.stats.here();
        let blocks = self.bufs.pins.len() as u64;
        s.direct_requests.fetch_add(1, Relaxed);
        s.direct_ops
            .fetch_add(self.bufs.extents.len() as u64, Relaxed);
        if self.write {
            // Only now: a FLUSH that ran while the write was in flight may
            // have cleared the flag already, and the next one must flush the
            // cache device again (as `write_frame` sets it after the write).
            self.core.cache_written.store(true, SeqCst);
            s.writes.fetch_add(1, Relaxed);
            s.bytes_written.fetch_add(self.len, Relaxed);
            s.write_hits.fetch_add(blocks, Relaxed);
        } else {
            s.reads.fetch_add(1, Relaxed);
            s.bytes_read.fetch_add(self.len, Relaxed);
            s.read_hits.fetch_add(blocks, Relaxed);
        }
        self.into_bufs()
    }

    /// The caller did not start the I/O: releases the pins, counts
    /// nothing, and returns the emptied vectors (as dropping it does, but
    /// keeping their capacity).
    pub fn declined(self) -> DirectBufs {
        self.into_bufs()
    }

    /// Records that the caller's I/O failed (the request is then retried
    /// through the blocking path).
    pub fn failed(self) -> DirectBufs {
        self.core.stats.here().errors.fetch_add(1, Relaxed);
        if self.write {
            // Part of it may have reached the device.
            self.core.cache_written.store(true, SeqCst);
        }
        self.into_bufs()
    }
}

impl Drop for DirectIo {
    fn drop(&mut self) {
        self.release();
    }
}

impl Engine {
    /// The cache device's descriptor, if it has one that direct I/O may use.
    pub fn cache_raw_access(&self) -> Option<RawAccess> {
        self.core.cache.raw_access()
    }

    /// The cache-device byte ranges `(offset, len)` of the frames that hold
    /// valid blocks now, in device order, adjacent frames merged: the only
    /// parts of the device the direct paths read or write.
    pub fn valid_frame_ranges(&self) -> Vec<(u64, u64)> {
        let c = &self.core;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for f in c.layout.frames_in_device_order() {
            if !c.frames.get(f).valid() {
                continue;
            }
            let at = c.layout.frame_offset(f);
            match out.last_mut() {
                Some((o, l)) if o.checked_add(*l) == Some(at) => *l += c.bs,
                _ => out.push((at, c.bs)),
            }
        }
        out
    }

    /// Pins the frames of a read of `[offset, offset+len)` if every block is
    /// cached and readable now.
    pub fn begin_direct_read(&self, offset: u64, len: u64) -> Option<DirectIo> {
        self.begin_direct_read_in(offset, len, &mut DirectBufs::default())
    }

    /// As [`Engine::begin_direct_read`], building the `DirectIo` in the
    /// vectors of `bufs` (taken from it; given back emptied on `None`).
    pub fn begin_direct_read_in(
        &self,
        offset: u64,
        len: u64,
        bufs: &mut DirectBufs,
    ) -> Option<DirectIo> {
        let mut io = self.begin_direct(offset, len, false, bufs)?;
        let c = &self.core;
        if c.mode() == WriteMode::Passthrough || !self.pin_all(&mut io, offset, len) {
            *bufs = io.into_bufs();
            return None;
        }
        c.readahead_reached(offset, len);
        Some(io)
    }

    /// Pins the frames of a write-back write of `[offset, offset+len)` if
    /// every block is cached and idle now, and marks them dirty.
    pub fn begin_direct_write(&self, offset: u64, len: u64) -> Option<DirectIo> {
        self.begin_direct_write_in(offset, len, &mut DirectBufs::default())
    }

    /// As [`Engine::begin_direct_write`], building the `DirectIo` in the
    /// vectors of `bufs` (taken from it; given back emptied on `None`).
    pub fn begin_direct_write_in(
        &self,
        offset: u64,
        len: u64,
        bufs: &mut DirectBufs,
    ) -> Option<DirectIo> {
        let c = &self.core;
        if c.mode() != WriteMode::Writeback {
            return None;
        }
        let mut io = self.begin_direct(offset, len, true, bufs)?;
        // Re-check after counting ourselves: a switch may have started.
        if c.mode() != WriteMode::Writeback || !self.pin_all(&mut io, offset, len) {
            *bufs = io.into_bufs();
            return None;
        }
        for &(set, f) in &io.bufs.pins {
            let _g = c.lock(set);
            c.set_dirty(f, true);
        }
        Some(io)
    }

    /// Counts the request in flight (a `DirectIo` without pins yet, in the
    /// vectors of `bufs`), or `None` if the engine is closed, the range is
    /// outside the disk or empty.
    fn begin_direct(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        bufs: &mut DirectBufs,
    ) -> Option<DirectIo> {
        let c = &self.core;
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.size() {
            return None;
        }
        c.inflight.inc();
        if write {
            c.wb_writers.fetch_add(1, SeqCst);
        }
        // Empty: a `DirectBufs` is either new or handed back by `into_bufs`.
        let io = DirectIo {
            core: Arc::clone(c),
            write,
            bufs: std::mem::take(bufs),
            len,
            released: false,
        };
        if c.closed.load(SeqCst) {
            *bufs = io.into_bufs();
            return None;
        }
        Some(io)
    }

    /// Pins every block of the range; false (pins kept in `io`, released
    /// when it is dropped) as soon as one block is not a usable hit.
    fn pin_all(&self, io: &mut DirectIo, offset: u64, len: u64) -> bool {
        let c = &self.core;
        for ch in chunks(offset, len, c.bs) {
            let set = c.set_of(ch.block);
            let mut g = c.lock(set);
            let Some(f) = c.lookup(set, ch.block) else {
                return false;
            };
            let e = c.frames.get(f);
            let usable = if io.write {
                e.state() == FrameState::Idle
            } else {
                e.state() != FrameState::Filling
            };
            if !usable || !e.can_pin() {
                return false;
            }
            c.frames.set(f, e.pinned());
            c.policy.on_hit(f, &mut g.clock);
            drop(g);
            io.bufs.pins.push((set, f));
            let dev_offset = c.layout.frame_offset(f) + ch.off;
            match io.bufs.extents.last_mut() {
                Some(last) if last.dev_offset + last.len == dev_offset => last.len += ch.len,
                _ => io.bufs.extents.push(Extent {
                    dev_offset,
                    pos: ch.pos as u64,
                    len: ch.len,
                }),
            }
        }
        true
    }
}
