//! Misses under write pressure: while dirty blocks are above the high
//! watermark (background writeback at work), a miss whose set offers only
//! dirty frames goes to the source around the cache, instead of writing a
//! dirty block back itself before it can start (a cache read, a source
//! write and a commit with a source flush, all in the request's time).
//! Below the watermark such a miss still evicts a dirty block.

use std::sync::Arc;
use std::time::Duration;
use vblkcache::device::{BlockDevice, LatencyDevice, LatencyProfile, MemDevice};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const BS: u64 = 4096;
const FRAMES: u64 = 8;

/// A source whose writes take 200 ms, so that background writeback holds
/// at most one frame (one run in flight, one block per run) while the test
/// runs, and an engine of `FRAMES` frames in sets of `assoc` whose high and
/// low watermarks are both 50 %.
fn rig(assoc: u32) -> (Arc<LatencyDevice<MemDevice>>, Engine) {
    let slow = LatencyProfile {
        write: Duration::from_millis(200),
        ..LatencyProfile::default()
    };
    let src = Arc::new(LatencyDevice::new(MemDevice::new(1 << 20), slow));
    let cache = Arc::new(MemDevice::new(1 << 20));
    let mut cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(FRAMES),
            assoc: Some(assoc),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    cfg.writeback.high_watermark_pct = 50;
    cfg.writeback.low_watermark_pct = 50;
    cfg.writeback.max_run_bytes = BS;
    cfg.writeback.max_inflight_runs = 1;
    let e = Engine::open(src.clone(), cache, cfg).unwrap();
    (src, e)
}

fn block(b: u64) -> Vec<u8> {
    vec![b as u8 + 1; BS as usize]
}

#[test]
fn a_miss_on_a_dirty_set_under_pressure_goes_around_the_cache() {
    // One fully associative set.
    let (src, e) = rig(FRAMES as u32);
    for b in 0..FRAMES {
        e.write(b * BS, &block(b)).unwrap();
    }
    // Every frame is dirty (one may be being written back): 8 > 4.
    let before = e.stats();
    e.write(FRAMES * BS, &block(FRAMES)).unwrap();
    let after = e.stats();
    assert_eq!(
        after.dirty_evictions - before.dirty_evictions,
        0,
        "the miss wrote a dirty block back itself"
    );
    assert_eq!(after.bypassed - before.bypassed, 1);
    // The data went to the source, and reads of it (also around the cache
    // while the set is dirty) return it.
    let mut buf = vec![0u8; BS as usize];
    src.read_at(&mut buf, FRAMES * BS).unwrap();
    assert!(buf == block(FRAMES), "the source lacks the write");
    e.read(FRAMES * BS, &mut buf).unwrap();
    assert!(buf == block(FRAMES));
    // A partial write of another new block, and a read of a third.
    e.write((FRAMES + 1) * BS + 512, &[7u8; 512]).unwrap();
    e.read((FRAMES + 1) * BS, &mut buf).unwrap();
    assert!(buf[..512].iter().all(|&x| x == 0) && buf[512..1024].iter().all(|&x| x == 7));
    // Every cached block still reads its data.
    for b in 0..FRAMES {
        e.read(b * BS, &mut buf).unwrap();
        assert!(buf == block(b), "block {b}");
    }
    // Once written back, everything is on the source.
    e.flush_all(&mut |_| {}).unwrap();
    for b in 0..=FRAMES {
        src.read_at(&mut buf, b * BS).unwrap();
        assert!(buf == block(b), "block {b} on the source");
    }
}

#[test]
fn below_the_watermark_a_miss_still_evicts_a_dirty_block() {
    // Two sets of 4: the first all dirty, the second empty, so 4 of 8
    // frames are dirty, not above 50 %.
    let (_src, e) = rig(4);
    let g = e.geometry();
    let set0: Vec<u64> = (0..1000).filter(|&b| g.set_of(b) == 0).take(5).collect();
    assert_eq!(set0.len(), 5);
    for &b in &set0[..4] {
        e.write(b * BS, &block(b)).unwrap();
    }
    let before = e.stats();
    e.write(set0[4] * BS, &block(set0[4])).unwrap();
    let after = e.stats();
    assert_eq!(after.bypassed - before.bypassed, 0);
    assert_eq!(after.dirty_evictions - before.dirty_evictions, 1);
    let mut buf = vec![0u8; BS as usize];
    for &b in &set0 {
        e.read(b * BS, &mut buf).unwrap();
        assert!(buf == block(b), "block {b}");
    }
}

#[test]
fn under_pressure_a_partial_write_miss_goes_around_and_keeps_clean_blocks() {
    let (src, e) = rig(FRAMES as u32);
    // 5 of 8 frames dirty (above 50 %), one clean, two free.
    for b in 0..5 {
        e.write(b * BS, &block(b)).unwrap();
    }
    let mut buf = vec![0u8; BS as usize];
    e.read(5 * BS, &mut buf).unwrap();
    // A whole-block miss still takes a free frame: no source read needed.
    let before = e.stats();
    e.write(6 * BS, &block(6)).unwrap();
    let mid = e.stats();
    assert_eq!(mid.bypassed - before.bypassed, 0);
    assert_eq!(mid.write_misses - before.write_misses, 1);
    // A partial miss goes to the source: no fill, no frame taken.
    e.write(7 * BS + 1024, &[9u8; 512]).unwrap();
    let after = e.stats();
    assert_eq!(after.bypassed - mid.bypassed, 1);
    assert_eq!(after.partial_fills - mid.partial_fills, 0);
    assert_eq!(after.write_misses - mid.write_misses, 1);
    src.read_at(&mut buf, 7 * BS).unwrap();
    assert!(buf[1024..1536].iter().all(|&x| x == 9) && buf[..1024].iter().all(|&x| x == 0));
    // The clean block is still cached.
    e.read(5 * BS, &mut buf).unwrap();
    assert_eq!(e.stats().read_hits - after.read_hits, 1);
    e.read(7 * BS, &mut buf).unwrap();
    assert!(buf[1024..1536].iter().all(|&x| x == 9) && buf[1536..].iter().all(|&x| x == 0));
}
