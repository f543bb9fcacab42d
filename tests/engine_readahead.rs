//! Sequential readahead on read misses (`EngineConfig::readahead`): what a
//! reader going in order gains, that scattered reads fetch nothing ahead,
//! that no read ever returns wrong data (writes racing the fetches
//! included, in every mode that caches reads), and that a shutdown with a
//! fetch under way waits for it and leaves a consistent cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vblkcache::device::{
    BlockDevice, GateDevice, GateOp, LatencyDevice, LatencyProfile, MemDevice,
};
use vblkcache::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};

const BS: usize = 4096;
const BLOCKS: usize = 2048;
const CACHE_BLOCKS: u64 = 1024;

/// The source's bytes: each 8-byte word holds its own byte offset, so a
/// block read from the wrong place, or a stale one, is told apart.
fn pattern() -> Vec<u8> {
    (0..BLOCKS).flat_map(source_block).collect()
}

/// Block `b` of [`pattern`].
fn source_block(b: usize) -> Vec<u8> {
    let start = (b * BS) as u64;
    (0..(BS / 8) as u64)
        .flat_map(|i| (start + i * 8).to_le_bytes())
        .collect()
}

/// What a write of generation `gen` puts in block `b`.
fn written(b: usize, gen: u64) -> Vec<u8> {
    (0..(BS / 8) as u64)
        .flat_map(|i| (0x5a5a_0000_0000_0000 | gen << 32 | (b as u64) << 12 | i).to_le_bytes())
        .collect()
}

fn slow_source(latency: Duration) -> Arc<dyn BlockDevice> {
    Arc::new(LatencyDevice::new(
        MemDevice::from_bytes(&pattern()),
        LatencyProfile::uniform(latency),
    ))
}

fn config(readahead: u64, mode: WriteMode) -> EngineConfig {
    EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(CACHE_BLOCKS),
            assoc: Some(8),
        },
        mode: Some(mode),
        readahead,
        ..EngineConfig::default()
    }
}

fn open(source: Arc<dyn BlockDevice>, cache: Arc<MemDevice>, cfg: EngineConfig) -> Engine {
    Engine::open(source, cache, cfg).expect("open the engine")
}

fn new_cache() -> Arc<MemDevice> {
    Arc::new(MemDevice::new(CACHE_BLOCKS * BS as u64 + (8 << 20)))
}

fn read_block(e: &Engine, b: usize) -> Vec<u8> {
    let mut buf = vec![0u8; BS];
    e.read((b * BS) as u64, &mut buf).expect("read");
    buf
}

/// Waits up to 10 s for `done` (a fetch ahead finishing in the background);
/// fails the test with `what` otherwise.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn reading_in_order_fetches_ahead_and_misses_less() {
    let mut misses = HashMap::new();
    for readahead in [0u64, 64 * BS as u64] {
        let e = open(
            slow_source(Duration::from_millis(1)),
            new_cache(),
            config(readahead, WriteMode::Writeback),
        );
        for b in 0..512 {
            assert!(
                read_block(&e, b) == source_block(b),
                "readahead {readahead}: block {b} read wrong"
            );
        }
        e.shutdown(false).expect("shutdown");
        let s = e.stats();
        assert_eq!(s.read_hits + s.read_misses, 512);
        assert_eq!(s.readahead_dropped, 0, "one reader never fills the queue");
        misses.insert(readahead, (s.read_misses, s.readahead_blocks));
    }
    assert_eq!(misses[&0], (512, 0), "without readahead every block misses");
    let (m, ahead) = misses[&(64 * BS as u64)];
    // Misses at 0 and 1 start the stream. After that the reader reaches
    // the first block fetched in each window (its trigger) long before the
    // window's end, and the next window is fetched then: no more misses
    // (one at the end of each window, 4, 8, 16, 32 then 64 blocks, without
    // the triggers).
    assert!(m <= 3, "{m} misses with readahead");
    assert!(ahead + m >= 512, "{ahead} blocks fetched ahead, {m} misses");
}

#[test]
fn scattered_reads_fetch_nothing_ahead() {
    let e = open(
        slow_source(Duration::ZERO),
        new_cache(),
        config(64 * BS as u64, WriteMode::Writeback),
    );
    // Stride 97 over 512 blocks: block b + 1 comes 417 reads after block b,
    // long after the 16 streams followed have forgotten it.
    for i in 0..512 {
        let b = i * 97 % 512;
        assert!(read_block(&e, b) == source_block(b), "block {b}");
    }
    let s = e.stats();
    assert_eq!((s.read_misses, s.readahead_blocks), (512, 0));
}

/// A reader goes through the disk in order (so readahead keeps fetching)
/// while a writer overwrites blocks just ahead of it, where fetches are
/// under way or about to be. Afterwards every block holds its last write
/// or the source's data, before and after a restart of the engine.
#[test]
fn writes_racing_readahead_are_never_lost() {
    for mode in [
        WriteMode::Writeback,
        WriteMode::Writethrough,
        WriteMode::Writearound,
    ] {
        let source = slow_source(Duration::from_micros(300));
        let cache = new_cache();
        let e = Arc::new(open(
            source.clone(),
            cache.clone(),
            config(32 * BS as u64, mode),
        ));
        let pos = Arc::new(Mutex::new(0usize));
        let last: Arc<Mutex<HashMap<usize, u64>>> = Arc::default();
        let reader = {
            let (e, pos) = (e.clone(), pos.clone());
            std::thread::spawn(move || {
                for b in 0..BLOCKS {
                    let _ = read_block(&e, b);
                    *pos.lock().unwrap() = b;
                }
            })
        };
        let writer = {
            let (e, pos, last) = (e.clone(), pos.clone(), last.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                for gen in 1..=600u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = *pos.lock().unwrap();
                    let b = (at + 1 + (x % 48) as usize).min(BLOCKS - 1);
                    e.write((b * BS) as u64, &written(b, gen)).expect("write");
                    last.lock().unwrap().insert(b, gen);
                }
            })
        };
        reader.join().expect("reader");
        writer.join().expect("writer");
        let e = Arc::into_inner(e).expect("one engine handle");
        let last = last.lock().unwrap().clone();
        let expect = |b: usize| match last.get(&b) {
            Some(&gen) => written(b, gen),
            None => source_block(b),
        };
        for b in 0..BLOCKS {
            assert!(read_block(&e, b) == expect(b), "{mode}: block {b} is wrong");
        }
        assert!(
            e.stats().readahead_blocks > 0,
            "{mode}: nothing fetched ahead"
        );
        e.shutdown(false).expect("shutdown");
        let e = open(source, cache, config(32 * BS as u64, mode));
        for b in 0..BLOCKS {
            assert!(
                read_block(&e, b) == expect(b),
                "{mode}: block {b} is wrong after a restart"
            );
        }
        e.shutdown(false).expect("shutdown");
    }
}

/// A fetch ahead stuck on the source holds a shutdown until it ends; the
/// blocks it fetched are then cached and right after a restart.
#[test]
fn shutdown_waits_for_a_fetch_under_way() {
    let gated = Arc::new(GateDevice::new(MemDevice::from_bytes(&pattern())));
    // The two misses that start the stream pass; the fetch ahead waits.
    gated.close_after(GateOp::Read, 2);
    let source: Arc<dyn BlockDevice> = gated.clone();
    let cache = new_cache();
    let e = Arc::new(open(
        source.clone(),
        cache.clone(),
        config(8 * BS as u64, WriteMode::Writeback),
    ));
    assert!(read_block(&e, 0) == source_block(0));
    assert!(read_block(&e, 1) == source_block(1));
    assert!(
        gated.wait_held(GateOp::Read, 1, Duration::from_secs(10)),
        "the fetch ahead never reached the source"
    );
    let stopper = {
        let e = e.clone();
        std::thread::spawn(move || e.shutdown(false))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !stopper.is_finished(),
        "shutdown returned with a fetch ahead still reading the source"
    );
    gated.open_all();
    stopper.join().expect("stopper").expect("shutdown");
    let s = e.stats();
    assert_eq!(s.readahead_blocks, 4, "blocks 2..6 were fetched ahead");
    drop(e);
    // Checked without readahead, so that only what was cached counts as hits.
    let e = open(source, cache, config(0, WriteMode::Writeback));
    for b in 0..16 {
        assert!(read_block(&e, b) == source_block(b), "block {b}");
    }
    let s = e.stats();
    assert_eq!(
        (s.read_hits, s.read_misses),
        (6, 10),
        "blocks 0..6 were cached before the shutdown"
    );
    e.shutdown(false).expect("shutdown");
}

/// A block being written around (its source write in flight) is not
/// fetched ahead: the fetch could read the old data and cache it after the
/// write, which would then be shadowed by it.
#[test]
fn a_block_written_around_is_not_fetched_ahead() {
    let gated = Arc::new(GateDevice::new(MemDevice::from_bytes(&pattern())));
    gated.close(GateOp::Write);
    let source: Arc<dyn BlockDevice> = gated.clone();
    let e = Arc::new(open(
        source,
        new_cache(),
        config(8 * BS as u64, WriteMode::Writearound),
    ));
    let writer = {
        let e = e.clone();
        std::thread::spawn(move || e.write((10 * BS) as u64, &written(10, 1)))
    };
    assert!(
        gated.wait_held(GateOp::Write, 1, Duration::from_secs(10)),
        "the write never reached the source"
    );
    // Misses at 8 and 9 make a stream: blocks 10..14 are wanted ahead.
    assert!(read_block(&e, 8) == source_block(8));
    assert!(read_block(&e, 9) == source_block(9));
    gated.open_all();
    writer.join().expect("writer").expect("write");
    assert!(
        read_block(&e, 10) == written(10, 1),
        "block 10 lost its write"
    );
    for b in 11..14 {
        assert!(read_block(&e, b) == source_block(b), "block {b}");
    }
    // Block 10 missed: it was not fetched ahead. 11..14 were, and reading
    // 11, the first of them, fetched the next window (14..22).
    assert_eq!(e.stats().read_misses, 3, "misses at 8, 9 and 10 only");
    wait_until("blocks 11..14 and 14..22 fetched ahead", || {
        e.stats().readahead_blocks == 3 + 8
    });
}

/// The daemon serves hits with `Engine::begin_direct_read` (its own I/O on
/// the cache device): a hit there on a window's first block fetches the next
/// window too, with no read through the blocking path.
#[test]
fn a_direct_hit_on_a_windows_first_block_fetches_the_next_window() {
    let e = open(
        slow_source(Duration::ZERO),
        new_cache(),
        config(64 * BS as u64, WriteMode::Writeback),
    );
    // Misses at 0 and 1: blocks 2..6 are fetched ahead, 2 is the trigger.
    read_block(&e, 0);
    read_block(&e, 1);
    for b in 3..6u64 {
        wait_until(&format!("block {b} stored"), || {
            e.begin_direct_read(b * BS as u64, BS as u64).is_some()
        });
    }
    assert_eq!(e.stats().readahead_blocks, 4, "the first window only");
    wait_until("a direct hit on block 2", || {
        e.begin_direct_read(2 * BS as u64, BS as u64).is_some()
    });
    wait_until("the next window (8 blocks) fetched", || {
        e.stats().readahead_blocks == 12
    });
    for b in 0..14 {
        assert!(read_block(&e, b) == source_block(b), "block {b}");
    }
    let s = e.stats();
    assert_eq!(s.read_misses, 2, "only the two that started the stream");
    e.shutdown(false).expect("shutdown");
}

/// With several requests in flight the first blocks of a window are often
/// being read already when it is planned: the next window is then fetched
/// when a read reaches the window's first block that was fetched ahead.
#[test]
fn the_next_window_starts_at_the_first_block_fetched_ahead() {
    let e = open(
        slow_source(Duration::ZERO),
        new_cache(),
        config(64 * BS as u64, WriteMode::Writeback),
    );
    // Block 2 is cached first (as if another request had read it), then
    // misses at 0 and 1 plan 2..6, of which 3..6 are fetched ahead.
    for b in [2, 0, 1] {
        assert!(read_block(&e, b) == source_block(b), "block {b}");
    }
    assert!(read_block(&e, 3) == source_block(3), "block 3");
    wait_until("reading block 3 fetching 6..14", || {
        e.stats().readahead_blocks >= 3 + 8
    });
    for b in 4..14 {
        assert!(read_block(&e, b) == source_block(b), "block {b}");
    }
    assert_eq!(e.stats().read_misses, 3, "misses at 2, 0 and 1 only");
    e.shutdown(false).expect("shutdown");
}
