//! A wrapper that counts operations, for tests that check how much I/O a
//! request causes (for example, how many flushes one guest FLUSH produces).

use super::{BlockDevice, DeviceError};
use std::sync::atomic::{AtomicU64, Ordering};

/// Operation counters of a [`CountingDevice`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IoCounts {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// Counts the operations that reach the inner device.
pub struct CountingDevice<D> {
    inner: D,
    c: Counters,
}

impl<D: BlockDevice> CountingDevice<D> {
    pub fn new(inner: D) -> Self {
        CountingDevice {
            inner,
            c: Counters::default(),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// A snapshot of the counters.
    pub fn counts(&self) -> IoCounts {
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        IoCounts {
            reads: l(&self.c.reads),
            writes: l(&self.c.writes),
            flushes: l(&self.c.flushes),
            discards: l(&self.c.discards),
            write_zeroes: l(&self.c.write_zeroes),
            bytes_read: l(&self.c.bytes_read),
            bytes_written: l(&self.c.bytes_written),
        }
    }
}

impl<D: BlockDevice> BlockDevice for CountingDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.c.reads.fetch_add(1, Ordering::SeqCst);
        self.c
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.c.writes.fetch_add(1, Ordering::SeqCst);
        self.c
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.c.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.c.discards.fetch_add(1, Ordering::SeqCst);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.c.write_zeroes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(offset, len)
    }
    fn name(&self) -> String {
        self.inner.name()
    }
}
