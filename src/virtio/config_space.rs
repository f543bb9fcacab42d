//! The virtio-blk configuration space (`struct virtio_blk_config`).
//!
//! It is rebuilt on every read so `wce` always reflects the engine's current
//! write mode. The only writable field is `wce` (VIRTIO_BLK_F_CONFIG_WCE).

use super::DeviceLimits;
use std::mem::{offset_of, size_of};
use virtio_bindings::bindings::virtio_blk::virtio_blk_config;
use vm_memory::ByteValued;

/// `virtio_blk_config` as bytes.
#[repr(transparent)]
#[derive(Clone, Copy, Default)]
struct BlkConfig(virtio_blk_config);

// SAFETY: virtio_blk_config is `repr(C, packed)` and made only of integers and
// arrays of integers, so it has no padding and every bit pattern is valid.
unsafe impl ByteValued for BlkConfig {}

/// Offset of the `wce` byte.
pub const WCE_OFFSET: u32 = offset_of!(virtio_blk_config, wce) as u32;

/// Config-space errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("config write of {len} bytes at offset {offset}: only the 1-byte wce field at offset {WCE_OFFSET} is writable")]
    ReadOnlyField { offset: u32, len: usize },
    #[error("config write sets wce to {0}, expected 0 or 1")]
    BadWce(u8),
}

/// Builds the config space image.
pub fn build(limits: &DeviceLimits, num_queues: u16, wce: bool) -> Vec<u8> {
    let c = virtio_blk_config {
        capacity: limits.capacity_sectors.to_le(),
        size_max: limits.size_max.to_le(),
        seg_max: limits.seg_max.to_le(),
        blk_size: (limits.logical_block_sectors * 512).to_le(),
        // One logical block per physical block; the cache block is an
        // optimisation hint, given as the optimal I/O size.
        physical_block_exp: 0,
        alignment_offset: 0,
        min_io_size: 1u16.to_le(),
        opt_io_size: limits.discard_sector_alignment.to_le(),
        wce: u8::from(wce),
        num_queues: num_queues.to_le(),
        max_discard_sectors: limits.max_discard_sectors.to_le(),
        max_discard_seg: limits.max_discard_seg.to_le(),
        discard_sector_alignment: limits.discard_sector_alignment.to_le(),
        max_write_zeroes_sectors: limits.max_write_zeroes_sectors.to_le(),
        max_write_zeroes_seg: limits.max_write_zeroes_seg.to_le(),
        write_zeroes_may_unmap: 1,
        ..Default::default()
    };
    BlkConfig(c).as_slice().to_vec()
}

/// Reads `size` bytes at `offset` of the config space. Bytes past the end of
/// the structure read as zero (the front-end may know a longer layout); a
/// range that overflows returns an empty vector, which the vhost-user layer
/// reports as a failed GET_CONFIG.
pub fn read(image: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let (Ok(off), Ok(len)) = (usize::try_from(offset), usize::try_from(size)) else {
        return Vec::new();
    };
    let Some(end) = off.checked_add(len) else {
        return Vec::new();
    };
    // The vhost-user message caps config reads at 256 bytes.
    if end > 256 {
        return Vec::new();
    }
    let mut out = vec![0u8; len];
    if off < image.len() {
        let n = image.len().min(end) - off;
        out[..n].copy_from_slice(&image[off..off + n]);
    }
    out
}

/// Interprets a config write; returns the new `wce` value.
pub fn parse_write(offset: u32, buf: &[u8]) -> Result<bool, ConfigSpaceError> {
    if offset != WCE_OFFSET || buf.len() != 1 {
        return Err(ConfigSpaceError::ReadOnlyField {
            offset,
            len: buf.len(),
        });
    }
    match buf[0] {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(ConfigSpaceError::BadWce(v)),
    }
}

/// Size of the structure.
pub const CONFIG_LEN: usize = size_of::<virtio_blk_config>();

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn layout_matches_the_spec_offsets() {
        let limits = DeviceLimits::new(64 << 20, 64 * 1024, false);
        let img = build(&limits, 4, true);
        assert_eq!(img.len(), CONFIG_LEN);
        // Offsets from the virtio spec (5.2.4).
        assert_eq!(
            u64::from_le_bytes(img[0..8].try_into().unwrap()),
            (64 << 20) / 512
        );
        assert_eq!(u32_at(&img, 8), limits.size_max);
        assert_eq!(u32_at(&img, 12), limits.seg_max);
        assert_eq!(u32_at(&img, 20), 512); // blk_size
        assert_eq!(img[32], 1); // wce
        assert_eq!(WCE_OFFSET, 32);
        assert_eq!(u16::from_le_bytes(img[34..36].try_into().unwrap()), 4);
        assert_eq!(u32_at(&img, 36), MAX_SECTORS);
        assert_eq!(u32_at(&img, 40), 1); // max_discard_seg
        assert_eq!(u32_at(&img, 44), 128); // 64K / 512
        assert_eq!(u32_at(&img, 48), MAX_SECTORS);
        assert_eq!(u32_at(&img, 52), 1);
        assert_eq!(img[56], 1); // write_zeroes_may_unmap
        let off = build(&limits, 4, false);
        assert_eq!(off[32], 0);
    }

    const MAX_SECTORS: u32 = super::super::MAX_DISCARD_SECTORS;

    #[test]
    fn reads_are_bounded_and_padded() {
        let img = build(&DeviceLimits::new(1 << 20, 4096, false), 1, false);
        assert_eq!(read(&img, 0, 8), img[0..8].to_vec());
        let tail = read(&img, (CONFIG_LEN - 4) as u32, 16);
        assert_eq!(tail.len(), 16);
        assert_eq!(&tail[..4], &img[CONFIG_LEN - 4..]);
        assert!(tail[4..].iter().all(|b| *b == 0));
        assert!(read(&img, u32::MAX, 16).is_empty());
        assert!(read(&img, 200, 100).is_empty());
    }

    #[test]
    fn only_wce_is_writable() {
        assert_eq!(parse_write(WCE_OFFSET, &[1]), Ok(true));
        assert_eq!(parse_write(WCE_OFFSET, &[0]), Ok(false));
        assert_eq!(
            parse_write(WCE_OFFSET, &[2]),
            Err(ConfigSpaceError::BadWce(2))
        );
        assert!(parse_write(0, &[0; 8]).is_err());
        assert!(parse_write(WCE_OFFSET, &[1, 0]).is_err());
    }
}
