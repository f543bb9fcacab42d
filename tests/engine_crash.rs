//! Crash-point test of the write-back contract.
//!
//! Both devices model a volatile write cache. A seeded workload runs until
//! the power is cut at I/O number `k` (counted over both devices), every
//! unflushed write is then kept or dropped sector by sector, the engine is
//! reopened (crash recovery) and every sector of the disk is checked against
//! an oracle: it must hold the content it had at the last completed FLUSH or
//! the content of a write issued after that FLUSH. Run for every `k` of
//! several workloads and write modes.

use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use vblkcache::device::{BlockDevice, DeviceError, MemDevice, VolatileCacheDevice};
use vblkcache::engine::meta::Layout;
use vblkcache::engine::{Engine, EngineConfig, Geometry, GeometryRequest, WriteMode};

const SECTOR: u64 = 512;
const BS: u32 = 4096;
const CACHE_BLOCKS: u64 = 16;

/// Cache blocks and associativity of a rig.
#[derive(Clone, Copy)]
struct Geo {
    blocks: u64,
    assoc: u32,
    /// Background writeback's high watermark, in per cent of the frames.
    /// Above it, a miss on a set of dirty frames goes around the cache; at
    /// 100 there is no background writeback and such a miss always writes
    /// a dirty block back itself (and commits), which fills the journal.
    wb_high: u8,
    /// Largest readahead window in blocks (0: off).
    readahead: u64,
}

/// The usual rig: 4 sets of 4, so blocks compete for frames.
const SMALL: Geo = Geo {
    blocks: CACHE_BLOCKS,
    assoc: 4,
    wb_high: 50,
    readahead: 0,
};
/// The same with every full-set miss evicting a dirty block itself.
const EVICTING: Geo = Geo {
    wb_high: 100,
    ..SMALL
};
/// 2 sets of 32 ways: runs of 16 blocks in 2 rows per set, so a frame's
/// place on the device is not its number (format version 2's row order).
const ROWS: Geo = Geo {
    blocks: 64,
    assoc: 32,
    wb_high: 50,
    readahead: 0,
};
/// The usual rig with readahead: sequential reads fetch up to 4 blocks
/// ahead in the background, racing with the writes that follow.
const READAHEAD: Geo = Geo {
    readahead: 4,
    ..SMALL
};
const SOURCE_BLOCKS: u64 = 48;

/// Power shared by both devices: after `limit` operations everything fails.
struct Power {
    ops: AtomicU64,
    limit: AtomicU64,
    off: AtomicBool,
}

impl Power {
    fn tick(&self) -> Result<(), DeviceError> {
        if self.off.load(SeqCst) {
            return Err(DeviceError::PoweredOff);
        }
        let n = self.ops.fetch_add(1, SeqCst) + 1;
        if n > self.limit.load(SeqCst) {
            self.off.store(true, SeqCst);
            return Err(DeviceError::PoweredOff);
        }
        Ok(())
    }
}

struct Powered {
    dev: Arc<VolatileCacheDevice<Arc<MemDevice>>>,
    power: Arc<Power>,
}

impl BlockDevice for Powered {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.power.tick()?;
        self.dev.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.power.tick()?;
        self.dev.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.power.tick()?;
        self.dev.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.power.tick()?;
        self.dev.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.power.tick()?;
        self.dev.write_zeroes(offset, len)
    }
}

/// Content of `sector` written by version `v` (0 = initial content, u32::MAX = zeros).
fn content(v: u32, sector: u64) -> Vec<u8> {
    if v == u32::MAX {
        return vec![0u8; SECTOR as usize];
    }
    let mut out = Vec::with_capacity(SECTOR as usize);
    while out.len() < SECTOR as usize {
        out.extend_from_slice(&v.to_le_bytes());
        out.extend_from_slice(&(sector as u32).to_le_bytes());
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, count: u64 },
    Zero { sector: u64, count: u64 },
    Read { sector: u64, count: u64 },
    Flush,
    FlushAll,
    Restart,
}

fn workload(seed: u64, len: usize) -> Vec<Op> {
    workload_with(seed, len, false)
}

/// With `commit_heavy`, small writes and flushes dominate and there are no
/// restarts, so the journal fills and checkpoints happen.
fn workload_with(seed: u64, len: usize, commit_heavy: bool) -> Vec<Op> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sectors = SOURCE_BLOCKS * u64::from(BS) / SECTOR;
    (0..len)
        .map(|_| {
            let sector = rng.gen_range(0..sectors);
            let count = rng.gen_range(1..=(sectors - sector).min(20));
            if commit_heavy {
                return match rng.gen_range(0..10) {
                    0..=4 => Op::Write { sector, count },
                    5 => Op::FlushAll,
                    _ => Op::Flush,
                };
            }
            match rng.gen_range(0..20) {
                0..=8 => Op::Write { sector, count },
                9 => Op::Zero { sector, count },
                10..=14 => Op::Read { sector, count },
                15..=17 => Op::Flush,
                18 => Op::FlushAll,
                _ => Op::Restart,
            }
        })
        .collect()
}

/// A workload in which about a third of the operations read on from where
/// the previous read ended, 8 sectors (one block) at a time, so that reads
/// miss block after block and start readahead; half the writes land in the
/// four blocks after that point; flushes in between.
fn workload_sequential(seed: u64, len: usize) -> Vec<Op> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sectors = SOURCE_BLOCKS * u64::from(BS) / SECTOR;
    let per_block = u64::from(BS) / SECTOR;
    let mut next = 0;
    (0..len)
        .map(|_| {
            let sector = rng.gen_range(0..sectors);
            let count = rng.gen_range(1..=(sectors - sector).min(20));
            match rng.gen_range(0..12) {
                0..=3 => {
                    if next + per_block > sectors {
                        next = rng.gen_range(0..sectors / per_block) * per_block;
                    }
                    let op = Op::Read {
                        sector: next,
                        count: per_block,
                    };
                    next += per_block;
                    op
                }
                // Writes into the next blocks the reads will reach: blocks
                // that readahead must not fetch over.
                4 | 5 => {
                    let at = (next + rng.gen_range(0..4 * per_block)).min(sectors - 1);
                    Op::Write {
                        sector: at,
                        count: count.min(sectors - at),
                    }
                }
                6 | 7 => Op::Write { sector, count },
                8 => Op::Read { sector, count },
                9 | 10 => Op::Flush,
                _ => Op::FlushAll,
            }
        })
        .collect()
}

struct Oracle {
    /// Content version of each sector at the last completed flush.
    stable: Vec<u32>,
    /// Versions written to each sector since (issued, completed or not).
    after: Vec<Vec<u32>>,
    /// Latest version of each sector.
    latest: Vec<u32>,
}

struct Outcome {
    ops_used: u64,
    crashed: bool,
}

fn cfg_geo(mode: WriteMode, geo: Geo) -> EngineConfig {
    let mut cfg = EngineConfig {
        geometry: GeometryRequest {
            block_size: Some(BS),
            cache_blocks: Some(geo.blocks),
            assoc: Some(geo.assoc),
        },
        mode: Some(mode),
        readahead: geo.readahead * u64::from(BS),
        ..EngineConfig::default()
    };
    cfg.writeback.high_watermark_pct = geo.wb_high;
    cfg.writeback.low_watermark_pct = cfg.writeback.low_watermark_pct.min(geo.wb_high);
    cfg
}

/// Runs `ops` with the power cut after `limit` device operations; returns
/// whether the cut happened, after recovering and checking the disk.
fn run(ops: &[Op], mode: WriteMode, limit: u64, keep_seed: u64) -> Outcome {
    run_geo(ops, mode, limit, keep_seed, SMALL)
}

fn run_geo(ops: &[Op], mode: WriteMode, limit: u64, keep_seed: u64, geo: Geo) -> Outcome {
    let cfg = |mode| cfg_geo(mode, geo);
    let size = SOURCE_BLOCKS * u64::from(BS);
    let sectors = size / SECTOR;
    let mut initial = Vec::with_capacity(size as usize);
    for s in 0..sectors {
        initial.extend(content(0, s));
    }
    let src_mem = Arc::new(MemDevice::from_bytes(&initial));
    let g = Geometry::resolve(&cfg(mode).geometry, geo.blocks).unwrap();
    let cache_mem = Arc::new(MemDevice::new(Layout::new(&g).device_len()));
    let src_vol = Arc::new(VolatileCacheDevice::new(src_mem.clone()));
    let cache_vol = Arc::new(VolatileCacheDevice::new(cache_mem.clone()));
    let power = Arc::new(Power {
        ops: AtomicU64::new(0),
        limit: AtomicU64::new(u64::MAX),
        off: AtomicBool::new(false),
    });
    let source: Arc<dyn BlockDevice> = Arc::new(Powered {
        dev: src_vol.clone(),
        power: power.clone(),
    });
    let cache: Arc<dyn BlockDevice> = Arc::new(Powered {
        dev: cache_vol.clone(),
        power: power.clone(),
    });
    // Format with power on, then arm the cut.
    let mut engine = Engine::open(source.clone(), cache.clone(), cfg(mode)).unwrap();
    engine.flush().unwrap();
    src_vol.flush().unwrap();
    cache_vol.flush().unwrap();
    power.ops.store(0, SeqCst);
    power.limit.store(limit, SeqCst);

    let mut o = Oracle {
        stable: vec![0; sectors as usize],
        after: vec![Vec::new(); sectors as usize],
        latest: vec![0; sectors as usize],
    };
    let mut version = 0u32;
    let mut crashed = false;
    for (idx, op) in ops.iter().enumerate() {
        if std::env::var("CRASH_DEBUG").is_ok() {
            eprintln!("op {idx} starts at device op {}", power.ops.load(SeqCst));
        }
        let r = match *op {
            Op::Write { sector, count } | Op::Zero { sector, count } => {
                let zero = matches!(op, Op::Zero { .. });
                version += 1;
                let v = if zero { u32::MAX } else { version };
                for s in sector..sector + count {
                    o.after[s as usize].push(v);
                    o.latest[s as usize] = v;
                }
                if zero {
                    engine.write_zeroes(sector * SECTOR, count * SECTOR)
                } else {
                    let mut data = Vec::with_capacity((count * SECTOR) as usize);
                    for s in sector..sector + count {
                        data.extend(content(v, s));
                    }
                    engine.write(sector * SECTOR, &data)
                }
            }
            Op::Read { sector, count } => {
                let mut buf = vec![0u8; (count * SECTOR) as usize];
                let r = engine.read(sector * SECTOR, &mut buf);
                if r.is_ok() {
                    for (i, s) in (sector..sector + count).enumerate() {
                        let got = &buf[i * SECTOR as usize..(i + 1) * SECTOR as usize];
                        assert!(
                            got == content(o.latest[s as usize], s),
                            "read of sector {s} before the crash is wrong"
                        );
                    }
                }
                r
            }
            Op::Flush | Op::FlushAll => {
                let r = if matches!(op, Op::Flush) {
                    engine.flush()
                } else {
                    engine.flush_all(&mut |_| {}).and_then(|_| engine.flush())
                };
                if r.is_ok() {
                    for s in 0..sectors as usize {
                        o.stable[s] = o.latest[s];
                        o.after[s].clear();
                    }
                }
                r
            }
            Op::Restart => {
                let r = engine.shutdown(false);
                if r.is_ok() {
                    // A clean shutdown flushes everything.
                    for s in 0..sectors as usize {
                        o.stable[s] = o.latest[s];
                        o.after[s].clear();
                    }
                    match Engine::open(
                        source.clone(),
                        cache.clone(),
                        EngineConfig {
                            mode: None,
                            ..cfg(mode)
                        },
                    ) {
                        Ok(e) => {
                            engine = e;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    r
                }
            }
        };
        if r.is_err() {
            assert!(
                power.off.load(SeqCst),
                "operation failed with the power on: {:?}",
                r.err()
            );
            crashed = true;
            break;
        }
    }
    engine.halt();
    drop(engine);
    let ops_used = power.ops.load(SeqCst);
    // A background store or writeback may have met the cut after the last
    // foreground operation: that is a crash point too.
    crashed |= power.off.load(SeqCst);
    if !crashed {
        return Outcome { ops_used, crashed };
    }
    // Power cut: each unflushed sector write survives or not.
    let mut rng = rand::rngs::StdRng::seed_from_u64(keep_seed);
    let policy = keep_seed % 3; // 0: drop all, 1: keep all, 2: random
    src_vol
        .power_cut(|_, _| match policy {
            0 => false,
            1 => true,
            _ => rng.gen_bool(0.5),
        })
        .unwrap();
    cache_vol
        .power_cut(|_, _| match policy {
            0 => false,
            1 => true,
            _ => rng.gen_bool(0.5),
        })
        .unwrap();

    let e = match Engine::open(src_mem.clone(), cache_mem.clone(), EngineConfig::default()) {
        Ok(e) => e,
        Err(err) => {
            panic!("recovery failed after a cut at {limit} ({mode}, keep seed {keep_seed}): {err}")
        }
    };
    let mut disk = vec![0u8; size as usize];
    e.read(0, &mut disk).unwrap();
    for s in 0..sectors {
        let got = &disk[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let st = o.stable[s as usize];
        let ok = got == content(st, s) || o.after[s as usize].iter().any(|&v| got == content(v, s));
        if !ok {
            let v = u32::from_le_bytes([got[0], got[1], got[2], got[3]]);
            let from = u32::from_le_bytes([got[4], got[5], got[6], got[7]]);
            panic!(
                "cut at op {limit} ({mode}, keep seed {keep_seed}): sector {s} holds version {v} of sector {from}; \
                 allowed: flushed {st} or later {:?}",
                o.after[s as usize]
            );
        }
    }
    // Recovered data must also reach the source intact.
    e.flush_all(&mut |_| {}).unwrap();
    let src = src_mem.to_vec();
    assert!(
        src == disk,
        "source after recovery + flush_all differs from what the cache served"
    );
    e.shutdown(false).unwrap();
    Outcome { ops_used, crashed }
}

fn sweep(mode: WriteMode, seeds: std::ops::Range<u64>, ops_per_workload: usize) -> u64 {
    sweep_with(mode, seeds, ops_per_workload, false)
}

fn sweep_with(
    mode: WriteMode,
    seeds: std::ops::Range<u64>,
    ops_per_workload: usize,
    heavy: bool,
) -> u64 {
    sweep_geo(mode, seeds, ops_per_workload, heavy, SMALL)
}

fn sweep_geo(
    mode: WriteMode,
    seeds: std::ops::Range<u64>,
    ops_per_workload: usize,
    heavy: bool,
    geo: Geo,
) -> u64 {
    let workloads = seeds.map(|seed| (seed, workload_with(seed, ops_per_workload, heavy)));
    sweep_ops(mode, workloads, geo)
}

/// Cuts the power at every device operation of each `(seed, workload)`.
fn sweep_ops(mode: WriteMode, workloads: impl Iterator<Item = (u64, Vec<Op>)>, geo: Geo) -> u64 {
    let mut points = 0;
    for (seed, ops) in workloads {
        let total = run_geo(&ops, mode, u64::MAX, 0, geo).ops_used;
        for k in 0..total {
            let out = run_geo(&ops, mode, k, seed * 1000 + k, geo);
            assert!(out.crashed || out.ops_used <= k, "expected a cut at {k}");
            points += 1;
        }
    }
    points
}

#[test]
fn crash_at_every_io_writeback() {
    let n = sweep(WriteMode::Writeback, 0..6, 40);
    eprintln!("writeback: {n} crash points checked");
    assert!(n > 500);
    // Both ways a miss on a set of dirty frames goes are crashed into.
    let (bypassed, evicted) = (0..6)
        .map(|seed| uncut(workload(seed, 40), SMALL).1)
        .fold((0, 0), |(b, d), s| (b + s.bypassed, d + s.dirty_evictions));
    eprintln!("writeback: {bypassed} misses around the cache, {evicted} dirty evictions");
    assert!(bypassed > 0, "no miss went around the cache");
}

/// The same with frames laid out in rows: recovery must find each block's
/// data where `Geometry::slot_of` put it.
#[test]
fn crash_at_every_io_writeback_row_layout() {
    let g = Geometry::resolve(&cfg_geo(WriteMode::Writeback, ROWS).geometry, ROWS.blocks).unwrap();
    assert!(
        (0..ROWS.blocks).any(|f| g.slot_of(f) != f),
        "rows not in use"
    );
    let n = sweep_geo(WriteMode::Writeback, 400..404, 40, false, ROWS);
    eprintln!("writeback, row layout: {n} crash points checked");
    assert!(n > 300);
}

/// Enough commits to fill the journal, so checkpoints (table copy switch)
/// are crashed into too.
/// Misses that evict dirty blocks themselves (no background writeback):
/// a cache read, a source write and a commit inside a request.
#[test]
fn crash_at_every_io_writeback_evicting() {
    let n = sweep_geo(WriteMode::Writeback, 0..6, 40, false, EVICTING);
    eprintln!("writeback, evicting misses: {n} crash points checked");
    assert!(n > 500);
    let evicted: u64 = (0..6)
        .map(|seed| uncut(workload(seed, 40), EVICTING).1.dirty_evictions)
        .sum();
    assert!(evicted > 0, "no miss evicted a dirty block");
}

#[test]
fn crash_at_every_io_through_checkpoints() {
    let n = sweep_geo(WriteMode::Writeback, 300..302, 80, true, EVICTING);
    eprintln!("writeback with checkpoints: {n} crash points checked");
    assert!(
        uncut(workload_with(300, 80, true), EVICTING).0 > 0,
        "the workload never checkpoints"
    );
    assert!(n > 300);
}

/// Readahead on: windows fetched and stored in the background while the
/// workload writes, flushes and writes back; every cut must still leave
/// each sector at its last flushed content or a later write.
#[test]
fn crash_at_every_io_writeback_readahead() {
    let workloads = (600..606).map(|seed| (seed, workload_sequential(seed, 40)));
    let n = sweep_ops(WriteMode::Writeback, workloads, READAHEAD);
    eprintln!("writeback with readahead: {n} crash points checked");
    assert!(n > 500);
    let ahead: u64 = (600..606)
        .map(|seed| {
            uncut(workload_sequential(seed, 40), READAHEAD)
                .1
                .readahead_blocks
        })
        .sum();
    eprintln!("writeback with readahead: {ahead} blocks read ahead without a cut");
    assert!(ahead > 0, "nothing was read ahead");
}

/// Runs a workload without a cut (restarts skipped) in write-back on
/// `geo`; returns the checkpoints it caused and the engine's counters.
fn uncut(ops: Vec<Op>, geo: Geo) -> (u64, vblkcache::engine::StatsSnapshot) {
    let size = SOURCE_BLOCKS * u64::from(BS);
    let src = Arc::new(MemDevice::new(size));
    let cfg = cfg_geo(WriteMode::Writeback, geo);
    let g = Geometry::resolve(&cfg.geometry, geo.blocks).unwrap();
    let cache = Arc::new(MemDevice::new(Layout::new(&g).device_len()));
    let e = Engine::open(src, cache, cfg).unwrap();
    for op in ops {
        match op {
            Op::Write { sector, count } => e
                .write(sector * SECTOR, &vec![7u8; (count * SECTOR) as usize])
                .unwrap(),
            Op::Read { sector, count } => e
                .read(sector * SECTOR, &mut vec![0u8; (count * SECTOR) as usize])
                .unwrap(),
            Op::Flush => e.flush().unwrap(),
            Op::FlushAll => e.flush_all(&mut |_| {}).unwrap(),
            _ => {}
        }
    }
    let checkpoints = e.status().metadata_checkpoints;
    // After the background fetches and stores have finished.
    e.shutdown(false).unwrap();
    (checkpoints, e.stats())
}

#[test]
fn crash_at_every_io_writethrough_and_writearound() {
    let a = sweep(WriteMode::Writethrough, 100..103, 40);
    let b = sweep(WriteMode::Writearound, 200..203, 40);
    eprintln!("writethrough: {a}, writearound: {b} crash points checked");
    assert!(a > 100 && b > 100);
}

/// More write-back workloads than the suite runs, for `scripts/crash-soak.sh`:
/// `CRASH_SEEDS` seeds (default 50) from seed 1000 on, half of them
/// commit-heavy.
#[test]
#[ignore]
fn crash_soak_writeback() {
    let seeds: u64 = match std::env::var("CRASH_SEEDS") {
        Ok(v) => v.parse().expect("CRASH_SEEDS must be a number"),
        Err(_) => 50,
    };
    let half = seeds / 2;
    let a = sweep(WriteMode::Writeback, 1000..1000 + half, 40);
    let b = sweep_with(WriteMode::Writeback, 5000..5000 + (seeds - half), 60, true);
    eprintln!(
        "crash soak: {seeds} write-back workloads, {} crash points checked",
        a + b
    );
    assert!(a + b > seeds * 50);
}

#[test]
#[ignore]
fn debug_one() {
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let k: u64 = std::env::var("K").unwrap().parse().unwrap();
    let ops = workload(seed, 40);
    for (i, op) in ops.iter().enumerate() {
        eprintln!("{i}: {op:?}");
    }
    run(&ops, WriteMode::Writeback, k, seed * 1000 + k);
}
