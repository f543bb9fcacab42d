//! Hit path: reads (512 B and 4 KiB) and writeback-mode write hits on a cache
//! whose every block the benchmark touches is cached, against a raw
//! `MemDevice` copy of the same size as the floor.

use crate::common::{filling_working_set, mem_engine, rates, request, Opts, Report, Rng, R};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vblkcache::device::{AlignedBuf, BlockDevice, MemDevice};
use vblkcache::engine::Engine;

const SECTION: &str = "hit";
/// Cache blocks of every hit-path cache.
const BLOCKS: u64 = 4096;

/// What one thread does per operation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// Runs `threads` threads for `dur`, each calling `f(thread, rng)` in a loop;
/// returns per-thread (operations, seconds).
fn run_threads<F>(threads: usize, dur: Duration, seed: u64, f: F) -> R<Vec<(u64, f64)>>
where
    F: Fn(usize, &mut Rng, &mut [u8]) -> R<()> + Sync,
{
    let barrier = Barrier::new(threads);
    let stop = AtomicBool::new(false);
    let results: Vec<R<(u64, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, stop, f) = (&barrier, &stop, &f);
                s.spawn(move || -> R<(u64, f64)> {
                    let mut rng = Rng::new(seed ^ ((t as u64 + 1) * 0x1234_5678_9ABC));
                    let mut buf = AlignedBuf::new(64 << 10);
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut ops = 0u64;
                    // Checking the clock every 64 operations keeps its cost
                    // (tens of ns) out of the per-operation numbers.
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..64 {
                            if let Err(e) = f(t, &mut rng, &mut buf) {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                        ops += 64;
                        if t == 0 && t0.elapsed() >= dur {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok((ops, t0.elapsed().as_secs_f64()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("bench thread panicked".into()))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// A warm cache: engine, working set, block size.
struct Warm {
    engine: Engine,
    ws: Vec<u64>,
    bs: u64,
}

fn warm_cache(bs: u32, assoc: u32, report: &mut Report) -> R<Warm> {
    let bsz = u64::from(bs);
    // A source four times the cache, so hashing leaves almost no set short.
    let source_blocks = 4 * BLOCKS;
    let source: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(source_blocks * bsz));
    let engine = mem_engine(source, request(bs, BLOCKS, assoc), BLOCKS)?;
    let ws = filling_working_set(&engine.geometry(), source_blocks);
    let mut buf = AlignedBuf::new(bs as usize);
    // Pass 1 misses and queues the stores; pass 2 waits for each store and
    // hits, so afterwards every working-set block is cached and idle.
    for _pass in 0..2 {
        for &b in &ws {
            engine.read(b * bsz, &mut buf)?;
        }
    }
    let valid = engine.valid_blocks();
    report.check(
        SECTION,
        format!(
            "bs {}K assoc {assoc}: warm cache holds the whole working set ({} of {} frames, valid_blocks {valid})",
            bs / 1024,
            ws.len(),
            BLOCKS
        ),
        valid == ws.len() as u64 && engine.dirty_blocks() == 0,
    );
    Ok(Warm {
        engine,
        ws,
        bs: bsz,
    })
}

/// Measures `op` of `size` bytes at random aligned offsets of the working set.
fn measure(
    opts: &Opts,
    report: &mut Report,
    w: &Warm,
    label: &str,
    op: Op,
    size: usize,
    threads: usize,
) -> R<()> {
    let slots = w.bs / size as u64;
    let n = w.ws.len() as u64;
    let mut per = Vec::new();
    let mut agg = Vec::new();
    w.engine.reset_stats();
    let mut total_ops = 0u64;
    for rep in 0..opts.reps() {
        let r = run_threads(threads, opts.cpu_rep(), rep as u64 + 7, |_, rng, buf| {
            let b = w.ws[rng.below(n) as usize];
            let off = b * w.bs + rng.below(slots) * size as u64;
            match op {
                Op::Read => w.engine.read(off, &mut buf[..size])?,
                Op::Write => w.engine.write(off, &buf[..size])?,
            }
            Ok(())
        })?;
        total_ops += r.iter().map(|x| x.0).sum::<u64>();
        let (p, a) = rates(&r);
        per.push(p);
        agg.push(a);
    }
    let st = w.engine.stats();
    let what = if op == Op::Read { "read" } else { "write" };
    let case = format!("{label} {what} {size}B x{threads}thr");
    report.row(SECTION, &case, "ops/s per thread", "op/s", &per, "");
    report.row(SECTION, &case, "ops/s total", "op/s", &agg, "");
    let (hits, misses) = match op {
        Op::Read => (st.read_hits, st.read_misses),
        Op::Write => (st.write_hits, st.write_misses),
    };
    report.check(
        SECTION,
        format!(
            "{case}: {total_ops} ops, {what}_hits {hits}, {what}_misses {misses}, waits {}",
            st.waits
        ),
        misses == 0 && hits == total_ops,
    );
    Ok(())
}

/// The floor: the same copies straight from/to a `MemDevice`.
fn measure_raw(opts: &Opts, report: &mut Report, op: Op, size: usize, threads: usize) -> R<()> {
    let len = BLOCKS * 4096;
    let dev = MemDevice::new(len);
    let slots = len / size as u64;
    let mut per = Vec::new();
    for rep in 0..opts.reps() {
        let r = run_threads(threads, opts.cpu_rep(), rep as u64 + 3, |_, rng, buf| {
            let off = rng.below(slots) * size as u64;
            match op {
                Op::Read => dev.read_at(&mut buf[..size], off)?,
                Op::Write => dev.write_at(&buf[..size], off)?,
            }
            Ok(())
        })?;
        per.push(rates(&r).0);
    }
    let what = if op == Op::Read { "read" } else { "write" };
    report.row(
        SECTION,
        format!("raw MemDevice {what} {size}B x{threads}thr"),
        "ops/s per thread",
        "op/s",
        &per,
        "floor: no engine",
    );
    Ok(())
}

pub fn run(opts: &Opts, report: &mut Report) -> R<()> {
    if opts.matches("raw MemDevice") {
        for threads in [1, 2] {
            for size in [512, 4096] {
                measure_raw(opts, report, Op::Read, size, threads)?;
            }
            measure_raw(opts, report, Op::Write, 4096, threads)?;
        }
    }
    for bs in [4096u32, 65536] {
        for assoc in [1u32, 16, 256, 4096] {
            let label = if u64::from(assoc) == BLOCKS {
                format!("bs {}K full-assoc {assoc}", bs / 1024)
            } else {
                format!("bs {}K assoc {assoc}", bs / 1024)
            };
            if !opts.matches(&label) {
                continue;
            }
            let w = warm_cache(bs, assoc, report)?;
            for threads in [1, 2] {
                for size in [512, 4096] {
                    measure(opts, report, &w, &label, Op::Read, size, threads)?;
                }
            }
            // Write hits (writeback mode) at the default associativity and
            // at the two extremes.
            if assoc != 16 {
                for threads in [1, 2] {
                    measure(opts, report, &w, &label, Op::Write, 4096, threads)?;
                }
            }
            w.engine.shutdown(false)?;
        }
    }
    Ok(())
}
