//! Storage devices behind one trait.
//!
//! The source image and the cache device are both [`BlockDevice`]s. Real
//! storage is a [`FileDevice`] (a regular file or a block device, optionally
//! opened with `O_DIRECT`); tests use [`MemDevice`]. Latency, bandwidth,
//! fault injection, volatile-write-cache modelling, I/O counting and gates
//! that hold operations for tests are wrappers around any device rather than
//! flags inside one, so benchmarks and crash tests reuse them unchanged.

mod aligned;
mod counting;
mod fault;
mod file;
mod gate;
mod identity;
mod latency;
mod mem;
mod rate;
mod volatile;

pub use aligned::{AlignedBuf, DIRECT_ALIGN};
pub use counting::{CountingDevice, IoCounts};
pub use fault::{FaultDevice, FaultPlan};
pub use file::{fs_type, FileDevice, OpenOptions};
pub use gate::{GateDevice, GateOp, OpenOnDrop};
pub use identity::{block_device_id, sysfs_id, valid_block_id, DeviceIdentity, MAX_BLOCK_ID};
pub use latency::{LatencyDevice, LatencyProfile};
pub use mem::MemDevice;
pub use rate::{RateDevice, RateProfile};
pub use volatile::VolatileCacheDevice;

use std::io;
use std::sync::Arc;

/// The operation a [`DeviceError`] happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Allocate,
    Open,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Discard => "discard",
            IoOp::WriteZeroes => "write-zeroes",
            IoOp::Allocate => "allocate",
            IoOp::Open => "open",
        };
        f.write_str(s)
    }
}

/// An I/O error with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{op} of {len} bytes at offset {offset} is outside the device ({size} bytes)")]
    OutOfRange {
        op: IoOp,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{op} of {len} bytes at offset {offset} failed on {name}")]
    Io {
        op: IoOp,
        offset: u64,
        len: u64,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("injected {op} error at offset {offset}")]
    Injected { op: IoOp, offset: u64 },
    #[error("device is powered off (simulated power cut)")]
    PoweredOff,
}

impl DeviceError {
    /// True for faults that were injected by a test wrapper.
    pub fn is_injected(&self) -> bool {
        matches!(self, DeviceError::Injected { .. } | DeviceError::PoweredOff)
    }
}

/// Checks that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(op: IoOp, offset: u64, len: u64, size: u64) -> Result<(), DeviceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

/// A byte-addressed storage device shared by several threads.
///
/// Implementations must be safe to call concurrently; two concurrent writes to
/// overlapping ranges leave the range holding one of them, sector by sector.
/// A completed `write_at` is only durable after a later `flush` completes.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes. Constant for the life of the device.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`. The whole range must be inside the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
    /// Writes `buf` at `offset`. The whole range must be inside the device.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Tells the device the range is unused. Reads of it afterwards return
    /// zeros (devices that cannot guarantee that write zeros instead).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len)
    }
    /// Sets the range to zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(IoOp::WriteZeroes, offset, len, self.size())?;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0u64;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
    /// Reserves backing storage for the range so that later writes into it
    /// need not allocate; the contents are unchanged. Only a hint: the
    /// default does nothing (memory, block devices, wrappers). A sparse
    /// file is where it matters: on ext4 an O_DIRECT write into a hole
    /// takes the inode lock exclusively and allocates, which serialises
    /// concurrent writers and costs CPU on every write.
    fn allocate(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(IoOp::Allocate, offset, len, self.size())
    }
    /// A short name for messages (a path, or "mem").
    fn name(&self) -> String {
        String::from("device")
    }
    /// Which file or block device is behind the device (see
    /// [`DeviceIdentity`]); a file's is read now. `None` (the default) for
    /// memory and for wrappers that do not pass their inner device's data
    /// through unchanged.
    fn identity(&self) -> Option<DeviceIdentity> {
        None
    }
    /// A file descriptor whose byte offsets are this device's, for callers
    /// that do asynchronous I/O (io_uring) outside this trait. `None` (the
    /// default) for devices that are not one plain file, and for every
    /// wrapper that adds behaviour (latency, faults, counting), so I/O that
    /// must see that behaviour never bypasses it.
    fn raw_access(&self) -> Option<RawAccess> {
        None
    }
}

/// See [`BlockDevice::raw_access`]. The descriptor stays valid as long as the
/// device that returned it is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAccess {
    pub fd: std::os::fd::RawFd,
    /// Opened with `O_DIRECT`: buffers, offsets and lengths must be aligned
    /// to the device's logical block size.
    pub direct: bool,
    /// The file lives in memory (tmpfs, ramfs): I/O on it never waits for
    /// storage, so a caller may do it synchronously.
    pub memory: bool,
    /// With `direct`: offsets, lengths and buffer addresses must be
    /// multiples of this (a power of two, at most 4096).
    pub align: u64,
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        (**self).write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        (**self).allocate(offset, len)
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn raw_access(&self) -> Option<RawAccess> {
        (**self).raw_access()
    }
    fn identity(&self) -> Option<DeviceIdentity> {
        (**self).identity()
    }
}
