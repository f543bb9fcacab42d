//! Failure handling of the pipelined writeback: whatever run fails, the
//! frames marked clean are exactly those whose data reached the source.

use crate::device::{BlockDevice, CountingDevice, DeviceError, FaultDevice, MemDevice};
use crate::engine::{Engine, EngineConfig, GeometryRequest, WriteMode};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BS: u64 = 4096;
/// Contiguous dirty blocks: 16 runs of 4 blocks.
const DIRTY: u64 = 64;

type Dev = CountingDevice<FaultDevice<MemDevice>>;

fn dev(len: u64) -> Arc<Dev> {
    Arc::new(CountingDevice::new(FaultDevice::new(MemDevice::new(len))))
}

/// Write-back on 256 fully associative 4K frames, background writeback off
/// (the idle drain too).
fn quiet_cfg() -> EngineConfig {
    let mut cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS as u32),
            cache_blocks: Some(256),
            assoc: Some(256),
        },
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    cfg.writeback.high_watermark_pct = 100;
    cfg.writeback.low_watermark_pct = 100;
    cfg.writeback.idle_drain_after = None;
    cfg
}

/// An engine with background writeback off, 4-block runs, and `DIRTY`
/// dirty blocks, block `b` filled with byte `b + 1`.
fn rig() -> (Arc<Dev>, Arc<Dev>, Engine) {
    let (src, cache) = (dev(1 << 20), dev(4 << 20));
    let mut cfg = quiet_cfg();
    cfg.writeback.max_run_bytes = 4 * BS;
    // Two runs in flight: which runs a failure can still catch is bounded.
    cfg.writeback.max_inflight_runs = 2;
    let e = Engine::open(src.clone(), cache.clone(), cfg).unwrap();
    for b in 0..DIRTY {
        e.write(b * BS, &vec![b as u8 + 1; BS as usize]).unwrap();
    }
    assert_eq!(e.dirty_blocks(), DIRTY);
    (src, cache, e)
}

/// Blocks whose new data is on the source.
fn on_source(src: &Dev) -> u64 {
    let mut buf = vec![0u8; BS as usize];
    (0..DIRTY)
        .filter(|&b| {
            src.read_at(&mut buf, b * BS).unwrap();
            buf.iter().all(|&x| x == b as u8 + 1)
        })
        .count() as u64
}

/// The engine still serves the new data, and a healed flush cleans it all.
fn recovers(src: &Dev, e: &Engine) {
    let mut buf = vec![0u8; BS as usize];
    for b in 0..DIRTY {
        e.read(b * BS, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == b as u8 + 1), "block {b}");
    }
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    assert_eq!(on_source(src), DIRTY);
}

#[test]
fn failing_source_write_keeps_unwritten_runs_dirty() {
    for fail_at in [0u64, 1, 2, 5, 13] {
        let (src, _cache, e) = rig();
        let s0 = src.counts();
        // Fail every source write once `fail_at` runs are done; the writer
        // may hold one more run by then, so which run fails first varies.
        let mut last = 0;
        let r = e.flush_all(&mut |p| {
            last = p.done;
            if p.done >= fail_at * 4 {
                src.inner().plan().fail_writes.store(true, SeqCst);
            }
        });
        assert!(r.is_err(), "fail_at {fail_at}: flush_all must fail");
        let written = on_source(&src);
        assert_eq!(
            e.dirty_blocks(),
            DIRTY - written,
            "fail_at {fail_at}: clean blocks == blocks on the source"
        );
        assert_eq!(written % 4, 0, "whole runs only");
        assert!(written >= fail_at * 4 && written <= (fail_at + 2) * 4);
        assert_eq!(last, written, "progress counts the runs written");
        assert!(e.stats().errors >= 1);
        // Every source write was a whole run; no write happened twice.
        let s1 = src.counts();
        assert!(s1.writes - s0.writes <= DIRTY / 4);
        src.inner().heal();
        recovers(&src, &e);
        e.shutdown(false).unwrap();
    }
}

#[test]
fn failing_cache_read_writes_nothing_more_and_keeps_blocks_dirty() {
    let (src, cache, e) = rig();
    let s0 = src.counts();
    cache.inner().plan().fail_reads.store(true, SeqCst);
    assert!(e.flush_all(&mut |_| {}).is_err());
    assert_eq!(
        src.counts().writes,
        s0.writes,
        "nothing read, nothing written"
    );
    assert_eq!(e.dirty_blocks(), DIRTY);
    assert_eq!(on_source(&src), 0);
    cache.inner().heal();
    recovers(&src, &e);
    e.shutdown(false).unwrap();
}

#[test]
fn repeated_flushes_reuse_the_run_buffers_and_writer_threads() {
    let (src, _cache, e) = rig();
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(on_source(&src), DIRTY);
    // The pass's buffers and writer threads (one per run in flight, two
    // here) are kept for the next one.
    assert_eq!(e.core.wb_bufs.kept(), 2);
    assert_eq!(e.core.wb_pool.kept(), 2);
    let c = src.counts();
    for b in 0..DIRTY {
        e.write(b * BS, &vec![b as u8 + 1; BS as usize]).unwrap();
    }
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.core.wb_bufs.kept(), 2);
    assert_eq!(e.core.wb_pool.kept(), 2, "the same threads served both");
    assert_eq!(
        src.counts().writes - c.writes,
        DIRTY / 4,
        "one write per run"
    );
    assert_eq!(e.dirty_blocks(), 0);
    e.shutdown(false).unwrap();
    // Shutdown ends the kept thread.
    assert_eq!(e.core.wb_pool.kept(), 0);
}

#[test]
fn a_run_in_neighbouring_frames_is_one_cache_read() {
    let (src, cache, e) = rig();
    let (c0, s0) = (cache.counts(), e.stats());
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(on_source(&src), DIRTY);
    let s1 = e.stats();
    let runs = s1.writeback_runs - s0.writeback_runs;
    let reads = s1.writeback_cache_reads - s0.writeback_cache_reads;
    assert_eq!(runs, DIRTY / 4);
    // Blocks written in order into an empty cache sit in neighbouring frames
    // of their set (one set here): one cache read per run, not per block.
    assert_eq!(reads, runs, "one cache read per run");
    assert_eq!(cache.counts().reads - c0.reads, reads);
    // The pass flushed the source once, at its end (less than 64 MiB).
    assert_eq!(s1.writeback_source_flushes - s0.writeback_source_flushes, 1);
    e.shutdown(false).unwrap();
}

/// A device whose writes (or reads, with `reads`) take `DELAY` once
/// `armed`, and which records how many were in progress at once.
struct Slow {
    inner: MemDevice,
    reads: bool,
    armed: AtomicBool,
    now: AtomicUsize,
    most: AtomicUsize,
    /// The name of the thread of each slowed operation.
    threads: Mutex<Vec<String>>,
}

const DELAY: Duration = Duration::from_millis(20);

impl Slow {
    fn new(len: u64, reads: bool) -> Arc<Slow> {
        Arc::new(Slow {
            inner: MemDevice::new(len),
            reads,
            armed: AtomicBool::new(!reads),
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
        })
    }

    fn slow<T>(&self, io: impl FnOnce() -> T) -> T {
        if !self.armed.load(SeqCst) {
            return io();
        }
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(n, SeqCst);
        std::thread::sleep(DELAY);
        let r = io();
        self.now.fetch_sub(1, SeqCst);
        r
    }
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        if self.reads {
            self.slow(|| self.inner.read_at(buf, offset))
        } else {
            self.inner.read_at(buf, offset)
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        if self.reads {
            self.inner.write_at(buf, offset)
        } else {
            self.slow(|| self.inner.write_at(buf, offset))
        }
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
}

/// Block size of the long-run tests.
const BIG: u64 = 64 << 10;

/// 64K blocks in one set of 256, runs of up to `blocks` blocks.
fn long_runs_cfg(blocks: u64) -> EngineConfig {
    let mut cfg = quiet_cfg();
    cfg.geometry = GeometryRequest {
        block_size: Some(BIG as u32),
        cache_blocks: Some(256),
        assoc: Some(256),
    };
    cfg.writeback.max_run_bytes = blocks * BIG;
    cfg
}

/// Writes `runs` dirty runs of `blocks` blocks each at every other run's
/// place (so they stay separate runs), run `r` filled with byte `r + 1`.
fn write_long_runs(e: &Engine, runs: u64, blocks: u64) {
    for r in 0..runs {
        let data = vec![r as u8 + 1; (blocks * BIG) as usize];
        e.write(2 * r * blocks * BIG, &data).unwrap();
    }
    assert_eq!(e.dirty_blocks(), runs * blocks);
}

/// Whether the source holds every run written by `write_long_runs`.
fn long_runs_on_source(src: &Dev, runs: u64, blocks: u64) -> bool {
    let len = (blocks * BIG) as usize;
    let mut buf = vec![0u8; len];
    (0..runs).all(|r| {
        src.read_at(&mut buf, 2 * r * len as u64).unwrap();
        buf.iter().all(|&x| x == r as u8 + 1)
    })
}

/// `write_long_runs(runs, blocks)` with 8 runs in flight; the cache's reads
/// are slowed once the blocks are written.
fn slow_cache_rig(runs: u64, blocks: u64) -> (Arc<Dev>, Arc<Slow>, Engine) {
    let src = dev(64 << 20);
    let cache = Slow::new(32 << 20, true);
    let mut cfg = long_runs_cfg(blocks);
    cfg.writeback.max_inflight_runs = 8;
    let e = Engine::open(src.clone(), cache.clone(), cfg).unwrap();
    write_long_runs(&e, runs, blocks);
    cache.armed.store(true, SeqCst);
    (src, cache, e)
}

/// The cache reads of long runs are spread over the writer threads: with a
/// cache whose reads take `DELAY`, eight 1 MiB runs are read at once, not
/// one after the other on the pass's thread (as before session 20).
#[test]
fn writeback_reads_several_long_runs_from_the_cache_at_once() {
    let (src, cache, e) = slow_cache_rig(16, 16);
    e.flush_all(&mut |_| {}).unwrap();
    cache.armed.store(false, SeqCst);
    assert_eq!(e.dirty_blocks(), 0);
    // Up to the run limit (8); at least half of it even if starting the
    // writer threads staggers the first reads.
    let most = cache.most.load(SeqCst);
    assert!(
        (4..=8).contains(&most),
        "{most} cache reads in progress at once"
    );
    assert!(
        long_runs_on_source(&src, 16, 16),
        "wrong data on the source"
    );
    let readers = cache.threads.lock().unwrap();
    assert!(
        readers.iter().all(|t| t == "vbc-wb-writer"),
        "long runs read by {readers:?}"
    );
    drop(readers);
    e.shutdown(false).unwrap();
}

/// A cache read that fails on a writer thread (a long run) writes nothing
/// of that run and leaves it dirty; the next flush writes it.
#[test]
fn a_failing_cache_read_of_a_long_run_keeps_it_dirty() {
    let (src, cache) = (dev(64 << 20), dev(32 << 20));
    let e = Engine::open(src.clone(), cache.clone(), long_runs_cfg(16)).unwrap();
    write_long_runs(&e, 4, 16);
    let w0 = src.counts().writes;
    cache.inner().plan().fail_reads.store(true, SeqCst);
    assert!(e.flush_all(&mut |_| {}).is_err());
    assert_eq!(src.counts().writes, w0, "a run not read was written");
    assert_eq!(e.dirty_blocks(), 4 * 16);
    cache.inner().heal();
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    assert!(long_runs_on_source(&src, 4, 16), "wrong data on the source");
    e.shutdown(false).unwrap();
}

/// Short runs are read by the pass's own thread, so a writer's time in
/// flight is the source write alone.
#[test]
fn writeback_reads_short_runs_on_the_pass_thread() {
    let (src, cache, e) = slow_cache_rig(8, 1);
    let me = std::thread::current().name().map(String::from);
    e.flush_all(&mut |_| {}).unwrap();
    cache.armed.store(false, SeqCst);
    assert_eq!(e.dirty_blocks(), 0);
    assert_eq!(cache.most.load(SeqCst), 1, "one pass thread reads");
    let readers = cache.threads.lock().unwrap();
    assert_eq!(readers.len(), 8);
    assert!(
        readers.iter().all(|t| Some(t) == me.as_ref()),
        "short runs read by {readers:?}"
    );
    drop(readers);
    assert!(long_runs_on_source(&src, 8, 1), "wrong data on the source");
    e.shutdown(false).unwrap();
}

/// Random dirty blocks make runs of one block: with a source of latency L
/// that serves requests in parallel, writeback must not be one run per L.
#[test]
fn writeback_keeps_several_runs_in_flight_to_the_source() {
    const BLOCKS: u64 = 64;
    let src = Slow::new(1 << 20, false);
    let mut cfg = quiet_cfg();
    cfg.writeback.max_inflight_runs = 8;
    let e = Engine::open(src.clone(), dev(4 << 20), cfg).unwrap();
    // Every other block: no two dirty blocks are neighbours.
    for i in 0..BLOCKS {
        let b = 2 * i;
        e.write(b * BS, &vec![b as u8 + 1; BS as usize]).unwrap();
    }
    assert_eq!(e.dirty_blocks(), BLOCKS);
    let t = Instant::now();
    let mut seen = Vec::new();
    e.flush_all(&mut |p| seen.push(p.done)).unwrap();
    let took = t.elapsed();
    assert_eq!(e.dirty_blocks(), 0);
    let most = src.most.load(SeqCst);
    assert_eq!(most, 8, "runs in flight at once (the limit)");
    // One run at a time would take BLOCKS * DELAY (1.28 s).
    assert!(
        took < DELAY * (BLOCKS as u32) / 3,
        "flush_all took {took:?}"
    );
    // Progress still counts runs in the order they were claimed.
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(seen.last().copied(), Some(BLOCKS));
    let mut buf = vec![0u8; BS as usize];
    for i in 0..BLOCKS {
        let b = 2 * i;
        src.read_at(&mut buf, b * BS).unwrap();
        assert!(buf.iter().all(|&x| x == b as u8 + 1), "block {b}");
    }
    // The buffers of one-block runs are one block each, not `max_run_bytes`.
    assert!(e.core.wb_bufs.kept() <= 16);
    e.shutdown(false).unwrap();
    assert_eq!(e.core.wb_pool.kept(), 0);
}

/// `flush_all` flushes the source once for 96 MiB written back (every
/// 1 GiB and at its end; a background pass would every 64 MiB).
#[test]
fn flush_all_flushes_the_source_once_per_gib() {
    const MIB: u64 = 1 << 20;
    let bs = 64 * 1024;
    let mut cfg = quiet_cfg();
    cfg.geometry = GeometryRequest {
        block_size: Some(bs as u32),
        cache_blocks: Some(2048),
        assoc: Some(64),
    };
    let (src, cache) = (dev(128 * MIB), dev(130 * MIB));
    let e = Engine::open(src, cache, cfg).unwrap();
    let data = vec![0x5au8; MIB as usize];
    for m in 0..96 {
        e.write(m * MIB, &data).unwrap();
    }
    let before = e.stats().writeback_source_flushes;
    e.flush_all(&mut |_| {}).unwrap();
    assert_eq!(e.dirty_blocks(), 0);
    assert_eq!(e.stats().writeback_source_flushes - before, 1);
}
