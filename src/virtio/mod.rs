//! The virtio-blk device on top of the engine: descriptor-chain parsing
//! ([`request`]), execution against the engine ([`execute`]), the config
//! space ([`config_space`]), the I/O thread pool ([`pool`]) and the
//! vhost-user backend ([`backend`]). The engine never sees virtio types; this
//! module is the only translation layer.

pub mod backend;
mod bounce;
pub mod config_space;
pub mod execute;
mod filemap;
mod fixed;
mod flushq;
mod inflight;
mod order;
pub mod pool;
pub mod request;
#[cfg(test)]
mod request_tests;
pub mod uring;

pub use backend::{BlkBackend, BlkBackendConfig, DRAIN_TIMEOUT};
pub use bounce::{free_huge_pages, staging_threshold};
pub use request::{BlkError, ParseError, Request, RequestKind};

/// The daemon's default `--bounce-min`: hits of 32 KiB and more are staged
/// in huge-page buffers (see `bounce`).
pub const DEFAULT_BOUNCE_MIN: usize = MIN_BOUNCE;
/// Smallest `--bounce-min`: the smallest staging buffer.
pub const MIN_BOUNCE: usize = 32 << 10;
/// Largest `--bounce-min`: one huge page.
pub const MAX_BOUNCE: usize = crate::device::AlignedBuf::HUGE_LEN;

/// Largest number of segments a request may have (advertised as `seg_max`).
pub const SEG_MAX: u32 = 254;
/// Largest segment the driver should build (advertised as `size_max`).
pub const SIZE_MAX: u32 = 64 * 1024;
/// Largest discard / write-zeroes segment, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / 512;

/// The device limits every request is checked against. These are exactly the
/// values advertised in the config space, so a well-behaved driver never
/// trips them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    /// Discard alignment hint (cache block size / 512); advisory only.
    pub discard_sector_alignment: u32,
    /// Logical block size in sectors (blk_size / 512); discard and
    /// write-zeroes ranges must be aligned to it.
    pub logical_block_sectors: u32,
    pub read_only: bool,
}

impl DeviceLimits {
    /// Limits for a disk of `size` bytes served from a cache with
    /// `cache_block_size`-byte blocks.
    pub fn new(size: u64, cache_block_size: u32, read_only: bool) -> Self {
        DeviceLimits {
            capacity_sectors: size / 512,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: 1,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: 1,
            discard_sector_alignment: (cache_block_size / 512).max(1),
            logical_block_sectors: 1,
            read_only,
        }
    }

    /// Largest total data length of one request: `size_max * seg_max`.
    pub fn max_data_len(&self) -> u64 {
        u64::from(self.size_max) * u64::from(self.seg_max)
    }

    /// Longest accepted descriptor chain: header, `seg_max` data, status.
    pub fn max_chain_len(&self) -> u32 {
        self.seg_max.saturating_add(2)
    }
}
