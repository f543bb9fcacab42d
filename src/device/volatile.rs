//! A model of a disk with a volatile write cache, for crash tests.
//!
//! Completed writes sit in a RAM cache until the next `flush`; a simulated
//! power cut keeps any subset of them (chosen by the test), sector by sector,
//! and drops the rest. Operations can also be counted and the power cut at a
//! given operation index, so a test can crash at every point of a workload.

use super::{BlockDevice, DeviceError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Size of the unit that a power cut keeps or drops atomically.
pub const SECTOR: u64 = 512;

struct Pending {
    offset: u64,
    data: Vec<u8>,
}

/// Wraps a durable device with a volatile write cache.
///
/// Invariant: `inner` holds exactly the state that would survive a power cut
/// that drops every unflushed write; reads see `inner` with the pending writes
/// applied in completion order.
pub struct VolatileCacheDevice<D> {
    inner: D,
    pending: Mutex<Vec<Pending>>,
    ops: AtomicU64,
    /// Operation index after which the device behaves as powered off (0 = never).
    cut_after: AtomicU64,
    off: AtomicBool,
}

impl<D: BlockDevice> VolatileCacheDevice<D> {
    pub fn new(inner: D) -> Self {
        VolatileCacheDevice {
            inner,
            pending: Mutex::new(Vec::new()),
            ops: AtomicU64::new(0),
            cut_after: AtomicU64::new(0),
            off: AtomicBool::new(false),
        }
    }

    /// The durable device underneath.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Operations seen so far (reads, writes, flushes, discards).
    pub fn op_count(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// After `n` more operations complete, every later one fails with
    /// [`DeviceError::PoweredOff`] until [`power_cut`](Self::power_cut).
    pub fn cut_power_after(&self, n: u64) {
        let now = self.ops.load(Ordering::SeqCst);
        self.cut_after.store(now + n, Ordering::SeqCst);
    }

    /// Number of writes not yet flushed.
    pub fn pending_writes(&self) -> usize {
        self.lock().len()
    }

    /// Simulates losing power: for each pending write `i` and each of its
    /// sectors `s`, `keep(i, s)` says whether that sector reached the medium.
    /// Kept sectors are applied in completion order. The device is usable
    /// (powered on) again afterwards.
    pub fn power_cut(&self, mut keep: impl FnMut(usize, u64) -> bool) -> Result<(), DeviceError> {
        let pending = std::mem::take(&mut *self.lock());
        for (i, p) in pending.iter().enumerate() {
            let mut s = 0u64;
            let len = p.data.len() as u64;
            while s * SECTOR < len {
                let start = s * SECTOR;
                let end = (start + SECTOR).min(len);
                if keep(i, s) {
                    self.inner
                        .write_at(&p.data[start as usize..end as usize], p.offset + start)?;
                }
                s += 1;
            }
        }
        self.off.store(false, Ordering::SeqCst);
        self.cut_after.store(0, Ordering::SeqCst);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> Result<(), DeviceError> {
        if self.off.load(Ordering::SeqCst) {
            return Err(DeviceError::PoweredOff);
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        let cut = self.cut_after.load(Ordering::SeqCst);
        if cut != 0 && n > cut {
            self.off.store(true, Ordering::SeqCst);
            return Err(DeviceError::PoweredOff);
        }
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for VolatileCacheDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.tick()?;
        let pending = self.lock();
        self.inner.read_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for p in pending.iter() {
            let pend = p.offset + p.data.len() as u64;
            let lo = p.offset.max(offset);
            let hi = pend.min(end);
            if lo < hi {
                buf[(lo - offset) as usize..(hi - offset) as usize]
                    .copy_from_slice(&p.data[(lo - p.offset) as usize..(hi - p.offset) as usize]);
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.tick()?;
        super::check_range(super::IoOp::Write, offset, buf.len() as u64, self.size())?;
        self.lock().push(Pending {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.tick()?;
        let mut pending = self.lock();
        for p in pending.iter() {
            self.inner.write_at(&p.data, p.offset)?;
        }
        pending.clear();
        self.inner.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        super::check_range(super::IoOp::WriteZeroes, offset, len, self.size())?;
        let zeros = vec![
            0u8;
            usize::try_from(len).map_err(|_| DeviceError::OutOfRange {
                op: super::IoOp::WriteZeroes,
                offset,
                len,
                size: self.size(),
            })?
        ];
        self.write_at(&zeros, offset)
    }

    fn name(&self) -> String {
        format!("volatile({})", self.inner.name())
    }
}

#[cfg(test)]
mod tests {
    use super::super::MemDevice;
    use super::*;

    #[test]
    fn unflushed_writes_can_be_lost() {
        let d = VolatileCacheDevice::new(MemDevice::new(8192));
        d.write_at(&[1u8; 1024], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2u8; 1024], 0).unwrap();
        let mut b = [0u8; 1024];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [2u8; 1024]);
        // Keep only the first sector of the unflushed write: a torn write.
        d.power_cut(|_, s| s == 0).unwrap();
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(&b[..512], &[2u8; 512]);
        assert_eq!(&b[512..], &[1u8; 512]);
    }

    #[test]
    fn cut_after_n_ops() {
        let d = VolatileCacheDevice::new(MemDevice::new(4096));
        d.cut_power_after(2);
        d.write_at(&[1u8; 512], 0).unwrap();
        d.flush().unwrap();
        assert!(matches!(
            d.write_at(&[2u8; 512], 0),
            Err(DeviceError::PoweredOff)
        ));
        d.power_cut(|_, _| true).unwrap();
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1u8; 512]);
    }
}
