//! A shared mapping of a memory-backed cache file (tmpfs, ramfs), so that a
//! queue thread serves hits on it with a memory copy instead of a
//! `preadv`/`pwritev` system call per request.
//!
//! Only frames that hold valid blocks are ever copied (the engine pins them
//! for the copy). Before the file is mapped, [`fill_holes`] allocates any
//! hole under a valid frame (a cache file copied onto tmpfs sparsely turns
//! all-zero frames into holes), or the mapping is not used if that fails;
//! after that the daemon writes the pages of every block it stores and never
//! punches holes, so a copy does not fault in a hole and a full tmpfs cannot
//! turn into SIGBUS here. That holds for a file only this daemon writes:
//! another process truncating the file or punching holes in it while it is
//! mapped, or a swap read error, raise SIGBUS, which ends the daemon (with
//! `preadv`/`pwritev` they failed one request). The mapping is coherent with
//! `pread`/`pwrite` on the same file (one page cache), which the engine's
//! other paths keep using. It is excluded from core dumps.

use std::os::fd::RawFd;

/// A read-write `MAP_SHARED` mapping of a whole file. Invariant: `ptr` maps
/// `len` bytes until drop.
pub(crate) struct FileMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until drop whichever
// thread uses it. Its bytes are accessed only through raw-pointer copies in
// `copy`; the engine's pins keep a frame's block fixed during a copy, but
// two requests may copy into or out of the same frame at once (as two
// `pwritev` calls could): the bytes are then unspecified, never unsafe, since
// no reference to them exists.
unsafe impl Send for FileMap {}
// SAFETY: as for Send; `copy` takes `&self` and uses raw pointers only.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps the file behind `fd` whole; `None` if it is empty or the kernel
    /// refuses (callers then use system calls).
    pub(crate) fn new(fd: RawFd) -> Option<FileMap> {
        FileMap::map(fd, file_len(fd)?)
    }

    /// Maps the first `len` bytes (at most the file's size) of the file
    /// behind `fd`, leaving the rest unmapped.
    #[cfg(test)]
    pub(crate) fn first(fd: RawFd, len: usize) -> Option<FileMap> {
        FileMap::map(fd, len.min(file_len(fd)?))
    }

    /// Maps the first `len` bytes of the file behind `fd`; the caller
    /// checked that the file has them.
    fn map(fd: RawFd, len: usize) -> Option<FileMap> {
        if len == 0 {
            return None;
        }
        // SAFETY: a new shared mapping of `len` bytes of `fd` at an address
        // the kernel picks; nothing else is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            log::info!(
                "cannot map the memory-backed cache file ({}); hits use system calls",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: advice on the mapping just made; failure is harmless.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_DONTDUMP);
        }
        Some(FileMap {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Copies between the file at `offset` and the buffers of `iov` in
    /// order (into the buffers if `!write`); false, copying nothing, if the
    /// range is not inside the file or is not `len` bytes.
    ///
    /// # Safety
    /// Each iovec must point to memory valid for reads (write) or writes
    /// (read) of its length for the duration of the call.
    pub(crate) unsafe fn copy(
        &self,
        write: bool,
        offset: u64,
        len: u64,
        iov: &[libc::iovec],
    ) -> bool {
        let total: Option<usize> = iov.iter().try_fold(0usize, |a, v| a.checked_add(v.iov_len));
        let (Some(total), Ok(start)) = (total, usize::try_from(offset)) else {
            return false;
        };
        if u64::try_from(total).ok() != Some(len)
            || start.checked_add(total).is_none_or(|e| e > self.len)
        {
            return false;
        }
        let mut at = start;
        for v in iov {
            // SAFETY: `at..at + iov_len` lies inside the mapping (checked
            // above for the sum); the iovec is valid per the caller, and
            // guest buffers never overlap our private mapping.
            unsafe {
                let file = self.ptr.add(at);
                let buf = v.iov_base.cast::<u8>();
                if write {
                    std::ptr::copy_nonoverlapping(buf, file, v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(file, buf, v.iov_len);
                }
            }
            at += v.iov_len;
        }
        true
    }
}

/// The size of the file behind `fd`, if it can be had.
fn file_len(fd: RawFd) -> Option<usize> {
    usize::try_from(fstat(fd)?.st_size).ok()
}

/// `fstat` of `fd`, if it succeeds.
fn fstat(fd: RawFd) -> Option<libc::stat> {
    // SAFETY: an all-zero stat is a valid value for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the caller's lifetime; `st` is valid.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some(st)
}

/// Allocates whatever part of the `(offset, len)` ranges (sorted, not
/// overlapping) of the file behind `fd` is a hole, keeping the data and the
/// file size: afterwards reading or writing those ranges through a mapping
/// cannot fault on a missing page (on tmpfs that fault raises SIGBUS when
/// the filesystem is full). Parts past the end of the file are left alone
/// (a mapping does not cover them). One pass over the file's holes and data
/// (`SEEK_HOLE`/`SEEK_DATA`), so the cost grows with the file, not with the
/// number of ranges times its size. Returns the bytes newly allocated.
/// Fails, naming the range, if the filesystem cannot allocate it (full, or
/// no `fallocate`).
pub(crate) fn fill_holes(fd: RawFd, ranges: &[(u64, u64)]) -> std::io::Result<u64> {
    let size = file_len(fd)
        .and_then(|l| u64::try_from(l).ok())
        .ok_or_else(|| std::io::Error::other("cannot read the cache file's size"))?;
    let blocks_before = allocated_bytes(fd);
    let end_of = |(o, l): (u64, u64)| o.saturating_add(l).min(size);
    let last = ranges.iter().map(|&r| end_of(r)).max().unwrap_or(0);
    let mut i = 0;
    let mut pos = 0u64;
    while i < ranges.len() {
        // Skip ranges that end before `pos`, then start at the next one.
        while i < ranges.len() && end_of(ranges[i]) <= pos {
            i += 1;
        }
        let Some(&(start, _)) = ranges.get(i) else {
            break;
        };
        pos = pos.max(start);
        if pos >= last {
            break;
        }
        let hole = seek(fd, pos, libc::SEEK_HOLE)?.unwrap_or(size);
        if hole >= last {
            break;
        }
        // No data after the hole: it runs to the end of the file.
        let hole_end = seek(fd, hole, libc::SEEK_DATA)?.unwrap_or(size).min(last);
        let mut j = i;
        while let Some(&r) = ranges.get(j) {
            if r.0 >= hole_end {
                break;
            }
            let (a, b) = (r.0.max(hole), end_of(r).min(hole_end));
            if a < b {
                allocate(fd, a, b - a)?;
            }
            j += 1;
        }
        // Progress even if a concurrent store just wrote into the hole.
        pos = hole_end.max(pos.saturating_add(1));
    }
    Ok(allocated_bytes(fd).saturating_sub(blocks_before))
}

/// `lseek(fd, pos, whence)` for SEEK_HOLE (always an offset: the end of the
/// file counts as a hole) or SEEK_DATA (`None` when no data follows).
fn seek(fd: RawFd, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let at = libc::off_t::try_from(pos)
        .map_err(|_| std::io::Error::other(format!("offset {pos} out of range")))?;
    // SAFETY: lseek on a descriptor the caller keeps open; it only reports
    // an offset (the file position it moves is not used: every I/O on the
    // cache file is positional).
    let r = unsafe { libc::lseek(fd, at, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if whence == libc::SEEK_DATA && e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot look for holes at byte {pos} of the cache file: {e}"),
        ));
    }
    Ok(u64::try_from(r).ok())
}

/// Allocates `len` bytes at `offset` inside the file, keeping its size.
fn allocate(fd: RawFd, offset: u64, len: u64) -> std::io::Result<()> {
    let end = offset.saturating_add(len);
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::other(format!(
            "bytes {offset}..{end} of the cache file are out of range"
        )));
    };
    // SAFETY: allocates the range's missing blocks; KEEP_SIZE leaves the
    // file size alone, and existing data is never touched by mode 0.
    if unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, at, n) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot allocate bytes {offset}..{end} of the cache file: {e}"),
        ));
    }
    Ok(())
}

/// Bytes allocated to the file behind `fd` (0 if unknown).
fn allocated_bytes(fd: RawFd) -> u64 {
    fstat(fd)
        .and_then(|st| u64::try_from(st.st_blocks).ok())
        .unwrap_or(0)
        .saturating_mul(512)
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    /// A new empty file `f` in `dir`, open for reading and writing.
    fn new_file(dir: &tempfile::TempDir) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap()
    }

    #[test]
    fn copies_both_ways_and_refuses_ranges_outside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = new_file(&dir);
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        let map = FileMap::new(f.as_raw_fd()).unwrap();
        let mut a = [0u8; 1000];
        let mut b = [0u8; 1048];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs point to the local arrays above.
        assert!(unsafe { map.copy(false, 4096, 2048, &iov) });
        assert!(a.iter().chain(b.iter()).all(|&x| x == 7));
        a.fill(1);
        b.fill(2);
        // SAFETY: as above.
        assert!(unsafe { map.copy(true, 100, 2048, &iov) });
        let mut back = [0u8; 2048];
        f.read_exact_at(&mut back, 100).unwrap();
        assert!(back[..1000].iter().all(|&x| x == 1) && back[1000..].iter().all(|&x| x == 2));
        // Past the end, or a length that does not match the buffers.
        for (offset, len) in [(8192 - 1024, 2048), (0, 4096), (u64::MAX, 2048)] {
            // SAFETY: as above (and nothing is copied).
            let copied = unsafe { map.copy(false, offset, len, &iov) };
            assert!(!copied, "{offset} {len}");
        }
    }

    /// The offset of the first hole at or after `at` (the end of the file
    /// counts as one).
    fn next_hole(f: &std::fs::File, at: u64) -> u64 {
        // SAFETY: lseek on an open descriptor.
        let r = unsafe { libc::lseek(f.as_raw_fd(), at as libc::off_t, libc::SEEK_HOLE) };
        assert!(r >= 0, "{}", std::io::Error::last_os_error());
        r as u64
    }

    /// Bytes allocated to the file.
    fn allocated(f: &std::fs::File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn holes_under_the_given_ranges_are_filled_and_others_left() {
        // tmpfs where there is one (the case that matters), else any
        // filesystem with holes.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let f = new_file(&dir);
        const K: u64 = 1024;
        f.set_len(256 * K).unwrap();
        f.write_all_at(&[9u8; 4096], 64 * K).unwrap();
        if next_hole(&f, 0) != 0 {
            eprintln!("skipping: this filesystem reports no holes");
            return;
        }
        let before = allocated(&f);
        // A hole, a range half hole half data, another hole; the holes
        // between them stay. (SEEK_HOLE cannot show the result: tmpfs
        // reports allocated pages nobody wrote as holes; they are allocated
        // all the same, which is what matters.)
        let ranges = [(0, 16 * K), (60 * K, 8 * K), (100 * K, 4 * K)];
        assert_eq!(fill_holes(f.as_raw_fd(), &ranges).unwrap(), 24 * K);
        assert_eq!(allocated(&f), before + 24 * K, "exactly the holes filled");
        assert_eq!(fill_holes(f.as_raw_fd(), &ranges).unwrap(), 0);
        assert_eq!(allocated(&f), before + 24 * K, "filling again adds nothing");
        let mut back = [0u8; 4096];
        f.read_exact_at(&mut back, 64 * K).unwrap();
        assert!(back.iter().all(|&x| x == 9), "data around the holes kept");
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&x| x == 0));
        assert_eq!(f.metadata().unwrap().len(), 256 * K);
        // Ranges past the end of the file are left alone (not mapped).
        assert_eq!(
            fill_holes(f.as_raw_fd(), &[(256 * K, 4096), (u64::MAX - 1, 4096)]).unwrap(),
            0
        );
        assert_eq!(f.metadata().unwrap().len(), 256 * K);
    }
}
