//! Writeback throughput: `flush_all` of contiguous dirty blocks to a source
//! with per-request write latency, against writing the same bytes to that
//! source directly, sequentially, with the engine's largest run as request
//! size.

use crate::common::{cache_device_len, request, Opts, Report, R};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vblkcache::device::{
    AlignedBuf, BlockDevice, CountingDevice, LatencyDevice, LatencyProfile, MemDevice,
};
use vblkcache::engine::{Engine, EngineConfig, WriteMode};

const SECTION: &str = "writeback";
const BS: u64 = 65536;
const CACHE_BLOCKS: u64 = 4096;
/// Dirty blocks written back per flush: 64 MiB, a quarter of the cache, so no
/// set overflows while filling (that would write blocks back early).
const DIRTY: u64 = 1024;

type Source = CountingDevice<LatencyDevice<MemDevice>>;

/// Writes every dirty block; block `b` is filled with bytes `b + round`.
fn dirty_all(engine: &Engine, round: u8) -> R<()> {
    let mut buf = AlignedBuf::new(BS as usize);
    for b in 0..DIRTY {
        buf.fill((b as u8).wrapping_add(round));
        engine.write(b * BS, &buf)?;
    }
    Ok(())
}

fn source_holds(src: &Source, round: u8) -> R<bool> {
    let mut buf = AlignedBuf::new(BS as usize);
    for b in 0..DIRTY {
        src.inner().inner().read_at(&mut buf, b * BS)?;
        let want = (b as u8).wrapping_add(round);
        if buf.iter().any(|&x| x != want) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn case(opts: &Opts, report: &mut Report, lat: Duration, run_bytes: u64) -> R<()> {
    let label = format!(
        "{} MiB dirty, write lat {}ms, run {}K",
        (DIRTY * BS) >> 20,
        lat.as_secs_f64() * 1e3,
        run_bytes >> 10
    );
    if !opts.matches(&label) {
        return Ok(());
    }
    let profile = LatencyProfile {
        write: lat,
        flush: lat,
        ..LatencyProfile::default()
    };
    let src = Arc::new(CountingDevice::new(LatencyDevice::new(
        MemDevice::new(CACHE_BLOCKS * BS),
        profile,
    )));
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
    let reps = if opts.quick { 2 } else { 3 };
    let (mut t_flush, mut t_direct, mut t_fresh, mut ratio) = (vec![], vec![], vec![], vec![]);
    let direct_buf = AlignedBuf::new(run_bytes as usize);
    // Touch every source page once, untimed: the first write to a MemDevice
    // page pays a page fault, which would otherwise fall on rep 0's flush_all
    // (it writes the source before the direct pass does).
    src.inner()
        .inner()
        .write_at(&AlignedBuf::new((DIRTY * BS) as usize), 0)?;
    for rep in 0..reps {
        let round = rep as u8 * 3 + 1;
        dirty_all(&engine, round)?;
        let st = engine.stats();
        let dirty = engine.dirty_blocks();
        let c0 = src.counts();
        let t = Instant::now();
        engine.flush_all(&mut |_| {})?;
        let tf = t.elapsed().as_secs_f64();
        let c1 = src.counts();
        let writes = c1.writes - c0.writes;
        let bytes = c1.bytes_written - c0.bytes_written;
        let holds = source_holds(&src, round)?;
        report.check(
            SECTION,
            format!(
                "{label} rep {rep}: {dirty} dirty before (dirty_evictions so far {}), {} after; \
                 {writes} source writes of {bytes} bytes; source holds the data: {}",
                st.dirty_evictions,
                engine.dirty_blocks(),
                holds
            ),
            dirty == DIRTY && engine.dirty_blocks() == 0 && bytes == DIRTY * BS && holds,
        );
        // The same bytes, written directly with the same request size.
        let t = Instant::now();
        let mut off = 0;
        while off < DIRTY * BS {
            let n = run_bytes.min(DIRTY * BS - off) as usize;
            src.write_at(&direct_buf[..n], off)?;
            off += n as u64;
        }
        src.flush()?;
        let td = t.elapsed().as_secs_f64();
        // Diagnostic: the same, with a freshly allocated zeroed buffer per
        // request (what a writeback run pays besides its copies).
        let t = Instant::now();
        let mut off = 0;
        while off < DIRTY * BS {
            let n = run_bytes.min(DIRTY * BS - off) as usize;
            let fresh = AlignedBuf::new(n);
            src.write_at(&fresh, off)?;
            off += n as u64;
        }
        src.flush()?;
        t_fresh.push(t.elapsed().as_secs_f64());
        t_flush.push(tf);
        t_direct.push(td);
        ratio.push(tf / td);
    }
    let mib = (DIRTY * BS) as f64 / (1 << 20) as f64;
    report.row(SECTION, &label, "flush_all time", "s", &t_flush, "");
    let mbs: Vec<f64> = t_flush.iter().map(|t| mib / t).collect();
    report.row(SECTION, &label, "flush_all rate", "MiB/s", &mbs, "");
    report.row(SECTION, &label, "direct write time", "s", &t_direct, "");
    report.row(
        SECTION,
        &label,
        "direct, new buffer per request",
        "s",
        &t_fresh,
        "diagnostic: zeroed AlignedBuf per request",
    );
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
    case(opts, report, Duration::ZERO, 4 << 20)?;
    case(opts, report, Duration::from_millis(1), 4 << 20)?;
    case(opts, report, Duration::from_millis(1), BS)?;
    Ok(())
}
