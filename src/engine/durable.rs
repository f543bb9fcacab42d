//! Flushes that stay failed once one has failed.
//!
//! When a device flush fails, the writes it should have made durable may be
//! lost although they still read back: Linux may mark the pages of a failed
//! `fsync` clean, a disk may drop its volatile cache. A later flush that
//! succeeds does not bring them back, so it must not be reported as making
//! them durable. Invariant: after the first failed flush of a device, every
//! later flush of it through [`StickyFlush`] fails without being tried
//! (qemu's file driver does the same after a failed `fdatasync`). For the
//! cache device this freezes the durable metadata at its last good commit:
//! no journal record or table is written any more, so after a restart the
//! cache is what its last successful FLUSH promised. The device is trusted
//! again only after a restart.

use super::EngineError;
use crate::device::{BlockDevice, DeviceError};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

/// The flush state of one device (see the module comment).
#[derive(Default)]
pub(crate) struct StickyFlush {
    failed: AtomicBool,
}

impl StickyFlush {
    /// Flushes `dev`, or fails at once if a flush of it failed before.
    /// `wrap` turns the device's own error into the engine's (cache or
    /// source).
    pub fn flush(
        &self,
        dev: &dyn BlockDevice,
        wrap: fn(DeviceError) -> EngineError,
    ) -> Result<(), EngineError> {
        if self.failed.load(SeqCst) {
            return Err(EngineError::EarlierFlushFailed { device: dev.name() });
        }
        dev.flush().map_err(|e| {
            self.fail(dev, &e);
            wrap(e)
        })
    }

    /// Marks the device as no longer able to promise durability: a metadata
    /// write whose outcome is unknown (a superblock write that failed) makes
    /// any later metadata write unsafe, as a failed flush does.
    pub fn fail(&self, dev: &dyn BlockDevice, why: &dyn std::fmt::Display) {
        if !self.failed.swap(true, SeqCst) {
            log::error!(
                "{}: {why}; writes since the last successful flush may not be durable, so every \
                 later flush (guest FLUSH, commit, writeback, shutdown) fails; restart the daemon \
                 once the device is healthy",
                dev.name()
            );
        }
    }

    /// True once a flush has failed.
    pub fn failed(&self) -> bool {
        self.failed.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{CountingDevice, FaultDevice, MemDevice};

    #[test]
    fn a_failed_flush_fails_every_later_one_without_trying() {
        let dev = CountingDevice::new(FaultDevice::new(MemDevice::new(4096)));
        let s = StickyFlush::default();
        assert!(s.flush(&dev, EngineError::Cache).is_ok());
        dev.inner().plan().fail_flushes.store(true, SeqCst);
        assert!(matches!(
            s.flush(&dev, EngineError::Cache),
            Err(EngineError::Cache(_))
        ));
        dev.inner().heal();
        let flushes = dev.counts().flushes;
        assert!(matches!(
            s.flush(&dev, EngineError::Cache),
            Err(EngineError::EarlierFlushFailed { .. })
        ));
        assert_eq!(dev.counts().flushes, flushes, "the device was not asked");
        assert!(s.failed());
    }
}
