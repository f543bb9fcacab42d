//! Staging buffers for large cache hits: pieces of transparent huge pages.
//!
//! A read or write of at least `min` bytes that the queue's io_uring serves
//! goes between the cache device and one of these pieces, and is copied
//! from or to guest memory by the queue thread; smaller requests use guest
//! memory in place.
//!
//! Why: the kernel builds an O_DIRECT request from the physical pages of
//! its buffer, one segment per run of contiguous pages. Guest memory mapped
//! from a memfd or a plain file is made of scattered 4 KiB pages, so a
//! 1 MiB read becomes 256 segments, more than the 254 a virtio disk takes:
//! it reaches the disk as two requests (1,016 + 8 KiB). A piece of a huge
//! page is one segment. Paired A/B on the test host (`bench/ab.sh`, warm
//! cache, sequential reads QD8, BENCHMARKS.md session 21): 2.26× the IOPS
//! at 1 MiB, 2.07× at 256 KiB, 1.78× at 128 KiB, 1.75× at 64 KiB and 1.43×
//! at 32 KiB, with 7–26 % less daemon CPU per request (pinning 256 guest
//! pages costs more than copying 1 MiB). A 4 KiB request is one page either
//! way and would only pay for the copy.
//!
//! Guest RAM on hugetlbfs is already contiguous in 2 MiB pages: there the
//! copy would buy nothing, so the ring stages nothing when every region of
//! the guest's memory table is on hugetlbfs. With
//! `--pin-guest-memory`, staged requests use the pieces, not the registered
//! guest memory.
//!
//! Invariants:
//! - a piece of class `c` is `CLASS_MIN << c` bytes at a multiple of its
//!   size inside one [`HUGE_LEN`]-aligned page, so it never crosses a huge
//!   page (it is physically contiguous whenever the kernel gave that page a
//!   huge page; if not, it is still correct, only not faster);
//! - pages are freed only with the pool; the ring that owns the pool waits
//!   for every operation in flight before it is dropped, so no piece is in
//!   use by the kernel then;
//! - at most [`MAX_PAGES`] pages per pool: beyond that, requests use guest
//!   memory in place, so a queue never holds more than 32 MiB here.

use crate::device::AlignedBuf;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// Size of one page of the pool: a transparent huge page.
pub const HUGE_LEN: usize = AlignedBuf::HUGE_LEN;
/// Smallest piece.
const CLASS_MIN: usize = 32 << 10;
/// Piece sizes: 32 KiB, 64 KiB, ... 2 MiB.
const CLASSES: usize = 7;
/// Pages a pool may allocate.
pub const MAX_PAGES: usize = 16;

/// A piece of a page, lent to one request.
pub struct Piece {
    ptr: NonNull<u8>,
    class: usize,
}

impl Piece {
    /// Start of the piece.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Size of the piece in bytes.
    pub fn capacity(&self) -> usize {
        CLASS_MIN << self.class
    }
}

/// Huge pages cut into pieces; see the module documentation.
pub struct BouncePool {
    /// Requests of at least this many bytes are staged.
    min: usize,
    pages: Vec<AlignedBuf>,
    /// Free pieces of each class.
    free: [Vec<NonNull<u8>>; CLASSES],
}

// SAFETY: the pool owns its pages; the raw pointers in `free` point into
// them and are used by whichever single thread holds the pool.
unsafe impl Send for BouncePool {}
// SAFETY: as above; a `Piece` is a raw pointer into a page of its pool.
unsafe impl Send for Piece {}

impl BouncePool {
    /// A pool staging requests of `min` bytes and more (raised to the
    /// smallest piece, 32 KiB). Allocates nothing yet.
    pub fn new(min: usize) -> Self {
        BouncePool {
            min: min.max(CLASS_MIN),
            pages: Vec::new(),
            free: Default::default(),
        }
    }

    /// True if a request of `len` bytes should be staged.
    pub fn wants(&self, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|l| l >= self.min && l <= HUGE_LEN)
    }

    /// A piece of at least `len` bytes, or `None` if `len` is larger than a
    /// page or the pool is at [`MAX_PAGES`] with no free piece of that size.
    pub fn take(&mut self, len: usize) -> Option<Piece> {
        let class = (0..CLASSES).find(|&c| (CLASS_MIN << c) >= len)?;
        if self.free[class].is_empty() {
            if self.pages.len() >= MAX_PAGES {
                return None;
            }
            let mut page = AlignedBuf::new(HUGE_LEN);
            let base = page.as_mut_ptr();
            let size = CLASS_MIN << class;
            for at in (0..HUGE_LEN).step_by(size).rev() {
                // SAFETY: `at < HUGE_LEN`, the page's length.
                let p = unsafe { base.add(at) };
                if let Some(p) = NonNull::new(p) {
                    self.free[class].push(p);
                }
            }
            self.pages.push(page);
        }
        let ptr = self.free[class].pop()?;
        Some(Piece { ptr, class })
    }

    /// Gives back a piece taken from this pool.
    pub fn give(&mut self, piece: Piece) {
        if let Some(f) = self.free.get_mut(piece.class) {
            f.push(piece.ptr);
        }
    }

    /// Pages allocated so far.
    #[cfg(test)]
    pub fn pages(&self) -> usize {
        self.pages.len()
    }
}

/// True if `file` is on hugetlbfs (a `mem-path` under a hugetlbfs mount,
/// or a memfd created with MFD_HUGETLB).
pub fn on_hugetlbfs(file: &File) -> bool {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor and `st` a live, writable statfs.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between targets
    let kind = st.f_type as i64;
    rc == 0 && kind == HUGETLBFS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugetlbfs_files_are_recognised() {
        let plain = tempfile::tempfile().unwrap();
        assert!(!on_hugetlbfs(&plain));
        // A memfd on hugetlbfs needs no reserved huge pages until mapped.
        // SAFETY: a valid C string and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vbc-huge-test".as_ptr(),
                libc::MFD_HUGETLB | libc::MFD_CLOEXEC,
            )
        };
        if fd < 0 {
            eprintln!(
                "skipping the hugetlbfs case: memfd_create(MFD_HUGETLB): {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let huge = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(on_hugetlbfs(&huge));
    }

    #[test]
    fn pieces_stay_inside_one_huge_page_and_do_not_overlap() {
        let mut pool = BouncePool::new(64 << 10);
        let mut taken = Vec::new();
        for len in [64 << 10, 100 << 10, 1 << 20, 1 << 20, 2 << 20, 40 << 10] {
            let p = pool.take(len).expect("a piece");
            assert!(p.capacity() >= len);
            let start = p.as_mut_ptr() as usize;
            assert_eq!(start % p.capacity(), 0, "a piece is aligned to its size");
            assert_eq!(
                start / HUGE_LEN,
                (start + p.capacity() - 1) / HUGE_LEN,
                "a piece of {len} bytes crosses a huge page"
            );
            taken.push((start, p.capacity()));
        }
        taken.sort();
        for w in taken.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "pieces overlap: {w:?}");
        }
    }

    #[test]
    fn pieces_are_reused_and_the_pages_are_bounded() {
        let mut pool = BouncePool::new(1 << 20);
        let a = pool.take(1 << 20).expect("a piece");
        let at = a.as_mut_ptr();
        pool.give(a);
        let b = pool.take(1 << 20).expect("a piece");
        assert_eq!(b.as_mut_ptr(), at, "a given-back piece is lent again");
        assert_eq!(pool.pages(), 1);
        let mut held = vec![b];
        while let Some(p) = pool.take(2 << 20) {
            held.push(p);
        }
        assert_eq!(pool.pages(), MAX_PAGES);
        assert!(
            pool.take(1 << 20).is_some(),
            "the half-used page still has a 1 MiB piece"
        );
        assert!(pool.take(1 << 20).is_none(), "no page left to cut");
        assert!(pool.take((2 << 20) + 1).is_none(), "larger than a page");
    }

    #[test]
    fn only_requests_from_the_threshold_up_to_a_page_are_staged() {
        let pool = BouncePool::new(64 << 10);
        assert!(!pool.wants(4096));
        assert!(!pool.wants((64 << 10) - 512));
        assert!(pool.wants(64 << 10));
        assert!(pool.wants(HUGE_LEN as u64));
        assert!(!pool.wants(HUGE_LEN as u64 + 4096));
        assert!(
            BouncePool::new(0).wants(CLASS_MIN as u64) && !BouncePool::new(0).wants(4096),
            "the threshold is at least the smallest piece"
        );
    }
}
