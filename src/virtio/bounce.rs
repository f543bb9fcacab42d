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
use std::ptr::NonNull;

/// Size of one page of the pool: a transparent huge page.
pub const HUGE_LEN: usize = AlignedBuf::HUGE_LEN;
/// Smallest piece: the smallest `--bounce-min`.
const CLASS_MIN: usize = super::MIN_BOUNCE;
/// Piece sizes: 32 KiB, 64 KiB, ... 2 MiB.
const CLASSES: usize = 7;
/// Pages a pool may allocate.
pub const MAX_PAGES: usize = 16;

/// A piece of a page, lent to one request. It must go back to its pool
/// with [`BouncePool::give`] (a piece dropped instead is lost to the pool
/// until the pool is dropped).
pub struct Piece {
    ptr: NonNull<u8>,
    class: usize,
    /// Index of its page in the pool (pages are never removed).
    page: usize,
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

/// One page of the pool, cut into pieces of one class.
struct Page {
    buf: AlignedBuf,
    class: usize,
    /// Pieces of this page not lent out.
    free: usize,
}

/// Huge pages cut into pieces; see the module documentation.
///
/// Invariant: `free[c]` holds exactly the pieces of the pages of class `c`
/// that are not lent out, and each page's `free` counts its own.
pub struct BouncePool {
    /// Requests of at least this many bytes are staged.
    min: usize,
    pages: Vec<Page>,
    /// Free pieces of each class, with the index of their page.
    free: [Vec<(NonNull<u8>, usize)>; CLASSES],
}

// SAFETY: the pool owns its pages; the raw pointers in `free` point into
// them and are used by whichever single thread holds the pool.
unsafe impl Send for BouncePool {}

/// Pieces of class `class` in one page.
fn pieces(class: usize) -> usize {
    HUGE_LEN / (CLASS_MIN << class)
}

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
    /// page, or if no piece of that size is free, the pool is at
    /// [`MAX_PAGES`] and none of its pages is wholly free to be cut again.
    pub fn take(&mut self, len: usize) -> Option<Piece> {
        let class = (0..CLASSES).find(|&c| (CLASS_MIN << c) >= len)?;
        if self.free[class].is_empty() {
            let page = if self.pages.len() < MAX_PAGES {
                self.pages.push(Page {
                    buf: AlignedBuf::new(HUGE_LEN),
                    class,
                    free: 0,
                });
                self.pages.len() - 1
            } else {
                // A page none of whose pieces is lent out (of another
                // class: one of this class would have free pieces).
                self.pages.iter().position(|p| p.free == pieces(p.class))?
            };
            self.cut(page, class);
        }
        let (ptr, page) = self.free[class].pop()?;
        self.pages[page].free -= 1;
        Some(Piece { ptr, class, page })
    }

    /// Cuts page `i`, none of whose pieces is lent out, into pieces of
    /// `class`: its old pieces leave their free list, the new ones join
    /// theirs.
    fn cut(&mut self, i: usize, class: usize) {
        let Some(page) = self.pages.get_mut(i) else {
            return;
        };
        if page.free > 0 {
            self.free[page.class].retain(|&(_, of)| of != i);
        }
        page.class = class;
        let size = CLASS_MIN << class;
        let start = page.buf.as_mut_ptr();
        for at in (0..HUGE_LEN).step_by(size).rev() {
            // SAFETY: `at < HUGE_LEN`, the page's length.
            if let Some(p) = NonNull::new(unsafe { start.add(at) }) {
                self.free[class].push((p, i));
            }
        }
        page.free = pieces(class);
    }

    /// Gives back a piece taken from this pool.
    pub fn give(&mut self, piece: Piece) {
        let (Some(page), Some(f)) = (
            self.pages.get_mut(piece.page),
            self.free.get_mut(piece.class),
        ) else {
            return;
        };
        page.free += 1;
        f.push((piece.ptr, piece.page));
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
    crate::device::fs_type(file) == Some(HUGETLBFS_MAGIC)
}

/// `min` if large hits can be staged to any gain, that is if the kernel
/// backs `madvise(MADV_HUGEPAGE)` memory with huge pages (transparent huge
/// pages not set to `never`); `None`, logged, if not. Reads sysfs: the
/// daemon calls it before its seccomp filter forbids opening files.
pub fn staging_threshold(min: Option<usize>) -> Option<usize> {
    let min = min?;
    const THP: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    match std::fs::read_to_string(THP) {
        Ok(s) if s.contains("[never]") => {
            log::info!(
                "transparent huge pages are off ({THP}): large hits use guest memory in place"
            );
            None
        }
        Ok(_) => Some(min),
        Err(e) => {
            log::info!("cannot read {THP} ({e}): large hits use guest memory in place");
            None
        }
    }
}

/// Free huge pages of 2 MiB (`HugePages_Free` in /proc/meminfo); 0 if the
/// default huge page size is another, or the file cannot be read. For
/// tests that need guest RAM on hugetlbfs, and diagnostics.
pub fn free_huge_pages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    if field("Hugepagesize:") == 2048 {
        field("HugePages_Free:")
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugetlbfs_files_are_recognised() {
        let plain = tempfile::tempfile().unwrap();
        assert!(!on_hugetlbfs(&plain));
        assert!(crate::device::fs_type(&plain).is_some());
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
    fn a_wholly_free_page_is_cut_again_for_another_size() {
        let mut pool = BouncePool::new(CLASS_MIN);
        // Fill the pool with 2 MiB pieces, then give them all back.
        let mut held = Vec::new();
        while let Some(p) = pool.take(HUGE_LEN) {
            held.push(p);
        }
        assert_eq!(held.len(), MAX_PAGES);
        for p in held.drain(..) {
            pool.give(p);
        }
        // Every 32 KiB piece the pool could now lend comes from re-cut
        // pages: all of them, with no page or piece lent twice.
        let mut starts = Vec::new();
        while let Some(p) = pool.take(CLASS_MIN) {
            starts.push(p.as_mut_ptr() as usize);
            held.push(p);
        }
        assert_eq!(pool.pages(), MAX_PAGES);
        assert_eq!(starts.len(), MAX_PAGES * pieces(0), "every page re-cut");
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), MAX_PAGES * pieces(0), "a piece lent twice");
        assert!(pool.free[CLASSES - 1].is_empty(), "old 2 MiB pieces remain");
        assert!(pool.take(HUGE_LEN).is_none(), "no page is wholly free");
        // One page's pieces back: that page alone can be cut again.
        let one = held[0].page;
        let (back, keep): (Vec<_>, Vec<_>) = held.into_iter().partition(|p| p.page == one);
        assert_eq!(back.len(), pieces(0));
        let base = back.iter().map(|p| p.as_mut_ptr() as usize).min();
        for p in back {
            pool.give(p);
        }
        let big = pool.take(HUGE_LEN).expect("the freed page, re-cut");
        assert_eq!(big.page, one);
        assert_eq!(Some(big.as_mut_ptr() as usize), base, "not the freed page");
        assert!(
            pool.free[0].is_empty(),
            "the re-cut page's 32 KiB pieces remain"
        );
        drop(keep);
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
