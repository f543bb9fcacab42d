//! The block cache engine. It knows nothing of virtio: callers read and write
//! byte ranges of the virtual disk (the source image's size) and the engine
//! serves them from the cache device and the source.

pub mod geometry;
pub mod mode;
pub mod stats;

pub use geometry::{Geometry, GeometryError, GeometryRequest};
pub use mode::WriteMode;
pub use stats::{Stats, StatsSnapshot};

use crate::device::{BlockDevice, DeviceError};
use std::sync::Arc;
use std::time::Instant;

/// Write-back tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackConfig {
    /// Background writeback starts when this percentage of frames is dirty. Default 50.
    pub high_watermark_pct: u8,
    /// Background writeback stops when dirty frames fall to this percentage. Default 25.
    pub low_watermark_pct: u8,
    /// Largest coalesced source write. Default 4 MiB.
    pub max_run_bytes: u64,
}

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig {
            high_watermark_pct: 50,
            low_watermark_pct: 25,
            max_run_bytes: 4 << 20,
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            geometry: GeometryRequest::default(),
            mode: None,
            writeback: WritebackConfig::default(),
            store_workers: 2,
            format: false,
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
    #[error("request of {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("cannot switch to {to}: {dirty} dirty blocks could not be written back")]
    DirtyRemain { to: WriteMode, dirty: u64 },
    #[error("the engine is shut down")]
    ShutDown,
}

/// Progress of a whole-cache flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FlushProgress {
    /// Dirty blocks when the flush started.
    pub total: u64,
    /// Blocks written back so far.
    pub done: u64,
}

/// How the engine came up.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StartInfo {
    /// True when the cache device was freshly formatted.
    pub formatted: bool,
    /// True when the previous shutdown was clean.
    pub clean: bool,
    /// Mapping entries loaded from the cache device.
    pub entries_loaded: u64,
    /// Dirty entries among them.
    pub dirty_loaded: u64,
    /// Time taken to load the metadata, in milliseconds.
    pub load_ms: u64,
}

/// A point-in-time status of the engine, with named fields.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub mode: WriteMode,
    pub geometry: Geometry,
    pub source_size: u64,
    pub cache_device_size: u64,
    pub valid_blocks: u64,
    pub dirty_blocks: u64,
    pub hit_ratio: f64,
    pub uptime_secs: f64,
    pub start: StartInfo,
    pub stats: StatsSnapshot,
}

/// The cache engine.
///
/// TEMPORARY: this first cut forwards every request to the source so the
/// layers above can be built against the final API; the set-associative cache
/// replaces it.
pub struct Engine {
    source: Arc<dyn BlockDevice>,
    cache: Arc<dyn BlockDevice>,
    geometry: Geometry,
    mode: std::sync::Mutex<WriteMode>,
    stats: Stats,
    started: Instant,
    start: StartInfo,
}

impl Engine {
    /// Opens (or formats) the cache device and loads its metadata.
    pub fn open(
        source: Arc<dyn BlockDevice>,
        cache: Arc<dyn BlockDevice>,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let blocks = cfg
            .geometry
            .cache_blocks
            .unwrap_or((cache.size() / u64::from(cfg.geometry.block_size)).max(1));
        let geometry = Geometry::resolve(&cfg.geometry, blocks)?;
        Ok(Engine {
            source,
            cache,
            geometry,
            mode: std::sync::Mutex::new(cfg.mode.unwrap_or(WriteMode::Writeback)),
            stats: Stats::default(),
            started: Instant::now(),
            start: StartInfo::default(),
        })
    }

    /// Size of the virtual disk (the source image) in bytes.
    pub fn size(&self) -> u64 {
        self.source.size()
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        self.check(offset, buf.len() as u64)?;
        self.source.read_at(buf, offset).map_err(EngineError::Source)
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), EngineError> {
        self.check(offset, buf.len() as u64)?;
        self.source.write_at(buf, offset).map_err(EngineError::Source)
    }

    pub fn flush(&self) -> Result<(), EngineError> {
        self.source.flush().map_err(EngineError::Source)
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check(offset, len)?;
        self.source.discard(offset, len).map_err(EngineError::Source)
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check(offset, len)?;
        self.source.write_zeroes(offset, len).map_err(EngineError::Source)
    }

    pub fn mode(&self) -> WriteMode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Switches the write policy; leaving writeback first cleans every block.
    pub fn set_mode(&self, mode: WriteMode) -> Result<(), EngineError> {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
        Ok(())
    }

    /// Writes back every dirty block, reporting progress.
    pub fn flush_all(&self, progress: &mut dyn FnMut(FlushProgress)) -> Result<(), EngineError> {
        progress(FlushProgress { total: 0, done: 0 });
        self.flush()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    pub fn reset_stats(&self) {
        self.stats.reset()
    }

    pub fn status(&self) -> Status {
        Status {
            mode: self.mode(),
            geometry: self.geometry,
            source_size: self.size(),
            cache_device_size: self.cache.size(),
            valid_blocks: 0,
            dirty_blocks: 0,
            hit_ratio: 0.0,
            uptime_secs: self.started.elapsed().as_secs_f64(),
            start: self.start.clone(),
            stats: self.stats(),
        }
    }

    /// Stops background work and persists metadata. With `writeback`, dirty
    /// blocks are written back to the source first.
    pub fn shutdown(&self, writeback: bool) -> Result<(), EngineError> {
        if writeback {
            self.flush_all(&mut |_| {})?;
        }
        self.flush()
    }
}
