//! What the engine reports: how it started, its status, and the progress
//! of a whole-cache flush.

use super::{Geometry, StatsSnapshot, WriteMode};

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
    /// recovered from the crashed run's crash-state file (see [`crashstate`](super::crashstate)),
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
    /// The source and cache devices as they name themselves (a path, with
    /// any wrapper such as `latency(...)` around it).
    pub source: String,
    /// Which file or block device the source is, as the cache records it
    /// (see [`crate::device::DeviceIdentity`]); `None` for a memory source.
    pub source_identity: Option<String>,
    pub cache_device: String,
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
