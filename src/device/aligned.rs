//! Heap buffers aligned for `O_DIRECT`.

use std::alloc::{alloc, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: enough for O_DIRECT on 4 KiB-sector
/// devices.
pub const DIRECT_ALIGN: usize = 4096;

/// Buffers of at least this size are aligned to it and backed by
/// transparent huge pages where the kernel allows it (`madvise`).
///
/// Why: first touching a fresh 4 MiB buffer faulted in 1,024 pages, and on
/// a PVM guest each fault is expensive; the first `flush_all` of a daemon
/// spent 13 % of its CPU samples zeroing new writeback run buffers page by
/// page (`perf record`, session 20).
pub const HUGE: usize = 2 << 20;

/// A zero-initialised byte buffer whose start is aligned to [`DIRECT_ALIGN`]
/// (to [`HUGE`] for buffers that large).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out &[u8], like Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// [`HUGE`], for users of the type.
    pub const HUGE_LEN: usize = HUGE;

    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub fn new(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout);
        };
        if len >= HUGE {
            // SAFETY: the range is the allocation just made, 2 MiB aligned;
            // MADV_HUGEPAGE only changes how its pages are backed. A
            // refusal (THP disabled) leaves small pages: nothing to do.
            unsafe {
                libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
            }
        }
        // SAFETY: ptr is valid for writes of len bytes (just allocated).
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        let align = if len >= HUGE { HUGE } else { DIRECT_ALIGN };
        match Layout::from_size_align(len, align) {
            Ok(l) => l,
            // Only reachable for len close to isize::MAX, which alloc would refuse anyway.
            Err(_) => std::alloc::handle_alloc_error(Layout::new::<u8>()),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: ptr was returned by alloc with this same layout.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn aligned_and_zeroed() {
        let b = AlignedBuf::new(8192 + 3);
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(AlignedBuf::new(0).len(), 0);
    }

    #[test]
    fn large_buffers_are_aligned_for_huge_pages_and_zeroed() {
        for len in [HUGE, 4 * HUGE + 4096] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_ptr() as usize % HUGE, 0, "len {len}");
            assert!(b.iter().all(|&x| x == 0), "len {len}");
            // A buffer made after this one is freed may reuse its memory:
            // it must still come zeroed.
            b.fill(0xa5);
            drop(b);
            let again = AlignedBuf::new(len);
            assert!(again.iter().all(|&x| x == 0), "len {len}, reused");
        }
    }
}
