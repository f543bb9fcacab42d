//! Writeback throughput: `flush_all` of contiguous dirty blocks to a slow
//! source, against writing the same bytes to that source directly,
//! sequentially, with the engine's largest run as request size and one
//! request at a time: writeback also has one source write in flight at a
//! time (its writer thread), so the baseline gets the same request size and
//! the same concurrency.
//!
//! Two source models: [`LatencyDevice`] (a fixed cost per request, the copy
//! into memory on top: bandwidth is whatever memcpy gives) and
//! [`RateDevice`] (a fixed cost per request plus a transfer rate, one
//! request at a time: an HDD streaming).

use crate::common::{cache_device_len, request, Opts, Report, R};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vblkcache::device::{
    AlignedBuf, BlockDevice, CountingDevice, LatencyDevice, LatencyProfile, MemDevice, RateDevice,
    RateProfile,
};
use vblkcache::engine::{Engine, EngineConfig, WriteMode};

const SECTION: &str = "writeback";
const BS: u64 = 65536;
const CACHE_BLOCKS: u64 = 4096;
/// Dirty blocks written back per flush by default: 64 MiB, a quarter of the
/// cache, so no set overflows while filling (that would write blocks back
/// early; the checks would catch it).
const DIRTY: u64 = 1024;

type Source = CountingDevice<Arc<dyn BlockDevice>>;

/// The slow source of a case.
#[derive(Clone, Copy)]
enum Model {
    /// `LatencyDevice`: this write and flush latency per request.
    Latency(Duration),
    /// `RateDevice`: this latency per request plus this many MiB/s.
    Rate(Duration, u64),
}

impl Model {
    fn label(self) -> String {
        match self {
            Model::Latency(l) => format!("write lat {}ms", l.as_secs_f64() * 1e3),
            Model::Rate(l, mbs) => format!("lat {}ms + {mbs} MiB/s", l.as_secs_f64() * 1e3),
        }
    }

    fn wrap(self, mem: Arc<MemDevice>) -> Arc<dyn BlockDevice> {
        match self {
            Model::Latency(lat) => Arc::new(LatencyDevice::new(
                mem,
                LatencyProfile {
                    write: lat,
                    flush: lat,
                    ..LatencyProfile::default()
                },
            )),
            Model::Rate(latency, mbs) => Arc::new(RateDevice::new(
                mem,
                RateProfile {
                    latency,
                    bytes_per_sec: mbs << 20,
                },
            )),
        }
    }
}

/// Writes every dirty block; block `b` is filled with bytes `b + round`.
fn dirty_all(engine: &Engine, dirty: u64, round: u8) -> R<()> {
    let mut buf = AlignedBuf::new(BS as usize);
    for b in 0..dirty {
        buf.fill((b as u8).wrapping_add(round));
        engine.write(b * BS, &buf)?;
    }
    Ok(())
}

fn source_holds(mem: &MemDevice, dirty: u64, round: u8) -> R<bool> {
    let mut buf = AlignedBuf::new(BS as usize);
    for b in 0..dirty {
        mem.read_at(&mut buf, b * BS)?;
        let want = (b as u8).wrapping_add(round);
        if buf.iter().any(|&x| x != want) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn case(opts: &Opts, report: &mut Report, model: Model, dirty: u64, run_bytes: u64) -> R<()> {
    let label = format!(
        "{} MiB dirty, {}, run {}K",
        (dirty * BS) >> 20,
        model.label(),
        run_bytes >> 10
    );
    if !opts.matches(&label) {
        return Ok(());
    }
    let mem = Arc::new(MemDevice::new(CACHE_BLOCKS * BS));
    let src: Arc<Source> = Arc::new(CountingDevice::new(model.wrap(mem.clone())));
    let req = request(BS as u32, CACHE_BLOCKS, 256);
    let cache: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(cache_device_len(&req, CACHE_BLOCKS)?));
    let mut cfg = EngineConfig {
        geometry: req,
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    cfg.writeback.high_watermark_pct = 100;
    cfg.writeback.low_watermark_pct = 100;
    cfg.writeback.max_run_bytes = run_bytes;
    let source: Arc<dyn BlockDevice> = src.clone();
    let engine = Engine::open(source, cache, cfg)?;
    // Five reps: single 25 ms passes on shared cores vary by 20 % and more.
    let reps = if opts.quick { 2 } else { 5 };
    let (mut t_flush, mut t_direct, mut t_fresh, mut ratio) = (vec![], vec![], vec![], vec![]);
    let direct_buf = AlignedBuf::new(run_bytes as usize);
    // Touch every source page once, untimed: the first write to a MemDevice
    // page pays a page fault, which would otherwise fall on rep 0's flush_all
    // (it writes the source before the direct pass does).
    mem.write_at(&AlignedBuf::new((dirty * BS) as usize), 0)?;
    for rep in 0..reps {
        let round = rep as u8 * 3 + 1;
        dirty_all(&engine, dirty, round)?;
        let st = engine.stats();
        let dirty_before = engine.dirty_blocks();
        let c0 = src.counts();
        let t = Instant::now();
        engine.flush_all(&mut |_| {})?;
        let tf = t.elapsed().as_secs_f64();
        let c1 = src.counts();
        let writes = c1.writes - c0.writes;
        let bytes = c1.bytes_written - c0.bytes_written;
        let holds = source_holds(&mem, dirty, round)?;
        report.check(
            SECTION,
            format!(
                "{label} rep {rep}: {dirty_before} dirty before (dirty_evictions so far {}), {} after; \
                 {writes} source writes of {bytes} bytes; source holds the data: {}",
                st.dirty_evictions,
                engine.dirty_blocks(),
                holds
            ),
            dirty_before == dirty && engine.dirty_blocks() == 0 && bytes == dirty * BS && holds,
        );
        // The same bytes, written directly with the same request size.
        let t = Instant::now();
        let mut off = 0;
        while off < dirty * BS {
            let n = run_bytes.min(dirty * BS - off) as usize;
            src.write_at(&direct_buf[..n], off)?;
            off += n as u64;
        }
        src.flush()?;
        let td = t.elapsed().as_secs_f64();
        // Diagnostic: the same, with a freshly allocated zeroed buffer per
        // request (what a writeback run pays besides its copies). Only for
        // the latency model: the rate model hides the copy in its time.
        if matches!(model, Model::Latency(_)) {
            let t = Instant::now();
            let mut off = 0;
            while off < dirty * BS {
                let n = run_bytes.min(dirty * BS - off) as usize;
                let fresh = AlignedBuf::new(n);
                src.write_at(&fresh, off)?;
                off += n as u64;
            }
            src.flush()?;
            t_fresh.push(t.elapsed().as_secs_f64());
        }
        t_flush.push(tf);
        t_direct.push(td);
        ratio.push(tf / td);
    }
    let mib = (dirty * BS) as f64 / (1 << 20) as f64;
    report.row(SECTION, &label, "flush_all time", "s", &t_flush, "");
    let mbs: Vec<f64> = t_flush.iter().map(|t| mib / t).collect();
    report.row(SECTION, &label, "flush_all rate", "MiB/s", &mbs, "");
    report.row(SECTION, &label, "direct write time", "s", &t_direct, "");
    let dmbs: Vec<f64> = t_direct.iter().map(|t| mib / t).collect();
    report.row(SECTION, &label, "direct write rate", "MiB/s", &dmbs, "");
    if !t_fresh.is_empty() {
        report.row(
            SECTION,
            &label,
            "direct, new buffer per request",
            "s",
            &t_fresh,
            "diagnostic: zeroed AlignedBuf per request",
        );
    }
    report.row(
        SECTION,
        &label,
        "flush_all / direct",
        "x",
        &ratio,
        "1.0 = as fast as writing the source directly",
    );
    engine.shutdown(false)?;
    Ok(())
}

pub fn run(opts: &Opts, report: &mut Report) -> R<()> {
    let ms1 = Duration::from_millis(1);
    case(opts, report, Model::Latency(Duration::ZERO), DIRTY, 4 << 20)?;
    case(opts, report, Model::Latency(ms1), DIRTY, 4 << 20)?;
    // The same with three times the dirty data: the per-pass fixed cost
    // (first run's cache read, commit) weighs a third as much.
    case(opts, report, Model::Latency(ms1), 3 * DIRTY, 4 << 20)?;
    case(opts, report, Model::Latency(ms1), DIRTY, BS)?;
    // An HDD streaming: 1 ms per request plus 180 MiB/s.
    case(opts, report, Model::Rate(ms1, 180), DIRTY, 4 << 20)?;
    Ok(())
}
