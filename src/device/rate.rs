//! A wrapper that models a device with a transfer rate, like an HDD
//! streaming sequentially: each request costs a fixed latency plus its
//! length divided by the bandwidth, and requests are served one at a time.
//!
//! [`super::LatencyDevice`] charges per request only, so with large
//! requests its bandwidth is unbounded (the copy into memory is all that is
//! left). Writeback and its direct baseline are compared on bandwidth, which
//! needs a source whose time grows with the bytes moved.

use super::{BlockDevice, DeviceError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Cost model of a [`RateDevice`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RateProfile {
    /// Fixed cost of every request (reads, writes, flushes, discards).
    pub latency: Duration,
    /// Bytes per second moved by reads and writes; 0 means unlimited.
    pub bytes_per_sec: u64,
}

impl RateProfile {
    /// Time the device is busy with a request moving `len` bytes.
    pub fn cost(&self, len: u64) -> Duration {
        if self.bytes_per_sec == 0 {
            return self.latency;
        }
        // u128: len * 1e9 cannot overflow. The quotient can exceed u64
        // nanoseconds (huge lengths at low rates): saturate, never wrap.
        let nanos = u128::from(len) * 1_000_000_000 / u128::from(self.bytes_per_sec);
        let transfer = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.latency.saturating_add(transfer)
    }
}

/// Serves requests one at a time, each taking at least its [`RateProfile`]
/// cost. The inner operation runs inside that time (as a DMA transfer would),
/// so a fast inner device adds nothing on top.
pub struct RateDevice<D> {
    inner: D,
    profile: RateProfile,
    head: Mutex<()>,
}

impl<D: BlockDevice> RateDevice<D> {
    pub fn new(inner: D, profile: RateProfile) -> Self {
        RateDevice {
            inner,
            profile,
            head: Mutex::new(()),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    pub fn profile(&self) -> RateProfile {
        self.profile
    }

    fn serve<T>(&self, len: u64, f: impl FnOnce() -> T) -> T {
        let _head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let r = f();
        let busy = self.profile.cost(len);
        let spent = start.elapsed();
        if spent < busy {
            std::thread::sleep(busy - spent);
        }
        r
    }
}

impl<D: BlockDevice> BlockDevice for RateDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        self.serve(len, || self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.serve(buf.len() as u64, || self.inner.write_at(buf, offset))
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.serve(0, || self.inner.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        // No data moves: the fixed cost only.
        self.serve(0, || self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.serve(0, || self.inner.write_zeroes(offset, len))
    }
    fn name(&self) -> String {
        format!("rate({})", self.inner.name())
    }
    fn identity(&self) -> Option<super::DeviceIdentity> {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    #[test]
    fn cost_is_latency_plus_bytes_over_bandwidth() {
        let p = RateProfile {
            latency: Duration::from_millis(1),
            bytes_per_sec: 100 * MIB,
        };
        assert_eq!(p.cost(0), Duration::from_millis(1));
        assert_eq!(p.cost(MIB), Duration::from_millis(11));
        assert_eq!(p.cost(4 * MIB), Duration::from_millis(41));
        let unlimited = RateProfile {
            latency: Duration::from_millis(2),
            bytes_per_sec: 0,
        };
        assert_eq!(unlimited.cost(u64::MAX), Duration::from_millis(2));
        let slow = RateProfile {
            latency: Duration::ZERO,
            bytes_per_sec: 1,
        };
        assert_eq!(slow.cost(u64::MAX), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn requests_take_their_cost_one_at_a_time_and_data_passes() {
        let p = RateProfile {
            latency: Duration::from_millis(1),
            bytes_per_sec: 200 * MIB,
        };
        let dev = Arc::new(RateDevice::new(MemDevice::new(4 * MIB), p));
        // One 2 MiB write: 1 ms + 10 ms.
        let data = vec![7u8; (2 * MIB) as usize];
        let t = Instant::now();
        dev.write_at(&data, 0).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(11));
        let mut back = vec![0u8; (2 * MIB) as usize];
        dev.read_at(&mut back, 0).unwrap();
        assert_eq!(back, data);
        // Two writers at once are served one after the other.
        let t = Instant::now();
        let threads: Vec<_> = (0..2u64)
            .map(|i| {
                let dev = dev.clone();
                std::thread::spawn(move || {
                    dev.write_at(&vec![i as u8; (2 * MIB) as usize], i * 2 * MIB)
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(22), "serial");
        // A flush costs the latency alone.
        let t = Instant::now();
        dev.flush().unwrap();
        let f = t.elapsed();
        assert!(f >= Duration::from_millis(1));
        // Errors of the inner device come through.
        assert!(dev.write_at(&data, 3 * MIB).is_err());
        assert_eq!(dev.name(), "rate(mem)");
    }
}
