//! A small pool of block-sized fetch buffers.
//!
//! Every read miss fetches whole blocks into an O_DIRECT-aligned buffer that
//! lives until the background store has written it into the cache. Allocating
//! it fresh each time costs a zeroing `memset` of the whole block and, since
//! the allocator hands freed 64 KiB chunks back to the kernel, page faults on
//! the next use. The pool keeps up to `cap` freed buffers of exactly one size
//! and hands them out again.
//!
//! A reused buffer holds stale bytes of an earlier block: callers must
//! overwrite all of it before the contents are used (the source fetch does,
//! see `Core::read_source_blocks`). Buffers of any other size are neither
//! pooled nor taken from the pool.

use crate::device::AlignedBuf;
use std::sync::Mutex;

pub(crate) struct BufPool {
    len: usize,
    cap: usize,
    free: Mutex<Vec<AlignedBuf>>,
}

impl BufPool {
    /// A pool of at most `cap` idle buffers of `len` bytes.
    pub fn new(len: usize, cap: usize) -> BufPool {
        BufPool {
            len,
            cap,
            free: Mutex::new(Vec::with_capacity(cap)),
        }
    }

    /// A buffer of `len` bytes: a pooled one (stale contents) when `len` is
    /// the pool's size and one is idle, else a new zeroed one.
    pub fn take(&self, len: usize) -> AlignedBuf {
        if len == self.len {
            let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
            if let Some(b) = reused {
                return b;
            }
        }
        AlignedBuf::new(len)
    }

    /// Gives a buffer back; it is kept when it has the pool's size and the
    /// pool has room, otherwise freed.
    pub fn give(&self, buf: AlignedBuf) {
        if buf.len() != self.len {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.cap {
            free.push(buf);
        }
    }

    /// Idle buffers held (for tests).
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DIRECT_ALIGN;

    #[test]
    fn reuses_given_buffers_of_its_size() {
        let pool = BufPool::new(8192, 4);
        let mut a = pool.take(8192);
        assert!(a.iter().all(|&x| x == 0), "a new buffer is zeroed");
        a[0] = 7;
        let addr = a.as_ptr() as usize;
        pool.give(a);
        assert_eq!(pool.idle(), 1);
        let b = pool.take(8192);
        assert_eq!(
            b.as_ptr() as usize,
            addr,
            "the idle buffer is handed out again"
        );
        assert_eq!(b[0], 7, "a reused buffer keeps its stale bytes");
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn other_sizes_bypass_the_pool() {
        let pool = BufPool::new(8192, 4);
        pool.give(pool.take(8192));
        let big = pool.take(16384);
        assert_eq!(big.len(), 16384);
        assert_eq!(
            pool.idle(),
            1,
            "a larger request does not take the idle buffer"
        );
        pool.give(big);
        assert_eq!(pool.idle(), 1, "a buffer of another size is not kept");
    }

    #[test]
    fn keeps_at_most_cap_buffers() {
        let pool = BufPool::new(4096, 2);
        let bufs: Vec<_> = (0..5).map(|_| pool.take(4096)).collect();
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.idle(), 2);
    }
}
