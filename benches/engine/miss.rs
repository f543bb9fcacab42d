//! Miss path: cold random 4 KiB reads through a source with injected read
//! latency. Each thread keeps one request outstanding (queue depth = threads).
//! Every read goes to a block never read before, so every read is a miss.
//! The same threads reading the latency source directly give the baseline.

use crate::common::{mem_engine, request, Opts, PatternDevice, Report, R};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use vblkcache::device::{AlignedBuf, BlockDevice, LatencyDevice, LatencyProfile};

const SECTION: &str = "miss";
const REQ: u64 = 4096;
/// Synthetic source size: far more blocks than any run can read.
const SOURCE_BYTES: u64 = 1 << 40;
/// Odd multiplier: `k * STRIDE mod 2^n` visits every block once, in a
/// scattered order.
const STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;

/// One repetition's totals.
struct Rep {
    ops: u64,
    secs: f64,
    lat_sum: f64,
    lats: Vec<f64>,
    bad_data: u64,
}

/// Runs `threads` threads for `dur`, each issuing one 4 KiB read at a time at
/// the offsets `offset(k)` for a shared increasing `k`.
fn run(
    threads: usize,
    dur: Duration,
    next: &AtomicU64,
    offset: &(dyn Fn(u64) -> u64 + Sync),
    read: &(dyn Fn(u64, &mut [u8]) -> R<()> + Sync),
) -> R<Rep> {
    let barrier = Barrier::new(threads);
    let start = Instant::now();
    let per: Vec<R<Rep>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || -> R<Rep> {
                    let mut buf = AlignedBuf::new(REQ as usize);
                    let mut rep = Rep {
                        ops: 0,
                        secs: 0.0,
                        lat_sum: 0.0,
                        lats: Vec::new(),
                        bad_data: 0,
                    };
                    barrier.wait();
                    let t0 = Instant::now();
                    while t0.elapsed() < dur {
                        let off = offset(next.fetch_add(1, Ordering::Relaxed));
                        let t = Instant::now();
                        read(off, &mut buf)?;
                        let l = t.elapsed().as_secs_f64();
                        rep.lat_sum += l;
                        rep.lats.push(l);
                        rep.ops += 1;
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&buf[..8]);
                        if u64::from_le_bytes(w) != PatternDevice::word(off / 8) {
                            rep.bad_data += 1;
                        }
                    }
                    rep.secs = t0.elapsed().as_secs_f64();
                    Ok(rep)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("bench thread panicked".into()))
            })
            .collect()
    });
    let mut total = Rep {
        ops: 0,
        secs: start.elapsed().as_secs_f64(),
        lat_sum: 0.0,
        lats: Vec::new(),
        bad_data: 0,
    };
    for r in per {
        let r = r?;
        total.ops += r.ops;
        total.lat_sum += r.lat_sum;
        total.lats.extend(r.lats);
        total.bad_data += r.bad_data;
    }
    Ok(total)
}

fn p99(lats: &mut [f64]) -> f64 {
    lats.sort_by(|a, b| a.total_cmp(b));
    lats.get(lats.len() * 99 / 100).copied().unwrap_or(f64::NAN)
}

/// Per-case results: IOPS per repetition, mean latency (ms) per repetition,
/// all latencies, wrong-data count, operations.
type CaseResult = (Vec<f64>, Vec<f64>, Vec<f64>, u64, u64);

fn repeat(
    opts: &Opts,
    threads: usize,
    next: &AtomicU64,
    offset: &(dyn Fn(u64) -> u64 + Sync),
    read: &(dyn Fn(u64, &mut [u8]) -> R<()> + Sync),
) -> R<CaseResult> {
    let reps = if opts.quick { 2 } else { 3 };
    let (mut iops, mut mean, mut all, mut bad, mut ops) = (vec![], vec![], vec![], 0, 0);
    for _ in 0..reps {
        let r = run(threads, opts.io_rep(), next, offset, read)?;
        iops.push(r.ops as f64 / r.secs);
        mean.push(r.lat_sum / r.ops.max(1) as f64 * 1e3);
        all.extend(r.lats);
        bad += r.bad_data;
        ops += r.ops;
    }
    Ok((iops, mean, all, bad, ops))
}

pub fn run_all(opts: &Opts, report: &mut Report) -> R<()> {
    let thread_counts: &[usize] = &[1, 4, 16, 32];
    for lat_ms in [1u64, 5] {
        let lat = Duration::from_millis(lat_ms);
        let source = Arc::new(LatencyDevice::new(
            PatternDevice::new(SOURCE_BYTES),
            LatencyProfile::uniform(lat),
        ));
        // Baseline: the latency source read directly.
        let mut direct_mean = std::collections::HashMap::new();
        for &threads in thread_counts {
            let case = format!("direct source {lat_ms}ms 4K x{threads}thr");
            if !opts.matches(&case) {
                continue;
            }
            let next = AtomicU64::new(0);
            let blocks = SOURCE_BYTES / REQ;
            let offset = |k: u64| (k.wrapping_mul(STRIDE) % blocks) * REQ;
            let src = source.clone();
            let read = move |off: u64, buf: &mut [u8]| -> R<()> { Ok(src.read_at(buf, off)?) };
            let (iops, mean, mut all, _, _) = repeat(opts, threads, &next, &offset, &read)?;
            report.row(SECTION, &case, "IOPS", "op/s", &iops, "");
            let p = p99(&mut all) * 1e3;
            let m = report.row(
                SECTION,
                &case,
                "mean latency",
                "ms",
                &mean,
                format!("p99 {p:.3} ms"),
            );
            direct_mean.insert(threads, m.median);
        }
        for bs in [4096u32, 65536] {
            let bsz = u64::from(bs);
            let cache_blocks = if bs == 4096 { 16384 } else { 4096 };
            for &threads in thread_counts {
                let case = format!("engine bs {}K {lat_ms}ms 4K x{threads}thr", bs / 1024);
                if !opts.matches(&case) {
                    continue;
                }
                let src: Arc<dyn BlockDevice> = source.clone();
                let engine = mem_engine(src, request(bs, cache_blocks, 256), cache_blocks)?;
                let blocks = SOURCE_BYTES / bsz;
                let per_block = bsz / REQ;
                // A new block for every k; the 4 KiB piece inside it varies too.
                let offset =
                    |k: u64| (k.wrapping_mul(STRIDE) % blocks) * bsz + (k % per_block) * REQ;
                let read = |off: u64, buf: &mut [u8]| -> R<()> { Ok(engine.read(off, buf)?) };
                let next = AtomicU64::new(0);
                let (iops, mean, mut all, bad, ops) = repeat(opts, threads, &next, &offset, &read)?;
                let st = engine.stats();
                report.row(SECTION, &case, "IOPS", "op/s", &iops, "");
                let p = p99(&mut all) * 1e3;
                report.row(
                    SECTION,
                    &case,
                    "mean latency",
                    "ms",
                    &mean,
                    format!("p99 {p:.3} ms, demotions {}", st.demotions),
                );
                report.row(
                    SECTION,
                    &case,
                    "mean latency / source",
                    "x",
                    &mean.iter().map(|m| m / lat_ms as f64).collect::<Vec<_>>(),
                    "target <= 1.1",
                );
                if let Some(d) = direct_mean.get(&threads) {
                    report.row(
                        SECTION,
                        &case,
                        "mean latency / direct",
                        "x",
                        &mean.iter().map(|m| m / d).collect::<Vec<_>>(),
                        "vs the direct median at this thread count",
                    );
                }
                report.check(
                    SECTION,
                    format!(
                        "{case}: {ops} reads, read_misses {}, read_hits {}, wrong data {bad}",
                        st.read_misses, st.read_hits
                    ),
                    st.read_misses == ops && st.read_hits == 0 && bad == 0,
                );
                engine.shutdown(false)?;
            }
        }
    }
    Ok(())
}
