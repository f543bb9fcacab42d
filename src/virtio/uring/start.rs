//! Taking a request onto the ring: the pins, the iovecs into guest memory
//! (or a staging piece) and one submission queue entry per cache range.
//! A memory-backed cache is served here too, synchronously.

use super::{copy_between, Iovecs, Pending, QueueRing, Spare, MAX_EXTENTS};
use crate::engine::{DirectIo, Engine, Extent};
use crate::virtio::backend::GuestMem;
use crate::virtio::execute::walk;
use crate::virtio::order::Token;
use crate::virtio::request::{Request, RequestKind};
use io_uring::{opcode, squeue, types};
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend};

impl QueueRing {
    /// Queues `req` if it is a read or write-back write of cached blocks
    /// with suitably aligned buffers; otherwise gives it back.
    pub fn try_start(
        &mut self,
        engine: &Engine,
        token: Token,
        req: Request,
        mem: Arc<GuestMem>,
    ) -> Result<(), (Request, Arc<GuestMem>)> {
        let (offset, write) = match req.kind {
            RequestKind::Read { offset } => (offset, false),
            RequestKind::Write { offset } => (offset, true),
            _ => return Err((req, mem)),
        };
        let len = req.data_len;
        // Guest regions are page-aligned mappings, so a guest address has
        // the alignment its host address will have: refuse misaligned
        // requests before the engine pins (and, for writes, dirties) frames.
        let a = self.align;
        let misaligned = req
            .data
            .iter()
            .any(|s| s.addr.0 % a != 0 || u64::from(s.len) % a != 0);
        if len == 0 || offset % a != 0 || len % a != 0 || misaligned {
            return Err((req, mem));
        }
        let mut spare = self.spare.pop().unwrap_or_default();
        let io = if write {
            engine.begin_direct_write_in(offset, len, &mut spare.direct)
        } else {
            engine.begin_direct_read_in(offset, len, &mut spare.direct)
        };
        let Some(io) = io else {
            self.spare.push(spare);
            return Err((req, mem));
        };
        // Never more operations in flight than completion queue entries.
        let cq = self.ring.params().cq_entries() as usize;
        let mut iovecs = spare.iov;
        if self.ops + io.extents().len() > cq
            || self.build_iovecs(&req, &mem, &io, &mut iovecs).is_none()
        {
            self.spare.push(Spare {
                direct: io.declined(),
                iov: iovecs,
            });
            return Err((req, mem));
        }
        let mut pending = Pending {
            token,
            req,
            mem,
            io,
            iovecs,
            remaining: 0,
            failed: false,
            bounce: None,
        };
        if self.inline {
            pending.failed = !self.run_inline(write, &pending.io, &pending.iovecs);
            let done = self.finish(pending);
            self.ready.push(done);
            return Ok(());
        }
        // Staged operations are plain READ/WRITE (Linux 5.6).
        let stage = self.plain_ops
            && self.bounce.as_ref().is_some_and(|p| p.wants(len))
            && !self.guest_on_huge_pages(&pending.mem);
        if let Some(pool) = self.bounce.as_mut().filter(|_| stage) {
            if let Some(piece) = usize::try_from(len).ok().and_then(|l| pool.take(l)) {
                if !write || copy_between(&piece, &pending.io, &pending.iovecs, true) {
                    pending.bounce = Some(piece);
                } else {
                    pool.give(piece);
                }
            }
        }
        let slot = self.alloc_slot();
        let n = pending.io.extents().len();
        let mut queued = 0;
        for (i, ext) in pending.io.extents().iter().enumerate() {
            let Some(iov) = pending.iovecs.op(i) else {
                break;
            };
            let user_data = ((slot as u64) << 16) | i as u64;
            let Some(sqe) = self.entry(&pending, ext, iov, write) else {
                break;
            };
            let sqe = sqe.user_data(user_data);
            if self.ring.submission().is_full() {
                self.submit();
            }
            // SAFETY: the iovec array and the guest memory it points into
            // are owned by `pending`, which stays in `slots[slot]` until this
            // operation's completion has been reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                break;
            }
            queued += 1;
            self.ops += 1;
            self.unsubmitted += 1;
        }
        pending.remaining = queued;
        if queued < n {
            // Some operations could not be queued: the request fails over to
            // the pool once the queued ones complete.
            pending.failed = true;
        }
        if pending.remaining == 0 {
            self.free.push(slot);
            let Pending {
                req,
                mem,
                io,
                bounce,
                ..
            } = pending;
            if let (Some(piece), Some(pool)) = (bounce, self.bounce.as_mut()) {
                pool.give(piece);
            }
            drop(io);
            return Err((req, mem));
        }
        self.slots[slot] = Some(pending);
        if self.unsubmitted >= self.submit_batch {
            self.submit();
        }
        Ok(())
    }

    /// The submission entry of one operation: cache range `ext` read into or
    /// written from the request's staging piece, or guest memory at `iov`
    /// (through registered buffers where guest memory is registered). `None`
    /// if a length does not fit in an entry or a range not in the piece.
    fn entry(
        &mut self,
        pending: &Pending,
        ext: &Extent,
        iov: &[libc::iovec],
        write: bool,
    ) -> Option<squeue::Entry> {
        let iov_len = u32::try_from(iov.len()).ok()?;
        let fd = types::Fixed(0);
        let at = ext.dev_offset;
        // One buffer (the common 4 KiB request): plain READ/WRITE, which
        // spare the kernel copying and walking an iovec array.
        let sqe = match (iov, write) {
            (_, w) if pending.bounce.is_some() => {
                let (Some(piece), Ok(pos), Ok(len)) = (
                    pending.bounce.as_ref(),
                    usize::try_from(ext.pos),
                    u32::try_from(ext.len),
                ) else {
                    return None;
                };
                // `try_start` took a piece of at least the request's
                // length, and each extent lies inside the request.
                if pos
                    .checked_add(len as usize)
                    .is_none_or(|e| e > piece.capacity())
                {
                    return None;
                }
                // SAFETY: in bounds of the piece (checked just above).
                let buf = unsafe { piece.as_mut_ptr().add(pos) };
                if w {
                    opcode::Write::new(fd, buf, len).offset(at).build()
                } else {
                    opcode::Read::new(fd, buf, len).offset(at).build()
                }
            }
            ([one], w) if self.plain_ops => {
                let Ok(len) = u32::try_from(one.iov_len) else {
                    return None;
                };
                let buf = one.iov_base.cast::<u8>();
                let fixed = self
                    .fixed
                    .as_ref()
                    .and_then(|f| f.index(&pending.mem, buf, one.iov_len));
                if fixed.is_some() {
                    self.fixed_ops += 1;
                }
                match (fixed, w) {
                    (Some(ix), true) => {
                        opcode::WriteFixed::new(fd, buf, len, ix).offset(at).build()
                    }
                    (Some(ix), false) => {
                        opcode::ReadFixed::new(fd, buf, len, ix).offset(at).build()
                    }
                    (None, true) => opcode::Write::new(fd, buf, len).offset(at).build(),
                    (None, false) => opcode::Read::new(fd, buf, len).offset(at).build(),
                }
            }
            (_, w) => {
                let fixed = match &self.fixed {
                    Some(f) if self.vec_fixed_ops => f.index_all(&pending.mem, iov),
                    _ => None,
                };
                if fixed.is_some() {
                    self.fixed_ops += 1;
                }
                let v = iov.as_ptr();
                match (fixed, w) {
                    (Some(ix), true) => opcode::WritevFixed::new(fd, v, iov_len, ix)
                        .offset(at)
                        .build(),
                    (Some(ix), false) => opcode::ReadvFixed::new(fd, v, iov_len, ix)
                        .offset(at)
                        .build(),
                    (None, true) => opcode::Writev::new(fd, v, iov_len).offset(at).build(),
                    (None, false) => opcode::Readv::new(fd, v, iov_len).offset(at).build(),
                }
            }
        };
        Some(sqe)
    }

    /// Runs each operation with `preadv`/`pwritev` on this thread; false
    /// if one failed or was short.
    fn run_inline(&mut self, write: bool, io: &DirectIo, iovecs: &Iovecs) -> bool {
        for (i, ext) in io.extents().iter().enumerate() {
            let Some(iov) = iovecs.op(i) else {
                return false;
            };
            if let Some(map) = &self.map {
                // SAFETY: each iovec points into guest memory that the
                // caller's `Arc<GuestMem>` keeps mapped during this call.
                let copied = unsafe { map.copy(write, ext.dev_offset, ext.len, iov) };
                if copied {
                    self.mapped_copies += 1;
                    continue;
                }
            }
            let (Ok(n), Ok(off)) = (
                libc::c_int::try_from(iov.len()),
                libc::off_t::try_from(ext.dev_offset),
            ) else {
                return false;
            };
            // SAFETY: each iovec points into guest memory that the caller's
            // `Arc<GuestMem>` keeps mapped for the duration of this call, and
            // `n` is the length of the iovec array.
            let r = unsafe {
                if write {
                    libc::pwritev(self.fd, iov.as_ptr(), n, off)
                } else {
                    libc::preadv(self.fd, iov.as_ptr(), n, off)
                }
            };
            if u64::try_from(r).ok() != Some(ext.len) {
                log::warn!(
                    "cache I/O returned {r}, expected {}; retrying through the pool",
                    ext.len
                );
                return false;
            }
        }
        true
    }

    /// True if every region of `mem` lies on hugetlbfs, so that guest
    /// buffers are contiguous in huge pages already; worked out once per
    /// memory table.
    fn guest_on_huge_pages(&mut self, mem: &Arc<GuestMem>) -> bool {
        if let Some((seen, huge)) = &self.huge_guest {
            if std::ptr::eq(seen.as_ptr(), Arc::as_ptr(mem)) {
                return *huge;
            }
        }
        let huge = mem.iter().all(|r| {
            r.file_offset()
                .is_some_and(|f| crate::virtio::bounce::on_hugetlbfs(f.file()))
        });
        self.huge_guest = Some((Arc::downgrade(mem), huge));
        huge
    }

    fn alloc_slot(&mut self) -> usize {
        match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        }
    }

    /// Fills `out` with one iovec array per extent, pointing into guest
    /// memory; `None` if a buffer is not mapped or not aligned for the device.
    fn build_iovecs(
        &self,
        req: &Request,
        mem: &GuestMem,
        io: &DirectIo,
        out: &mut Iovecs,
    ) -> Option<()> {
        out.iov.clear();
        out.spans.clear();
        if io.extents().len() > MAX_EXTENTS {
            return None;
        }
        let align = self.align;
        for ext in io.extents() {
            if ext.dev_offset % align != 0 || ext.len % align != 0 {
                return None;
            }
            let len = usize::try_from(ext.len).ok()?;
            let start = out.iov.len();
            let iov = &mut out.iov;
            let mut add = |addr: GuestAddress, n: usize| -> Result<(), ()> {
                for s in mem.get_slices(addr, n) {
                    let s = s.map_err(|_| ())?;
                    let ptr = s.ptr_guard_mut().as_ptr();
                    if (ptr as u64) % align != 0 || (s.len() as u64) % align != 0 {
                        return Err(());
                    }
                    iov.push(libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: s.len(),
                    });
                }
                Ok(())
            };
            walk(&req.data, ext.pos, len, |addr, r| {
                add(addr, r.len()).map_err(|_| {
                    crate::virtio::request::BlkError::GuestMemory("not usable in place".into())
                })
            })
            .ok()?;
            let n = out.iov.len() - start;
            if n > libc::UIO_MAXIOV as usize {
                return None;
            }
            out.spans.push((start, n));
        }
        Some(())
    }
}
