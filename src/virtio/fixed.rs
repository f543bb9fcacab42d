//! Guest memory registered with a queue's io_uring as fixed buffers
//! (`--pin-guest-memory`, off by default).
//!
//! A read or write into an unregistered buffer makes the kernel look up and
//! pin the guest pages it touches, and unpin them again at completion, for
//! every operation. Registering guest memory does that once: the kernel
//! pins every page of it for as long as it stays registered. The price is
//! that all of the guest's RAM is faulted in and locked (it counts against
//! `RLIMIT_MEMLOCK` unless the daemon has `CAP_IPC_LOCK`), which is why it is
//! opt-in.
//!
//! Invariants:
//! - the table describes exactly what is registered with the ring: after a
//!   failed registration it is empty and nothing is registered;
//! - the registered generation of guest memory (`mem`) is kept alive while
//!   registered, so its mappings outlive the registration;
//! - a buffer index is handed out only for a range wholly inside one
//!   registered buffer;
//! - a generation is registered at most once: a failure is logged once and
//!   the ring serves that generation with unregistered buffers;
//! - only [`FixedBufs::prepare`] registers, called by the vhost-user thread
//!   when the memory table changes, after the ring's queued operations were
//!   submitted: the kernel resolves a buffer index when it takes an
//!   operation from the submission queue, and an operation it has taken
//!   keeps the buffer it resolved. A request read through another
//!   generation gets no index;
//! - if the kernel refuses to drop a registration, the ring stops using
//!   registered buffers for good and keeps that generation mapped.

use super::backend::GuestMem;
use io_uring::IoUring;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The largest buffer the kernel accepts in one registration entry.
const MAX_BUF: usize = 1 << 30;
/// The most buffers one ring may register (the kernel's limit is 16384).
const MAX_BUFS: usize = 16384;

/// The fixed buffers of one ring.
#[derive(Default)]
pub(crate) struct FixedBufs {
    /// The guest memory generation the table was built for.
    mem: Option<Arc<GuestMem>>,
    /// Registered buffers as (host start, length), sorted by start; the
    /// position is the buffer index.
    bufs: Vec<(usize, usize)>,
    /// Registrations attempted.
    generations: u64,
    /// Unregistering failed: registered buffers are no longer used.
    broken: bool,
    /// Registrations shared from another ring rather than made here.
    shared: u64,
}

/// One ring's registration of a memory generation, which other rings can
/// share (IORING_REGISTER_CLONE_BUFFERS, Linux 6.12+): the pages are pinned
/// and charged to RLIMIT_MEMLOCK once, not once per queue. Valid while the
/// ring whose descriptor it holds exists.
pub(crate) struct SharedBufs {
    fd: RawFd,
    mem: Arc<GuestMem>,
    bufs: Vec<(usize, usize)>,
}

impl FixedBufs {
    /// True if `mem` is the generation the table was built for (nothing to
    /// register before using it).
    pub(crate) fn is_current(&self, mem: &Arc<GuestMem>) -> bool {
        self.broken || self.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem))
    }

    /// Registers `mem` unless it is the current generation, sharing
    /// `from`'s registration of it where the kernel can (the table is then
    /// the same as `from`'s); otherwise registers it itself. The caller has
    /// submitted every queued operation.
    pub(crate) fn prepare(
        &mut self,
        ring: &IoUring,
        mem: &Arc<GuestMem>,
        from: Option<&SharedBufs>,
    ) {
        if self.is_current(mem) {
            return;
        }
        let Some(src) = from.filter(|s| Arc::ptr_eq(&s.mem, mem)) else {
            self.register(ring, mem);
            return;
        };
        if !self.unregister(ring) {
            return;
        }
        match ring.submitter().register_buffers_clone(src.fd) {
            Ok(()) => {
                self.mem = Some(Arc::clone(mem));
                self.generations += 1;
                self.shared += 1;
                self.bufs = src.bufs.clone();
                log::info!(
                    "guest memory shared with another queue's io_uring: {} buffers",
                    self.bufs.len()
                );
            }
            // Older kernels (before 6.12) cannot share: register here.
            Err(e) => {
                log::debug!("cannot share a registration of guest memory ({e}); registering");
                self.register(ring, mem);
            }
        }
    }

    /// This ring's registration, for other rings to share; `None` if
    /// nothing is registered.
    pub(crate) fn sharable(&self, ring: &IoUring) -> Option<SharedBufs> {
        if self.broken || !self.registered() {
            return None;
        }
        Some(SharedBufs {
            fd: ring.as_raw_fd(),
            mem: Arc::clone(self.mem.as_ref()?),
            bufs: self.bufs.clone(),
        })
    }

    /// How many registrations were shared from another ring.
    #[cfg(test)]
    pub(crate) fn shared(&self) -> u64 {
        self.shared
    }

    /// How many registrations were attempted.
    #[cfg(test)]
    pub(crate) fn generations(&self) -> u64 {
        self.generations
    }

    /// The index of the registered buffer holding `[ptr, ptr + len)`, if
    /// `mem` is the registered generation. Only [`FixedBufs::prepare`]
    /// registers: a request read through an older map (popped before the
    /// memory table changed) uses plain operations.
    pub(crate) fn index(&self, mem: &Arc<GuestMem>, ptr: *const u8, len: usize) -> Option<u16> {
        if self.broken || !self.is_current(mem) {
            return None;
        }
        let start = ptr as usize;
        let end = start.checked_add(len)?;
        let i = self
            .bufs
            .partition_point(|&(s, _)| s <= start)
            .checked_sub(1)?;
        let &(s, l) = self.bufs.get(i)?;
        (end <= s.checked_add(l)?).then(|| u16::try_from(i).ok())?
    }

    /// The index of the one registered buffer holding every range of
    /// `iov`, as [`FixedBufs::index`].
    pub(crate) fn index_all(&self, mem: &Arc<GuestMem>, iov: &[libc::iovec]) -> Option<u16> {
        let (first, rest) = iov.split_first()?;
        let ix = self.index(mem, first.iov_base.cast(), first.iov_len)?;
        let &(s, l) = self.bufs.get(usize::from(ix))?;
        let end = s.checked_add(l)?;
        rest.iter()
            .all(|v| {
                let a = v.iov_base as usize;
                a >= s && a.checked_add(v.iov_len).is_some_and(|e| e <= end)
            })
            .then_some(ix)
    }

    /// True if guest memory is registered.
    pub(crate) fn registered(&self) -> bool {
        !self.bufs.is_empty()
    }

    /// Stops using registered buffers after the kernel refused to drop a
    /// registration: the old generation stays mapped (`mem` is kept), since
    /// the kernel may still hold its pages.
    fn give_up(&mut self, e: &std::io::Error) {
        log::warn!(
            "cannot unregister guest memory from io_uring ({e}); this queue no longer uses \
             registered buffers"
        );
        self.bufs.clear();
        self.broken = true;
    }

    /// Drops the current registration, if any; false if the kernel refused
    /// (the ring then stops using registered buffers).
    fn unregister(&mut self, ring: &IoUring) -> bool {
        if self.broken {
            return false;
        }
        if self.registered() {
            // Operations already taken by the kernel keep the buffers they
            // resolved; the caller submitted every queued one.
            if let Err(e) = ring.submitter().unregister_buffers() {
                self.give_up(&e);
                return false;
            }
            self.bufs.clear();
        }
        true
    }

    /// Replaces the registration with `mem`'s regions.
    fn register(&mut self, ring: &IoUring, mem: &Arc<GuestMem>) {
        if !self.unregister(ring) {
            return;
        }
        self.mem = Some(Arc::clone(mem));
        self.generations += 1;
        let mut bufs = Vec::new();
        for region in mem.iter() {
            let base = region.as_ptr() as usize;
            let Ok(size) = usize::try_from(region.len()) else {
                continue;
            };
            let mut at = 0;
            while at < size {
                let n = (size - at).min(MAX_BUF);
                bufs.push((base + at, n));
                at += n;
            }
        }
        bufs.sort_unstable();
        if bufs.is_empty() {
            return;
        }
        if bufs.len() > MAX_BUFS {
            log::warn!(
                "guest memory needs {} io_uring buffers, more than the {MAX_BUFS} a ring takes; \
                 serving without registered buffers",
                bufs.len()
            );
            return;
        }
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|&(s, l)| libc::iovec {
                iov_base: s as *mut libc::c_void,
                iov_len: l,
            })
            .collect();
        // SAFETY: every iovec is a live mapping of guest memory, kept mapped
        // by `self.mem` for as long as it is registered (the kernel pins the
        // pages in any case).
        match unsafe { ring.submitter().register_buffers(&iov) } {
            Ok(()) => {
                let bytes: usize = bufs.iter().map(|&(_, l)| l).sum();
                log::info!(
                    "guest memory registered with io_uring: {} MiB in {} buffers",
                    bytes >> 20,
                    bufs.len()
                );
                self.bufs = bufs;
            }
            Err(e) => log::warn!(
                "cannot register guest memory with io_uring ({e}): it locks all of the \
                 guest's RAM, so it needs RLIMIT_MEMLOCK of the guest's RAM for the daemon's \
                 user (x queues before Linux 6.12), or CAP_IPC_LOCK (which --user drops), and \
                 shared memory (memfd, shm or hugetlbfs); this queue serves without registered \
                 buffers"
            ),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use io_uring::{opcode, types};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use vm_memory::{Bytes, FileOffset, GuestAddress};

    const MIB: usize = 1 << 20;

    /// True if the running kernel is at least `major.minor`.
    pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        version >= (major, minor)
    }

    /// A 64 KiB file of `seed`-derived bytes.
    fn data_file(seed: u8) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ seed).collect();
        f.write_all(&bytes).unwrap();
        f
    }

    /// Reads 4 KiB of `file` into `ptr` with READ_FIXED on buffer `index`;
    /// the kernel's result.
    fn read_fixed(ring: &mut IoUring, file: &std::fs::File, ptr: *mut u8, index: u16) -> i32 {
        let sqe = opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), ptr, 4096, index)
            .offset(8192)
            .build();
        // SAFETY: `ptr` points at 4 KiB of guest memory the caller keeps
        // mapped until the completion is reaped below.
        unsafe { ring.submission().push(&sqe) }.unwrap();
        ring.submit_and_wait(1).unwrap();
        ring.completion().next().unwrap().result()
    }

    fn host(mem: &GuestMem, addr: u64) -> *mut u8 {
        mem.get_slice(GuestAddress(addr), 4096)
            .unwrap()
            .ptr_guard_mut()
            .as_ptr()
    }

    /// Two guest regions are two buffers; a range is found in the one that
    /// holds it (the kernel agrees: READ_FIXED with that index lands the
    /// file's bytes in guest memory), and ranges outside or across a
    /// region's end get no index.
    #[test]
    fn each_range_gets_the_buffer_that_holds_it() {
        let mut ring = IoUring::new(8).unwrap();
        let mem = Arc::new(
            GuestMem::from_ranges(&[
                (GuestAddress(0), 2 * MIB),
                (GuestAddress(4 * MIB as u64), MIB),
            ])
            .unwrap(),
        );
        let mut fixed = FixedBufs::default();
        let ptr = host(&mem, 0);
        assert_eq!(fixed.index(&mem, ptr, 4096), None, "nothing registered yet");
        fixed.prepare(&ring, &mem, None);
        let file = data_file(7);
        let want: Vec<u8> = (8192..8192 + 4096u32).map(|i| (i as u8) ^ 7).collect();
        for addr in [0u64, MIB as u64, 4 * MIB as u64 + 8192] {
            let ptr = host(&mem, addr);
            let ix = fixed.index(&mem, ptr, 4096).unwrap();
            assert_eq!(
                read_fixed(&mut ring, &file, ptr, ix),
                4096,
                "addr {addr:#x}"
            );
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert!(got == want, "addr {addr:#x}");
        }
        assert!(fixed.registered());
        assert_eq!(fixed.generations, 1, "one generation, registered once");
        let first = host(&mem, 0);
        let second = host(&mem, 4 * MIB as u64);
        // The two regions are separate mappings: a range running off the end
        // of the first one is in no buffer.
        let end_of_first = host(&mem, 2 * MIB as u64 - 4096);
        assert_eq!(fixed.index(&mem, end_of_first, 8192), None);
        assert!(fixed.index(&mem, first, 2 * MIB).is_some());
        assert_ne!(
            fixed.index(&mem, first, 4096),
            fixed.index(&mem, second, 4096)
        );
        let iov = |p: *mut u8| libc::iovec {
            iov_base: p.cast(),
            iov_len: 4096,
        };
        let same = [iov(first), iov(host(&mem, 8192))];
        assert_eq!(fixed.index_all(&mem, &same), fixed.index(&mem, first, 4096));
        let split = [iov(first), iov(second)];
        assert_eq!(fixed.index_all(&mem, &split), None, "two buffers");
        let mut outside = vec![0u8; 4096];
        assert_eq!(fixed.index(&mem, outside.as_mut_ptr(), 4096), None);
    }

    /// New guest memory (SET_MEM_TABLE) replaces the registration: the
    /// new memory gets buffers and the old memory's are gone from the
    /// kernel too (READ_FIXED into it fails).
    #[test]
    fn new_guest_memory_replaces_the_registration() {
        let mut ring = IoUring::new(8).unwrap();
        let old = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MIB)]).unwrap());
        let new = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MIB)]).unwrap());
        let file = data_file(3);
        let mut fixed = FixedBufs::default();
        let old_ptr = host(&old, 0);
        fixed.prepare(&ring, &old, None);
        let old_ix = fixed.index(&old, old_ptr, 4096).unwrap();
        assert_eq!(read_fixed(&mut ring, &file, old_ptr, old_ix), 4096);
        let new_ptr = host(&new, 0);
        assert_eq!(
            fixed.index(&new, new_ptr, 4096),
            None,
            "a request's generation was registered by the hit path"
        );
        fixed.prepare(&ring, &new, None);
        let new_ix = fixed.index(&new, new_ptr, 4096).unwrap();
        assert_eq!(fixed.generations, 2);
        assert_eq!(fixed.index(&old, old_ptr, 4096), None, "old generation");
        assert_eq!(read_fixed(&mut ring, &file, new_ptr, new_ix), 4096);
        assert_eq!(fixed.index(&new, old_ptr, 4096), None);
        assert_eq!(
            read_fixed(&mut ring, &file, old_ptr, old_ix),
            -libc::EFAULT,
            "the old memory is still registered"
        );
    }

    /// A second ring shares the first one's registration (one pin, one
    /// memlock charge): the same table, and the kernel serves READ_FIXED on
    /// it, even after the first ring moved on to another generation.
    #[test]
    fn a_second_ring_shares_the_registration() {
        let mut first = IoUring::new(8).unwrap();
        let mut second = IoUring::new(8).unwrap();
        let mem = Arc::new(
            GuestMem::from_ranges(&[(GuestAddress(0), MIB), (GuestAddress(4 * MIB as u64), MIB)])
                .unwrap(),
        );
        let file = data_file(9);
        let (mut a, mut b) = (FixedBufs::default(), FixedBufs::default());
        a.prepare(&first, &mem, None);
        let from = a.sharable(&first).unwrap();
        b.prepare(&second, &mem, Some(&from));
        // IORING_REGISTER_CLONE_BUFFERS is in Linux 6.12.
        assert_eq!(b.shared(), u64::from(kernel_at_least(6, 12)));
        assert!(b.is_current(&mem) && b.registered());
        assert_eq!(a.bufs, b.bufs);
        let ptr = host(&mem, 4 * MIB as u64);
        let ix = b.index(&mem, ptr, 4096).unwrap();
        assert_eq!(read_fixed(&mut first, &file, ptr, ix), 4096);
        // A registration of another generation is not shared.
        let other = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MIB)]).unwrap());
        let third = IoUring::new(8).unwrap();
        let mut c = FixedBufs::default();
        c.prepare(&third, &other, Some(&from));
        assert_eq!(c.shared(), 0);
        assert!(c.is_current(&other) && c.registered());
        // The first ring moves on to that generation; the second keeps the
        // buffers it shared.
        a.prepare(&first, &other, None);
        assert_eq!(read_fixed(&mut first, &file, ptr, ix), -libc::EFAULT);
        assert_eq!(read_fixed(&mut second, &file, ptr, ix), 4096);
    }

    /// Guest memory the kernel will not pin for long (a shared mapping of a
    /// file on a disk filesystem) is not registered: no index is handed
    /// out, and the same generation is not tried again.
    #[test]
    fn memory_that_cannot_be_pinned_is_used_unregistered() {
        let ring = IoUring::new(8).unwrap();
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("ram");
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(MIB as u64).unwrap();
        let mem = Arc::new(
            GuestMem::from_ranges_with_files(&[(
                GuestAddress(0),
                MIB,
                Some(FileOffset::new(file, 0)),
            )])
            .unwrap(),
        );
        let mut fixed = FixedBufs::default();
        let ptr = host(&mem, 0);
        fixed.prepare(&ring, &mem, None);
        assert_eq!(fixed.index(&mem, ptr, 4096), None);
        fixed.prepare(&ring, &mem, None);
        assert!(!fixed.registered());
        assert_eq!(fixed.generations, 1, "a failed generation was retried");
    }
}
