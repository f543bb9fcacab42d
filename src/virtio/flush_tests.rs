//! Guest FLUSHes served in batches (`flushq`): many FLUSHes in flight share
//! one engine flush, and a FLUSH that arrives while an engine flush runs is
//! served by the next one, never by the one already running.

use super::*;
use crate::device::DeviceError;
use std::sync::Condvar;

const WAIT: Duration = Duration::from_secs(10);

/// A memory cache device whose flushes can be held at a gate; counts the
/// flushes that reached it.
struct GateDevice {
    inner: MemDevice,
    state: Mutex<Gate>,
    cond: Condvar,
}

struct Gate {
    /// `None`: flushes pass. `Some(n)`: `n` more may pass, the others wait.
    permits: Option<u64>,
    /// Flushes that reached the device (passed or waiting).
    entered: u64,
}

impl GateDevice {
    fn new(size: u64) -> GateDevice {
        GateDevice {
            inner: MemDevice::new(size),
            state: Mutex::new(Gate {
                permits: None,
                entered: 0,
            }),
            cond: Condvar::new(),
        }
    }

    fn set_permits(&self, permits: Option<u64>) {
        self.state.lock().unwrap().permits = permits;
        self.cond.notify_all();
    }

    fn entered(&self) -> u64 {
        self.state.lock().unwrap().entered
    }

    /// Waits until `n` flushes have entered (false after [`WAIT`]).
    fn wait_entered(&self, n: u64) -> bool {
        let g = self.state.lock().unwrap();
        let (g, _) = self
            .cond
            .wait_timeout_while(g, WAIT, |s| s.entered < n)
            .unwrap();
        g.entered >= n
    }
}

impl BlockDevice for GateDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        let mut g = self.state.lock().unwrap();
        g.entered += 1;
        self.cond.notify_all();
        while g.permits == Some(0) {
            g = self.cond.wait(g).unwrap();
        }
        if let Some(n) = g.permits.as_mut() {
            *n -= 1;
        }
        drop(g);
        self.inner.flush()
    }
}

/// Publishes a FLUSH in slot `k` of queue 0, descriptors `2k` and `2k+1`.
fn publish_flush(g: &Guest, k: u16) -> Slot {
    let s = Guest::slot(0, u64::from(k));
    g.reset_status(&s);
    g.header(s.hdr, VIRTIO_BLK_T_FLUSH, 0);
    let head = g.chain(0, 2 * k, &[(s.hdr, 16, 0), (s.status, 1, W)]);
    g.publish(0, head);
    s
}

/// Publishes a 4 KiB write of `data` at sector 0 in slot `k` of queue 0,
/// descriptors `2k`..`2k+2`.
fn publish_write(g: &Guest, k: u16, data: &[u8]) -> Slot {
    let s = Guest::slot(0, u64::from(k));
    g.reset_status(&s);
    g.header(s.hdr, VIRTIO_BLK_T_OUT, 0);
    g.mem.write_slice(data, GuestAddress(s.data)).unwrap();
    let head = g.chain(
        0,
        2 * k,
        &[(s.hdr, 16, 0), (s.data, 4096, 0), (s.status, 1, W)],
    );
    g.publish(0, head);
    s
}

#[test]
fn flushes_in_flight_share_one_engine_flush() {
    let slow_flush = LatencyProfile {
        flush: Duration::from_millis(30),
        ..LatencyProfile::default()
    };
    let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DISK));
    let cache: Arc<dyn BlockDevice> =
        Arc::new(LatencyDevice::new(MemDevice::new(1 << 20), slow_flush));
    let mut g = Guest::with_devices(1, limits(), source, cache);
    // Something to flush, so that the first engine flush takes 30 ms while
    // the queue pops the other FLUSHes.
    let w = publish_write(&g, 0, &pattern(1));
    g.run(0);
    assert_eq!(g.take_used(0).len(), 1);
    assert_eq!(g.status(w.status), OK);

    let before = g.engine.stats().flushes;
    let slots: Vec<Slot> = (0..7).map(|k| publish_flush(&g, k)).collect();
    g.run(0);
    assert_eq!(g.take_used(0).len(), 7);
    for s in &slots {
        assert_eq!(g.status(s.status), OK);
    }
    let batches = g.backend.flush_batches();
    assert!(
        (1..=2).contains(&batches),
        "7 FLUSHes in flight took {batches} engine flushes"
    );
    // Each guest FLUSH still counts in the statistics.
    assert_eq!(g.engine.stats().flushes - before, 7);
}

#[test]
fn a_flush_received_during_an_engine_flush_waits_for_the_next() {
    let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DISK));
    let gate = Arc::new(GateDevice::new(1 << 20));
    let cache: Arc<dyn BlockDevice> = gate.clone();
    let mut g = Guest::with_devices(1, limits(), source, cache);
    // Block 0 cached dirty and committed: the overwrites below change no
    // mapping, so each engine flush is exactly one cache device flush.
    publish_write(&g, 0, &pattern(1));
    g.run(0);
    publish_flush(&g, 1);
    g.run(0);
    publish_write(&g, 2, &pattern(2));
    g.run(0);
    assert_eq!(g.take_used(0).len(), 3);

    // F1's engine flush is held at the device.
    gate.set_permits(Some(0));
    let entered = gate.entered();
    let f1 = publish_flush(&g, 3);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert!(
        gate.wait_entered(entered + 1),
        "F1's flush never reached the device"
    );

    // A write completes while F1's flush is held (on the pool's other
    // thread), then F2 arrives: only a flush that starts after F2 covers it.
    let w2 = publish_write(&g, 4, &pattern(3));
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let next = g.used_seen[0].wrapping_add(1);
    assert!(wait_used(&g, next, WAIT), "the write never completed");
    assert_eq!(g.take_used(0).len(), 1);
    assert_eq!(g.status(w2.status), OK);
    let f2 = publish_flush(&g, 6);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let at_f2 = gate.entered();

    // Let F1's flush through: F2 must now wait for a flush of its own,
    // which is held in turn.
    gate.set_permits(Some(1));
    assert!(gate.wait_entered(at_f2 + 1), "no flush after F2 arrived");
    let next = g.used_seen[0].wrapping_add(1);
    assert!(wait_used(&g, next, WAIT), "F1 never completed");
    assert_eq!(g.take_used(0).len(), 1);
    assert_eq!(g.status(f1.status), OK);
    assert_eq!(
        g.status(f2.status),
        UNTOUCHED,
        "F2 was completed by the flush that was running when it arrived"
    );

    gate.set_permits(None);
    assert!(g.backend.drain(WAIT), "drain");
    assert_eq!(g.take_used(0).len(), 1);
    assert_eq!(g.status(f2.status), OK);
}
