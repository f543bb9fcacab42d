//! A wrapper that injects I/O errors.

use super::{BlockDevice, DeviceError, IoOp};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which operations fail. All fields can be changed while the device is in use.
#[derive(Debug, Default)]
pub struct FaultPlan {
    pub fail_reads: AtomicBool,
    pub fail_writes: AtomicBool,
    pub fail_flushes: AtomicBool,
    /// When non-zero, every operation after this many successful ones fails.
    pub fail_after: AtomicU64,
}

/// Fails operations on the inner device as its [`FaultPlan`] says.
pub struct FaultDevice<D> {
    inner: D,
    plan: FaultPlan,
    ops: AtomicU64,
}

impl<D: BlockDevice> FaultDevice<D> {
    pub fn new(inner: D) -> Self {
        FaultDevice {
            inner,
            plan: FaultPlan::default(),
            ops: AtomicU64::new(0),
        }
    }

    /// The live fault plan.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Clears every fault.
    pub fn heal(&self) {
        self.plan.fail_reads.store(false, Ordering::SeqCst);
        self.plan.fail_writes.store(false, Ordering::SeqCst);
        self.plan.fail_flushes.store(false, Ordering::SeqCst);
        self.plan.fail_after.store(0, Ordering::SeqCst);
    }

    fn check(&self, op: IoOp, offset: u64) -> Result<(), DeviceError> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst) + 1;
        let after = self.plan.fail_after.load(Ordering::SeqCst);
        let flag = match op {
            IoOp::Read => &self.plan.fail_reads,
            IoOp::Flush => &self.plan.fail_flushes,
            _ => &self.plan.fail_writes,
        };
        if flag.load(Ordering::SeqCst) || (after != 0 && n > after) {
            return Err(DeviceError::Injected { op, offset });
        }
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for FaultDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.check(IoOp::Read, offset)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.check(IoOp::Write, offset)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.check(IoOp::Flush, 0)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(IoOp::Discard, offset)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check(IoOp::WriteZeroes, offset)?;
        self.inner.write_zeroes(offset, len)
    }
    fn name(&self) -> String {
        format!("fault({})", self.inner.name())
    }
}
