//! Guest FLUSHes served in batches (`flushq`): many FLUSHes in flight share
//! one engine flush, and a FLUSH that arrives while an engine flush runs is
//! served by the next one, never by the one already running.

use super::*;
use crate::device::{GateDevice, GateOp};

const WAIT: Duration = Duration::from_secs(10);

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
    let gate = Arc::new(GateDevice::new(MemDevice::new(1 << 20)));
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
    gate.close(GateOp::Flush);
    let entered = gate.arrived(GateOp::Flush);
    let f1 = publish_flush(&g, 3);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    assert!(
        gate.wait_arrived(GateOp::Flush, entered + 1, WAIT),
        "F1's flush never reached the device"
    );

    // A write completes while F1's flush is held (on the pool's other
    // thread), then F2 arrives: only a flush that starts after F2 covers it.
    // It is answered (its status written) but stays off the used ring
    // until F1, taken before it, is posted (`order`).
    let w2 = publish_write(&g, 4, &pattern(3));
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let deadline = Instant::now() + WAIT;
    while g.status(w2.status) != OK {
        assert!(Instant::now() < deadline, "the write never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(g.take_used(0).len(), 0, "the write was posted before F1");
    let f2 = publish_flush(&g, 6);
    g.backend.process_queue(0, &g.vrings[0]).unwrap();
    let at_f2 = gate.arrived(GateOp::Flush);

    // Let F1's flush through: F2 must now wait for a flush of its own,
    // which is held in turn.
    gate.let_through(GateOp::Flush, 1);
    assert!(
        gate.wait_arrived(GateOp::Flush, at_f2 + 1, WAIT),
        "no flush after F2 arrived"
    );
    let next = g.used_seen[0].wrapping_add(2);
    assert!(wait_used(&g, next, WAIT), "F1 never completed");
    assert_eq!(g.take_used(0).len(), 2, "F1, then the write");
    assert_eq!(g.status(f1.status), OK);
    assert_eq!(
        g.status(f2.status),
        UNTOUCHED,
        "F2 was completed by the flush that was running when it arrived"
    );

    gate.open(GateOp::Flush);
    assert!(g.backend.drain(WAIT), "drain");
    assert_eq!(g.take_used(0).len(), 1);
    assert_eq!(g.status(f2.status), OK);
}
