//! The idle drain: once no request has come for `idle_drain_after`, the
//! background writeback cleans every dirty block, below the low watermark
//! too, and a request stops it.

use std::sync::Arc;
use std::time::{Duration, Instant};
use vblkcache::device::{BlockDevice, LatencyDevice, LatencyProfile, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const BS: usize = 4096;
const DIRTY: u64 = 64;

/// Write-back on 256 fully associative 4K frames; watermark writeback off
/// (high 100 %), so only the idle drain cleans; runs of one block, one at a
/// time.
fn cfg(idle: Option<Duration>) -> EngineConfig {
    let mut c = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(256),
            assoc: Some(256),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    c.writeback.high_watermark_pct = 100;
    c.writeback.low_watermark_pct = 50;
    c.writeback.max_run_bytes = BS as u64;
    c.writeback.max_inflight_runs = 1;
    c.writeback.idle_drain_after = idle;
    c
}

type Src = LatencyDevice<MemDevice>;

/// A source whose writes take `write_latency`, and an engine with
/// `DIRTY` dirty blocks at every other block (no two in one run), block
/// `b` filled with byte `b + 1`.
fn rig(idle: Option<Duration>, write_latency: Duration) -> (Arc<Src>, Engine) {
    let profile = LatencyProfile {
        write: write_latency,
        ..LatencyProfile::uniform(Duration::ZERO)
    };
    let src = Arc::new(LatencyDevice::new(MemDevice::new(1 << 20), profile));
    let e = Engine::open(src.clone(), Arc::new(MemDevice::new(4 << 20)), cfg(idle)).unwrap();
    for b in 0..DIRTY {
        e.write(2 * b * BS as u64, &vec![b as u8 + 1; BS]).unwrap();
    }
    assert_eq!(e.dirty_blocks(), DIRTY);
    (src, e)
}

/// Waits up to `limit` for `e` to have no dirty block.
fn drained(e: &Engine, limit: Duration) -> bool {
    let t0 = Instant::now();
    while e.dirty_blocks() > 0 && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    e.dirty_blocks() == 0
}

/// Blocks whose new data is on the source.
fn on_source(src: &Src) -> u64 {
    let mut buf = vec![0u8; BS];
    (0..DIRTY)
        .filter(|&b| {
            src.inner().read_at(&mut buf, 2 * b * BS as u64).unwrap();
            buf.iter().all(|&x| x == b as u8 + 1)
        })
        .count() as u64
}

/// Reads block 200 (never written) every 20 ms for `d`.
fn busy_for(e: &Engine, d: Duration) {
    let mut buf = vec![0u8; BS];
    let t0 = Instant::now();
    while t0.elapsed() < d {
        e.read(200 * BS as u64, &mut buf).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_idle_device_writes_every_dirty_block_back() {
    let (src, e) = rig(Some(Duration::from_millis(300)), Duration::ZERO);
    assert!(
        drained(&e, Duration::from_secs(10)),
        "{} dirty blocks left 10 s after the last request",
        e.dirty_blocks()
    );
    assert_eq!(on_source(&src), DIRTY);
    // The drain committed: the blocks are clean in the mapping too, so a
    // clean shutdown writes nothing back.
    let before = e.stats().writebacks;
    assert_eq!(before, DIRTY);
    e.shutdown(false).unwrap();
}

#[test]
fn without_the_idle_drain_dirty_blocks_below_the_watermark_stay() {
    let (src, e) = rig(None, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(e.dirty_blocks(), DIRTY);
    assert_eq!(on_source(&src), 0);
}

#[test]
fn requests_keep_the_idle_drain_from_starting() {
    let (src, e) = rig(Some(Duration::from_millis(600)), Duration::ZERO);
    // A read every 20 ms for 2 s: never 600 ms without a request.
    busy_for(&e, Duration::from_secs(2));
    assert_eq!(e.dirty_blocks(), DIRTY, "the drain ran while requests came");
    assert_eq!(on_source(&src), 0);
    assert!(drained(&e, Duration::from_secs(10)));
    assert_eq!(on_source(&src), DIRTY);
}

#[test]
fn a_request_stops_a_running_idle_drain() {
    // 30 ms per source write, one at a time: the drain takes about 2 s.
    let (src, e) = rig(Some(Duration::from_millis(300)), Duration::from_millis(30));
    let t0 = Instant::now();
    while e.stats().writebacks == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(e.stats().writebacks > 0, "the drain never started");
    std::thread::scope(|s| {
        let busy = s.spawn(|| busy_for(&e, Duration::from_millis(1500)));
        // Let the run in flight when the first request came finish.
        std::thread::sleep(Duration::from_millis(200));
        let at_stop = e.stats().writebacks;
        std::thread::sleep(Duration::from_millis(1000));
        let later = e.stats().writebacks;
        busy.join().unwrap();
        assert!(
            at_stop < DIRTY,
            "the drain finished before the requests came"
        );
        assert_eq!(
            later, at_stop,
            "the drain went on while requests came ({at_stop} then {later} blocks written back)"
        );
    });
    // Idle again: it resumes and finishes.
    assert!(drained(&e, Duration::from_secs(15)));
    assert_eq!(on_source(&src), DIRTY);
}

#[test]
fn shutdown_does_not_wait_for_a_running_idle_drain() {
    // 30 ms per source write, one at a time: the drain takes about 2 s.
    let (src, e) = rig(Some(Duration::from_millis(300)), Duration::from_millis(30));
    let t0 = Instant::now();
    while e.stats().writebacks == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(e.stats().writebacks > 0, "the drain never started");
    e.shutdown(false).unwrap();
    let written = e.stats().writebacks;
    assert!(
        written < DIRTY / 2,
        "shutdown waited for the drain ({written} of {DIRTY} blocks written back)"
    );
    // The source holds exactly the blocks written back.
    drop(e);
    assert_eq!(on_source(&src), written);
}
