//! The block cache engine. It knows nothing of virtio: callers read and write
//! byte ranges of the virtual disk (the source image's size) and the engine
//! serves them from the cache device and the source.

mod bufpool;
mod commit;
mod config;
mod core;
pub mod crashstate;
mod direct;
mod durable;
mod error;
mod frames;
pub mod geometry;
mod lifecycle;
pub mod meta;
pub mod mode;
mod open;
pub mod policy;
mod read;
mod readahead;
mod report;
mod shard;
pub mod stats;
mod store;
mod write;
mod writeback;

pub use config::{EngineConfig, WritebackConfig, DEFAULT_IDLE_DRAIN_AFTER};
pub use direct::{DirectBufs, DirectIo, Extent};
pub use error::EngineError;
pub use geometry::{Geometry, GeometryError, GeometryRequest};
pub use mode::WriteMode;
pub use report::{FlushProgress, StartInfo, Status};
pub use stats::{Stats, StatsSnapshot};

use crate::device::{BlockDevice, DeviceError};
use core::Core;
use shard::ShardedCount;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Idle one-block fetch buffers kept for reuse by read misses (64 of
/// 64 KiB blocks is 4 MiB).
const FETCH_BUFS: usize = 64;

/// The cache engine: a set-associative cache of `source` on `cache`.
///
/// All request methods take `&self` and may be called from many threads.
pub struct Engine {
    core: Arc<Core>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: Instant,
    start: StartInfo,
    shut: AtomicBool,
}

/// Decrements the in-flight counter when a request ends.
struct InFlight<'a>(&'a ShardedCount);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Engine {
    /// Opens the cache device: formats it when blank (or with
    /// `cfg.format`), otherwise loads its metadata and checks that it matches
    /// the request and the source.
    pub fn open(
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let opened = open::open_cache(&*source, &*cache, &cfg)?;
        let layout = opened.sb.layout;
        // Back the frame area with storage now, so that storing a fetched
        // block overwrites allocated space instead of filling a hole (on a
        // sparse ext4 file every such write allocated under the exclusive
        // inode lock: about 3,300 64 KiB writes/s however many threads,
        // against 6,000 with 2 threads and 18,000 with 16 when allocated).
        let frames_len = layout.geometry.cache_blocks * u64::from(layout.geometry.block_size);
        if let Err(e) = cache.allocate(layout.data_offset, frames_len) {
            let why = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
            log::info!(
                "cache {}: frame area not preallocated: {e}{why}",
                cache.name()
            );
        }
        let g = layout.geometry;
        let policy = policy::by_name("lru", g.cache_blocks).ok_or(EngineError::ShutDown)?;
        let store = store::StoreQueue::new(256);
        let core = Arc::new(Core {
            source,
            cache,
            layout,
            bs: u64::from(layout.geometry.block_size),
            source_size: opened.sb.source_size,
            frames: frame_table(&cfg, &opened.sb),
            policy,
            mode: AtomicU8::new(opened.sb.mode.to_u8()),
            stats: Stats::default(),
            valid: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            cache_written: AtomicBool::new(false),
            source_written: AtomicBool::new(false),
            cache_flush: durable::StickyFlush::default(),
            source_flush: durable::StickyFlush::default(),
            inflight: ShardedCount::default(),
            wb_writers: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            wb: cfg.writeback,
            wb_signal: Mutex::new(core::WritebackSignal::default()),
            wb_cond: Condvar::new(),
            wb_bufs: writeback::RunBuffers::default(),
            wb_pool: writeback::WriterPool::default(),
            wb_settle: Mutex::new(()),
            store,
            readahead: readahead::ReadAhead::new(readahead_blocks(cfg.readahead, g.block_size)),
            fetch_bufs: bufpool::BufPool::new(layout.geometry.block_size as usize, FETCH_BUFS),
            commit_queue: Mutex::new(Vec::new()),
            rerecord: AtomicBool::new(false),
            group: Mutex::new(commit::GroupCommit::default()),
            group_cond: Condvar::new(),
            journal: Mutex::new(commit::JournalState {
                pos: opened.sb.journal_pos,
                seq: opened.sb.commit_seq,
                sb: opened.sb.clone(),
                slot: opened.slot,
                commits: 0,
                checkpoints: 0,
            }),
        });
        // Install the loaded mapping set by set: one stripe lock per set and
        // one counter update at the end (validated entries sit in their set).
        let (mut valid, mut dirty_n) = (0u64, 0u64);
        let assoc = u64::from(layout.geometry.assoc);
        for (set, chunk) in opened
            .entries
            .chunks(layout.geometry.assoc as usize)
            .enumerate()
        {
            let set = set as u64;
            let mut guard = core.lock(set);
            for (w, &e) in chunk.iter().enumerate() {
                if e & frames::VALID == 0 {
                    continue;
                }
                let f = set * assoc + w as u64;
                let dirty = e & frames::DIRTY != 0;
                // A loaded dirty entry is committed dirty already (it is in
                // the table on the cache device).
                let entry =
                    frames::Entry::new(e & frames::BLOCK_MASK, dirty, frames::FrameState::Idle)
                        .with_flag(frames::CDIRTY, dirty);
                core.frames.set(f, entry);
                core.policy.on_insert(f, &mut guard.clock);
                valid += 1;
                dirty_n += u64::from(dirty);
            }
        }
        core.valid.store(valid, SeqCst);
        core.dirty.store(dirty_n, SeqCst);
        // Only now, with the run's whole mapping in it (see `crashstate`).
        if let Some(f) = core.frames.crash_file() {
            match f.publish() {
                Ok(()) => log::info!("crash state kept in {}", f.path().display()),
                Err(e) => warn_no_crash_state(&e),
            }
        }
        let mut threads = Vec::new();
        for i in 0..cfg.store_workers.max(1) {
            let c = core.clone();
            threads.push(spawn(&format!("vbc-store{i}"), move || {
                store::run_store_worker(c)
            })?);
        }
        if core.readahead.enabled() {
            for i in 0..readahead::WORKERS {
                let c = core.clone();
                threads.push(spawn(&format!("vbc-ra{i}"), move || {
                    readahead::run_readahead_worker(c)
                })?);
            }
        }
        let c = core.clone();
        threads.push(spawn("vbc-writeback", move || writeback::run_writeback(c))?);
        log::info!(
            "cache open: {} blocks of {} bytes, {} loaded ({} dirty), mode {}",
            g.cache_blocks,
            g.block_size,
            opened.start.entries_loaded,
            opened.start.dirty_loaded,
            opened.sb.mode
        );
        Ok(Engine {
            core,
            threads: Mutex::new(threads),
            started: Instant::now(),
            start: opened.start,
            shut: AtomicBool::new(false),
        })
    }

    /// Size of the virtual disk (the source image) in bytes.
    pub fn size(&self) -> u64 {
        self.core.source_size
    }

    /// The geometry in use.
    pub fn geometry(&self) -> Geometry {
        self.core.layout.geometry
    }

    fn begin(&self, offset: u64, len: u64) -> Result<InFlight<'_>, EngineError> {
        self.core.inflight.inc();
        let guard = InFlight(&self.core.inflight);
        if self.core.closed.load(SeqCst) {
            return Err(EngineError::ShutDown);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(guard),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of the virtual disk.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let _g = self.begin(offset, buf.len() as u64)?;
        let s = self.core.stats.here();
        s.reads.fetch_add(1, Relaxed);
        s.bytes_read.fetch_add(buf.len() as u64, Relaxed);
        let r = self.core.read(offset, buf);
        if r.is_err() {
            self.core.stats.here().errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// Writes `buf` at `offset` of the virtual disk. Durable after `flush`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        let _g = self.begin(offset, buf.len() as u64)?;
        let s = self.core.stats.here();
        s.writes.fetch_add(1, Relaxed);
        s.bytes_written.fetch_add(buf.len() as u64, Relaxed);
        self.core.write(offset, buf)
    }

    /// Makes every completed write durable: flushes the cache device and the
    /// source, each only if it was written since its last flush, and commits
    /// the changed dirty mappings (no metadata I/O when none changed).
    pub fn flush(&self) -> Result<(), EngineError> {
        self.flush_requests(1)
    }

    /// As [`Engine::flush`], for `n` guest FLUSHes received before this
    /// call, served together by one commit (each is counted in the
    /// statistics). A commit that starts after the call covers every write
    /// completed before any of them.
    pub fn flush_requests(&self, n: u64) -> Result<(), EngineError> {
        let _g = self.begin(0, 0)?;
        self.core.stats.here().flushes.fetch_add(n, Relaxed);
        let r = self.core.commit();
        if r.is_err() {
            self.core.stats.here().errors.fetch_add(1, Relaxed);
        }
        r
    }

    /// Discards a range: reads of it return zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let _g = self.begin(offset, len)?;
        self.core.stats.here().discards.fetch_add(1, Relaxed);
        self.core.zero_range(offset, len, true)
    }

    /// Sets a range to zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let _g = self.begin(offset, len)?;
        self.core.stats.here().discards.fetch_add(1, Relaxed);
        self.core.zero_range(offset, len, false)
    }

    pub fn mode(&self) -> WriteMode {
        self.core.mode()
    }

    /// Switches the write policy at run time. Leaving writeback first switches
    /// to writethrough (no new dirty blocks), waits for writes already in
    /// flight, and writes every dirty block back; if that fails the mode goes
    /// back to writeback and the error is returned.
    pub fn set_mode(&self, mode: WriteMode) -> Result<(), EngineError> {
        let c = &self.core;
        let old = c.mode();
        if old == mode {
            return Ok(());
        }
        if old == WriteMode::Writeback {
            c.mode.store(WriteMode::Writethrough.to_u8(), SeqCst);
            while c.wb_writers.load(SeqCst) > 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
            if let Err(e) = c.flush_all(&mut |_| {}) {
                c.mode.store(WriteMode::Writeback.to_u8(), SeqCst);
                return Err(e);
            }
        }
        c.mode.store(mode.to_u8(), SeqCst);
        log::info!("write mode changed from {old} to {mode}");
        Ok(())
    }

    /// Writes back every dirty block and flushes the source, reporting progress.
    pub fn flush_all(&self, progress: &mut dyn FnMut(FlushProgress)) -> Result<(), EngineError> {
        self.core.flush_all(progress)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.core.stats.snapshot()
    }

    pub fn reset_stats(&self) {
        self.core.stats.reset()
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.core.dirty.load(SeqCst)
    }

    pub fn valid_blocks(&self) -> u64 {
        self.core.valid.load(SeqCst)
    }

    /// RAM per cache block used by the mapping and the policy, in bytes.
    pub fn ram_bytes_per_block(&self) -> f64 {
        self.core.frames.bytes_per_frame() + self.core.policy.bytes_per_frame() as f64
    }

    pub fn status(&self) -> Status {
        let stats = self.stats();
        let lookups = stats.read_hits + stats.read_misses;
        Status {
            mode: self.mode(),
            policy: self.core.policy.name(),
            geometry: self.geometry(),
            sets: self.geometry().sets(),
            source: self.core.source.name(),
            source_identity: self.core.source.identity().map(|i| i.to_string()),
            cache_device: self.core.cache.name(),
            source_size: self.size(),
            cache_device_size: self.core.cache.size(),
            data_offset: self.core.layout.data_offset,
            valid_blocks: self.valid_blocks(),
            dirty_blocks: self.dirty_blocks(),
            hit_ratio: if lookups == 0 {
                0.0
            } else {
                stats.read_hits as f64 / lookups as f64
            },
            ram_bytes_per_block: self.ram_bytes_per_block(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            metadata_commits: self.core.journal.lock().map(|j| j.commits).unwrap_or(0),
            metadata_checkpoints: self.core.journal.lock().map(|j| j.checkpoints).unwrap_or(0),
            cache_flush_failed: self.core.cache_flush.failed(),
            source_flush_failed: self.core.source_flush.failed(),
            start: self.start.clone(),
            stats,
        }
    }
}

/// The frame table: in a new crash-state file when the configuration asks
/// for one and it can be made, in private memory otherwise (said once).
fn frame_table(cfg: &EngineConfig, sb: &meta::Superblock) -> frames::FrameTable {
    let g = sb.layout.geometry;
    if let Some(dir) = &cfg.crash_state_dir {
        let made = crashstate::boot_id().and_then(|boot| {
            crashstate::CrashFile::create(dir, &crashstate::Header::for_run(sb, boot))
        });
        match made {
            Ok(file) => return frames::FrameTable::in_crash_file(file, g.sets()),
            Err(e) => warn_no_crash_state(&e),
        }
    }
    frames::FrameTable::new(g.cache_blocks, g.sets())
}

/// The readahead window in blocks for `bytes` (see
/// [`EngineConfig::readahead`]).
fn readahead_blocks(bytes: u64, block_size: u32) -> u64 {
    match bytes {
        0 => 0,
        b => (b / u64::from(block_size.max(1))).max(1),
    }
}

fn warn_no_crash_state(e: &crashstate::CrashStateError) {
    log::warn!(
        "no crash state ({e}): a crash of the daemon will lose the write-back writes completed \
         since the guest's last flush"
    );
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, EngineError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| {
            EngineError::Cache(DeviceError::Io {
                op: crate::device::IoOp::Open,
                offset: 0,
                len: 0,
                name: format!("thread {name}"),
                source: e,
            })
        })
}

impl BlockDevice for Engine {
    fn size(&self) -> u64 {
        Engine::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.read(offset, buf).map_err(to_device_error)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.write(offset, buf).map_err(to_device_error)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Engine::flush(self).map_err(to_device_error)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        Engine::discard(self, offset, len).map_err(to_device_error)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        Engine::write_zeroes(self, offset, len).map_err(to_device_error)
    }
    fn name(&self) -> String {
        format!("vblkcache({})", self.core.source.name())
    }
}

fn to_device_error(e: EngineError) -> DeviceError {
    match e {
        EngineError::Source(d) | EngineError::Cache(d) => d,
        other => DeviceError::Io {
            op: crate::device::IoOp::Read,
            offset: 0,
            len: 0,
            name: String::from("engine"),
            source: std::io::Error::other(other.to_string()),
        },
    }
}
