//! What the engine is opened with: its configuration and write-back tuning.

use super::{GeometryRequest, WriteMode};
use std::time::Duration;

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
    /// [`crashstate`](super::crashstate)); `None` keeps it in private memory only.
    pub crash_state_dir: Option<std::path::PathBuf>,
    /// Largest window of sequential readahead on read misses, in bytes
    /// (rounded down to whole blocks, at least one); 0 (the default) turns
    /// it off (see `readahead`).
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
