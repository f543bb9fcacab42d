//! The in-RAM mapping: one packed 64-bit entry per cache frame, and lock
//! stripes that serialise changes to the sets.
//!
//! Entry layout (bit 63 down):
//! `VALID | DIRTY | CDIRTY | QUEUED | SRCPEND | FRESH | state(2) | pins(8) | source block(48)`.
//!
//! `CDIRTY` says the last *committed* metadata (journal or table on the cache
//! device) maps this frame as dirty for its block; `QUEUED` says the frame is
//! in the commit queue. `SRCPEND` says writeback made the frame clean but the
//! source has not been flushed since: until it is, the frame's data is durable
//! only in the cache, so a commit must still map it dirty. A freed frame keeps
//! its block number (with `VALID` clear) so the committed view can still be
//! written out.
//!
//! Invariants, all under the stripe lock of the frame's set:
//! - an entry with `VALID` clear is a free frame (only `CDIRTY`, `QUEUED` and
//!   the old block number may be set);
//! - a frame with `CDIRTY` set is never given to another block: after a crash
//!   recovery would map its old block to the new data. It becomes reusable
//!   once a commit records it clean or free;
//! - at most one valid entry in a set holds a given source block;
//! - a frame whose state is not `Idle`, or that has pins, is never chosen as
//!   a victim;
//! - `Filling` frames are owned by one request or worker: nobody else reads or
//!   writes their data until the owner sets them `Idle` (or frees them);
//! - `WritingBack` frames may be read but not written;
//! - `SRCPEND` is set only on a valid clean frame; making the frame dirty
//!   clears it, and freeing it clears it and marks the source as needing a
//!   flush before the next commit (the free state will be recorded);
//! - pins count requests reading or writing the frame's data right now;
//! - `FRESH` is set exactly while a frame given a new block is being filled
//!   (`Filling` from `Entry::new`): its data is not yet the block's. A frame
//!   claimed `Filling` to update a block it already holds is not fresh. The
//!   crash state (`crashstate`) relies on this to tell a dirty frame whose
//!   data is the block's from one that is garbage.
//!
//! The atomics only provide safe interior mutability: every change happens
//! with the stripe lock held, so `Relaxed` ordering suffices (the mutex orders
//! them).

use super::crashstate::CrashFile;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard};

pub const VALID: u64 = 1 << 63;
pub const DIRTY: u64 = 1 << 62;
pub const CDIRTY: u64 = 1 << 61;
pub const QUEUED: u64 = 1 << 60;
pub const SRCPEND: u64 = 1 << 59;
/// A new block is being filled into the frame (see the module comment).
pub const FRESH: u64 = 1 << 58;
const STATE_SHIFT: u32 = 56;
const STATE_MASK: u64 = 0x3 << STATE_SHIFT;
const PIN_SHIFT: u32 = 48;
const PIN_ONE: u64 = 1 << PIN_SHIFT;
const PIN_MASK: u64 = 0xff << PIN_SHIFT;
pub const BLOCK_MASK: u64 = (1 << 48) - 1;

/// What is happening to a frame's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameState {
    /// Nothing exclusive; readers and writers may pin it.
    Idle = 0,
    /// Owned exclusively: being fetched, stored, or updated in place.
    Filling = 1,
    /// Being copied to the source: readable, not writable, not evictable.
    WritingBack = 2,
}

/// Decoded view of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry(pub u64);

impl Entry {
    /// A frame given `block`; one made `Filling` is `FRESH` until it
    /// leaves that state.
    pub fn new(block: u64, dirty: bool, state: FrameState) -> Entry {
        let mut v = VALID | (block & BLOCK_MASK) | ((state as u64) << STATE_SHIFT);
        if dirty {
            v |= DIRTY;
        }
        if state == FrameState::Filling {
            v |= FRESH;
        }
        Entry(v)
    }
    /// A new block's data is still being filled in.
    pub fn fresh(self) -> bool {
        self.0 & FRESH != 0
    }
    pub fn valid(self) -> bool {
        self.0 & VALID != 0
    }
    pub fn dirty(self) -> bool {
        self.0 & DIRTY != 0
    }
    pub fn cdirty(self) -> bool {
        self.0 & CDIRTY != 0
    }
    pub fn queued(self) -> bool {
        self.0 & QUEUED != 0
    }
    /// Written back, source not flushed since (see the module comment).
    pub fn srcpend(self) -> bool {
        self.0 & SRCPEND != 0
    }
    /// A free frame that nothing committed points at: may take a new block.
    pub fn reusable(self) -> bool {
        !self.valid() && !self.cdirty()
    }
    pub fn with_flag(self, flag: u64, on: bool) -> Entry {
        if on {
            Entry(self.0 | flag)
        } else {
            Entry(self.0 & !flag)
        }
    }
    /// What the last commit says about this frame (table/journal value).
    pub fn committed(self) -> u64 {
        if self.cdirty() {
            VALID | DIRTY | self.block()
        } else {
            0
        }
    }
    /// What the next commit should say about this frame: dirty while its
    /// data is dirty, or written back to a source not flushed since.
    pub fn wanted(self) -> u64 {
        if self.valid() && (self.dirty() || self.srcpend()) {
            VALID | DIRTY | self.block()
        } else {
            0
        }
    }
    pub fn block(self) -> u64 {
        self.0 & BLOCK_MASK
    }
    pub fn pins(self) -> u64 {
        (self.0 & PIN_MASK) >> PIN_SHIFT
    }
    pub fn state(self) -> FrameState {
        match (self.0 & STATE_MASK) >> STATE_SHIFT {
            1 => FrameState::Filling,
            2 => FrameState::WritingBack,
            _ => FrameState::Idle,
        }
    }
    /// The entry in state `s`; leaving `Filling` ends `FRESH`.
    pub fn with_state(self, s: FrameState) -> Entry {
        let keep = if s == FrameState::Filling {
            !STATE_MASK
        } else {
            !(STATE_MASK | FRESH)
        };
        Entry((self.0 & keep) | ((s as u64) << STATE_SHIFT))
    }
    pub fn with_dirty(self, d: bool) -> Entry {
        if d {
            Entry(self.0 | DIRTY)
        } else {
            Entry(self.0 & !DIRTY)
        }
    }
    /// Idle with no pins: may be evicted or claimed.
    pub fn quiet(self) -> bool {
        self.state() == FrameState::Idle && self.pins() == 0
    }
    /// True when another pin fits.
    pub fn can_pin(self) -> bool {
        self.pins() < 0xff
    }
    pub fn pinned(self) -> Entry {
        Entry(self.0 + PIN_ONE)
    }
    pub fn unpinned(self) -> Entry {
        if self.pins() == 0 {
            self
        } else {
            Entry(self.0 - PIN_ONE)
        }
    }
    /// The value persisted on the cache device: valid, dirty and block only.
    pub fn persistent(self) -> u64 {
        if self.valid() {
            self.0 & (VALID | DIRTY | BLOCK_MASK)
        } else {
            0
        }
    }
}

/// Per-stripe state guarded by the stripe mutex.
#[derive(Default)]
pub struct StripeState {
    /// Replacement-policy clock.
    pub clock: u32,
    /// Threads waiting on the condvar (notify only when non-zero).
    pub waiters: u32,
    /// Source blocks with a write to the source in flight that bypasses the
    /// cache. No fill of such a block may start: it could read the old data
    /// and cache it after the write completes.
    pub uncached: Vec<u64>,
}

pub struct Stripe {
    pub state: Mutex<StripeState>,
    pub cond: Condvar,
}

/// Where the entries live: private memory, or the shared crash-state file.
enum Backing {
    Heap(Box<[AtomicU64]>),
    Shared(CrashFile),
}

/// Entries plus lock stripes. A set belongs to stripe `set % stripes`.
pub struct FrameTable {
    backing: Backing,
    stripes: Box<[Stripe]>,
}

/// Upper bound on lock stripes (sets share stripes beyond this).
const MAX_STRIPES: u64 = 4096;

impl FrameTable {
    /// A table of `frames` free entries in private memory.
    pub fn new(frames: u64, sets: u64) -> Self {
        Self::with_backing(
            Backing::Heap((0..frames).map(|_| AtomicU64::new(0)).collect()),
            sets,
        )
    }

    /// A table whose entries are those of `file` (all free: a new file is
    /// zeros), so that they outlive the process.
    pub fn in_crash_file(file: CrashFile, sets: u64) -> Self {
        Self::with_backing(Backing::Shared(file), sets)
    }

    fn with_backing(backing: Backing, sets: u64) -> Self {
        let n = sets.clamp(1, MAX_STRIPES);
        FrameTable {
            backing,
            stripes: (0..n)
                .map(|_| Stripe {
                    state: Mutex::new(StripeState::default()),
                    cond: Condvar::new(),
                })
                .collect(),
        }
    }

    #[inline]
    fn entries(&self) -> &[AtomicU64] {
        match &self.backing {
            Backing::Heap(b) => b,
            Backing::Shared(f) => f.entries(),
        }
    }

    /// The crash-state file holding the entries, if any.
    pub fn crash_file(&self) -> Option<&CrashFile> {
        match &self.backing {
            Backing::Heap(_) => None,
            Backing::Shared(f) => Some(f),
        }
    }

    pub fn frames(&self) -> u64 {
        self.entries().len() as u64
    }

    pub fn stripe(&self, set: u64) -> &Stripe {
        &self.stripes[(set % self.stripes.len() as u64) as usize]
    }

    /// Locks the stripe of `set`.
    pub fn lock(&self, set: u64) -> MutexGuard<'_, StripeState> {
        self.stripe(set)
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reads an entry. Callers hold the stripe lock when they act on it.
    #[inline]
    pub fn get(&self, frame: u64) -> Entry {
        Entry(self.entries()[frame as usize].load(Relaxed))
    }

    /// Writes an entry. Callers must hold the frame's stripe lock.
    #[inline]
    pub fn set(&self, frame: u64, e: Entry) {
        self.entries()[frame as usize].store(e.0, Relaxed)
    }

    /// Finds the valid frame holding `block` among `first..first+assoc`.
    #[inline]
    pub fn lookup(&self, first: u64, assoc: u32, block: u64) -> Option<u64> {
        let want = VALID | (block & BLOCK_MASK);
        let set = &self.entries()[first as usize..(first + u64::from(assoc)) as usize];
        set.iter()
            .position(|e| e.load(Relaxed) & (VALID | BLOCK_MASK) == want)
            .map(|w| first + w as u64)
    }

    /// Waits on the stripe's condvar, releasing and retaking the lock.
    pub fn wait<'a>(
        &'a self,
        set: u64,
        mut g: MutexGuard<'a, StripeState>,
    ) -> MutexGuard<'a, StripeState> {
        g.waiters += 1;
        let mut g = self
            .stripe(set)
            .cond
            .wait(g)
            .unwrap_or_else(|p| p.into_inner());
        g.waiters -= 1;
        g
    }

    /// Wakes waiters of the stripe if there are any.
    pub fn notify(&self, set: u64, g: &StripeState) {
        if g.waiters > 0 {
            self.stripe(set).cond.notify_all();
        }
    }

    /// Bytes of RAM used by entries and stripes, per frame.
    pub fn bytes_per_frame(&self) -> f64 {
        let n = self.entries().len();
        let total = std::mem::size_of_val(self.entries())
            + self.stripes.len() * std::mem::size_of::<Stripe>();
        total as f64 / n.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_packing() {
        let e = Entry::new(BLOCK_MASK, true, FrameState::WritingBack);
        assert!(e.valid() && e.dirty());
        assert_eq!(e.block(), BLOCK_MASK);
        assert_eq!(e.state(), FrameState::WritingBack);
        let p = e.pinned().pinned();
        assert_eq!(p.pins(), 2);
        assert_eq!(p.block(), BLOCK_MASK);
        assert_eq!(p.unpinned().unpinned(), e);
        assert_eq!(
            e.with_dirty(false).with_state(FrameState::Idle),
            Entry::new(BLOCK_MASK, false, FrameState::Idle)
        );
        assert_eq!(p.persistent(), VALID | DIRTY | BLOCK_MASK);
    }

    #[test]
    fn fresh_lasts_while_a_new_block_fills() {
        let e = Entry::new(7, true, FrameState::Filling);
        assert!(e.fresh());
        assert_eq!(e.state(), FrameState::Filling);
        assert_eq!(e.pinned().unpinned(), e);
        let idle = e.with_state(FrameState::Idle);
        assert!(!idle.fresh());
        assert_eq!(idle, Entry::new(7, true, FrameState::Idle));
        // Claiming a held block for an update in place is not fresh.
        assert!(!idle.with_state(FrameState::Filling).fresh());
        assert!(!Entry::new(7, true, FrameState::Idle).fresh());
        assert!(!e.with_state(FrameState::WritingBack).fresh());
        assert_eq!(e.persistent(), VALID | DIRTY | 7);
    }

    #[test]
    fn lookup_finds_only_valid() {
        let t = FrameTable::new(8, 2);
        t.set(5, Entry::new(42, false, FrameState::Idle));
        assert_eq!(t.lookup(4, 4, 42), Some(5));
        assert_eq!(t.lookup(0, 4, 42), None);
        assert_eq!(t.lookup(4, 4, 0), None);
    }
}
