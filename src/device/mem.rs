//! An in-memory device for tests and benchmarks.

use super::{check_range, BlockDevice, DeviceError, IoOp};
use std::sync::RwLock;

/// Bytes per lock shard. Independent shards let threads touch different parts
/// of the device at once.
const SHARD: u64 = 1 << 20;

/// A RAM-backed device. Every write is durable at once (no write cache).
pub struct MemDevice {
    size: u64,
    shards: Vec<RwLock<Vec<u8>>>,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(SHARD) as usize;
        let shards = (0..n)
            .map(|i| {
                let start = i as u64 * SHARD;
                RwLock::new(vec![0u8; (size - start).min(SHARD) as usize])
            })
            .collect();
        MemDevice { size, shards }
    }

    /// A device holding `data`.
    pub fn from_bytes(data: &[u8]) -> Self {
        let dev = MemDevice::new(data.len() as u64);
        // In range by construction.
        let _ = dev.write_at(data, 0);
        dev
    }

    /// A copy of the whole content.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        let _ = self.read_at(&mut out, 0);
        out
    }

    fn for_each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        // f(shard, shard_off, buf_off, n)
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let shard = (pos / SHARD) as usize;
            let soff = (pos % SHARD) as usize;
            let n = (SHARD - pos % SHARD).min(len - done) as usize;
            f(shard, soff, done as usize, n);
            done += n as u64;
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        check_range(IoOp::Read, offset, buf.len() as u64, self.size)?;
        self.for_each_piece(offset, buf.len() as u64, |s, so, bo, n| {
            let shard = self.shards[s].read().unwrap_or_else(|p| p.into_inner());
            buf[bo..bo + n].copy_from_slice(&shard[so..so + n]);
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        check_range(IoOp::Write, offset, buf.len() as u64, self.size)?;
        self.for_each_piece(offset, buf.len() as u64, |s, so, bo, n| {
            let mut shard = self.shards[s].write().unwrap_or_else(|p| p.into_inner());
            shard[so..so + n].copy_from_slice(&buf[bo..bo + n]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(IoOp::WriteZeroes, offset, len, self.size)?;
        self.for_each_piece(offset, len, |s, so, _, n| {
            let mut shard = self.shards[s].write().unwrap_or_else(|p| p.into_inner());
            shard[so..so + n].fill(0);
        });
        Ok(())
    }

    fn name(&self) -> String {
        String::from("mem")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_across_shards() {
        let dev = MemDevice::new(3 * SHARD + 100);
        let data: Vec<u8> = (0..SHARD + 10).map(|i| i as u8).collect();
        dev.write_at(&data, SHARD - 5).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, SHARD - 5).unwrap();
        assert_eq!(back, data);
        assert!(dev.read_at(&mut [0u8; 200], 3 * SHARD).is_err());
        dev.write_zeroes(SHARD, 10).unwrap();
        dev.read_at(&mut back[..10], SHARD).unwrap();
        assert_eq!(&back[..10], &[0u8; 10]);
    }
}
