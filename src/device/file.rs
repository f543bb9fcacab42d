//! A regular file or a block device.

use super::aligned::{AlignedBuf, DIRECT_ALIGN};
use super::{check_range, BlockDevice, DeviceError, IoOp};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
    /// Claim a block device exclusively (`O_EXCL`): the open fails with
    /// `EBUSY` while the device is mounted, part of a RAID or device-mapper
    /// target, or claimed by another program, and none of these can take it
    /// while it stays open. No effect on a regular file.
    pub exclusive: bool,
}

/// A file or block device accessed with positional I/O.
///
/// With `O_DIRECT`, requests go straight to the file when their offset and
/// length are multiples of the file's direct-I/O alignment (`statx`
/// `STATX_DIOALIGN`, or the logical sector size of a block device; 512 on
/// most devices) and their buffer is aligned for it. A misaligned buffer is
/// copied through an aligned bounce buffer. A misaligned offset or length is
/// a read-modify-write of the covering sectors: such writes are serialised
/// with each other, but not atomic against a concurrent aligned write to the
/// same sectors. Guests and the engine write whole 512-byte sectors, so on
/// devices with 512-byte alignment that path is never taken for their data.
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
    block_device: bool,
    /// A block device's stable identifier, read from sysfs at open (see
    /// [`super::DeviceIdentity`]).
    block_id: Option<String>,
    memory: bool,
    /// Direct-I/O alignment of offsets and lengths (a power of two).
    dio_align: u64,
    /// Direct-I/O alignment of buffer addresses (a power of two).
    mem_align: usize,
    /// Serialises read-modify-write cycles.
    rmw: std::sync::Mutex<()>,
    /// A second handle without O_DIRECT, for a regular file whose size is
    /// not a multiple of `dio_align`: a write into its last partial sector
    /// goes through it, since an aligned O_DIRECT write there would extend
    /// the file (and a restart would then find a source of another size).
    tail: Option<File>,
}

// BLKGETSIZE64 = _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
// BLKDISCARD = _IO(0x12, 119)
const BLKDISCARD: libc::c_ulong = 0x1277;
// BLKZEROOUT = _IO(0x12, 127)
const BLKZEROOUT: libc::c_ulong = 0x127f;
// BLKROGET = _IO(0x12, 94)
const BLKROGET: libc::c_ulong = 0x125e;

fn io_err(op: IoOp, offset: u64, len: u64, path: &Path, source: io::Error) -> DeviceError {
    DeviceError::Io {
        op,
        offset,
        len,
        name: path.display().to_string(),
        source,
    }
}

impl FileDevice {
    /// Opens an existing file or block device.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Self, DeviceError> {
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let mut flags = 0;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        // O_EXCL without O_CREAT is defined for block devices only: ask the
        // path first (a race with a rename here only loses the claim).
        if opts.exclusive && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
        {
            flags |= libc::O_EXCL;
        }
        if flags != 0 {
            oo.custom_flags(flags);
        }
        let file = oo
            .open(path)
            .map_err(|e| io_err(IoOp::Open, 0, 0, path, e))?;
        set_noatime(&file);
        let meta = file
            .metadata()
            .map_err(|e| io_err(IoOp::Open, 0, 0, path, e))?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if rc != 0 {
                return Err(io_err(IoOp::Open, 0, 0, path, io::Error::last_os_error()));
            }
            // The kernel lets a read-only block device be opened for
            // writing and fails the writes later: refuse it now, as a
            // read-only filesystem refuses the open.
            let mut ro: libc::c_int = 0;
            // SAFETY: BLKROGET writes one int through the pointer, which
            // points at a live local.
            let rc =
                unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET, &mut ro as *mut libc::c_int) };
            if rc == 0 && ro != 0 && !opts.read_only {
                return Err(io_err(
                    IoOp::Open,
                    0,
                    0,
                    path,
                    io::Error::from_raw_os_error(libc::EROFS),
                ));
            }
            size
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io_err(
                IoOp::Open,
                0,
                0,
                path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a regular file or block device",
                ),
            ));
        };
        let block_id = if block_device {
            use std::os::unix::fs::MetadataExt;
            super::block_device_id(meta.rdev())
        } else {
            None
        };
        // A block device's node is on devtmpfs, which reports the tmpfs
        // magic: the device itself is storage (zram and brd included, which
        // take O_DIRECT and are fast with it).
        let memory = !block_device && in_memory(&file);
        let (dio_align, mem_align) = direct_alignment(&file, block_device);
        let tail = if opts.direct && !block_device && !opts.read_only && size % dio_align != 0 {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| io_err(IoOp::Open, 0, 0, path, e))?;
            Some(f)
        } else {
            None
        };
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            direct: opts.direct,
            block_device,
            block_id,
            memory,
            dio_align,
            mem_align,
            rmw: std::sync::Mutex::new(()),
            tail,
        })
    }

    /// True when opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the file lives on a memory filesystem.
    pub fn is_memory(&self) -> bool {
        self.memory
    }

    /// The alignment O_DIRECT needs for offsets and lengths (1 without
    /// O_DIRECT).
    pub fn direct_align(&self) -> u64 {
        if self.direct {
            self.dio_align
        } else {
            1
        }
    }

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        !self.direct
            || ((ptr as usize) % self.mem_align == 0
                && len as u64 % self.dio_align == 0
                && offset % self.dio_align == 0)
    }

    /// The aligned window `[start, end)` covering `[offset, offset+len)`.
    fn window(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.dio_align;
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        (start, end)
    }

    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // Reading past EOF of a file that is shorter than it claims: zeros.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(IoOp::Read, offset, len, &self.path, e)),
            }
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_err(IoOp::Write, offset, buf.len() as u64, &self.path, e))
    }

    fn fallocate(
        &self,
        mode: libc::c_int,
        offset: u64,
        len: u64,
        op: IoOp,
    ) -> Result<(), DeviceError> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(DeviceError::OutOfRange {
                op,
                offset,
                len,
                size: self.size,
            });
        };
        // SAFETY: fallocate only reads its scalar arguments.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        self.result_of(rc, op, offset, len)
    }

    /// `Ok` for a system call that returned 0, else its `errno` as the
    /// error of `op` on `offset..offset + len`.
    fn result_of(
        &self,
        rc: libc::c_int,
        op: IoOp,
        offset: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        Err(io_err(op, offset, len, &self.path, e))
    }

    fn blk_range_ioctl(
        &self,
        req: libc::c_ulong,
        offset: u64,
        len: u64,
        op: IoOp,
    ) -> Result<(), DeviceError> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: the ioctl reads two u64 from a live local array.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req, range.as_ptr()) };
        self.result_of(rc, op, offset, len)
    }
}

/// Stops reads from updating the file's access time (an inode check per
/// read otherwise). Allowed only to the file's owner or CAP_FOWNER; without
/// it the file keeps its atime updates, which cost some CPU and nothing else.
fn set_noatime(file: &std::fs::File) {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NOATIME);
        }
    }
}

/// The alignment O_DIRECT needs on `file`: (offsets and lengths, buffer
/// addresses). [`DIRECT_ALIGN`] for both when the kernel does not say
/// (AlignedBuf is aligned to it, so the bounce path always works).
fn direct_alignment(file: &File, block_device: bool) -> (u64, usize) {
    let fallback = (DIRECT_ALIGN as u64, DIRECT_ALIGN);
    let sane = |n: u64| n.is_power_of_two() && n <= DIRECT_ALIGN as u64;
    if block_device {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points
        // at a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        return match u64::try_from(size) {
            Ok(n) if rc == 0 && sane(n) => (n, n as usize),
            _ => fallback,
        };
    }
    // SAFETY: an all-zero statx is a valid value for statx to overwrite.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid empty C string used with AT_EMPTY_PATH on
    // an open descriptor, and `stx` is a live, writable statx.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return fallback;
    }
    let off = u64::from(stx.stx_dio_offset_align);
    let mem = u64::from(stx.stx_dio_mem_align);
    if sane(off) && sane(mem) {
        (off, mem as usize)
    } else {
        fallback
    }
}

/// True for files on tmpfs or ramfs (their I/O is a memory copy).
fn in_memory(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    matches!(fs_type(file), Some(TMPFS_MAGIC | RAMFS_MAGIC))
}

/// The magic number of the filesystem `file` is on (`statfs.f_type`), if
/// `fstatfs` answers.
pub fn fs_type(file: &File) -> Option<i64> {
    // SAFETY: an all-zero statfs is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor and `st` a live, writable statfs.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between targets
    (rc == 0).then_some(st.f_type as i64)
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn raw_access(&self) -> Option<super::RawAccess> {
        Some(super::RawAccess {
            fd: self.file.as_raw_fd(),
            direct: self.direct,
            memory: self.memory,
            align: self.direct_align().max(self.mem_align as u64),
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        check_range(IoOp::Read, offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.pread(buf, offset);
        }
        let (start, end) = self.window(offset, len);
        let mut bounce = AlignedBuf::new((end - start) as usize);
        self.pread(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        check_range(IoOp::Write, offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self.pwrite(buf, offset);
        }
        let (start, end) = self.window(offset, len);
        if let Some(tail) = self.tail.as_ref().filter(|_| end > self.size) {
            // The page cache writes exactly these bytes; a later flush
            // (fsync of the inode) makes them durable, and O_DIRECT I/O on
            // the range writes the page cache back first.
            return tail
                .write_all_at(buf, offset)
                .map_err(|e| io_err(IoOp::Write, offset, len, &self.path, e));
        }
        let mut bounce = AlignedBuf::new((end - start) as usize);
        let skip = (offset - start) as usize;
        // Only the partial head and tail sectors need their old content.
        if skip != 0 || (offset + len) % self.dio_align != 0 {
            // Two overlapping read-modify-writes would lose one another's
            // bytes; this path is rare, so one lock is enough.
            let _rmw = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
            self.pread(&mut bounce, start)?;
            bounce[skip..skip + buf.len()].copy_from_slice(buf);
            return self.pwrite(&bounce, start);
        }
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.pwrite(&bounce, start)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.file
            .sync_data()
            .map_err(|e| io_err(IoOp::Flush, 0, 0, &self.path, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(IoOp::Discard, offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            // BLKDISCARD does not promise zeros; zero explicitly so reads are defined.
            return self.write_zeroes(offset, len);
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
            IoOp::Discard,
        ) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeroes_slow(offset, len),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(IoOp::WriteZeroes, offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let ok = if self.block_device {
            self.blk_range_ioctl(BLKZEROOUT, offset, len, IoOp::WriteZeroes)
                .is_ok()
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
                IoOp::WriteZeroes,
            )
            .is_ok()
        };
        if ok {
            Ok(())
        } else {
            self.write_zeroes_slow(offset, len)
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(IoOp::Allocate, offset, len, self.size)?;
        // tmpfs/ramfs: a write into a hole costs nothing special there, and
        // allocating would take the whole size in RAM at once.
        if len == 0 || self.block_device || self.memory {
            return Ok(());
        }
        // Never fill the filesystem for a hint: a sparse cache file larger
        // than the free space (allowed, and used by tests) stays sparse, and
        // fallocate may leave what it allocated before failing. Allocate only
        // if what is still a hole is at most half of the free space.
        let (allocated, free) = self.space()?;
        // Count only what the range itself may hold: assume every byte of
        // the file outside it is allocated (exact when, as for the cache's
        // metadata area, it was written), so the guard never counts too low.
        let outside = self.size.saturating_sub(len);
        let missing = len.saturating_sub(allocated.saturating_sub(outside));
        if missing > free / 2 {
            return Err(io_err(
                IoOp::Allocate,
                offset,
                len,
                &self.path,
                io::Error::other(format!(
                    "{missing} bytes still to allocate, more than half of the {free} bytes free"
                )),
            ));
        }
        // Mode KEEP_SIZE without other flags: allocate (as unwritten extents
        // on ext4/xfs), keep every byte and the file size as they are.
        self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len, IoOp::Allocate)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn identity(&self) -> Option<super::DeviceIdentity> {
        use std::os::unix::fs::MetadataExt;
        if self.block_device {
            return Some(super::DeviceIdentity::Block {
                id: self.block_id.clone(),
            });
        }
        let m = self.file.metadata().ok()?;
        let secs = u64::try_from(m.mtime()).ok()?;
        let nanos = u64::try_from(m.mtime_nsec()).ok()?;
        Some(super::DeviceIdentity::File {
            ino: m.ino(),
            mtime_ns: secs.checked_mul(1_000_000_000)?.checked_add(nanos)?,
        })
    }
}

impl FileDevice {
    /// Bytes of the file backed by storage, and bytes free for an
    /// unprivileged user on its filesystem.
    fn space(&self) -> Result<(u64, u64), DeviceError> {
        let fail = |e: io::Error| io_err(IoOp::Allocate, 0, 0, &self.path, e);
        let meta = self.file.metadata().map_err(fail)?;
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta).saturating_mul(512);
        // SAFETY: an all-zero statvfs is a valid value for fstatvfs to fill.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open and `st` is a valid out-pointer.
        if unsafe { libc::fstatvfs(self.file.as_raw_fd(), &mut st) } != 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        Ok((allocated, free))
    }

    fn write_zeroes_slow(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = AlignedBuf::new(
            CHUNK.min(len.div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64) as usize,
        );
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Issues BLKDISCARD on a block device (used by `--format` to trim).
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.block_device {
            self.blk_range_ioctl(BLKDISCARD, offset, len, IoOp::Discard)
        } else {
            self.discard(offset, len)
        }
    }
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
