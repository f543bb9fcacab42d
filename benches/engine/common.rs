//! Shared pieces of the engine benchmarks: options, sample summaries, the
//! report (rows and checks), a synthetic source device and small helpers.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;
use vblkcache::device::{BlockDevice, DeviceError, MemDevice};
use vblkcache::engine::meta::Layout;
use vblkcache::engine::{Engine, EngineConfig, Geometry, GeometryRequest, WriteMode};

pub type R<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Opts {
    pub quick: bool,
    pub json: bool,
    /// Sections to run (empty: all).
    pub only: Vec<String>,
    /// Only cases whose label contains this (hit, miss and writeback).
    pub filter: Option<String>,
    /// Also write the JSON report to this file.
    pub json_out: Option<String>,
}

impl Opts {
    pub fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
    /// True when `--filter` is absent or `label` contains it.
    pub fn matches(&self, label: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| label.contains(f))
    }
    /// Repetitions of each timed case.
    pub fn reps(&self) -> usize {
        if self.quick {
            3
        } else {
            5
        }
    }
    /// Length of one timed repetition of a CPU-bound case.
    pub fn cpu_rep(&self) -> Duration {
        Duration::from_millis(if self.quick { 60 } else { 200 })
    }
    /// Length of one timed repetition of a latency-bound case.
    pub fn io_rep(&self) -> Duration {
        Duration::from_millis(if self.quick { 150 } else { 500 })
    }
}

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Summary {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            samples: n,
        }
    }

    /// Spread as (max - min) / median, in percent.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median * 100.0
        }
    }
}

/// One measured number.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub section: &'static str,
    pub case: String,
    pub metric: &'static str,
    pub unit: &'static str,
    #[serde(flatten)]
    pub summary: Summary,
    pub note: String,
}

/// A correctness check made while measuring (e.g. "every read was a hit").
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub section: &'static str,
    pub what: String,
    pub ok: bool,
}

/// Everything the run measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
    /// Free-form facts (sizes, counters) worth keeping next to the numbers.
    pub facts: Vec<(String, String)>,
    #[serde(skip)]
    pub verbose: bool,
}

impl Report {
    pub fn row(
        &mut self,
        section: &'static str,
        case: impl Into<String>,
        metric: &'static str,
        unit: &'static str,
        samples: &[f64],
        note: impl Into<String>,
    ) -> Summary {
        let summary = Summary::of(samples);
        let row = Row {
            section,
            case: case.into(),
            metric,
            unit,
            summary,
            note: note.into(),
        };
        if self.verbose {
            eprintln!(
                "  {:<44} {:<18} {:>12} {:<6} [{} .. {}] {}",
                row.case,
                row.metric,
                fmt_num(summary.median),
                row.unit,
                fmt_num(summary.min),
                fmt_num(summary.max),
                row.note
            );
        }
        self.rows.push(row);
        summary
    }

    pub fn check(&mut self, section: &'static str, what: impl Into<String>, ok: bool) {
        let what = what.into();
        if self.verbose || !ok {
            eprintln!("  check {}: {what}", if ok { "ok    " } else { "FAILED" });
        }
        self.checks.push(Check { section, what, ok });
    }

    pub fn fact(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (k, v) = (key.into(), value.into());
        if self.verbose {
            eprintln!("  {k}: {v}");
        }
        self.facts.push((k, v));
    }
}

/// Formats a number with 3-4 significant digits.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        String::from("-")
    } else if a >= 100_000.0 {
        format!("{:.0}", x)
    } else if a >= 100.0 {
        format!("{:.1}", x)
    } else if a >= 1.0 {
        format!("{:.3}", x)
    } else {
        format!("{:.4}", x)
    }
}

/// xorshift64*: a tiny, fast generator for picking offsets (quality is
/// irrelevant here; speed is, so it does not dominate the hit path).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    #[inline]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// A read-mostly synthetic device of any size: byte `o` holds a value derived
/// from `o`, so reads can be checked without storing anything. Writes are
/// accepted and dropped. Used as the source of the miss benchmark, where the
/// source must be far larger than RAM-backed devices allow.
pub struct PatternDevice {
    size: u64,
}

impl PatternDevice {
    pub fn new(size: u64) -> PatternDevice {
        PatternDevice { size }
    }

    /// The 8-byte word at word index `w`.
    #[inline]
    pub fn word(w: u64) -> u64 {
        w.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5A5A_5A5A
    }

    /// The byte at offset `o`.
    pub fn byte(o: u64) -> u8 {
        (Self::word(o / 8) >> (8 * (o % 8))) as u8
    }

    fn fill(buf: &mut [u8], offset: u64) {
        if offset % 8 == 0 && buf.len() % 8 == 0 {
            for (i, c) in buf.chunks_exact_mut(8).enumerate() {
                c.copy_from_slice(&Self::word(offset / 8 + i as u64).to_le_bytes());
            }
        } else {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = Self::byte(offset + i as u64);
            }
        }
    }
}

impl BlockDevice for PatternDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        vblkcache::device::check_range(
            vblkcache::device::IoOp::Read,
            offset,
            buf.len() as u64,
            self.size,
        )?;
        Self::fill(buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        vblkcache::device::check_range(
            vblkcache::device::IoOp::Write,
            offset,
            buf.len() as u64,
            self.size,
        )
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn name(&self) -> String {
        String::from("pattern")
    }
}

/// A geometry request for exactly `blocks` blocks of `bs` bytes with `assoc` ways.
pub fn request(bs: u32, blocks: u64, assoc: u32) -> GeometryRequest {
    GeometryRequest {
        block_size: Some(bs),
        cache_blocks: Some(blocks),
        assoc: Some(assoc),
    }
}

/// Bytes a cache device needs for this geometry (metadata included).
pub fn cache_device_len(req: &GeometryRequest, blocks: u64) -> R<u64> {
    let g = Geometry::resolve(req, blocks)?;
    Ok(Layout::new(&g).device_len())
}

/// Opens an engine on a fresh in-memory cache sized for `req`, in writeback
/// mode, with background writeback off (high watermark 100%) so it does not
/// run during a measurement.
pub fn mem_engine(source: Arc<dyn BlockDevice>, req: GeometryRequest, blocks: u64) -> R<Engine> {
    let cache: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(cache_device_len(&req, blocks)?));
    let mut cfg = EngineConfig {
        geometry: req,
        mode: Some(WriteMode::Writeback),
        ..EngineConfig::default()
    };
    cfg.writeback.high_watermark_pct = 100;
    cfg.writeback.low_watermark_pct = 100;
    Ok(Engine::open(source, cache, cfg)?)
}

/// Source blocks that exactly fill the cache of `g` without any eviction:
/// walking the source from block 0, each block is taken while its set has a
/// free way. Stops at `g.cache_blocks` blocks or at the end of the source.
pub fn filling_working_set(g: &Geometry, source_blocks: u64) -> Vec<u64> {
    let mut used = vec![0u32; g.sets() as usize];
    let mut ws = Vec::with_capacity(g.cache_blocks as usize);
    for b in 0..source_blocks {
        if ws.len() as u64 == g.cache_blocks {
            break;
        }
        let s = g.set_of(b) as usize;
        if used[s] < g.assoc {
            used[s] += 1;
            ws.push(b);
        }
    }
    ws
}

/// Resident and peak resident set size of this process, in bytes:
/// resident from `/proc/self/statm` (pages), peak from `VmHWM` in
/// `/proc/self/status` (kB).
pub fn rss_bytes() -> R<(u64, u64)> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let resident_pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or("no resident field in /proc/self/statm")?
        .parse()?;
    // SAFETY: sysconf only reads a configuration value; no memory is passed.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).map_err(|_| "sysconf(_SC_PAGESIZE) failed")?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or("no VmHWM in /proc/self/status")?
        .parse()?;
    Ok((resident_pages * page, hwm_kb * 1024))
}

/// Per-thread rates and aggregate rate of one repetition, from per-thread
/// (operations, seconds).
pub fn rates(per_thread: &[(u64, f64)]) -> (f64, f64) {
    let n = per_thread.len().max(1) as f64;
    let per: f64 = per_thread
        .iter()
        .map(|&(ops, s)| ops as f64 / s.max(1e-9))
        .sum::<f64>()
        / n;
    (per, per * n)
}
