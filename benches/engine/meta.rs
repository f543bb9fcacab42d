//! Metadata: `Engine::open` of a cache whose persisted mapping holds N
//! entries of 64 KiB blocks, after a clean shutdown, on sparse files.
//!
//! Filling N frames through the engine would copy N * 64 KiB of data, so the
//! mapping is written with the public `meta::save_table` instead (every frame
//! valid and clean, each block in the set it hashes to). The engine then opens
//! it once and shuts down cleanly, so the measured open reads a table and a
//! superblock the engine itself wrote. The measured opens run in fresh child
//! processes (this binary re-executed), so the RSS delta is the engine's own
//! and not memory left over from the set-up.

use crate::common::{cache_device_len, request, rss_bytes, Opts, Report, R};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use vblkcache::device::{AlignedBuf, BlockDevice, FileDevice, OpenOptions};
use vblkcache::engine::meta::{self, decode_page, Layout, META_PAGE};
use vblkcache::engine::{Engine, EngineConfig, Geometry};

const SECTION: &str = "meta";
const BS: u32 = 65536;
const ASSOC: u32 = 256;
/// Entry flag for a valid frame (see the table format in `engine::meta`).
const VALID: u64 = 1 << 63;
/// Argument that makes this binary a child that times one open.
pub const CHILD_ARG: &str = "--meta-child";

/// What a child measured, printed as one JSON line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ChildResult {
    pub open_s: f64,
    pub load_ms: u64,
    pub entries_loaded: u64,
    pub clean: bool,
    pub rss_before: u64,
    pub rss_after: u64,
    pub hwm_after: u64,
    pub ram_bytes_per_block: f64,
    pub shutdown_s: f64,
}

fn open_devices(cache: &Path, source: &Path) -> R<(Arc<dyn BlockDevice>, Arc<dyn BlockDevice>)> {
    let c = FileDevice::open(
        cache,
        OpenOptions {
            direct: true,
            read_only: false,
            exclusive: false,
        },
    )?;
    let s = FileDevice::open(source, OpenOptions::default())?;
    Ok((Arc::new(s), Arc::new(c)))
}

/// The child: opens the cache, measures, shuts down cleanly, prints JSON.
pub fn child(cache: &Path, source: &Path) -> R<()> {
    let (src, cdev) = open_devices(cache, source)?;
    let (rss_before, _) = rss_bytes()?;
    let t = Instant::now();
    // As the daemon opens it by default: the mapping's entries in a
    // crash-state file on /dev/shm (counted in RSS as shared memory).
    let shm = Path::new("/dev/shm");
    let cfg = EngineConfig {
        crash_state_dir: shm.is_dir().then(|| shm.to_path_buf()),
        ..EngineConfig::default()
    };
    let engine = Engine::open(src, cdev, cfg)?;
    let open_s = t.elapsed().as_secs_f64();
    let (rss_after, hwm_after) = rss_bytes()?;
    let st = engine.status();
    let t = Instant::now();
    engine.shutdown(false)?;
    let r = ChildResult {
        open_s,
        load_ms: st.start.load_ms,
        entries_loaded: st.start.entries_loaded,
        clean: st.start.clean,
        rss_before,
        rss_after,
        hwm_after,
        ram_bytes_per_block: st.ram_bytes_per_block,
        shutdown_s: t.elapsed().as_secs_f64(),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn sparse_file(path: &Path, len: u64) -> R<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(len)?;
    Ok(())
}

/// Entries for `g` with every frame valid: runs of `g.run` consecutive source
/// blocks go, whole, to the set they hash to while it has room.
fn full_table(g: &Geometry, source_blocks: u64) -> Vec<u64> {
    let run = u64::from(g.run);
    let assoc = u64::from(g.assoc);
    let mut fill = vec![0u64; g.sets() as usize];
    let mut entries = vec![0u64; g.cache_blocks as usize];
    let mut placed = 0;
    let mut group = 0;
    while placed < g.cache_blocks && (group + 1) * run <= source_blocks {
        let first = group * run;
        let s = g.set_of(first);
        let f = &mut fill[s as usize];
        if *f + run <= assoc {
            for i in 0..run {
                entries[(s * assoc + *f + i) as usize] = VALID | (first + i);
            }
            *f += run;
            placed += run;
        }
        group += 1;
    }
    entries
}

/// Reads and decodes the table without validating the entries.
fn read_decode(dev: &dyn BlockDevice, l: &Layout, copy: u8) -> R<usize> {
    let pages = l.table_pages();
    let per = meta::ENTRIES_PER_PAGE;
    let chunk = 256u64;
    let mut buf = AlignedBuf::new((chunk * META_PAGE) as usize);
    let mut out = Vec::with_capacity(l.geometry.cache_blocks as usize);
    let mut p = 0;
    while p < pages {
        let n = chunk.min(pages - p);
        dev.read_at(
            &mut buf[..(n * META_PAGE) as usize],
            l.table_copy_offset(copy) + p * META_PAGE,
        )?;
        for i in 0..n {
            let want = (l.geometry.cache_blocks - (p + i) * per).min(per) as usize;
            let o = (i * META_PAGE) as usize;
            decode_page(&buf[o..o + META_PAGE as usize], p + i, want, &mut out)?;
        }
        p += n;
    }
    Ok(out.len())
}

fn one_size(report: &mut Report, n: u64, children: usize) -> R<()> {
    let dir = tempfile::tempdir()?;
    let (cpath, spath) = (dir.path().join("cache"), dir.path().join("source"));
    let req = request(BS, n, ASSOC);
    let source_blocks = 2 * n;
    sparse_file(&cpath, cache_device_len(&req, n)?)?;
    sparse_file(&spath, source_blocks * u64::from(BS))?;
    let label = format!("{}M entries x 64K", n >> 20);
    let (src, cdev) = open_devices(&cpath, &spath)?;
    let cfg = EngineConfig {
        geometry: req,
        ..EngineConfig::default()
    };
    let t = Instant::now();
    let e = Engine::open(src.clone(), cdev.clone(), cfg.clone())?;
    let g = e.geometry();
    e.shutdown(false)?;
    drop(e);
    let t_format = t.elapsed().as_secs_f64();
    let layout = Layout::new(&g);
    // The table copy the superblock points at (shutdown switches copies).
    let active = match meta::read_superblock(&*cdev)? {
        meta::Found::Superblock(sb, _) => sb.table_copy,
        _ => 0,
    };
    let entries = full_table(&g, source_blocks);
    let filled = entries.iter().filter(|&&x| x != 0).count() as u64;
    meta::save_table(&*cdev, &layout, active, &entries)?;
    cdev.flush()?;
    drop(entries);
    report.fact(
        format!("meta {label}"),
        format!(
            "cache file {} GiB (sparse), source {} GiB (sparse), table {} MiB, {filled} of {n} frames filled, format+shutdown {t_format:.2}s",
            cache_device_len(&req, n)? >> 30,
            (source_blocks * u64::from(BS)) >> 30,
            (layout.data_offset - layout.table_offset) >> 20
        ),
    );
    // Where open's time goes: raw read + decode of the table vs the full
    // load_table (which also validates every entry).
    let t = Instant::now();
    let decoded = read_decode(&*cdev, &layout, active)?;
    let t_decode = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let loaded = meta::load_table(&*cdev, &layout, active, source_blocks)?;
    let t_load = t.elapsed().as_secs_f64();
    drop(loaded);
    report.row(
        SECTION,
        &label,
        "table read+decode",
        "s",
        &[t_decode],
        "no validation",
    );
    report.row(
        SECTION,
        &label,
        "meta::load_table",
        "s",
        &[t_load],
        "read+decode+validate",
    );
    report.check(
        SECTION,
        format!("{label}: decoded {decoded} entries"),
        decoded as u64 == n,
    );
    // First open of the synthetic table, then a real clean shutdown.
    let t = Instant::now();
    let e = Engine::open(src.clone(), cdev.clone(), cfg.clone())?;
    let t_open1 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    e.shutdown(false)?;
    let t_save = t.elapsed().as_secs_f64();
    drop(e);
    drop((src, cdev));
    report.row(
        SECTION,
        &label,
        "first open",
        "s",
        &[t_open1],
        "synthetic table",
    );
    report.row(SECTION, &label, "shutdown (save table)", "s", &[t_save], "");
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    for _ in 0..children {
        let out = Command::new(&exe)
            .arg(CHILD_ARG)
            .arg(&cpath)
            .arg(&spath)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "open child failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: ChildResult = serde_json::from_str(line.trim())?;
        results.push(r);
    }
    let open: Vec<f64> = results.iter().map(|r| r.open_s).collect();
    let load: Vec<f64> = results.iter().map(|r| r.load_ms as f64 / 1e3).collect();
    let install: Vec<f64> = results
        .iter()
        .map(|r| r.open_s - r.load_ms as f64 / 1e3)
        .collect();
    let rss: Vec<f64> = results
        .iter()
        .map(|r| r.rss_after.saturating_sub(r.rss_before) as f64 / n as f64)
        .collect();
    let peak: Vec<f64> = results
        .iter()
        .map(|r| r.hwm_after.saturating_sub(r.rss_before) as f64 / n as f64)
        .collect();
    let shut: Vec<f64> = results.iter().map(|r| r.shutdown_s).collect();
    let note = format!("{} fresh processes, cache O_DIRECT", results.len());
    report.row(
        SECTION,
        &label,
        "open after clean shutdown",
        "s",
        &open,
        note,
    );
    report.row(
        SECTION,
        &label,
        "  of which open_cache (load_ms)",
        "s",
        &load,
        "superblock+table+validate",
    );
    report.row(
        SECTION,
        &label,
        "  of which install+threads",
        "s",
        &install,
        "open - load_ms",
    );
    report.row(
        SECTION,
        &label,
        "shutdown (save table)",
        "s",
        &shut,
        "in child",
    );
    report.row(
        SECTION,
        &label,
        "RSS delta per block",
        "B",
        &rss,
        "statm after - before open",
    );
    report.row(
        SECTION,
        &label,
        "peak RSS delta per block",
        "B",
        &peak,
        "VmHWM - RSS before",
    );
    if let Some(r) = results.first() {
        report.row(
            SECTION,
            &label,
            "ram_bytes_per_block()",
            "B",
            &[r.ram_bytes_per_block],
            "engine's own estimate",
        );
    }
    for (i, r) in results.iter().enumerate() {
        report.check(
            SECTION,
            format!(
                "{label} child {i}: clean {}, entries_loaded {} (want {filled})",
                r.clean, r.entries_loaded
            ),
            r.clean && r.entries_loaded == filled,
        );
    }
    Ok(())
}

pub fn run(opts: &Opts, report: &mut Report) -> R<()> {
    one_size(report, 1 << 20, if opts.quick { 1 } else { 3 })?;
    if !opts.quick {
        one_size(report, 16 << 20, 2)?;
    }
    Ok(())
}
