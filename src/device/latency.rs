//! A wrapper that adds latency, to emulate a slow HDD or a remote source.

use super::{BlockDevice, DeviceError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency added to each operation.
#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyProfile {
    pub read: Duration,
    pub write: Duration,
    pub flush: Duration,
    /// Serve one request at a time, like a single disk head. When false the
    /// latencies overlap, like a remote store with many requests in flight.
    pub serial: bool,
    /// Up to this much extra latency, varying from request to request
    /// (pseudo-random), so requests can complete out of order.
    pub jitter: Duration,
}

impl LatencyProfile {
    /// The same latency for reads, writes and flushes, requests overlapping.
    pub fn uniform(d: Duration) -> Self {
        LatencyProfile {
            read: d,
            write: d,
            flush: d,
            serial: false,
            jitter: Duration::ZERO,
        }
    }
}

/// Sleeps before each operation on the inner device.
pub struct LatencyDevice<D> {
    inner: D,
    profile: LatencyProfile,
    head: Mutex<()>,
    counter: AtomicU64,
}

impl<D: BlockDevice> LatencyDevice<D> {
    pub fn new(inner: D, profile: LatencyProfile) -> Self {
        LatencyDevice {
            inner,
            profile,
            head: Mutex::new(()),
            counter: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    fn delay<T>(&self, d: Duration, f: impl FnOnce() -> T) -> T {
        let j = self.profile.jitter.as_nanos() as u64;
        let d = if j == 0 {
            d
        } else {
            // splitmix64 of a request counter: cheap, deterministic per run.
            let mut x = self
                .counter
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            d + Duration::from_nanos(x % j)
        };
        if d.is_zero() {
            return f();
        }
        if self.profile.serial {
            let _g = self.head.lock().unwrap_or_else(|p| p.into_inner());
            std::thread::sleep(d);
            f()
        } else {
            std::thread::sleep(d);
            f()
        }
    }
}

impl<D: BlockDevice> BlockDevice for LatencyDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.delay(self.profile.read, || self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.delay(self.profile.write, || self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.delay(self.profile.flush, || self.inner.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.delay(self.profile.write, || self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.delay(self.profile.write, || self.inner.write_zeroes(offset, len))
    }
    fn name(&self) -> String {
        format!("latency({})", self.inner.name())
    }
    fn identity(&self) -> Option<super::DeviceIdentity> {
        self.inner.identity()
    }
}
