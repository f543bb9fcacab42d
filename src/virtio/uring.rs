//! Cache hits served from the queue thread with io_uring, straight between
//! the cache device and guest memory.
//!
//! Each virtqueue owns one [`QueueRing`], used only by that queue's worker
//! thread (and by the drain after the worker has exited). A read or a
//! write-back write whose blocks are all cached gets its frames pinned by the
//! engine ([`Engine::begin_direct_read`](crate::engine::Engine::begin_direct_read)/
//! [`Engine::begin_direct_write`](crate::engine::Engine::begin_direct_write)); one
//! `readv`/`writev` per contiguous cache range is queued with iovecs pointing
//! into guest memory; a request of `--bounce-min` bytes or more uses a
//! huge-page staging buffer instead and is copied (see `bounce`). Queued
//! operations are submitted every
//! [`SUBMIT_BATCH`] operations and at the end of the pass, so the device
//! starts on the first requests of a large pass while the worker is still
//! queueing the rest. Completions wake the worker through an eventfd
//! registered with its epoll loop and are put on the used ring in batches.
//! Anything else (misses, flushes, discards, unaligned buffers, a full ring)
//! is declined and goes to the blocking I/O pool.
//!
//! A cache file on tmpfs or ramfs (page cache, no O_DIRECT) is read and
//! written synchronously on the queue thread instead: that I/O is a memory
//! copy that never waits, and the kernel would hand such io_uring reads to
//! its worker threads, which costs two context switches per request.
//!
//! This file holds the ring and its settings; `start` takes a request onto
//! the ring, `reap` submits, waits and takes completions off it.
//!
//! Invariants:
//! - a request's pins, guest memory mapping (`Arc<GuestMem>`) and iovec
//!   arrays live in its slot until every one of its operations has
//!   completed, so the kernel never sees a dangling pointer;
//! - a ring is never dropped with operations in flight (`Drop` waits);
//! - at most `cq_entries` operations are in flight, so completions cannot
//!   overflow the completion queue;
//! - with `O_DIRECT`, every iovec and file offset is aligned to `align`
//!   (what the device reported); an `EINVAL` raises `align` to 4096 and the
//!   request is retried through the pool, as is any failed or short
//!   operation.

use super::backend::{GuestMem, Vring};
use super::bounce::{BouncePool, Piece};
use super::filemap::FileMap;
use super::fixed::{FixedBufs, SharedBufs};
use super::order::Token;
use super::request::Request;
use crate::device::RawAccess;
use crate::engine::{DirectBufs, DirectIo};
#[cfg(test)]
use io_uring::types;
use io_uring::{opcode, IoUring};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod reap;
mod start;

/// Largest number of cache ranges one request may use on this path.
const MAX_EXTENTS: usize = 256;
/// Attempts of one `submit` before giving up until the next pass.
const SUBMIT_RETRIES: u32 = 100;
/// Alignment after the device refused `FIRST_ALIGN`.
const SAFE_ALIGN: u64 = 4096;
/// `user_data` of a test's held operation (see `QueueRing::hold_for`).
#[cfg(test)]
const HELD: u64 = u64::MAX;

/// Ring set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("cannot create an io_uring of {entries} entries: {source}")]
    Setup {
        entries: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create or register the io_uring completion eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register the cache device with io_uring: {0}")]
    RegisterFile(#[source] std::io::Error),
}

/// The vectors one request needs on this path, kept between requests so
/// that serving a hit allocates nothing.
#[derive(Default)]
struct Spare {
    direct: DirectBufs,
    iov: Iovecs,
}

/// The iovecs of every operation of a request, in one array: operation `i`
/// uses `iov[spans[i].0..][..spans[i].1]`.
#[derive(Default)]
struct Iovecs {
    iov: Vec<libc::iovec>,
    spans: Vec<(usize, usize)>,
}

impl Iovecs {
    /// The iovec array of operation `i`, as the kernel wants it.
    fn op(&self, i: usize) -> Option<&[libc::iovec]> {
        let &(start, n) = self.spans.get(i)?;
        self.iov.get(start..start.checked_add(n)?)
    }
}

/// A request whose operations are queued or in flight.
struct Pending {
    token: Token,
    req: Request,
    mem: Arc<GuestMem>,
    io: DirectIo,
    /// Read by the kernel until the last operation completes.
    iovecs: Iovecs,
    remaining: usize,
    failed: bool,
    /// The staging buffer of a large request (see `bounce`): a read is
    /// copied from it to guest memory once every operation has completed; a
    /// write was copied into it before the first operation was queued.
    bounce: Option<Piece>,
}

/// A request that left the ring.
pub enum Done {
    /// Served; post the request of `token` with `used_len`.
    Served { token: Token, used_len: u32 },
    /// The direct I/O failed; run the request through the pool.
    Retry {
        token: Token,
        req: Request,
        mem: Arc<GuestMem>,
    },
}

/// Queued operations that are submitted at once, without waiting for the
/// end of the pass.
///
/// Why: the kernel holds the block requests of one `io_uring_enter` in a
/// plug and hands them to the device only when the whole call is through.
/// On the test machine a 4 KiB O_DIRECT read costs about 8 µs in that call,
/// so a pass of 32 new requests kept the device idle for about 250 µs
/// before it saw the first one. Submitting every 16 operations costs one
/// more system call and device notification per 16, and gave 3-9 % more
/// IOPS at 4 KiB randread QD32 with 2 queues for 3-8 % more CPU per I/O
/// (BENCHMARKS.md, session 7).
pub const SUBMIT_BATCH: usize = 16;

/// Requests popped in one pass after which the completions already there
/// are posted to the used ring (and the driver signalled), without waiting
/// for the end of the pass.
///
/// Why: a pass that pops a whole queue's worth and posts everything at its
/// end makes the driver and the worker take turns: the driver sleeps while
/// the worker serves all 32, the worker sleeps while the driver answers.
/// Posting every 16 lets the driver consume and publish new requests while
/// the pass goes on, and the pass picks those up before it re-arms kicks,
/// so the worker often does not sleep between turns. Paired A/B, 4 KiB
/// randread QD32 (BENCHMARKS.md, session 8): with the cache on tmpfs and
/// 1 queue, IOPS 1.48-1.74x and CPU per I/O 0.71-0.85x; on disk with
/// 1 queue, IOPS 1.01-1.13x and CPU per I/O 0.90-1.00x; on disk with
/// 2 queues, no difference beyond the order of the runs.
pub const POST_BATCH: usize = 16;

/// Operations in flight on the ring from which a worker that ends a pass
/// leaves the driver's kicks off and lets the next completion wake it
/// instead: the pass that follows takes whatever the driver published in
/// between.
///
/// Why: at queue depth 32 each turn of the queue cost the worker two
/// wake-ups, one for a completion and one for the kick of the requests the
/// driver sent in answer, about 20 µs each on the test machine. With this
/// many operations in flight the next completion is never far off, and the
/// kick costs the driver a system call (a VM exit in a guest) too. Paired
/// A/B, 4 KiB randread on disk (BENCHMARKS.md, session 9): kick reads per
/// I/O 0.023 → 0.015 at QD32; daemon CPU per I/O 0.965-0.986x with 1 queue
/// at QD32 and QD16, 0.96-1.00x with 2 queues; IOPS 0.99-1.04x; at QD8 it
/// does not engage.
///
/// Invariant: kicks stay off only while at least this many submitted
/// operations are in flight; each of them completes and signals the
/// completion eventfd, which runs a pass (see `BlkBackend::process_ring`),
/// so no published request waits for more than the next completion. A
/// queue stopped or disabled meanwhile gets one pass when it is live again
/// (vhost-user-backend runs one for each kick it registers), which takes
/// what was published and re-arms kicks. Shallower queues, synchronous
/// (tmpfs) hits and requests the pool serves re-arm kicks at the end of
/// every pass, as before.
pub const KICKLESS_DEPTH: usize = 16;

/// One queue's io_uring and its in-flight requests.
pub struct QueueRing {
    ring: IoUring,
    event: EventFd,
    fd: RawFd,
    /// 1 without O_DIRECT.
    align: u64,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Operations queued or in flight.
    ops: usize,
    /// Operations pushed but not yet submitted.
    unsubmitted: usize,
    /// Submit once this many operations are queued ([`SUBMIT_BATCH`]).
    submit_batch: usize,
    /// `io_uring_enter` calls that submitted operations.
    submits: u64,
    /// Post what is done after this many popped requests ([`POST_BATCH`]).
    post_batch: usize,
    /// Leave kicks off from this many operations in flight ([`KICKLESS_DEPTH`]).
    kickless_depth: usize,
    /// Tests: `reap` takes nothing while set, as if no operation had
    /// completed yet (see `set_unreaped`).
    #[cfg(test)]
    unreaped: bool,
    /// Do the I/O synchronously (a memory-backed, buffered cache).
    inline: bool,
    /// With `inline`: the cache file mapped (shared by the queues), so that
    /// a hit is a memory copy.
    map: Option<Arc<FileMap>>,
    /// The kernel has IORING_OP_READ/WRITE (Linux 5.6): one-buffer
    /// requests use them rather than READV/WRITEV.
    plain_ops: bool,
    /// The kernel has IORING_OP_READV/WRITEV_FIXED (Linux 6.15): requests
    /// with several buffers can use registered guest memory too.
    vec_fixed_ops: bool,
    /// Requests served synchronously, waiting to be reaped.
    ready: Vec<Done>,
    /// Vectors of finished requests, for the next ones.
    spare: Vec<Spare>,
    /// (user_data, result) of the completions being reaped; kept, like
    /// `spare`, to allocate nothing per reap.
    cqes: Vec<(u64, i32)>,
    /// The queue's vring, kept so completions can be posted by the drain.
    pub vring: Option<Vring>,
    /// Ranges copied through `map` so far.
    mapped_copies: u64,
    /// Guest memory registered as fixed buffers (`--pin-guest-memory`).
    fixed: Option<FixedBufs>,
    /// Operations queued on registered buffers so far.
    fixed_ops: u64,
    /// Staging buffers for large requests (`None`: every request uses
    /// guest memory in place).
    bounce: Option<BouncePool>,
    /// The last guest memory table seen by staging, and whether all of it
    /// is on hugetlbfs (then nothing is staged: see `bounce`). The `Weak`
    /// keeps the table's allocation, so no later table can share its
    /// address.
    huge_guest: Option<(std::sync::Weak<GuestMem>, bool)>,
}

// SAFETY: the raw iovec pointers inside `Pending` point into guest memory
// kept mapped by the `Arc<GuestMem>` stored next to them; nothing in them is
// tied to the creating thread, and the ring is used by one thread at a time
// (it sits behind a mutex).
unsafe impl Send for QueueRing {}

impl QueueRing {
    /// A ring for the device behind `access`, sized for `queue_size`
    /// requests; `map` is a mapping of that device's file, used when it is
    /// memory-backed; `pin_memory` registers guest memory with the ring;
    /// requests of `bounce_min` bytes and more are staged (see `bounce`).
    pub(crate) fn new(
        access: RawAccess,
        queue_size: u16,
        map: Option<Arc<FileMap>>,
        pin_memory: bool,
        bounce_min: Option<usize>,
    ) -> Result<QueueRing, UringError> {
        let entries = u32::from(queue_size).clamp(64, 4096);
        let ring = IoUring::new(entries).map_err(|source| UringError::Setup { entries, source })?;
        let event = EventFd::new(EFD_NONBLOCK).map_err(UringError::EventFd)?;
        ring.submitter()
            .register_eventfd(event.as_raw_fd())
            .map_err(UringError::EventFd)?;
        // A registered file saves a descriptor lookup per operation.
        ring.submitter()
            .register_files(&[access.fd])
            .map_err(UringError::RegisterFile)?;
        let (plain_ops, vec_fixed_ops) = supported_ops(&ring);
        Ok(QueueRing {
            ring,
            event,
            fd: access.fd,
            align: if access.direct {
                access.align.max(1)
            } else {
                1
            },
            slots: Vec::new(),
            free: Vec::new(),
            ops: 0,
            unsubmitted: 0,
            submit_batch: SUBMIT_BATCH,
            post_batch: POST_BATCH,
            kickless_depth: KICKLESS_DEPTH,
            #[cfg(test)]
            unreaped: false,
            submits: 0,
            inline: access.memory,
            map: map.filter(|_| access.memory),
            plain_ops,
            vec_fixed_ops,
            ready: Vec::new(),
            spare: Vec::new(),
            cqes: Vec::new(),
            vring: None,
            mapped_copies: 0,
            fixed: pin_memory.then(FixedBufs::default),
            fixed_ops: 0,
            bounce: bounce_min.map(BouncePool::new),
            huge_guest: None,
        })
    }

    /// The eventfd signalled when operations complete.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Mutes (`false`) or restores the completion eventfd; a busy-polling
    /// worker reaps without it. Completions that land while it is muted
    /// signal nothing: reap after restoring it.
    pub fn set_eventfd(&mut self, on: bool) {
        let cq = self.ring.completion();
        if on {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
    }

    /// Replaces the mapping of the cache file (tests: a mapping of part of
    /// it); only a memory-backed cache uses one.
    #[cfg(test)]
    pub(crate) fn set_map(&mut self, map: Option<Arc<FileMap>>) {
        self.map = map.filter(|_| self.inline);
    }

    /// Changes how many queued operations are submitted at once (tests).
    #[cfg(test)]
    pub(crate) fn set_submit_batch(&mut self, n: usize) {
        self.submit_batch = n.max(1);
    }

    /// After how many popped requests a pass posts what is already done.
    pub(crate) fn post_batch(&self) -> usize {
        self.post_batch
    }

    /// Changes [`Self::post_batch`] (tests).
    #[cfg(test)]
    pub(crate) fn set_post_batch(&mut self, n: usize) {
        self.post_batch = n.max(1);
    }

    /// True when a pass may end with kicks off: at least
    /// [`KICKLESS_DEPTH`] submitted operations are in flight, so a
    /// completion is bound to wake the worker (see that constant).
    pub(crate) fn deep(&self) -> bool {
        self.ops.saturating_sub(self.unsubmitted) >= self.kickless_depth
    }

    /// Changes [`KICKLESS_DEPTH`] (tests; `usize::MAX` turns it off).
    #[cfg(test)]
    pub(crate) fn set_kickless_depth(&mut self, n: usize) {
        self.kickless_depth = n.max(1);
    }

    /// While `on`, `reap` takes nothing (tests: an operation that is still
    /// on the device after its pass, whatever the device's speed).
    #[cfg(test)]
    pub(crate) fn set_unreaped(&mut self, on: bool) {
        self.unreaped = on;
    }

    /// Puts an operation in flight that completes after `d` and serves no
    /// request (tests: a slow device operation the test controls).
    #[cfg(test)]
    pub(crate) fn hold_for(&mut self, d: std::time::Duration) {
        let ts = Box::leak(Box::new(types::Timespec::from(d)));
        let sqe = opcode::Timeout::new(ts).build().user_data(HELD);
        // SAFETY: `ts` is leaked, so it outlives the operation.
        unsafe { self.ring.submission().push(&sqe) }.expect("room for a held operation");
        self.ops += 1;
        self.unsubmitted += 1;
        self.submit();
    }

    /// How many `io_uring_enter` calls submitted operations.
    #[cfg(test)]
    pub(crate) fn submits(&self) -> u64 {
        self.submits
    }

    /// How many cache ranges were copied through the mapping.
    pub fn mapped_copies(&self) -> u64 {
        self.mapped_copies
    }

    /// Replaces the registration of guest memory with `mem` (the guest's
    /// memory table changed): done here, on the vhost-user thread, rather
    /// than on the queue worker at the next hit, since pinning a large
    /// guest's RAM takes seconds. Shares `from`'s registration where the
    /// kernel can. A memory-backed cache registers nothing (its hits are
    /// copies). Returns this ring's registration, for the next rings.
    pub(crate) fn reregister_fixed(
        &mut self,
        mem: &Arc<GuestMem>,
        from: Option<&SharedBufs>,
    ) -> Option<SharedBufs> {
        if self.fixed.is_none() || self.inline {
            return None;
        }
        self.submit();
        let f = self.fixed.as_mut()?;
        f.prepare(&self.ring, mem, from);
        f.sharable(&self.ring)
    }

    /// How many guest memory registrations were shared from another ring.
    #[cfg(test)]
    pub(crate) fn fixed_shared(&self) -> u64 {
        self.fixed.as_ref().map_or(0, |f| f.shared())
    }

    /// How many guest memory registrations were attempted.
    #[cfg(test)]
    pub(crate) fn fixed_generations(&self) -> u64 {
        self.fixed.as_ref().map_or(0, |f| f.generations())
    }

    /// Pages held by the staging pool (tests).
    #[cfg(test)]
    pub(crate) fn bounce_pages(&self) -> usize {
        self.bounce.as_ref().map_or(0, |p| p.pages())
    }

    /// How many operations used registered guest memory.
    pub fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    /// True if guest memory is registered with the ring.
    #[cfg(test)]
    pub(crate) fn fixed_registered(&self) -> bool {
        self.fixed.as_ref().is_some_and(|f| f.registered())
    }

    /// True if requests with several buffers can use registered memory.
    #[cfg(test)]
    pub(crate) fn vectored_fixed(&self) -> bool {
        self.vec_fixed_ops
    }

    /// True if hits are served by copying from a mapping of the cache file.
    pub fn mapped(&self) -> bool {
        self.map.is_some()
    }

    /// Signals the completion eventfd, so that the worker wakes and reaps.
    pub fn wake(&self) {
        if let Err(e) = self.event.write(1) {
            log::warn!("io_uring: cannot signal the completion eventfd: {e}");
        }
    }

    /// True while operations are queued or in flight, or requests served
    /// synchronously wait to be reaped.
    pub fn busy(&self) -> bool {
        self.ops > 0 || !self.ready.is_empty()
    }
}

/// Copies a staged request between `piece` and the guest buffers of each
/// extent: from the guest for a write (`to_piece`), to the guest for a read.
/// False if an extent does not fit in the piece (never for a request built
/// by `try_start`). The piece must not be in use by the kernel.
fn copy_between(piece: &Piece, io: &DirectIo, iovecs: &Iovecs, to_piece: bool) -> bool {
    for (i, ext) in io.extents().iter().enumerate() {
        let Some(iov) = iovecs.op(i) else {
            return false;
        };
        let Ok(mut at) = usize::try_from(ext.pos) else {
            return false;
        };
        let total = iov
            .iter()
            .try_fold(0u64, |a, v| a.checked_add(v.iov_len as u64));
        if total != Some(ext.len) {
            return false;
        }
        for v in iov {
            if at
                .checked_add(v.iov_len)
                .is_none_or(|end| end > piece.capacity())
            {
                return false;
            }
            // SAFETY: `at..at + iov_len` lies inside the piece (checked
            // above), which no operation is using; the iovec points into
            // guest memory that the request's `Arc<GuestMem>` keeps mapped
            // (the caller holds it), and guest memory never overlaps the
            // daemon's own pages.
            unsafe {
                let p = piece.as_mut_ptr().add(at);
                let g = v.iov_base.cast::<u8>();
                if to_piece {
                    std::ptr::copy_nonoverlapping(g, p, v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(p, g, v.iov_len);
                }
            }
            at += v.iov_len;
        }
    }
    true
}

/// Whether the kernel offers IORING_OP_READ and IORING_OP_WRITE, and
/// IORING_OP_READV_FIXED and IORING_OP_WRITEV_FIXED (a probe failing means a
/// kernel older than 5.6, which has none of them).
fn supported_ops(ring: &IoUring) -> (bool, bool) {
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_err() {
        return (false, false);
    }
    let has = |a: u8, b: u8| probe.is_supported(a) && probe.is_supported(b);
    (
        has(opcode::Read::CODE, opcode::Write::CODE),
        has(opcode::ReadvFixed::CODE, opcode::WritevFixed::CODE),
    )
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        // Never let the kernel write into memory we are about to release.
        if self.busy() {
            log::warn!(
                "io_uring dropped with {} operations in flight; waiting",
                self.ops
            );
            let _ = self.drain();
        }
    }
}
