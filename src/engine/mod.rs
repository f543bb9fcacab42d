//! The block cache engine. It knows nothing of virtio: callers read and write
//! byte ranges of the virtual disk (the source image's size) and the engine
//! serves them from the cache device and the source.

mod bufpool;
mod commit;
mod core;
pub mod crashstate;
mod direct;
mod durable;
mod frames;
pub mod geometry;
pub mod meta;
pub mod mode;
mod open;
pub mod policy;
mod read;
mod readahead;
mod shard;
pub mod stats;
mod store;
mod write;
mod writeback;

pub use direct::{DirectBufs, DirectIo, Extent};
pub use geometry::{Geometry, GeometryError, GeometryRequest};
pub use mode::WriteMode;
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

/// Default [`WritebackConfig::idle_drain_after`].
pub const DEFAULT_IDLE_DRAIN_AFTER: Duration = Duration::from_secs(10);

/// Write-back tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Background writeback starts when this percentage of frames is dirty. Default 50.
    pub high_watermark_pct: u8,
    /// Background writeback stops when dirty frames fall to this percentage. Default 25.
    pub low_watermark_pct: u8,
    /// Largest coalesced source write. Default 4 MiB.
    pub max_run_bytes: u64,
    /// Most runs a writeback pass has in flight to the source at once (each
    /// on a writer thread), while it is not throttled; at least 1. Default
    /// 16: a source with latency L takes at most 16/L runs per second, and
    /// random dirty blocks make runs of one block.
    pub max_inflight_runs: usize,
    /// Once no request has come for this long, background writeback cleans
    /// every dirty block (below the low watermark too), and stops as soon
    /// as a request comes. `None`: dirty blocks below the high watermark
    /// stay until a flush, a mode change or shutdown writes them back.
    /// Default 10 s. What dm-cache's smq policy does when the device is
    /// idle: it keeps the window in which a lost cache device loses data
    /// short.
    pub idle_drain_after: Option<Duration>,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig {
            high_watermark_pct: 50,
            low_watermark_pct: 25,
            max_run_bytes: 4 << 20,
            max_inflight_runs: 16,
            idle_drain_after: Some(DEFAULT_IDLE_DRAIN_AFTER),
        }
    }
}

/// Everything the engine needs besides its two devices.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub geometry: GeometryRequest,
    /// Write policy. With `None` the mode persisted on the cache device is
    /// used, or writeback for a new cache.
    pub mode: Option<WriteMode>,
    pub writeback: WritebackConfig,
    /// Threads that store fetched blocks into the cache. Default 2.
    pub store_workers: usize,
    /// Format the cache device even when it holds something that is not a
    /// vblkcache superblock and is not all zeros.
    pub format: bool,
    /// With `format`: format even a cache that holds dirty blocks (they are
    /// lost). Without it `format` refuses such a cache.
    pub discard_dirty: bool,
    /// Accept a source file other than the one the cache was last used with
    /// (the same image moved or copied): its clean entries are dropped, its
    /// dirty blocks kept.
    pub source_moved: bool,
    /// Directory (a tmpfs such as `/dev/shm`) for the crash-state file,
    /// which keeps the live mapping past a crash of the process (see
    /// [`crashstate`]); `None` keeps it in private memory only.
    pub crash_state_dir: Option<std::path::PathBuf>,
    /// Largest window of sequential readahead on read misses, in bytes
    /// (rounded down to whole blocks, at least one); 0 (the default) turns
    /// it off (see [`readahead`]).
    pub readahead: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            geometry: GeometryRequest::default(),
            mode: None,
            writeback: WritebackConfig::default(),
            store_workers: 2,
            format: false,
            discard_dirty: false,
            source_moved: false,
            crash_state_dir: None,
            readahead: 0,
        }
    }
}

impl EngineConfig {
    /// The default configuration with blocks of `block_size` bytes and,
    /// if given, this write mode (the rest of the geometry is derived).
    pub fn with_block_size(block_size: u32, mode: Option<WriteMode>) -> EngineConfig {
        EngineConfig {
            geometry: GeometryRequest {
                block_size: Some(block_size),
                ..GeometryRequest::default()
            },
            mode,
            ..EngineConfig::default()
        }
    }
}

/// Engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("source device: {0}")]
    Source(#[source] DeviceError),
    #[error("cache device: {0}")]
    Cache(#[source] DeviceError),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("--{param} {requested} conflicts with {persisted} recorded on cache device {device} (omit --{param}, or pass --format to discard the cache; it refuses while the cache holds dirty blocks)")]
    GeometryConflict {
        param: &'static str,
        requested: u64,
        persisted: u64,
        device: String,
    },
    #[error("cache device {device} holds data that is not a vblkcache cache; pass --format to overwrite it")]
    ForeignCache { device: String },
    #[error("cache device {device} belongs to a source of {recorded} bytes, but the source has {actual} bytes; use the original source, or --format to discard the cache")]
    SourceMismatch {
        device: String,
        recorded: u64,
        actual: u64,
    },
    #[error("cache device {device} holds {dirty} dirty blocks of another source file than {path} (its inode differs); start with the source it was used with, or pass --source-moved if {path} is that image moved or copied, or --format to discard the cache and its dirty blocks")]
    SourceChanged {
        device: String,
        path: String,
        dirty: u64,
    },
    #[error("cache device {device} holds {dirty} dirty blocks that are not on the source yet; --format would lose them: start without --format and write them back (`vblkcache flush`, or --writeback-on-exit), or pass --format --discard-dirty to lose them")]
    FormatDirty { device: String, dirty: u64 },
    #[error("source {device} is empty")]
    EmptySource { device: String },
    #[error("cache device {device}: {source}")]
    Meta {
        device: String,
        #[source]
        source: meta::MetaError,
    },
    #[error("cache device {device} was not shut down cleanly in write-back mode and this version cannot recover its dirty blocks; refusing to start (pass --format to discard the cache AND its unwritten data)")]
    Unclean { device: String },
    #[error("cannot use passthrough mode: the cache holds {dirty} dirty blocks (start in writeback mode and flush first)")]
    PassthroughDirty { dirty: u64 },
    #[error("request of {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{dirty} dirty blocks could not be written back")]
    DirtyRemain { dirty: u64 },
    #[error("the engine is shut down")]
    ShutDown,
    #[error("the metadata commit this flush joined failed (see the log)")]
    CommitFailed,
    #[error("{device}: a flush failed earlier, so writes since the last good flush may not be durable; every later flush fails (restart once the device is healthy)")]
    EarlierFlushFailed { device: String },
}

impl EngineError {
    /// True when the error comes from what the user asked for (geometry,
    /// conflicting options, wrong device) rather than from failing I/O.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            EngineError::Geometry(_)
                | EngineError::GeometryConflict { .. }
                | EngineError::ForeignCache { .. }
                | EngineError::SourceMismatch { .. }
                | EngineError::EmptySource { .. }
                | EngineError::SourceChanged { .. }
                | EngineError::FormatDirty { .. }
                | EngineError::PassthroughDirty { .. }
        )
    }
}

/// Progress of a whole-cache flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FlushProgress {
    /// Dirty blocks when the flush started (grows if writes add more).
    pub total: u64,
    /// Blocks written back so far.
    pub done: u64,
}

/// How the engine came up.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StartInfo {
    /// True when the cache device was freshly formatted.
    pub formatted: bool,
    /// True when the previous shutdown was clean (or the device is new).
    pub clean: bool,
    /// Mapping entries loaded from the cache device.
    pub entries_loaded: u64,
    /// Dirty entries among them.
    pub dirty_loaded: u64,
    /// Journal commits replayed after an unclean shutdown.
    pub commits_replayed: u64,
    /// Dirty blocks recovered after an unclean shutdown.
    pub dirty_recovered: u64,
    /// Clean entries dropped after an unclean shutdown (their data is on the source).
    pub clean_dropped: u64,
    /// After an unclean shutdown: `Some(dirty blocks)` when the mapping was
    /// recovered from the crashed run's crash-state file (see [`crashstate`]),
    /// `None` when from the journal alone.
    pub crash_state_recovered: Option<u64>,
    /// Time taken to open, recover and load the metadata, in milliseconds.
    pub load_ms: u64,
}

/// A point-in-time status of the engine, with named fields.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub mode: WriteMode,
    pub policy: &'static str,
    pub geometry: Geometry,
    pub sets: u64,
    pub source_size: u64,
    pub cache_device_size: u64,
    pub data_offset: u64,
    pub valid_blocks: u64,
    pub dirty_blocks: u64,
    /// read_hits / (read_hits + read_misses), 0 when nothing was read.
    pub hit_ratio: f64,
    /// RAM used by the mapping and the policy per cache block, in bytes.
    pub ram_bytes_per_block: f64,
    pub uptime_secs: f64,
    /// Metadata commits written to the journal since start.
    pub metadata_commits: u64,
    /// Journal checkpoints (full table writes) since start.
    pub metadata_checkpoints: u64,
    /// A flush of the cache device failed: every later flush fails until a
    /// restart (see `durable`).
    pub cache_flush_failed: bool,
    /// The same for the source.
    pub source_flush_failed: bool,
    pub start: StartInfo,
    pub stats: StatsSnapshot,
}

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

    /// Stops serving, waits for requests and background stores in flight,
    /// optionally writes back every dirty block, and persists the mapping with
    /// a clean-shutdown mark (also when the writeback failed: the blocks it
    /// left dirty are saved dirty; not after a failed flush, see `durable`).
    /// Later requests fail with `ShutDown`. Calling it
    /// again does nothing.
    pub fn shutdown(&self, writeback: bool) -> Result<(), EngineError> {
        if self.shut.swap(true, SeqCst) {
            return Ok(());
        }
        let c = &self.core;
        c.closed.store(true, SeqCst);
        while c.inflight.total() > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        // Readahead first: its last fetches hand their blocks to the store
        // queue, which is waited for next.
        c.close_readahead();
        c.readahead.wait_idle();
        c.store.wait_idle();
        self.stop_workers();
        let r = if writeback {
            c.flush_all(&mut |_| {})
        } else {
            Ok(())
        };
        // No pass runs any more: end the kept writer threads.
        c.wb_pool.stop();
        // Blocks a failed writeback left dirty are persisted dirty: the
        // mapping is saved whether or not the writeback succeeded.
        let saved = self.persist();
        match r {
            Err(e) => {
                if let Err(p) = saved {
                    log::error!("cache metadata not saved: {p}");
                }
                Err(e)
            }
            Ok(()) => saved,
        }
    }

    /// Stops the background threads and waits for them, persisting nothing:
    /// the cache device is left as a crash would leave it. For crash tests.
    pub fn halt(&self) {
        if self.shut.swap(true, SeqCst) {
            return;
        }
        self.core.closed.store(true, SeqCst);
        self.stop_workers();
        self.core.wb_pool.stop();
    }

    /// Tells the writeback and store threads to stop and joins them.
    fn stop_workers(&self) {
        let c = &self.core;
        {
            let mut s = c.wb_signal.lock().unwrap_or_else(|p| p.into_inner());
            s.stop = true;
            c.wb_cond.notify_all();
        }
        c.close_readahead();
        c.store.close();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }

    /// Writes the table and a clean superblock.
    fn persist(&self) -> Result<(), EngineError> {
        let c = &self.core;
        let meta_err = |e| EngineError::Meta {
            device: c.cache.name(),
            source: e,
        };
        // Data first: the table written next points at it. After a failed
        // flush nothing is persisted (`durable`): the next start recovers
        // from the last good commit.
        c.flush_cache()?;
        c.cache_written.store(false, SeqCst);
        // Frames written back whose pass has not flushed the source yet are
        // persisted clean below: the source must hold their data first.
        let written_back = (0..c.frames.frames()).any(|f| c.frames.get(f).srcpend());
        // A source whose flush failed may have lost writes that clean
        // entries stand for: then nothing is persisted either.
        if c.source_written.swap(false, SeqCst) | written_back | c.source_flush.failed() {
            c.flush_source()?;
        }
        let mut j = c.journal.lock().unwrap_or_else(|p| p.into_inner());
        let j = &mut *j;
        // The full table goes to the inactive copy; the superblock switches.
        let entries: Vec<u64> = (0..c.frames.frames())
            .map(|f| c.frames.get(f).persistent())
            .collect();
        // `j` changes only once everything is written, so that it always
        // describes what the durable superblock may point at.
        let mut sb = j.sb.clone();
        sb.table_copy ^= 1;
        meta::save_table(&*c.cache, &c.layout, sb.table_copy, &entries).map_err(meta_err)?;
        c.flush_cache()?;
        sb.clean = true;
        sb.mode = c.mode();
        // Read after the last source write and flush: the next start
        // compares it to tell whether something else wrote the source since.
        sb.source_id = c.source.identity();
        sb.commit_seq = j.seq + 1;
        sb.journal_pos = 0;
        // Both slots get the clean superblock (one after the other, each
        // flushed), so either copy alone still says "clean".
        let mut slot = j.slot;
        for _ in 0..2 {
            sb.seq += 1;
            slot = 1 - slot;
            c.write_superblock(&sb, slot)?;
        }
        j.seq = sb.commit_seq;
        j.sb = sb;
        j.slot = slot;
        // The cache is clean on its device now: no crash state is needed.
        if let Some(f) = c.frames.crash_file() {
            f.remove();
        }
        log::info!(
            "cache metadata saved: {} blocks in use, {} dirty",
            c.valid.load(SeqCst),
            c.dirty.load(SeqCst)
        );
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Without an explicit shutdown the threads are still told to stop;
        // the metadata is not written (the next start sees an unclean cache).
        let c = &self.core;
        c.closed.store(true, SeqCst);
        if let Ok(mut s) = c.wb_signal.lock() {
            s.stop = true;
            c.wb_cond.notify_all();
        }
        c.close_readahead();
        c.store.close();
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
