//! A wrapper whose operations can be held at gates, so that a test can stop
//! the engine at a chosen point: a source write in flight, a flush before or
//! after it reached the device, a write-zeroes. It can also cut the power:
//! every operation fails from then on.
//!
//! Each gated operation has its own gate. An open gate lets everything
//! through. A closed gate lets through as many operations as it has permits
//! (each takes one) and holds the others until it opens or gets more
//! permits. Every operation that reaches a gate is counted, and so is every
//! one that had to wait there.

use super::{BlockDevice, DeviceError, RawAccess};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The operations a [`GateDevice`] can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateOp {
    Read = 0,
    Write = 1,
    /// A flush, before it reaches the inner device.
    Flush = 2,
    /// A flush that has flushed the inner device, before it returns.
    FlushDone = 3,
    WriteZeroes = 4,
}

const OPS: usize = 5;

#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    closed: bool,
    /// Operations the closed gate still lets through.
    permits: u64,
    /// Operations that reached the gate (passed or held).
    arrived: u64,
    /// Operations that had to wait at the gate.
    held: u64,
}

/// Opens every gate of a [`GateDevice`] when dropped
/// ([`GateDevice::open_on_drop`]).
pub struct OpenOnDrop<'a, D: BlockDevice>(&'a GateDevice<D>);

impl<D: BlockDevice> Drop for OpenOnDrop<'_, D> {
    fn drop(&mut self) {
        self.0.open_all();
    }
}

/// A device wrapper with a gate per [`GateOp`]; all gates start open.
pub struct GateDevice<D> {
    inner: D,
    gates: Mutex<[Gate; OPS]>,
    cond: Condvar,
    off: AtomicBool,
}

impl<D: BlockDevice> GateDevice<D> {
    pub fn new(inner: D) -> Self {
        GateDevice {
            inner,
            gates: Mutex::new([Gate::default(); OPS]),
            cond: Condvar::new(),
            off: AtomicBool::new(false),
        }
    }

    /// The wrapped device (not gated).
    pub fn inner(&self) -> &D {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, [Gate; OPS]> {
        // A test thread that panicked while holding the lock leaves the
        // counts as they were; they are still meaningful.
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate of `op`: later operations wait at it.
    pub fn close(&self, op: GateOp) {
        self.close_after(op, 0);
    }

    /// Closes the gate of `op` with `n` permits: `n` more operations pass,
    /// then they wait.
    pub fn close_after(&self, op: GateOp, n: u64) {
        let mut g = self.lock();
        g[op as usize].closed = true;
        g[op as usize].permits = n;
        drop(g);
        self.cond.notify_all();
    }

    /// Gives the closed gate of `op` `n` more permits (held operations take
    /// them first).
    pub fn let_through(&self, op: GateOp, n: u64) {
        let mut g = self.lock();
        g[op as usize].permits = g[op as usize].permits.saturating_add(n);
        drop(g);
        self.cond.notify_all();
    }

    /// Opens the gate of `op`: held and later operations pass.
    pub fn open(&self, op: GateOp) {
        self.lock()[op as usize].closed = false;
        self.cond.notify_all();
    }

    /// Opens every gate.
    pub fn open_all(&self) {
        for g in self.lock().iter_mut() {
            g.closed = false;
        }
        self.cond.notify_all();
    }

    /// A guard that opens every gate when dropped, also when a test
    /// panics, so threads held at a gate can finish and a failing test
    /// reports its failure instead of hanging in a scoped join.
    pub fn open_on_drop(&self) -> OpenOnDrop<'_, D> {
        OpenOnDrop(self)
    }

    /// Operations of kind `op` that reached the gate so far.
    pub fn arrived(&self, op: GateOp) -> u64 {
        self.lock()[op as usize].arrived
    }

    /// Waits until `n` operations of kind `op` have reached the gate
    /// (passed or held); false if that did not happen within `limit`.
    pub fn wait_arrived(&self, op: GateOp, n: u64, limit: Duration) -> bool {
        self.wait_for(limit, |g| g[op as usize].arrived >= n)
    }

    /// Waits until `n` operations of kind `op` have had to wait at the
    /// gate; false if that did not happen within `limit`.
    pub fn wait_held(&self, op: GateOp, n: u64, limit: Duration) -> bool {
        self.wait_for(limit, |g| g[op as usize].held >= n)
    }

    fn wait_for(&self, limit: Duration, done: impl Fn(&[Gate; OPS]) -> bool) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cond
            .wait_timeout_while(g, limit, |g| !done(g))
            .unwrap_or_else(|p| p.into_inner());
        done(&g)
    }

    /// Cuts the power: every operation fails with `PoweredOff` from now on
    /// (held ones when they pass).
    pub fn power_off(&self) {
        self.off.store(true, SeqCst);
    }

    /// Powers on again after [`GateDevice::power_off`].
    pub fn power_on(&self) {
        self.off.store(false, SeqCst);
    }

    /// Passes the gate of `op`, waiting while it is closed without permits.
    fn pass(&self, op: GateOp) -> Result<(), DeviceError> {
        let mut g = self.lock();
        g[op as usize].arrived += 1;
        let blocked = |g: &[Gate; OPS]| g[op as usize].closed && g[op as usize].permits == 0;
        if blocked(&g) {
            g[op as usize].held += 1;
            self.cond.notify_all();
            while blocked(&g) {
                g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        } else {
            self.cond.notify_all();
        }
        if g[op as usize].closed {
            g[op as usize].permits -= 1;
        }
        drop(g);
        self.powered()
    }

    fn powered(&self) -> Result<(), DeviceError> {
        if self.off.load(SeqCst) {
            Err(DeviceError::PoweredOff)
        } else {
            Ok(())
        }
    }
}

impl<D: BlockDevice> BlockDevice for GateDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.pass(GateOp::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.pass(GateOp::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.pass(GateOp::Flush)?;
        self.inner.flush()?;
        self.pass(GateOp::FlushDone)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.powered()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.pass(GateOp::WriteZeroes)?;
        self.inner.write_zeroes(offset, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.powered()?;
        self.inner.allocate(offset, len)
    }
    fn name(&self) -> String {
        format!("gated {}", self.inner.name())
    }
    fn raw_access(&self) -> Option<RawAccess> {
        // Direct I/O would go around the gates.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;
    use std::sync::Arc;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn closed_gate_holds_after_its_permits_and_counts() {
        let d = Arc::new(GateDevice::new(MemDevice::new(1 << 16)));
        d.close_after(GateOp::Write, 1);
        d.write_at(&[1; 512], 0).unwrap(); // takes the permit
        let t = {
            let d = Arc::clone(&d);
            std::thread::spawn(move || d.write_at(&[2; 512], 512))
        };
        assert!(d.wait_held(GateOp::Write, 1, WAIT));
        assert_eq!(d.arrived(GateOp::Write), 2);
        let mut b = [0u8; 512];
        d.read_at(&mut b, 512).unwrap(); // reads are not gated here
        assert_eq!(b, [0; 512], "the held write went through");
        d.let_through(GateOp::Write, 1);
        t.join().unwrap().unwrap();
        d.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [2; 512]);
        // Still closed, with no permits left: the next one waits again.
        let t = {
            let d = Arc::clone(&d);
            std::thread::spawn(move || d.write_at(&[3; 512], 0))
        };
        assert!(d.wait_held(GateOp::Write, 2, WAIT));
        d.power_off();
        d.open_all();
        assert!(matches!(t.join().unwrap(), Err(DeviceError::PoweredOff)));
        assert!(d.flush().is_err());
    }

    #[test]
    fn flush_done_gate_holds_after_the_inner_flush() {
        let d = Arc::new(GateDevice::new(MemDevice::new(1 << 16)));
        d.close(GateOp::FlushDone);
        let t = {
            let d = Arc::clone(&d);
            std::thread::spawn(move || d.flush())
        };
        assert!(d.wait_held(GateOp::FlushDone, 1, WAIT));
        assert_eq!(d.arrived(GateOp::Flush), 1);
        assert!(!d.wait_held(GateOp::Flush, 1, Duration::from_millis(10)));
        d.open(GateOp::FlushDone);
        t.join().unwrap().unwrap();
    }
}
