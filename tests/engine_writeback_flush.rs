//! Writeback flushes the source itself: a guest FLUSH that arrives while a
//! writeback pass waits for the source's flush neither waits for it nor
//! commits the written-back blocks clean, and a crash at that moment loses
//! nothing that FLUSH covered. Also: a frame freed while its writeback awaits
//! the source flush, a failed source flush, and two passes at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vblkcache::device::{
    BlockDevice, DeviceError, FaultDevice, GateDevice, GateOp, MemDevice, VolatileCacheDevice,
};
use vblkcache::engine::{
    Engine, EngineConfig, EngineError, GeometryRequest, WriteMode, WritebackConfig,
};

const BS: usize = 4096;
const WAIT: Duration = Duration::from_secs(10);

/// A source with a volatile write cache whose operations can be held at
/// gates until the test opens them, and whose power can be cut. Not zeros,
/// so that a lost write-zeroes and a lost writeback differ from the old
/// content.
type GatedSource = GateDevice<VolatileCacheDevice<MemDevice>>;

fn gated_source(size: usize) -> GatedSource {
    GateDevice::new(VolatileCacheDevice::new(MemDevice::from_bytes(&vec![
        0x11u8;
        size
    ])))
}

/// Waits until an operation has been held at the closed gate of `op`.
fn held(src: &GatedSource, op: GateOp) -> bool {
    src.wait_held(op, 1, WAIT)
}

/// A write-back engine on a gated source and a volatile cache device, with
/// the format made durable.
fn rig() -> (
    Arc<GatedSource>,
    Arc<VolatileCacheDevice<MemDevice>>,
    Engine,
) {
    let src = Arc::new(gated_source(64 * BS));
    let cache = Arc::new(VolatileCacheDevice::new(MemDevice::new(4 << 20)));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(WriteMode::Writeback))).unwrap();
    e.flush().unwrap();
    src.inner().flush().unwrap();
    cache.flush().unwrap();
    (src, cache, e)
}

/// Cuts the power: both devices fail from now on, then lose every write
/// not flushed, and come back.
fn power_cut(src: &GatedSource, cache: &VolatileCacheDevice<MemDevice>) {
    src.power_off();
    cache.cut_power_after(0);
    src.open_all();
}

/// After `power_cut`, once the engine is gone: drops the unflushed writes,
/// powers on and reopens.
fn recover(src: &Arc<GatedSource>, cache: &Arc<VolatileCacheDevice<MemDevice>>) -> Engine {
    src.inner().power_cut(|_, _| false).unwrap();
    cache.power_cut(|_, _| false).unwrap();
    src.power_on();
    Engine::open(src.clone(), cache.clone(), cfg(None)).unwrap()
}

/// No background writeback: each test's passes are the only ones.
const NO_BACKGROUND: WritebackConfig = WritebackConfig {
    high_watermark_pct: 100,
    low_watermark_pct: 25,
    max_run_bytes: 4 << 20,
    max_inflight_runs: 16,
    idle_drain_after: None,
};

/// Runs a guest FLUSH on a thread of `s` and waits at most `limit` for it:
/// whether it succeeded, or a timeout (the thread then runs on).
fn flush_within<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    e: &'scope Engine,
    limit: Duration,
) -> Result<bool, mpsc::RecvTimeoutError> {
    let (tx, rx) = mpsc::channel();
    s.spawn(move || {
        let _ = tx.send(e.flush().is_ok());
    });
    rx.recv_timeout(limit)
}

fn cfg(mode: Option<WriteMode>) -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(64),
            assoc: Some(8),
        },
        mode,
        writeback: NO_BACKGROUND,
        ..EngineConfig::default()
    }
}

/// Writes block 3 (committed dirty by a FLUSH first if `committed`), starts
/// `flush_all` and holds its source flush; a guest FLUSH must complete
/// meanwhile. Then the power is cut with every unflushed write lost, and the
/// reopened cache must still return the block.
fn guest_flush_during_writeback_flush(committed: bool) {
    let (src, cache, e) = rig();
    let data = vec![0xA5u8; BS];
    e.write(3 * BS as u64, &data).unwrap();
    if committed {
        e.flush().unwrap();
    }
    src.close(GateOp::Flush);
    std::thread::scope(|s| {
        // Opens the gates when this closure ends, also on a failed assertion.
        let _open = src.open_on_drop();
        let wb = s.spawn(|| e.flush_all(&mut |_| {}));
        assert!(
            held(&src, GateOp::Flush),
            "flush_all never flushed the source"
        );
        // The block was written to the source (not durably) and is clean in
        // RAM now. A guest FLUSH must not wait for the held source flush.
        let ok = flush_within(s, &e, WAIT);
        // Power cut while the source flush is still held: the source loses
        // the written-back block, the cache keeps what was flushed.
        power_cut(&src, &cache);
        assert_eq!(
            ok,
            Ok(true),
            "a guest FLUSH waited for (or failed with) the writeback's source flush"
        );
        assert!(
            wb.join().unwrap().is_err(),
            "flush_all succeeded without power"
        );
    });
    e.halt();
    drop(e);
    let e = recover(&src, &cache);
    let mut on_source = vec![0u8; BS];
    src.inner().read_at(&mut on_source, 3 * BS as u64).unwrap();
    assert_ne!(
        on_source, data,
        "the test needs the source write to be lost"
    );
    let mut back = vec![0u8; BS];
    e.read(3 * BS as u64, &mut back).unwrap();
    assert!(
        back == data,
        "a write completed before a completed FLUSH was lost after the crash"
    );
    // And the recovered dirty block reaches the source.
    e.flush_all(&mut |_| {}).unwrap();
    src.inner().read_at(&mut on_source, 3 * BS as u64).unwrap();
    assert!(on_source == data);
}

#[test]
fn guest_flush_during_writeback_of_uncommitted_block() {
    guest_flush_during_writeback_flush(false);
}

#[test]
fn guest_flush_during_writeback_of_committed_block() {
    guest_flush_during_writeback_flush(true);
}

/// A source flush that fails leaves the written-back blocks dirty. Every
/// later flush of that source fails too (what the failed one lost may not
/// come back), until a restart: then the blocks, committed dirty, are written
/// back again.
#[test]
fn failed_source_flush_keeps_blocks_dirty() {
    let src = Arc::new(FaultDevice::new(MemDevice::new((64 * BS) as u64)));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let e = Engine::open(src.clone(), cache.clone(), cfg(Some(WriteMode::Writeback))).unwrap();
    e.write(0, &vec![7u8; 2 * BS]).unwrap();
    e.flush().unwrap();
    assert_eq!(e.dirty_blocks(), 2);
    src.plan().fail_flushes.store(true, SeqCst);
    assert!(e.flush_all(&mut |_| {}).is_err());
    assert_eq!(
        e.dirty_blocks(),
        2,
        "blocks marked clean without a source flush"
    );
    src.heal();
    let again = e.flush_all(&mut |_| {});
    assert!(
        matches!(again, Err(EngineError::EarlierFlushFailed { .. })),
        "writeback after a failed source flush: {again:?}"
    );
    assert_eq!(e.dirty_blocks(), 2);
    assert!(e.shutdown(false).is_err(), "persisted after a failed flush");
    drop(e);
    let e = Engine::open(src.clone(), cache.clone(), cfg(None)).unwrap();
    assert_eq!(e.dirty_blocks(), 2, "the committed dirty blocks came back");
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    let mut back = vec![0u8; 2 * BS];
    src.inner().read_at(&mut back, 0).unwrap();
    assert!(back == vec![7u8; 2 * BS]);
}

/// A block written back to a source not flushed since, then zeroed by the
/// guest: the frame is freed before the source is zeroed. A guest FLUSH in
/// that window must flush the source before it records the frame free;
/// else a crash leaves the block with the source's content from before the
/// writeback: neither the flushed data nor zeros.
#[test]
fn guest_flush_between_free_and_zeroing_of_written_back_block() {
    let (src, cache, e) = rig();
    let data = vec![0x5Au8; BS];
    e.write(5 * BS as u64, &data).unwrap();
    e.flush().unwrap();
    src.close(GateOp::Flush);
    src.close(GateOp::WriteZeroes);
    std::thread::scope(|s| {
        // Opens the gates when this closure ends, also on a failed assertion.
        let _open = src.open_on_drop();
        let wb = s.spawn(|| e.flush_all(&mut |_| {}));
        assert!(
            held(&src, GateOp::Flush),
            "flush_all never flushed the source"
        );
        let zero = s.spawn(|| e.write_zeroes(5 * BS as u64, BS as u64));
        assert!(
            held(&src, GateOp::WriteZeroes),
            "write_zeroes never reached the source"
        );
        // The frame is free now and the zeroing held. A guest FLUSH may not
        // complete without the (held) source flush; give it time to go wrong.
        let early = flush_within(s, &e, Duration::from_millis(500));
        power_cut(&src, &cache);
        assert_ne!(
            early,
            Ok(true),
            "the FLUSH completed without flushing the source"
        );
        assert!(wb.join().unwrap().is_err());
        assert!(zero.join().unwrap().is_err());
    });
    e.halt();
    drop(e);
    let e = recover(&src, &cache);
    let mut back = vec![0u8; BS];
    e.read(5 * BS as u64, &mut back).unwrap();
    assert!(
        back == data || back == vec![0u8; BS],
        "after the crash the block is neither its flushed data nor zeros"
    );
}

/// Two writeback passes at once (background writeback and `flush_all` can
/// overlap). Pass A has flushed the source but not yet settled its frames
/// when the block is written again and pass B writes the new data back. A's
/// settling must not clear the hold B's (unflushed) write put on the frame,
/// or the next commit records the block clean and a crash loses data a
/// completed FLUSH covered.
#[test]
fn overlapping_passes_do_not_settle_each_others_writes() {
    let (src, cache, e) = rig();
    let at = 7 * BS as u64;
    e.write(at, &vec![1u8; BS]).unwrap();
    e.flush().unwrap();
    src.close(GateOp::FlushDone);
    std::thread::scope(|s| {
        // Opens the gates when this closure ends, also on a failed assertion.
        let _open = src.open_on_drop();
        let a = s.spawn(|| e.flush_all(&mut |_| {}));
        assert!(
            held(&src, GateOp::FlushDone),
            "pass A never flushed the source"
        );
        // Later flushes are held before they reach the device.
        src.close(GateOp::Flush);
        let v2 = vec![2u8; BS];
        e.write(at, &v2).unwrap();
        let b = s.spawn(|| e.flush_all(&mut |_| {}));
        // Give B time to write the block back (it may have to wait for A).
        src.wait_held(GateOp::Flush, 1, Duration::from_millis(500));
        src.open(GateOp::FlushDone);
        assert!(a.join().unwrap().is_ok());
        assert!(held(&src, GateOp::Flush), "pass B never flushed the source");
        // B's write of v2 is not durable; a FLUSH now covers v2.
        let ok = flush_within(s, &e, WAIT);
        power_cut(&src, &cache);
        assert_eq!(ok, Ok(true), "the guest FLUSH did not complete");
        assert!(b.join().unwrap().is_err());
    });
    e.halt();
    drop(e);
    let e = recover(&src, &cache);
    let mut back = vec![0u8; BS];
    e.read(at, &mut back).unwrap();
    assert!(
        back == vec![2u8; BS],
        "a write completed before a completed FLUSH was lost after the crash"
    );
}

/// A set whose only reusable frames wait for a pass's source flush does not
/// make a miss wait for the rest of the pass: the miss flushes the source
/// itself and takes a frame.
#[test]
fn miss_in_a_set_held_by_writeback_flushes_the_source_itself() {
    let src = Arc::new(gated_source(64 * BS));
    let cache = Arc::new(VolatileCacheDevice::new(MemDevice::new(4 << 20)));
    let one_set = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(8),
            assoc: Some(8),
        },
        ..cfg(Some(WriteMode::Writeback))
    };
    let e = Engine::open(src.clone(), cache.clone(), one_set).unwrap();
    // Two runs of dirty blocks fill the only set, committed dirty.
    for b in [0u64, 1, 2, 3, 10, 11, 12, 13] {
        e.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    e.flush().unwrap();
    // The first run reaches the source, the second is held there.
    src.close_after(GateOp::Write, 1);
    std::thread::scope(|s| {
        // Opens the gates when this closure ends, also on a failed assertion.
        let _open = src.open_on_drop();
        let wb = s.spawn(|| e.flush_all(&mut |_| {}));
        assert!(
            held(&src, GateOp::Write),
            "the second run never reached the source"
        );
        let (tx, rx) = mpsc::channel();
        let eng = &e;
        s.spawn(move || {
            let mut buf = vec![0u8; BS];
            let r = eng.read(30 * BS as u64, &mut buf);
            let _ = tx.send(r.map(|_| buf));
        });
        let got = rx.recv_timeout(WAIT);
        // The pass is still held: the one source flush so far is the miss's.
        let flushes = e.stats().writeback_source_flushes;
        src.open_all();
        let got = got
            .expect("the miss waited for the writeback pass")
            .unwrap();
        assert_eq!(flushes, 1);
        assert!(got == vec![0x11u8; BS]);
        wb.join().unwrap().unwrap();
    });
    let mut back = vec![0u8; BS];
    for b in [0u64, 1, 2, 3, 10, 11, 12, 13] {
        src.inner().read_at(&mut back, b * BS as u64).unwrap();
        assert!(back == vec![b as u8 + 1; BS], "block {b} on the source");
    }
}

/// A source that calls `hook` with the offset of each write before doing
/// it (to hold, count or fail writes).
struct HookedSource<H: Fn(u64) + Send + Sync> {
    inner: MemDevice,
    hook: H,
}

fn hooked<H: Fn(u64) + Send + Sync>(hook: H) -> Arc<HookedSource<H>> {
    Arc::new(HookedSource {
        inner: MemDevice::from_bytes(&vec![0x11u8; 64 * BS]),
        hook,
    })
}

impl<H: Fn(u64) + Send + Sync> BlockDevice for HookedSource<H> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        (self.hook)(offset);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
}

/// Holds source writes at offset 0 until `release`; counts the others.
#[derive(Default)]
struct HoldFirstBlock {
    released: Mutex<bool>,
    cond: Condvar,
    others_written: AtomicU64,
}

impl HoldFirstBlock {
    fn on_write(&self, offset: u64) {
        if offset == 0 {
            let mut r = self.released.lock().unwrap();
            while !*r {
                r = self.cond.wait(r).unwrap();
            }
        } else {
            self.others_written.fetch_add(1, SeqCst);
        }
    }

    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// A pass with two runs in flight whose first run is slow: when the second
/// is written, a miss waiting for a frame of the set goes on (it flushes the
/// source itself) without waiting for the first run.
#[test]
fn a_slow_run_does_not_hold_back_the_frames_of_a_run_written_after_it() {
    let hold = Arc::new(HoldFirstBlock::default());
    let h = hold.clone();
    let src = hooked(move |offset| h.on_write(offset));
    let cache = Arc::new(MemDevice::new(4 << 20));
    let one_set = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(8),
            assoc: Some(8),
        },
        ..cfg(Some(WriteMode::Writeback))
    };
    let e = Engine::open(src.clone(), cache, one_set).unwrap();
    // Two runs of dirty blocks fill the only set: 0-3 (held at the source)
    // and 10-13.
    for b in [0u64, 1, 2, 3, 10, 11, 12, 13] {
        e.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    e.flush().unwrap();
    std::thread::scope(|s| {
        struct Release<'a>(&'a HoldFirstBlock);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.release();
            }
        }
        // Released when this closure ends, also by a failed assertion.
        let _release = Release(&hold);
        let wb = s.spawn(|| e.flush_all(&mut |_| {}));
        let t0 = Instant::now();
        while hold.others_written.load(SeqCst) == 0 && t0.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            hold.others_written.load(SeqCst),
            1,
            "run 10-13 never written"
        );
        let (tx, rx) = mpsc::channel();
        let eng = &e;
        s.spawn(move || {
            let mut buf = vec![0u8; BS];
            let r = eng.read(30 * BS as u64, &mut buf);
            let _ = tx.send(r.map(|_| buf));
        });
        let got = rx.recv_timeout(WAIT);
        hold.release();
        let got = got
            .expect("the miss waited for the run submitted before the one holding its frame")
            .unwrap();
        assert!(got == vec![0x11u8; BS]);
        wb.join().unwrap().unwrap();
    });
    for b in [0u64, 1, 2, 3, 10, 11, 12, 13] {
        let mut back = vec![0u8; BS];
        src.inner.read_at(&mut back, b * BS as u64).unwrap();
        assert!(back == vec![b as u8 + 1; BS], "block {b} not written back");
    }
}

/// A writer thread that dies holding a run does not hang the pass: the run
/// is reported not written and its blocks stay dirty, and the next pass
/// writes them.
#[test]
fn a_writer_thread_that_dies_fails_its_run_and_the_next_pass_writes_it() {
    // The first source write panics (a bug in a device driver): the writer
    // thread doing it dies.
    let armed = AtomicBool::new(true);
    let src = hooked(move |_| {
        if armed.swap(false, SeqCst) {
            panic!("injected panic in the source's write");
        }
    });
    let e = Engine::open(
        src.clone(),
        Arc::new(MemDevice::new(4 << 20)),
        cfg(Some(WriteMode::Writeback)),
    )
    .unwrap();
    for b in [0u64, 1, 2, 3, 10, 11, 12, 13] {
        e.write(b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    // Not a scoped thread: if the pass hangs, the test fails instead.
    let e = Arc::new(e);
    let (tx, rx) = mpsc::channel();
    let eng = e.clone();
    std::thread::spawn(move || {
        let _ = tx.send(eng.flush_all(&mut |_| {}));
    });
    let first = rx.recv_timeout(WAIT).expect("the pass hung");
    assert!(first.is_err(), "a pass with a lost run succeeded");
    assert!(
        e.dirty_blocks() > 0,
        "the lost run's blocks were marked clean"
    );
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    for b in [0u64, 1, 2, 3, 10, 11, 12, 13] {
        let mut back = vec![0u8; BS];
        src.inner.read_at(&mut back, b * BS as u64).unwrap();
        assert!(back == vec![b as u8 + 1; BS], "block {b} not written back");
    }
}
