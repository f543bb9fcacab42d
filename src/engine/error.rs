//! The engine's errors.

use super::{meta, GeometryError};
use crate::device::DeviceError;

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
    #[error("cache device {device} holds {dirty} dirty blocks of another source than {path} (they belong to {recorded}; {path} is {now}); start with the source it was used with, or pass --source-moved if {path} is that image moved or copied, or --format to discard the cache and its dirty blocks")]
    SourceChanged {
        device: String,
        path: String,
        dirty: u64,
        /// The source recorded on the cache, and the one given now, as
        /// [`crate::device::DeviceIdentity`] prints them.
        recorded: String,
        now: String,
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
